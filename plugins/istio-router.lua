-- istio-router: Istio traffic management for the outbound listener.
--
-- VirtualService http routes over DestinationRule subsets and ServiceEntry /
-- WorkloadEntry endpoints, decided here in Lua:
--   host lookup -> first rule whose match holds -> fault abort -> CORS ->
--   redirect | directResponse | weighted destination (+ rewrite, header
--   edits, fault delay, mirrors, timeout, retries, consistent-hash key).
--
-- Moonlet adds this filter when the configuration has Istio traffic resources
-- (phase unset, lowest priority: user filters run before routing). A LuaPlugin
-- named "istio-router" replaces it; a fork can start from this one with
--   local base = require("istio-router")
-- (`moonlet plugins export DIR` writes this file).
--
-- The data comes prepared from the configuration (moonlet.router.host: one
-- table per virtual host, built once per snapshot): matchers, regexes and
-- destinations are handles to native compiled values. Nothing below builds a
-- table or a string per request on the common path.
local router = {}

-- Native primitives, looked up once (docs/lua-api.md, "moonlet.router").
local R = moonlet.router
local host_of = R.host
local test = R.test
local match_path = R.match_path
local match_method = R.match_method
local match_authority = R.match_authority
local match_header = R.match_header
local match_query = R.match_query
local query = R.query
local pick = R.pick
local chance = R.chance
local forward = R.forward
local reply = R.reply
local delay = R.delay
local mirror = R.mirror
local regex_replace = R.regex_replace
local hash_cookie = R.hash_cookie
local set_response_header = R.set_response_header
local add_response_header = R.add_response_header
local remove_response_header = R.remove_response_header
local find, sub, match, gmatch, lower = string.find, string.sub, string.match, string.gmatch, string.lower
local pairs, ipairs = pairs, ipairs

local MATCH_LIMIT = "route match failed: a regex of the route hit its match limit\n"

-- One name/matcher list (headers, queryParams): every entry must be present and
-- match (false as matcher: present is enough). true, false, or nil (regex limit).
local function all_present(s, list, primitive)
  for i = 1, #list do
    local c = list[i]
    local ok = primitive(s, c[1], c[2])
    if not ok then return ok end
  end
  return true
end

-- One `match` entry: every field present must hold (AND).
-- Returns true, false, or nil when a regex hit its match limit.
local function match_entry(s, m, workload)
  local only = m.only   -- the entry's single condition, when it is one of these two
  if only == "headers" then
    local h = m.headers
    if #h == 1 then local c = h[1]; return match_header(s, c[1], c[2]) end
    return all_present(s, h, match_header)
  end
  if only == "uri" then return match_path(s, m.uri, m.ignore_uri_case) end
  local ok
  if m.uri then
    ok = match_path(s, m.uri, m.ignore_uri_case)
    if not ok then return ok end
  end
  if m.scheme then
    ok = test(m.scheme, s.request.scheme)
    if not ok then return ok end
  end
  if m.method then
    ok = match_method(s, m.method)
    if not ok then return ok end
  end
  if m.authority then
    ok = match_authority(s, m.authority)
    if not ok then return ok end
  end
  if m.port and m.port ~= s.destination.port then return false end
  if m.headers then
    ok = all_present(s, m.headers, match_header)
    if not ok then return ok end
  end
  local without = m.without_headers
  if without then
    -- withoutHeaders: the rule applies only if none of these is present (and
    -- matching, when a matcher is given).
    for i = 1, #without do
      local c = without[i]
      local present = match_header(s, c[1], c[2])
      if present == nil then return nil end
      if present then return false end
    end
  end
  if m.query_params then
    ok = all_present(s, m.query_params, match_query)
    if not ok then return ok end
  end
  -- sourceLabels / sourceNamespace: on the outbound listener the source is this
  -- workload.
  if m.source_labels then
    local labels = workload.labels
    for k, v in pairs(m.source_labels) do
      if labels[k] ~= v then return false end
    end
  end
  if m.source_namespace and m.source_namespace ~= workload.namespace then return false end
  return true
