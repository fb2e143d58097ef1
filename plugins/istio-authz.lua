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
