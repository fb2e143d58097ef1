-- istio-stats: Istio's standard request metrics, as Istio's stats filter records
-- them: istio_requests_total, istio_request_duration_milliseconds,
-- istio_request_bytes and istio_response_bytes, reporter "source" on the outbound
-- listener and "destination" on the inbound one, with Istio's labels.
--
-- Moonlet adds this filter to every chain (phase STATS, last). A LuaPlugin named
-- "istio-stats" replaces it, and then only that plugin records these metrics (a
-- plugin whose on_log does nothing turns them off). `moonlet plugins export DIR`
-- writes this file as a starting point; a fork in a file of another name may
-- `require("istio-stats")` and reuse `labels(info)`.
--
-- Where the values come from (moonlet.stats.info, docs/lua-api.md):
--   * this workload: --workload-name, --labels (app, version,
--     service.istio.io/canonical-name / -revision), --namespace, --cluster-id;
--   * the peer: the x-envoy-peer-metadata header another sidecar sent (the caller's
--     on the inbound side, the answering sidecar's on the outbound side), trusted
--     only over mutual TLS; "unknown" without it;
--   * principals: the mTLS identities (spiffe://...), "unknown" without mTLS.
--
-- Telemetry `metrics` (pluginConfig, compiled by Moonlet at config load from the
-- most specific Telemetry resource with a metrics section): `metrics` is the list of
-- overrides in order, {metric = "istio_requests_total" | nil (every metric), mode =
-- CLIENT_AND_SERVER | CLIENT | SERVER, disabled, tags = {{tag, op = "remove" |
-- "literal" | "attribute", value}}}. configure() folds them, per side and metric, into
-- a plan: the metric off, or the tag operations to apply to the standard labels.
--
-- Cost: per request, stats.key gives two integers that fix every label; the label
-- set is built (below, in Lua) only the first time a combination is seen, compiled
-- by stats.series into a native handle, and cached by the two integers in `cache`.
-- After that a request costs one native call, stats.log(cache, s): the key, the two
-- lookups cache[k1][k2] and stats.record, done in Swift; it gives the key back when
-- the cache has no handle for it. A tag override whose value is a request attribute
-- adds that attribute's value to the key (one stats.attr call per attribute and
-- request).
-- A fork that adds a label depending on something else (a request header, ...) must
-- add it to the cache key too.
local stats = {}
local S = moonlet.stats
local info, series, record, attr, log = S.info, S.series, S.record, S.attr, S.log

-- The four series of a label set, in stats.series' order.
local METRICS = { "istio_requests_total", "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes" }
local INBOUND = 1 << 33    -- stats.key's k2 carries the side in this bit

local UNKNOWN = "unknown"
local MAX_CACHED = 10000   -- label sets cached by this filter on one event loop

local cache = {}           -- k1 -> { k2 -> handle or false (refused) }
local cached = 0

-- Kubernetes service host "name.namespace.svc..." -> name, namespace.
local function service_parts(host, fallback_ns)
  local name, ns = host:match("^([^.]+)%.([^.]+)%.svc%.")
  if name then return name, ns end
  return host, fallback_ns or UNKNOWN
end

local function side(w, field)
  if w == nil then return UNKNOWN end
  return w[field] or UNKNOWN
end

-- The label set of one combination (Istio's names; see docs/operations.md).
function stats.labels(i)
  local me, peer = i.self, i.peer
  local src, dst
  if i.inbound then src, dst = peer, me else src, dst = me, peer end
  local service = i.service
  if i.inbound then
    service = me.canonical_service .. "." .. me.namespace .. ".svc.cluster.local"
  end
  local svc_name, svc_ns = service_parts(service, dst and dst.namespace)
  local src_principal = side(src, "principal")
  if i.inbound and peer == nil and i.peer_identity then src_principal = i.peer_identity.principal end
  return {
    reporter = i.inbound and "destination" or "source",
    source_workload = side(src, "workload"),
    source_workload_namespace = side(src, "namespace"),
    source_principal = src_principal,
    source_app = side(src, "app"),
    source_version = side(src, "version"),
    source_canonical_service = side(src, "canonical_service"),
    source_canonical_revision = side(src, "canonical_revision"),
    source_cluster = side(src, "cluster"),
    destination_workload = side(dst, "workload"),
    destination_workload_namespace = side(dst, "namespace"),
    destination_principal = side(dst, "principal"),
    destination_app = side(dst, "app"),
    destination_version = side(dst, "version"),
    destination_canonical_service = side(dst, "canonical_service"),
    destination_canonical_revision = side(dst, "canonical_revision"),
    destination_service = service,
    destination_service_name = svc_name,
    destination_service_namespace = svc_ns,
    destination_cluster = side(dst, "cluster"),
    request_protocol = i.protocol,
    response_code = tostring(i.code),
    grpc_response_status = i.grpc_status,
    response_flags = i.flags,
    -- Istio: what the destination knows of the connection; a source cannot know it.
    connection_security_policy = i.inbound and (i.mtls and "mutual_tls" or "none") or "unknown",
  }
end

--- configure: the Telemetry metrics overrides as a plan per side (conf.inbound,
--- conf.outbound; nil when nothing applies to that side): plan[m] for each of
--- METRICS is true (standard labels), false (not recorded) or the list of tag
--- operations in order; plan.attrs the attributes those operations read.
function stats.configure(c)
  -- on_log's first step, stats.log(cache, s), is all a request with a cached label
  -- set costs: the proxy makes that call natively (stats.logger, builtin only) and
  -- runs on_log only when it gives a key back.
  local conf = { shortcuts = { on_log = S.logger(), data = cache } }
  if type(c) ~= "table" or c.metrics == nil then return conf end
  for _, side in ipairs({ "inbound", "outbound" }) do
    local mode = side == "inbound" and "SERVER" or "CLIENT"
    local plan, any, attrs, seen = {}, false, {}, {}
    for m = 1, 4 do
      local off, ops = false, {}
      for _, o in ipairs(c.metrics) do
        if (o.metric == nil or o.metric == METRICS[m]) and (o.mode == nil or o.mode == "CLIENT_AND_SERVER" or o.mode == mode) then
          if o.disabled ~= nil then off = o.disabled end
          for _, t in ipairs(o.tags or {}) do
            ops[#ops + 1] = t
            if t.op == "attribute" and not seen[t.value] then seen[t.value] = true; attrs[#attrs + 1] = t.value end
          end
        end
      end
      if off then plan[m] = false; any = true
      elseif #ops > 0 then plan[m] = ops; any = true
      else plan[m] = true end
    end
    if any then plan.attrs = attrs; conf[side] = plan; conf.any = true end
  end
  return conf
end

-- The labels of one metric under a plan entry (a copy when it changes them).
local function apply(base, ops, s)
  local l = {}
  for k, v in pairs(base) do l[k] = v end
  for i = 1, #ops do
    local t = ops[i]
    if t.op == "remove" then l[t.tag] = nil
    elseif t.op == "literal" then l[t.tag] = t.value
    else l[t.tag] = attr(s, t.value) end
  end
  return l
end

local function make(s, plan)
  local base = stats.labels(info(s))
  if plan == nil then return series(base) or false end
  local per, on = {}, false
  for m = 1, 4 do
    local p = plan[m]
    if p == true then per[m] = base; on = true
    elseif p == false then per[m] = false
    else per[m] = apply(base, p, s); on = true end
  end
  if not on then return false end
  return series(per[1], per[2], per[3], per[4]) or false
end

local function handle_for(s, k1, k2, plan, ak)
  if cached >= MAX_CACHED then
    -- Emptied in place: the table is also conf.shortcuts.data.
    for k in pairs(cache) do cache[k] = nil end
    cached = 0
  end
  local h = make(s, plan)
  local t = cache[k1]
  if t == nil then t = {}; cache[k1] = t end
  if ak then
    local u = t[k2]
    if u == nil then u = {}; t[k2] = u end
    u[ak] = h
  else
    t[k2] = h
  end
  cached = cached + 1
  return h
end

--- on_log: runs once per stream when it ends; records it in Istio's request metrics.
function stats.on_log(s, conf)
  -- A label set seen before: recorded by this one call (k1 is nil then). Otherwise
  -- the stream's key, as stats.key(s) gives it.
  local k1, k2 = log(cache, s)
  if k1 == nil then return end
  local plan
  if conf and conf.any then
    if k2 >= INBOUND then plan = conf.inbound else plan = conf.outbound end
  end
  local t = cache[k1]
  local h = t and t[k2]
  local ak
  if plan and plan.attrs[1] then
    -- Overrides that read request attributes: their values are part of the key.
    local attrs = plan.attrs
    ak = attr(s, attrs[1])
    for i = 2, #attrs do ak = ak .. "\0" .. attr(s, attrs[i]) end
    h = h and h[ak]
  end
  if h == nil then h = handle_for(s, k1, k2, plan, ak) end
  if h then record(h, s) end
end

return stats