end

-- A rule applies when it has no match entry, or when any entry holds (OR).
-- Returns the result (true/false/nil as above) and the entry that held.
local function rule_matches(s, rule, workload)
  local matches = rule.matches
  local n = #matches
  if n == 0 then return true, nil end
  if n == 1 then
    local m = matches[1]
    local ok = match_entry(s, m, workload)
    if ok then return true, m end
    return ok
  end
  for i = 1, n do
    local m = matches[i]
    local ok = match_entry(s, m, workload)
    if ok then return true, m end
    if ok == nil then return nil end
  end
  return false
end

-- The host part of an authority (no port, lowercase).
local function host_only(authority)
  local bracketed = match(authority, "^(%[[^%]]*%])")
  if bracketed then return lower(bracketed) end
  return lower((match(authority, "^([^:]*)")))
end

-- DestinationRule consistentHash: the key of this request (nil: none).
local function hash_key(s, h)
  local kind = h.kind
  if kind == "header" then
    return s.request.headers:get(h.name)
  elseif kind == "source_ip" then
    return (match(s.source.address, "^(.*):[^:]*$"))
  elseif kind == "query" then
    return query(s, h.name)
  end
  -- httpCookie: the cookie's value (the last one sent); without one and with a
  -- ttl, Envoy generates it and sets it on the response.
  local value
  for _, header in ipairs(s.request.headers:get_all("cookie")) do
    for part in gmatch(header, "[^;]+") do
      local k, v = match(part, "^%s*(.-)%s*=(.+)$")
      if k == h.name then value = v end
    end
  end
  if value == nil and h.ttl > 0 then value = hash_cookie(s, h.name, h.path, h.ttl) end
  return value
end

-- Sends the stream to `target` (writes s.route), or answers 503 UH.
local function go(s, target, hash, rule_ref)
  local key
  if hash then key = hash_key(s, hash) end
  if forward(s, target, rule_ref, key) then return nil end
  return reply(s, 503, "no healthy upstream", "UH")
end

