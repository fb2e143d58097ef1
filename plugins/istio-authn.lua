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
