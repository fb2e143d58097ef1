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
-- Cost: per request, stats.key gives two integers that fix every label; the label
-- set is built (below, in Lua) only the first time a combination is seen, compiled
-- by stats.series into a native handle, and cached by the two integers. After
-- that a request costs stats.key, two table lookups and stats.record.
-- A fork that adds a label depending on something else (a request header, ...) must
-- add it to the cache key too.
local stats = {}
local S = moonlet.stats
local key, info, series, record = S.key, S.info, S.series, S.record

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
    connection_security_policy = i.mtls and "mutual_tls" or "none",
  }
end

local function handle_for(s, k1, k2)
  if cached >= MAX_CACHED then cache = {}; cached = 0 end
  local h = series(stats.labels(info(s))) or false
  local t = cache[k1]
  if t == nil then t = {}; cache[k1] = t end
  t[k2] = h
  cached = cached + 1
  return h
end

function stats.on_log(s)
  local k1, k2 = key(s)
  local t = cache[k1]
  local h = t and t[k2]
  if h == nil then h = handle_for(s, k1, k2) end
  if h then record(h, s) end
end

return stats