-- HTTPRewrite: uri (replaces the matched prefix; the whole path for other
-- matches), uriRegexRewrite, authority. The query string is kept.
local function rewrite(s, rw, m)
  if rw.regex or rw.uri then
    local target = s.request.path
    local path, qs = target, ""
    local q = find(target, "?", 1, true)
    if q then path, qs = sub(target, 1, q - 1), sub(target, q) end
    if rw.regex then
      s.request.path = regex_replace(rw.regex, path, rw.regex_rewrite) .. qs
    elseif m and m.uri_prefix then
      s.request.path = rw.uri .. sub(path, #m.uri_prefix + 1) .. qs
    elseif m == nil or m.uri == nil then
      -- No uri match: Istio matches prefix "/" and rewrites that prefix.
      s.request.path = rw.uri .. sub(path, 2) .. qs
    else
      s.request.path = rw.uri .. qs
    end
  end
  if rw.authority then s.request.authority = rw.authority end
end

-- headers.request: set, add, remove on the request going upstream.
local function edit_request(s, ops)
  local h = s.request.headers
  for _, n in ipairs(ops.remove) do h:remove(n) end
  for _, e in ipairs(ops.set) do h:set(e[1], e[2]) end
  for _, e in ipairs(ops.add) do h:add(e[1], e[2]) end
end

-- headers.response: recorded on the route, applied to the response (upstream or
-- local) before response filters run.
local function edit_response(s, ops)
  for _, n in ipairs(ops.remove) do remove_response_header(s, n) end
  for _, e in ipairs(ops.set) do set_response_header(s, e[1], e[2]) end
  for _, e in ipairs(ops.add) do add_response_header(s, e[1], e[2]) end
end

-- corsPolicy: whether `origin` is among allowOrigins.
local function origin_allowed(cors, origin)
  local list = cors.allow_origins
  for i = 1, #list do
    if test(list[i], origin) then return true end
  end
  return false
end

-- The matched rule, applied in Envoy's order.
-- (A rule marked `plain` is forwarded by on_request itself.)
local function apply(s, vh, rule, m)
  local fault = rule.fault
  if fault and fault.abort_status and chance(fault.abort_percent) then
    return reply(s, fault.abort_status, "fault filter abort", "FI")
  end
  local cors, origin = rule.cors, nil
  if cors then
    local h = s.request.headers
    origin = h:get("origin")
    if origin and not origin_allowed(cors, origin) then origin = nil end
    if origin and s.request.method == "OPTIONS" and h:get("access-control-request-method") then
      -- Preflight: answered here, never forwarded.
      add_response_header(s, "access-control-allow-origin", origin)
      if cors.allow_methods then add_response_header(s, "access-control-allow-methods", cors.allow_methods) end
      if cors.allow_headers then add_response_header(s, "access-control-allow-headers", cors.allow_headers) end
      if cors.max_age then add_response_header(s, "access-control-max-age", cors.max_age) end
      if cors.allow_credentials then add_response_header(s, "access-control-allow-credentials", "true") end
      return reply(s, 200, "")
    end
  end
  local red = rule.redirect
  if red then
    local authority = red.authority or s.request.authority
    if red.port then authority = host_only(authority) .. ":" .. red.port end
    -- Envoy's path_redirect swaps the path and keeps the query (unless the new uri has one).
    local target = s.request.path
    local uri = red.uri
    if uri and not find(uri, "?", 1, true) then
      local q = find(target, "?", 1, true)
      if q then uri = uri .. sub(target, q) end
    end
    local location = (red.scheme or s.request.scheme) .. "://" .. authority .. (uri or target)
    if rule.response_headers then edit_response(s, rule.response_headers) end
    return reply(s, red.code, "", nil, location)
  end
  local direct = rule.direct_response
  if direct then
    if rule.response_headers then edit_response(s, rule.response_headers) end
    return reply(s, direct.status, direct.body)
  end
  if rule.total_weight == 0 then return reply(s, 503, "no healthy upstream", "UH") end
  local targets = rule.targets
  local k = 1
  if #targets > 1 then k = pick(rule.ref) end
  local answered = go(s, targets[k], rule.hashes[k], rule.ref)
  if answered then return answered end
  if fault and fault.delay_ms and chance(fault.delay_percent) then delay(s, fault.delay_ms) end
  if rule.rewrite then rewrite(s, rule.rewrite, m) end
  if rule.request_headers then edit_request(s, rule.request_headers) end
  if rule.response_headers then edit_response(s, rule.response_headers) end
  if origin then
    add_response_header(s, "access-control-allow-origin", origin)
    if cors.expose_headers then add_response_header(s, "access-control-expose-headers", cors.expose_headers) end
    if cors.allow_credentials then add_response_header(s, "access-control-allow-credentials", "true") end
  end
  local mirrors = rule.mirrors
  if mirrors then
    for i = 1, #mirrors do
      local mi = mirrors[i]
      if chance(mi.percent) then mirror(s, mi.target) end
    end
  end
  return nil
end

function router.on_request(s, conf)
  local vh, block_all = host_of(s)
  if vh == true then return end                        -- an earlier filter chose the route
  if vh == false then return end                       -- inbound: the local app
  if vh == nil then
    -- REGISTRY_ONLY (Sidecar outboundTrafficPolicy): Istio's BlackHoleCluster, 502.
    if block_all then return reply(s, 502, "") end
    return reply(s, 404, "", "NR")                     -- no such host
  end
  local rules = vh.rules
  if rules == nil then
    -- No VirtualService: the default route, every endpoint of the service.
    if vh.default == nil then return reply(s, 404, "", "NR") end
    return go(s, vh.default, vh.default_hash, nil)
  end
  local workload = vh.workload
  for i = 1, #rules do
    local rule = rules[i]
    local hit, m = true, nil
    if rule.matches[1] then hit, m = rule_matches(s, rule, workload) end
    if hit == nil then return reply(s, 500, MATCH_LIMIT) end
    if hit then
      if rule.plain then
        -- Weighted destinations and nothing else (no fault, CORS, redirect, direct
        -- response, rewrite, header edits, mirrors or hashing): pick and forward.
        local targets = rule.targets
        local k = 1
        if targets[2] then k = pick(rule.ref) end
        if forward(s, targets[k], rule.ref, nil) then return nil end
        return reply(s, 503, "no healthy upstream", "UH")
      end
      return apply(s, vh, rule, m)
    end
  end
  return reply(s, 404, "", "NR")                       -- no rule matched
end

-- Istio's retryOn, decided here for each failed attempt (the phase runs before the
-- proxy decides a retry; a filter earlier in the chain may decide first). The
-- policy is the stream's route retry (the matched rule's `retries`, Istio's
-- default when it has none, or what a filter wrote to s.route.retry); the
-- mechanism stays native: attempts, per-try timeout, backoff with jitter, another
-- host, the replay buffer, the cluster's maxRetries.
--   5xx             any 5xx, a reset, a connect failure, a per-try timeout
--   gateway-error   502, 503, 504, a reset, a connect failure, a per-try timeout
--   reset           a reset, a connect failure, a per-try timeout
--   connect-failure a connect failure
--   refused-stream  an HTTP/2 REFUSED_STREAM
--   retriable-4xx   409
--   a status code   that status (retriable-status-codes)
--   cancelled, deadline-exceeded, resource-exhausted, internal, unavailable
--                   a gRPC response head (trailers-only) whose grpc-status is that
--                   code (1, 4, 8, 13, 14), as Envoy reads it (kind "grpc-status")
local RETRY, NO_RETRY = moonlet.RETRY, moonlet.NO_RETRY

