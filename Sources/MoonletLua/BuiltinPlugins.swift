/// Lua filters that ship inside the binary. The text of each is the file of the same
/// name in plugins/ (a test keeps them identical; scripts/gen-builtins writes this file).
public enum BuiltinPlugins {
    /// plugins/istio-authn.lua
    public static let istioAuthn = #"""
-- Istio RequestAuthentication for the inbound listener: JWTs are looked for where
-- the policies' jwtRules say (fromHeaders, fromParams, fromCookies; by default
-- "Authorization: Bearer" and the access_token query parameter), verified natively
-- (moonlet.jwt: signature, issuer, audiences, exp/nbf), and the request is answered
-- as Envoy's jwt_authn answers it:
--   * no token: the request goes on without a request principal (an
--     AuthorizationPolicy decides), unless a rule says presence: REQUIRED;
--   * a token that does not verify: 401 (403 for a disallowed audience) with
--     Envoy's text as the body and "www-authenticate: Bearer realm=...";
--   * a verified token: s.auth is set (principal "iss/sub", claims...), the token
--     header is removed unless forwardOriginalToken, and outputPayloadToHeader /
--     outputClaimToHeaders are written.
-- Moonlet adds it (phase AUTHN) when a RequestAuthentication selects the workload;
-- its pluginConfig is prepared at config load: { rules = { {provider, issuer,
-- locations, forward, payload_header, claim_headers, required}, ... } }.
local authn = {}
local jwt = moonlet.jwt
local INVALID = ', error="invalid_token"'

