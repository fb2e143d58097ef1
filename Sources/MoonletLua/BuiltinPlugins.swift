/// Lua filters that ship inside the binary. The text of each is the file of the same
/// name in plugins/ (a test keeps them identical; scripts/gen-builtins writes this file).
public enum BuiltinPlugins {
    /// plugins/istio-accesslog.lua
    public static let istioAccesslog = #"""
-- Istio's access log: Telemetry `accessLogging` and the mesh config's accessLogFile.
--
-- Moonlet adds this filter (phase STATS) when an access log is on for the workload:
-- a Telemetry resource's accessLogging (mesh, namespace or workload scope, the most
-- specific wins) or the mesh config's accessLogFile. Its pluginConfig is built at
-- config load:
--   outputs  list of {path, text} (an Envoy format string) or {path, labels} (a list
--            of {key, format} pairs: one JSON object per line, keys in that order);
--            provider `envoy` is Istio's default (accessLogFile, else /dev/stdout,
--            with accessLogEncoding / accessLogFormat); envoyFileAccessLog extension
--            providers give their own path and format.
--   filter   nil (log every stream), false (`filter.expression: false`), or a list of
--            {attr = "code" | "method", op, value} that must all hold (the supported
--            CEL: `response.code >= 400 && request.method == "GET"`).
--   mode     CLIENT_AND_SERVER, CLIENT (outbound streams only) or SERVER (inbound only).
--
-- The decision (mode, filter) is here; formatting and the file are native
-- (moonlet.accesslog): the line is formatted with a format compiled once, buffered per
-- event loop and written by a thread of its own, so a slow disk never holds a request
-- (past the queue bound, lines are dropped and counted). With no mode or filter to
-- check, configure hands the writes to the proxy as a native on_log (accesslog.writer).
local f = {}
local accesslog = moonlet.accesslog
local write = accesslog.write

function f.configure(c)
  local conf = { outputs = {}, filter = c.filter, mode = c.mode or "CLIENT_AND_SERVER" }
  for i, o in ipairs(c.outputs or {}) do
    conf.outputs[i] = accesslog.open(o.path, o.labels or o.text)
  end
  conf.n = #conf.outputs
  if conf.mode == "CLIENT" then conf.only = "outbound" elseif conf.mode == "SERVER" then conf.only = "inbound" end
  -- Nothing to decide (every stream, no filter): on_log is only the writes, which the
  -- proxy then makes natively without entering Lua (builtin only; on_log is the same).
  if not conf.only and conf.filter == nil then conf.shortcuts = { on_log = accesslog.writer(conf.outputs) } end
  return conf
end

local function holds(v, op, want)
  if v == nil then return op == "!=" end
  if op == "==" then return v == want
  elseif op == "!=" then return v ~= want
  elseif op == ">=" then return v >= want
  elseif op == ">" then return v > want
  elseif op == "<=" then return v <= want
  elseif op == "<" then return v < want end
  return false
end

--- on_log: runs once per stream when it ends (local replies and errors included);
--- writes one line to every output when the mode and the filter expression let it.
function f.on_log(s, conf)
  if conf.only and s.listener ~= conf.only then return end
  local filter = conf.filter
  if filter == false then return end
  if filter then
    for i = 1, #filter do
      local c = filter[i]
      local v
      if c.attr == "code" then v = s.response.status or 0 else v = s.request.method end
      if not holds(v, c.op, c.value) then return end
    end
  end
  local outs = conf.outputs
  for i = 1, conf.n do write(s, outs[i]) end
end

return f