-- grpc-status -> its retryOn name (the codes Envoy retries on).
local GRPC_CONDITION = { [1] = "cancelled", [4] = "deadline-exceeded", [8] = "resource-exhausted",
                         [13] = "internal", [14] = "unavailable" }

-- retry_on text -> set of conditions (a policy's canonical text; bounded by the
-- distinct policies of the configuration and of filters).
local conditions_of = {}
local function conditions(retry_on)
  local c = conditions_of[retry_on]
  if c then return c end
  c = {}
  for t in gmatch(retry_on, "[^,%s]+") do c[tonumber(t) or t] = true end
  conditions_of[retry_on] = c
  return c
end

local function retried(on, kind, status, grpc_status)
  if kind == "grpc-status" then
    local name = GRPC_CONDITION[grpc_status]
    return (name and on[name]) or false
  elseif kind == "connect-failure" then
    return on["connect-failure"] or on["5xx"] or on["gateway-error"] or on.reset or false
  elseif kind == "reset" then
    return on.reset or on["5xx"] or on["gateway-error"] or false
  elseif kind == "refused-stream" then
    return on["refused-stream"] or on.reset or on["5xx"] or on["gateway-error"] or false
  end
  if kind == "timeout" then status = 504 end   -- Envoy counts a per-try timeout as 504
  if on["5xx"] and status >= 500 then return true end
  if on["gateway-error"] and (status == 502 or status == 503 or status == 504) then return true end
  if on["retriable-4xx"] and status == 409 then return true end
  return on[status] == true
end

function router.on_upstream_failure(s, conf, failure)
  local policy = s.route.retry
  if policy == nil then return NO_RETRY end
  if retried(conditions(policy.retry_on), failure.kind, failure.status, failure.grpc_status) then return RETRY end
  return NO_RETRY
end

return router