-- Compiles the rules into the list of distinct token locations, each with the rules
-- that read it (in policy order), and the headers this filter writes.
function authn.configure(config)
  local conf = { locations = {}, outputs = {}, required = false }
  local by_key = {}
  for _, rule in ipairs(config.rules or {}) do
    rule.handle = jwt.provider(rule.provider)
    if rule.required then conf.required = true end
    for _, loc in ipairs(rule.locations or {}) do
      local key = (loc.header and ("h:" .. loc.header .. ":" .. (loc.prefix or "")))
        or (loc.param and ("p:" .. loc.param)) or ("c:" .. loc.cookie)
      local l = by_key[key]
      if not l then
        l = { header = loc.header, prefix = loc.prefix or "", param = loc.param, cookie = loc.cookie, rules = {} }
        by_key[key] = l
        conf.locations[#conf.locations + 1] = l
      end
      l.rules[#l.rules + 1] = rule
    end
    if rule.payload_header then conf.outputs[#conf.outputs + 1] = rule.payload_header end
    for _, c in ipairs(rule.claim_headers or {}) do conf.outputs[#conf.outputs + 1] = c.header end
  end
  return conf
end

local function unescape(v)
  return (v:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local AMBIGUOUS = {}

-- The token at one location, nil, or AMBIGUOUS when the header (parameter, cookie) is sent more than once
-- (which one the upstream would read is not ours to guess: refused).
local function token_at(s, loc)
  if loc.header then
    local all = s.request.headers:get_all(loc.header)
    if #all > 1 then return AMBIGUOUS end
    local v = all[1]
    if not v then return nil end
    local p = loc.prefix
    if p ~= "" then
      if #v < #p or v:sub(1, #p):lower() ~= p:lower() then return nil end
      v = v:sub(#p + 1)
    end
    v = v:match("^%s*(.-)%s*$")
    if v == "" then return nil end
    return v
  elseif loc.param then
    local q = s.request.path:match("%?([^#]*)")
    if not q then return nil end
    local found = nil
    for k, v in q:gmatch("([^&=]+)=([^&]*)") do
      if unescape(k) == loc.param and v ~= "" then
        if found then return AMBIGUOUS end   -- the parameter twice: refused, as a header twice
        found = unescape(v)
      end
    end
    return found
  else
    local found = nil
    for _, line in ipairs(s.request.headers:get_all("cookie")) do
      for k, v in line:gmatch("([^;=%s]+)=([^;]*)") do
        if k == loc.cookie then
          v = v:match("^%s*(.-)%s*$")
          if v ~= "" then
            -- the cookie twice (in one Cookie header or several): refused, as a header twice
            if found then return AMBIGUOUS end
            found = v
          end
        end
      end
    end
    return found
  end
  return nil
end

local function realm(s)
  local uri = s.request.scheme .. "://" .. s.request.authority .. s.request.path:match("^[^?#]*")
  return 'Bearer realm="' .. uri:gsub('["\\]', "\\%0") .. '"'
end

-- Envoy's jwt_authn counters: moonlet_lua_jwt_authn_allowed / _denied.
local count = moonlet.metrics.counter

local function reject(s, err, status, missing)
  count("jwt_authn_denied")
  return s:respond(status or 401, err, {
    ["www-authenticate"] = realm(s) .. (missing and "" or INVALID),
    ["content-type"] = "text/plain",
  })
end

-- A claim by name, or by a dotted path into nested objects ("a.b.c").
local function claim_value(claims, name)
  local v = claims[name]
  if v == nil and name:find(".", 1, true) then
    v = claims
    for part in name:gmatch("[^.]+") do
      if type(v) ~= "table" then return nil end
      v = v[part]
    end
  end
  local t = type(v)
  if t == "string" then return v end
  if t == "number" or t == "boolean" then return tostring(v) end
  if t == "table" and #v > 0 then
    local out = {}
    for i, e in ipairs(v) do
      local te = type(e)
      if te ~= "string" and te ~= "number" and te ~= "boolean" then return nil end
      out[i] = tostring(e)
    end
    return table.concat(out, ",")
  end
  return nil
end

local function outputs(s, rule, token, claims, loc)
  local h = s.request.headers
  if rule.payload_header then
    h:set(rule.payload_header, token:match("^[^.]*%.([^.]*)") or "")
  end
  for _, c in ipairs(rule.claim_headers or {}) do
    local v = claim_value(claims, c.claim)
    if v then h:set(c.header, v) end
  end
  if loc.header and not rule.forward then h:remove(loc.header) end
end

function authn.on_request(s, conf)
  -- A RequestAuthentication protects the workload: its inbound traffic only.
  if s.listener ~= "inbound" then return end
  local h = s.request.headers
  -- Headers this filter writes are never taken from the client.
  for _, name in ipairs(conf.outputs) do h:remove(name) end
  local found = false
  for _, loc in ipairs(conf.locations) do
    local token = token_at(s, loc)
    if token == AMBIGUOUS then
      return reject(s, "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections", 401, false)
    end
    if token then
      found = true
      local claims, err, status, matched
      local first_err, first_status
      for _, rule in ipairs(loc.rules) do
        claims, err, status = jwt.authenticate(s, token, rule.handle)
        if claims then matched = rule; break end
        -- "issuer is not configured" only when no rule of this location knows the issuer.
        if not first_err or first_err == "Jwt issuer is not configured" then first_err, first_status = err, status end
      end
      if not matched then return reject(s, first_err, first_status, false) end
      outputs(s, matched, token, claims, loc)
      count("jwt_authn_allowed")
    end
  end
  if not found and conf.required then return reject(s, "Jwt is missing", 401, true) end
end

return authn

"""#

    /// plugins/istio-authz.lua
    public static let istioAuthz = #"""
-- Istio AuthorizationPolicy for the inbound listener: Envoy's RBAC semantics.
--
-- Moonlet adds this filter (phase AUTHZ) when AuthorizationPolicies select the
-- workload. Its pluginConfig is built at config load from the policies that apply
-- (root namespace, the workload's namespace, selector): per action (deny, allow,
-- audit) a list of policies {id, dry_run, rules}, each rule a list of checks that
-- must all hold. A check reads one attribute of the request and holds when any of
-- its values matches (`neg`: when none does); `any_of` holds when every check of
-- one of its alternatives holds (the `from` sources, the `to` operations).
--
-- Order: DENY policies, then ALLOW ones (when any ALLOW policy applies, a request
-- that none of them allows is denied); AUDIT marks the request for the access log.
-- A policy annotated istio.io/dry-run: "true" is evaluated without effect: its
-- result goes to the shadow metrics and to s.vars, as Envoy's shadow rules do.
-- Value matching (exact, prefix, suffix, path templates, CIDR) is native
-- (moonlet.authz), compiled once in configure.
local authz = {}
local A = moonlet.authz
local test, deny = A.test, A.deny
local stat = A.stat     -- Envoy's RBAC counters, by their Prometheus names

local ip_kinds = { source_ip = true, remote_ip = true, destination_ip = true }

local function compile_check(c)
  if c.k == "any_of" then
    local alts = {}
    for i, alt in ipairs(c.alts) do
      local cs = {}
      for j, x in ipairs(alt) do cs[j] = compile_check(x) end
      alts[i] = cs
    end
    return { k = "any_of", alts = alts }
  end
  local out = { k = c.k, neg = c.neg, h = c.h, c = c.c, m = {} }
  for i, v in ipairs(c.m) do
    if ip_kinds[c.k] then
      out.m[i] = A.cidr(v)
    elseif c.k == "destination_port" then
      out.m[i] = v
    else
      local flags = nil
      if c.k == "host" then flags = "i" elseif c.k == "path" then flags = "p" end
      out.m[i] = A.matcher(v.t, v.s, flags)
    end
  end
  return out
end

-- The policies of `list` whose dry-run flag is `dry_run` (nil: all of them).
local function compile_policies(list, dry_run)
  local out = {}
  for _, p in ipairs(list or {}) do
    if dry_run == nil or (p.dry_run == true) == dry_run then
      local rules = {}
      for i, r in ipairs(p.rules) do
        local checks = {}
        for j, c in ipairs(r.checks) do checks[j] = compile_check(c) end
        rules[i] = { id = r.id, checks = checks }
      end
      out[#out + 1] = { id = p.id, rules = rules }
    end
  end
  return out
end

function authz.configure(conf)
  local out = {
    deny = compile_policies(conf.deny, false),
    allow = compile_policies(conf.allow, false),
    audit = compile_policies(conf.audit, nil), -- dry-run is for ALLOW and DENY (Istio)
    shadow_deny = compile_policies(conf.deny, true),
    shadow_allow = compile_policies(conf.allow, true),
  }
  return out
end

local function any_match(ms, v)
  if v == nil then return false end
  for i = 1, #ms do
    if test(ms[i], v) then return true end
  end
  return false
end

-- A string or a list of strings (a JWT claim, the audiences): any element matches.
local function any_match_value(ms, v)
  if type(v) == "table" then
    for _, x in ipairs(v) do
      if type(x) == "string" and any_match(ms, x) then return true end
    end
    return false
  end
  if type(v) ~= "string" then return false end
  return any_match(ms, v)
end

-- s.auth of the request being evaluated (on_request runs to its end without yielding).
local NOT_READ = {}
local cur_auth = NOT_READ

-- The request's value of an attribute (nil when it has none).
local function value(s, k, c)
  if k == "principal" then return s.source.principal
  elseif k == "namespace" then return s.source.namespace
  elseif k == "trust_domain" then return s.source.principal:match("^([^/]+)/")
  elseif k == "source_ip" or k == "remote_ip" then return s.source.address
  elseif k == "destination_ip" then return s.destination.address
  elseif k == "host" then return s.request.authority
  elseif k == "method" then return s.request.method
  elseif k == "path" then return s.request.path
  elseif k == "header" then
    -- Envoy matches a header given several times on its values joined with ",".
    local all = s.request.headers:get_all(c.h)
    if #all <= 1 then return all[1] end
    return table.concat(all, ",")
  end
  -- request.auth.*: s.auth is set by RequestAuthentication (nil without a verified token).
  -- It is read once per request (each read of s.auth builds the table anew).
  local auth = cur_auth
  if auth == NOT_READ then auth = s.auth; cur_auth = auth end
  if auth == nil then return nil end
  if k == "request_principal" then
    -- Istio's request principal needs both iss and sub: a token without `sub` (or with an
    -- empty one) verifies but has no principal, so requestPrincipals ["*"] does not match it.
    if auth.issuer == "" or auth.subject == "" then return nil end
    return auth.principal
  elseif k == "auth_presenter" then return auth.presenter
  elseif k == "auth_audiences" then return auth.audiences
  elseif k == "auth_claims" then
    local v = auth.claims
    for _, key in ipairs(c.c) do
      if type(v) ~= "table" then return nil end
      v = v[key]
    end
    return v
  end
  return nil
end

local all_hold

local function holds(s, c)
  local k = c.k
  if k == "any_of" then
    local alts = c.alts
    for i = 1, #alts do
      if all_hold(s, alts[i]) then return true end
    end
    return false
  end
  local hit
  if k == "destination_port" then
    local port = s.destination.port
    hit = false
    for i = 1, #c.m do
      if c.m[i] == port then hit = true; break end
    end
  else
    hit = any_match_value(c.m, value(s, k, c))
  end
  if c.neg then return not hit end
  return hit
end

all_hold = function(s, checks)
  for i = 1, #checks do
    if not holds(s, checks[i]) then return false end
  end
  return true
end

-- The id of the first rule of `policies` the request matches, or nil.
local function first_match(s, policies)
  for i = 1, #policies do
    local rules = policies[i].rules
    for j = 1, #rules do
      if all_hold(s, rules[j].checks) then return rules[j].id end
    end
  end
  return nil
end

-- Envoy's shadow-rule outputs, by stat prefix (made once, not per request).
local shadow_names = {}
for _, prefix in ipairs({ "istio_dry_run_deny_", "istio_dry_run_allow_" }) do
  shadow_names[prefix] = {
    result = prefix .. "shadow_engine_result",
    id = prefix .. "shadow_effective_policy_id",
    allowed = "envoy_http_rbac_" .. prefix .. "shadow_allowed",
    denied = "envoy_http_rbac_" .. prefix .. "shadow_denied",
  }
end

-- Evaluates dry-run policies: the result goes to s.vars (for the access log) and to
-- the shadow counters, never to the request.
local function shadow(s, policies, prefix, matched_means)
  if #policies == 0 then return end
  local n = shadow_names[prefix]
  local id = first_match(s, policies)
  local result
  if id then result = matched_means elseif matched_means == "denied" then result = "allowed" else result = "denied" end
  s.vars[n.result] = result
  if id then s.vars[n.id] = id end
  stat(n[result])
end

function authz.on_request(s, conf)
  if s.listener ~= "inbound" then return end
  cur_auth = NOT_READ
  local audited = first_match(s, conf.audit)
  if audited then
    s.vars.access_log_hint = "true"
    s.vars.istio_authz_audit_policy = audited
  end
  -- The path was normalized natively before any filter (mesh config pathNormalization).
  shadow(s, conf.shadow_deny, "istio_dry_run_deny_", "denied")
  shadow(s, conf.shadow_allow, "istio_dry_run_allow_", "allowed")
  if #conf.deny > 0 then
    local id = first_match(s, conf.deny)
    if id then
      stat("envoy_http_rbac_denied")
      return deny(s, id)
    end
  end
  if #conf.allow > 0 then
    if not first_match(s, conf.allow) then
      stat("envoy_http_rbac_denied")
      return deny(s, "none")
    end
  end
  if #conf.deny > 0 or #conf.allow > 0 then stat("envoy_http_rbac_allowed") end
end

return authz

"""#

    /// plugins/istio-router.lua
    public static let istioRouter = #"""
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
  -- A route an earlier filter chose is left alone.
  if s.route.cluster ~= "" then return end
  local vh, block_all = host_of(s)
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
    local hit, m = rule_matches(s, rule, workload)
    if hit == nil then return reply(s, 500, MATCH_LIMIT) end
    if hit then return apply(s, vh, rule, m) end
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
local RETRY, NO_RETRY = moonlet.RETRY, moonlet.NO_RETRY

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

local function retried(on, kind, status)
  if kind == "connect-failure" then
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
  if retried(conditions(policy.retry_on), failure.kind, failure.status) then return RETRY end
  return NO_RETRY
end

return router

"""#

    /// Every builtin by name, for `builtin://NAME` plugin urls and `moonlet plugins export`.
    public static let all: [(name: String, source: String)] = [
        ("istio-authn", istioAuthn),
        ("istio-authz", istioAuthz),
        ("istio-router", istioRouter),
    ]

    /// Source by name, for `builtin://NAME` plugin urls.
    public static func source(_ name: String) -> String? { all.first { $0.name == name }?.source }
}