"""#

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
  count("jwt_authn_denied", 1)
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
      count("jwt_authn_allowed", 1)
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
-- Order: CUSTOM policies first (external authorization, below), then DENY
-- policies, then ALLOW ones (when any ALLOW policy applies, a request that none of
-- them allows is denied); AUDIT marks the request for the access log.
--
-- CUSTOM: when a rule of a CUSTOM policy matches, the request is checked with the
-- mesh config's envoyExtAuthzHttp provider the policy names (conf.provider), as
-- Envoy's ext_authz HTTP service does: a request with the original method, the path
-- prefixed with pathPrefix, the included request headers plus Host (content-length
-- 0, no body), sent with moonlet.http.call (the phase waits without blocking). 200
-- allows (headersToUpstreamOnAllow copied from the check response to the request,
-- headersToDownstreamOnAllow to the response); any other status denies with that
-- status, the check response's body and its headers (headersToDownstreamOnDeny, or
-- all but Host when unset), flag UAEX; an error or timeout denies with statusOnError
-- (empty body) unless failOpen. conf.custom_deny_all (a provider missing from the
-- mesh config, or not supported) denies every request: fail closed.
-- A policy annotated istio.io/dry-run: "true" is evaluated without effect: its
-- result goes to the shadow metrics and to s.vars, as Envoy's shadow rules do.
-- Value matching (exact, prefix, suffix, path templates, CIDR) is native
-- (moonlet.authz), compiled once in configure.
local authz = {}
local A = moonlet.authz
local test, deny, check, inbound, first, decide = A.test, A.deny, A.check, A.inbound, A.first, A.decide
-- Envoy's RBAC counters, counted by index (resolved once here from their Prometheus names).
local stat = A.stat
local ALLOWED, DENIED = A.stat_index("envoy_http_rbac_allowed"), A.stat_index("envoy_http_rbac_denied")

local ip_kinds = { source_ip = true, remote_ip = true, destination_ip = true }
-- Attributes authz.check reads natively from the request (one call per check, matchers
-- tested in place); the others (headers, JWT claims, ...) are read through `s` below.
local NATIVE = { principal = 1, namespace = 2, source_ip = 3, remote_ip = 3, destination_ip = 4,
                 host = 5, method = 6, path = 7 }

local compile_checks

local function compile_check(c)
  if c.k == "any_of" then
    local alts = {}
    for i, alt in ipairs(c.alts) do alts[i] = compile_checks(alt) end
    return { k = "any_of", alts = alts }
  end
  local out = { k = c.k, neg = c.neg, h = c.h, c = c.c, m = {}, native = NATIVE[c.k] }
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

-- A list of checks that must all hold. An any_of with a single alternative (one
-- `from` source, one `to` operation: the common case) is that alternative's checks,
-- so they join the list: fewer calls per request, the same result.
compile_checks = function(list)
  local out = {}
  for _, x in ipairs(list) do
    local c = compile_check(x)
    if c.k == "any_of" and #c.alts == 1 then
      for _, y in ipairs(c.alts[1]) do out[#out + 1] = y end
    else
      out[#out + 1] = c
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
        rules[i] = { id = r.id, checks = compile_checks(r.checks) }
      end
      out[#out + 1] = { id = p.id, rules = rules }
    end
  end
  -- When every check reads what authz.check reads natively (or the destination port),
  -- the whole list is also compiled into one native matcher: authz.first evaluates it in
  -- one call, with the same answer as first_match's Lua loop below. ids: the rule ids in
  -- the order authz.first counts them.
  if #out > 0 then
    out.native = A.rules(out)
    local ids = {}
    for _, p in ipairs(out) do
      for _, r in ipairs(p.rules) do ids[#ids + 1] = r.id end
    end
    out.ids = ids
  end
  return out
end

-- Header name matchers of a provider's list (ignore case).
local function compile_names(list)
  local out = {}
  for i, v in ipairs(list or {}) do out[i] = A.matcher(v.t, v.s, "i") end
  return out
end

local function compile_provider(p)
  if p == nil then return nil end
  return {
    target = p.target, timeout_ms = p.timeout_ms, path_prefix = p.path_prefix or "",
    fail_open = p.fail_open == true, status_on_error = p.status_on_error or 403,
    include = compile_names(p.include), additional = p.additional or {},
    to_upstream = compile_names(p.to_upstream),
    to_downstream_deny = compile_names(p.to_downstream_deny),
    to_downstream_allow = compile_names(p.to_downstream_allow),
  }
end

function authz.configure(conf)
  local out = {
    custom = compile_policies(conf.custom, false),
    custom_deny_all = conf.custom_deny_all,
    provider = compile_provider(conf.provider),
    deny = compile_policies(conf.deny, false),
    allow = compile_policies(conf.allow, false),
    audit = compile_policies(conf.audit, nil), -- dry-run is for ALLOW and DENY (Istio)
    shadow_deny = compile_policies(conf.deny, true),
    shadow_allow = compile_policies(conf.allow, true),
  }
  -- The common case: only DENY and ALLOW policies, every check native. on_request's
  -- evaluation of them (below) is then one native call with the same result.
  if not out.custom_deny_all and #out.custom == 0 and #out.audit == 0 and #out.shadow_deny == 0
      and #out.shadow_allow == 0 and (#out.deny == 0 or out.deny.native) and (#out.allow == 0 or out.allow.native) then
    out.decider = A.decider(out.deny, out.allow)
  end
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
  local native = c.native
  if native then
    hit = check(s, native, c.m)
  elseif k == "destination_port" then
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
    local c = checks[i]
    local native = c.native
    if native then
      -- The common checks (principal, namespace, addresses, host, method, path): one
      -- native call, without going through holds.
      local hit = check(s, native, c.m)
      if c.neg then hit = not hit end
      if not hit then return false end
    elseif not holds(s, c) then
      return false
    end
  end
  return true
end

-- The id of the first rule of `policies` the request matches, or nil.
local function first_match(s, policies)
  local native = policies.native
  if native and type(s) == "userdata" then
    local i = first(s, native)
    return i and policies.ids[i]
  end
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

-- Headers of a denying check response that never reach the client (framing and
-- hop-by-hop ones are the proxy's; Host is never copied, as Envoy does).
local deny_skip = {
  host = true, ["content-length"] = true, ["transfer-encoding"] = true, connection = true,
  ["keep-alive"] = true, ["proxy-connection"] = true, te = true, trailer = true, upgrade = true,
  ["proxy-authenticate"] = true, ["proxy-authorization"] = true, expect = true,
}
-- Always copied when headersToDownstreamOnDeny is set (Istio).
local deny_always = { path = true, status = true, ["www-authenticate"] = true, location = true }

local function name_match(ms, n)
  for i = 1, #ms do
    if test(ms[i], n) then return true end
  end
  return false
end

-- The external authorization check of a request a CUSTOM rule matched. Returns what
-- on_request returns: nil (allowed) or "respond".
local function ext_authz(s, p)
  local h = {}
  if #p.include > 0 then
    for n, v in s.request.headers:pairs() do
      if n ~= "host" and name_match(p.include, n) then
        if h[n] then h[n] = h[n] .. "," .. v else h[n] = v end
      end
    end
  end
  for k, v in pairs(p.additional) do h[k] = v end
  h.host = s.request.authority
  local res, err = moonlet.http.call(p.target, {
    method = s.request.method, path = p.path_prefix .. s.request.path, headers = h, timeout_ms = p.timeout_ms,
  })
  if not res then
    if p.fail_open then
      moonlet.log.warn("ext_authz check failed, allowed (failOpen):", err)
      s.vars.ext_authz_failure_mode_allowed = "true"
      return nil
    end
    moonlet.log.warn("ext_authz check failed:", err)
    return A.ext_deny(s, p.status_on_error, "", nil)
  end
  if res.status == 200 then
    if #p.to_upstream > 0 then
      for n, v in pairs(res.headers) do
        if name_match(p.to_upstream, n) then pcall(s.request.headers.set, s.request.headers, n, v) end
      end
    end
    if #p.to_downstream_allow > 0 then
      for n, v in pairs(res.headers) do
        if name_match(p.to_downstream_allow, n) then pcall(moonlet.router.add_response_header, s, n, v) end
      end
    end
    return nil
  end
  local out, count = {}, 0
  local listed = #p.to_downstream_deny > 0
  for n, v in pairs(res.headers) do
    -- A local reply holds at most 64 headers of at most 16 KiB each: the rest is dropped.
    if count < 64 and #v <= 16384 and not deny_skip[n] and (not listed or deny_always[n] or name_match(p.to_downstream_deny, n)) then
      out[n] = v
      count = count + 1
    end
  end
  local status = res.status
  if status < 200 or status > 599 then status = 403 end
  return A.ext_deny(s, status, res.body, out)
end

function authz.on_request(s, conf)
  local decider = conf.decider
  if decider and type(s) == "userdata" then return decide(s, decider) end
  if not inbound(s) then return end
  if conf.custom_deny_all then
    stat(DENIED)
    return deny(s, "custom-provider-unavailable")
  end
  if #conf.custom > 0 and conf.provider and first_match(s, conf.custom) then
    -- The check waits (other streams run meanwhile and share this module's state).
    local r = ext_authz(s, conf.provider)
    if r then return r end
  end
  cur_auth = NOT_READ
  if #conf.audit > 0 then
    local audited = first_match(s, conf.audit)
    if audited then
      s.vars.access_log_hint = "true"
      s.vars.istio_authz_audit_policy = audited
    end
  end
  -- The path was normalized natively before any filter (mesh config pathNormalization).
  if #conf.shadow_deny > 0 then shadow(s, conf.shadow_deny, "istio_dry_run_deny_", "denied") end
  if #conf.shadow_allow > 0 then shadow(s, conf.shadow_allow, "istio_dry_run_allow_", "allowed") end
  local deny_list, allow_list = conf.deny, conf.allow
  if #deny_list > 0 then
    local id = first_match(s, deny_list)
    if id then
      stat(DENIED)
      return deny(s, id)
    end
  end
  if #allow_list > 0 then
    if not first_match(s, allow_list) then
      stat(DENIED)
      return deny(s, "none")
    end
  end
  if #deny_list > 0 or #allow_list > 0 then stat(ALLOWED) end
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

"""#

    /// plugins/istio-stats.lua
    public static let istioStats = #"""
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

"""#

    /// plugins/istio-tracing.lua
    public static let istioTracing = #"""
-- Istio's tracing: B3 / W3C trace propagation, x-request-id, and one span per sidecar
-- per request (CLIENT on the outbound listener, SERVER on the inbound one, the server
-- span a child of the client's).
--
-- Moonlet adds this filter (phase STATS) when tracing is on for the workload: a
-- Telemetry resource's `tracing` section, or the mesh config's enableTracing /
-- defaultConfig.tracing. Its pluginConfig is built at config load: `sampling`
-- (percent of new traces: Telemetry randomSamplingPercentage, else
-- defaultConfig.tracing.sampling, else 1), `collectors` ({address, format = zipkin |
-- otlp}), `report` (false with disableSpanReporting), `mode` (CLIENT_AND_SERVER, CLIENT,
-- SERVER: which side reports spans; both sides propagate), the identity tags (service
-- `<app>.<namespace>`, istio.canonical_service, istio.namespace, istio.mesh_id,
-- node_id) and `custom_tags` ({tag, kind = literal | header | environment, value,
-- default}).
--
-- Ids, clocks, headers and export are native (moonlet.trace). A caller's sampling
-- decision (x-b3-sampled, x-b3-flags, b3, traceparent flags) is kept; otherwise the
-- sampling rate decides for a new trace. An unsampled request costs the header
-- propagation only: no span is kept, and the filter has no on_log (a recorded span is
-- ended natively when the stream ends).
local f = {}
local trace = moonlet.trace
local start = trace.start

function f.configure(c)
  local conf = { mode = c.mode or "CLIENT_AND_SERVER" }
  conf.tracer = trace.tracer(c)
  -- The side that does not report still propagates: a tracer with reporting off.
  if conf.mode ~= "CLIENT_AND_SERVER" then
    local quiet = {}
    for k, v in pairs(c) do quiet[k] = v end
    quiet.report = false
    conf.quiet = trace.tracer(quiet)
    conf.reporting = conf.mode == "CLIENT" and "outbound" or "inbound"
  else
    -- One tracer for both sides: on_request is only trace.start, which the proxy then
    -- calls natively without entering Lua (builtin only; on_request is the same).
    conf.shortcuts = { on_request = trace.starter(conf.tracer) }
  end
  return conf
end

--- on_request: continues or starts the trace, writes the headers the next hop reads.
--- There is no on_log: a span trace.start recorded (sampled streams only) is ended and
--- queued for export natively when the stream ends, so an unsampled stream costs no Lua
--- call at its end.
function f.on_request(s, conf)
  local t = conf.tracer
  if conf.reporting and s.listener ~= conf.reporting then t = conf.quiet end
  start(s, t)
end

return f

"""#

    /// Every builtin by name, for `builtin://NAME` plugin urls and `moonlet plugins export`.
    public static let all: [(name: String, source: String)] = [
        ("istio-accesslog", istioAccesslog),
        ("istio-authn", istioAuthn),
        ("istio-authz", istioAuthz),
        ("istio-router", istioRouter),
        ("istio-stats", istioStats),
        ("istio-tracing", istioTracing),
    ]

    /// Source by name, for `builtin://NAME` plugin urls.
    public static func source(_ name: String) -> String? { all.first { $0.name == name }?.source }
}
