import CLua
import MoonletCore
import MoonletConfig
import NIOCore
import Logging
#if canImport(Foundation)
import Foundation
#endif

// MARK: - Envoy Lua scripts (docs/lua-api.md "Envoy Lua scripts")
//
// A LuaPlugin whose script defines the globals `envoy_on_request(handle)` and/or
// `envoy_on_response(handle)` (and returns nothing) runs as in Envoy's Lua filter. It is
// adapted, not interpreted twice: the embedded Lua adapter below (`EnvoyCompat.adapter`)
// turns the script's two functions into a Moonlet module (on_request / on_request_body /
// on_response) that wraps the stream `s` into Envoy-style handle objects. The few things
// Lua cannot reach through `s` are the native helpers of this file, handed to the
// adapter only (a script never sees them).
//
// Load time: `EnvoyCompat.scan` reads the script's source (comments and strings
// skipped) for `:name(` method calls; a call of a function of Envoy's documented handle
// API that Moonlet does not have refuses the plugin, naming the function and its line.
// A call of `:body(`, `:bodyChunks(` or `:trailers(` makes the request buffered:
// envoy_on_request then runs once the whole request body is in (Envoy suspends the
// script in body() instead); and the response too (on_response returns STOP_AND_BUFFER):
// envoy_on_response then runs in on_response_body with the whole body and trailers,
// the head still editable.

enum EnvoyCompat {
    /// Envoy handle-API functions (stream handle, headers, buffer, stream info,
    /// connection, SSL connection, dynamic metadata, metadata) the adapter implements.
    static let supported: Set<String> = [
        "headers", "body", "bodyChunks", "trailers", "respond", "httpCall", "metadata", "streamInfo",
        "connection", "setUpstreamOverrideHost", "clearRouteCache", "base64Escape", "timestamp", "timestampString",
        "logTrace", "logDebug", "logInfo", "logWarn", "logErr", "logCritical", "log",
        "get", "getAtIndex", "getNumValues", "add", "replace", "remove", "set",
        "length", "getBytes", "setBytes",
        "protocol", "downstreamLocalAddress", "downstreamDirectLocalAddress", "downstreamDirectRemoteAddress",
        "downstreamRemoteAddress", "requestedServerName", "routeName", "virtualClusterName", "dynamicMetadata",
        "downstreamSslConnection", "ssl", "peerCertificatePresented", "peerCertificateValidated",
        "uriSanPeerCertificate", "uriSanLocalCertificate",
    ]

    /// Functions of Envoy's documented Lua API that Moonlet does not have: a script that
    /// calls one is refused at load with its name.
    static let unsupported: Set<String> = [
        "connectionStreamInfo", "filterContext", "importPublicKey", "verifySignature", "setHttp1ReasonPhrase",
        "dynamicTypedMetadata", "filterState", "sha256PeerCertificateDigest", "serialNumberPeerCertificate",
        "issuerPeerCertificate", "subjectPeerCertificate", "parsedSubjectPeerCertificate", "subjectLocalCertificate",
        "urlEncodedPemEncodedPeerCertificate", "urlEncodedPemEncodedPeerCertificateChain", "dnsSansPeerCertificate",
        "dnsSansLocalCertificate", "validFromPeerCertificate", "expirationPeerCertificate", "sessionId",
        "ciphersuiteId", "ciphersuiteString", "tlsVersion", "oidsPeerCertificate", "oidsLocalCertificate",
        "commonName", "organizationName", "upstreamHost", "drainBytes", "setHeaders",
    ]

    struct ScanResult {
        /// (name, line) of each method call `:name(`, in source order.
        var calls: [(String, Int)] = []
        var usesBody: Bool { calls.contains { $0.0 == "body" || $0.0 == "bodyChunks" } }
        /// Lines of the calls that wait for a whole body in Envoy (body, bodyChunks, trailers).
        var bufferingLines: [Int] { calls.filter { $0.0 == "body" || $0.0 == "bodyChunks" || $0.0 == "trailers" }.map(\.1) }

        /// Which flows to buffer: a buffering call inside envoy_on_request's lines buffers
        /// the request, inside envoy_on_response's the response; one elsewhere (a helper
        /// function the script calls from either) buffers both.
        func buffering(request: ClosedRange<Int>?, response: ClosedRange<Int>?) -> (request: Bool, response: Bool) {
            var req = false, resp = false
            for line in bufferingLines {
                let inReq = request?.contains(line) ?? false, inResp = response?.contains(line) ?? false
                if inReq && !inResp { req = true } else if inResp && !inReq { resp = true } else { req = true; resp = true }
            }
            return (req, resp)
        }
        var refused: (String, Int)? { calls.first { EnvoyCompat.unsupported.contains($0.0) } }
    }

    /// Method calls (`obj:name(...)`, `obj:name "..."`, `obj:name {...}`) of a Lua
    /// source, outside comments and string literals.
    static func scan(_ source: String) -> ScanResult {
        let b = Array(source.utf8)
        var out = ScanResult()
        var i = 0, line = 1
        let n = b.count
        func isIdentStart(_ c: UInt8) -> Bool { (c >= 97 && c <= 122) || (c >= 65 && c <= 90) || c == 95 }
        func isIdent(_ c: UInt8) -> Bool { isIdentStart(c) || (c >= 48 && c <= 57) }
        /// Level of a long bracket opening at j (`[[` 0, `[=[` 1...), or nil.
        func longOpen(_ j: Int) -> Int? {
            guard j < n, b[j] == 91 else { return nil }
            var k = j + 1, level = 0
            while k < n && b[k] == 61 { level += 1; k += 1 }
            return k < n && b[k] == 91 ? level : nil
        }
        /// Skips a long bracket of `level` opening at j; returns the index after it.
        func skipLong(_ j: Int, _ level: Int) -> Int {
            var k = j + level + 2
            while k < n {
                if b[k] == 10 { line += 1 }
                if b[k] == 93 {
                    var m = k + 1, l = 0
                    while m < n && b[m] == 61 { l += 1; m += 1 }
                    if l == level && m < n && b[m] == 93 { return m + 1 }
                }
                k += 1
            }
            return n
        }
        while i < n {
            let c = b[i]
            if c == 10 { line += 1; i += 1; continue }
            if c == 45 && i + 1 < n && b[i + 1] == 45 {             // -- comment
                if let lv = longOpen(i + 2) { i = skipLong(i + 2, lv); continue }
                while i < n && b[i] != 10 { i += 1 }
                continue
            }
            if c == 34 || c == 39 {                                  // "..." '...'
                i += 1
                while i < n && b[i] != c && b[i] != 10 { if b[i] == 92 { i += 1; if i < n && b[i] == 10 { line += 1 } }; i += 1 }
                i += 1
                continue
            }
            if c == 91, let lv = longOpen(i) { i = skipLong(i, lv); continue }
            if c == 58 {                                             // ':' name
                if i + 1 < n && b[i + 1] == 58 { i += 2; continue }  // ::label::
                var k = i + 1
                while k < n && (b[k] == 32 || b[k] == 9) { k += 1 }
                guard k < n, isIdentStart(b[k]) else { i += 1; continue }
                let start = k
                while k < n && isIdent(b[k]) { k += 1 }
                let name = String(decoding: b[start..<k], as: UTF8.self)
                var m = k
                while m < n && (b[m] == 32 || b[m] == 9 || b[m] == 10 || b[m] == 13) { m += 1 }
                if m < n && (b[m] == 40 || b[m] == 34 || b[m] == 39 || b[m] == 123 || longOpen(m) != nil) {
                    out.calls.append((name, line))
                }
                i = k
                continue
            }
            i += 1
        }
        return out
    }

    /// Turns the Envoy script whose environment is on top of `vm.L` into a Moonlet
    /// module: checks it (`scan`), runs the adapter on `co` under the plugin's budget,
    /// and leaves the module table on top of `co`.
    static func adapt(_ vm: LuaVM, _ co: OpaquePointer, source: String, chunkName: String, limits: LuaLimits) throws {
        let scan = scan(source)
        if let (name, line) = scan.refused {
            throw LuaError.runtime("\(chunkName):\(line): the Envoy Lua function '\(name)' is not supported by Moonlet (see docs/lua-api.md, \"Envoy Lua scripts\")")
        }
        let L = vm.L
        let rc = adapter.withCString { p in ml_loadtext(co, p, strlen(p), "=envoy-adapter") }
        guard rc == LUA_OK else {
            let m = String(cString: ml_tostring(co, -1)); lua_settop(co, 0)
            throw LuaError.runtime("envoy adapter: \(m)")
        }
        lua_pushvalue(L, -1)
        lua_xmove(L, co, 1)
        lua_pushvalue(co, -1)
        _ = lua_setupvalue(co, -3, 1)       // the adapter's _ENV: the script's own globals
        pushNatives(co)
        let buffer = scan.buffering(request: lines(L, "envoy_on_request"), response: lines(L, "envoy_on_response"))
        lua_pushboolean(co, buffer.request ? 1 : 0)
        lua_pushboolean(co, buffer.response ? 1 : 0)
        let out = vm.resume(co, nargs: 4, limits: limits, plugin: chunkName, keepResults: true)
        guard out.ok else { lua_settop(co, 0); throw LuaError.runtime("\(chunkName): \(out.error ?? "error")") }
    }

    /// The source lines of the script's global function `name` (in the environment on
    /// top of `L`), nil when it defines none.
    static func lines(_ L: OpaquePointer?, _ name: String) -> ClosedRange<Int>? {
        lua_pushstring(L, name)
        guard lua_rawget(L, -2) == LUA_TFUNCTION else { ml_pop(L, 1); return nil }
        var ar = lua_Debug()
        guard lua_getinfo(L, ">S", &ar) != 0, ar.linedefined > 0, ar.lastlinedefined >= ar.linedefined else { return nil }
        return Int(ar.linedefined)...Int(ar.lastlinedefined)
    }

    /// The native helpers of the adapter (a fresh table per load; only the adapter holds it).
    static func pushNatives(_ L: OpaquePointer) {
        lua_createtable(L, 0, 8)
        for (n, f) in [("set_body", setBody), ("override", override), ("b64", b64), ("local_address", localAddress),
                       ("own_spiffe", ownSpiffe), ("error", scriptError), ("fire", fire),
                       ("log_debug", logDebug), ("log_info", logInfo), ("log_warn", logWarn), ("log_err", logErr),
                       ("sni", requestedServerName), ("route_name", routeName)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
    }

    /// set_body(s, bytes): replaces the buffered request body; the content-length follows.
    static let setBody: lua_CFunction = { L in
        guard let (_, s, kind) = LuaAPI.resolve(L, 1, "setBytes"), kind == .stream else { return LuaAPI.fail(L, LuaAPI.outside) }
        guard s.bufferedRequestBody != nil, s.response == nil else {
            return LuaAPI.fail(L, "setBytes(): only the buffered request body can be replaced")
        }
        guard let b = LuaAPI.bytes(L, 2) else { return LuaAPI.fail(L, "setBytes(string): argument must be a string") }
        let max = LuaVM.vm(L).maxBufferedBodyBytes
        guard b.count <= max else { return LuaAPI.fail(L, "setBytes(): body of \(b.count) bytes is larger than the proxy's buffered body bound (\(max) bytes)") }
        var buf = ByteBufferAllocator().buffer(capacity: b.count)
        buf.writeBytes(b)
        s.bufferedRequestBody = buf
        // A chunked request gets a content-length when it is sent (UpstreamDispatch).
        if s.request.first("content-length") != nil { s.request.set("content-length", String(b.count)) }
        return 0
    }

    /// override(s, host, strict): Envoy's setUpstreamOverrideHost on the routed cluster.
    /// Returns true when the endpoint is set, false when it is not an endpoint (not
    /// strict: the balancer picks), "respond" after a 503 (strict).
    static let override: lua_CFunction = { L in
        guard let (_, s, kind) = LuaAPI.resolve(L, 1, "setUpstreamOverrideHost"), kind == .stream else { return LuaAPI.fail(L, LuaAPI.outside) }
        guard let host = LuaAPI.str(L, 2) else { return LuaAPI.fail(L, "setUpstreamOverrideHost(host): host must be a string") }
        let strict = lua_toboolean(L, 3) != 0
        var addr = host, port: Int? = nil
        if let (a, p) = LuaAPI.splitHostPort(host) { addr = a; port = p }
        if addr.hasPrefix("[") && addr.hasSuffix("]") { addr = String(addr.dropFirst().dropLast()) }
        guard LuaAPI.isIPLiteral(addr) else { return LuaAPI.fail(L, "setUpstreamOverrideHost: \(LuaAPI.quoted(host)) is not an IP address") }
        if s.route.cluster == RouteTable.passthroughCluster, let port {
            s.route.endpointIndex = -1; s.route.endpoint = addr; s.route.endpointPort = port
            s.destination.address = addr; s.destination.port = port
            lua_pushboolean(L, 1); return 1
        }
        guard let c = s.route.upstreamCluster else {
            // Before the router (the filter's phase runs first, as Envoy's Lua filter runs
            // before its router): the router pins it once it has chosen the cluster.
            s.route.overrideHost = addr; s.route.overrideHostPort = port ?? 0; s.route.overrideHostStrict = strict
            lua_pushboolean(L, 1); return 1
        }
        if LuaAPI.pinEndpoint(s, c, addr: addr, port: port) { lua_pushboolean(L, 1); return 1 }
        if strict {
            s.respond(503, body: "no healthy upstream\n", headers: [("content-type", "text/plain")], flags: .noHealthyUpstream)
            lua_pushstring(L, "respond"); return 1
        }
        lua_pushboolean(L, 0); return 1
    }

    static let b64: lua_CFunction = { L in
        guard let b = LuaAPI.bytes(L, 1) else { return LuaAPI.fail(L, "base64Escape(string): argument must be a string") }
        LuaAPI.push(L, Base64.encode(b))
        return 1
    }

    /// The downstream connection's local address ("ip:port"), "" when unknown.
    static let localAddress: lua_CFunction = { L in
        guard let (_, s, _) = LuaAPI.resolve(L, 1, "downstreamLocalAddress") else { return LuaAPI.fail(L, LuaAPI.outside) }
        let a = s.destination.address
        if a.isEmpty { lua_pushstring(L, "") }
        else if a.contains(":") && !a.hasPrefix("[") && a.split(separator: ":").count > 2 { LuaAPI.push(L, "[\(a)]:\(s.destination.port)") }
        else if a.contains(":") { LuaAPI.push(L, a) }
        else { LuaAPI.push(L, "\(a):\(s.destination.port)") }
        return 1
    }

    /// This workload's SPIFFE ID (its certificate's URI SAN).
    static let ownSpiffe: lua_CFunction = { L in
        let vm = LuaVM.vm(L)
        let w = vm.host.ownWorkload
        LuaAPI.push(L, "spiffe://\(vm.host.trustDomain)/ns/\(w.namespace)/sa/\(w.serviceAccount)")
        return 1
    }

    /// error(phase, message): a script error, logged and counted as a phase error (the
    /// request goes on, as in Envoy).
    static let scriptError: lua_CFunction = { L in
        let vm = LuaVM.vm(L)
        let phase = LuaAPI.str(L, 1) ?? "envoy"
        var msg = "error object is not a string"
        if let b = LuaAPI.bytes(L, 2) { msg = String(decoding: b.prefix(LuaAPI.maxLogLine), as: UTF8.self) }
        let line = "plugin \(vm.currentPlugin): \(phase): \(msg)"
        vm.logger.error("\(LogText.escape(line))", metadata: ["stream": "\(vm.currentID)"])
        vm.host.recordError(plugin: vm.currentPlugin, line)
        vm.metrics?.pluginCell(vm.currentPlugin).stats.errors &+= 1
        return 0
    }

    /// fire(target, opts): an asynchronous httpCall: sent, never waited for.
    static let fire: lua_CFunction = { L in
        let vm = LuaVM.vm(L)
        guard let s = vm.current, vm.currentID != 0 else { return LuaAPI.fail(L, "httpCall: only inside envoy_on_request / envoy_on_response") }
        guard let client = vm.httpClient else { return LuaAPI.fail(L, "httpCall: not available in this process") }
        guard let target = LuaAPI.str(L, 1), !target.isEmpty else { return LuaAPI.fail(L, "httpCall: cluster must be a string") }
        var req = LuaHTTPRequest(target: target, method: "GET", path: nil, headers: [], body: [], timeoutMs: LuaHTTPLimits.defaultTimeoutMs)
        if lua_type(L, 2) == LUA_TTABLE, let e = LuaAPI.readOptions(L, &req) { return LuaAPI.fail(L, "httpCall: " + e) }
        // Nothing waits for these, so nothing else bounds them: at most
        // maxAsyncCallsInFlight per VM (event loop); beyond, the call fails.
        guard vm.asyncCallsInFlight < maxAsyncCallsInFlight else {
            return LuaAPI.fail(L, "httpCall (asynchronous): \(maxAsyncCallsInFlight) calls of this event loop are already in flight")
        }
        vm.asyncCallsInFlight += 1
        _ = client.start(req, stream: s) { [unowned vm] _ in vm.asyncCallsInFlight -= 1 }
        return 0
    }

    /// The handle's log methods: a line at the level, at the position of the script that
    /// called the method (stack level 2: the adapter's method is level 1).
    static let logDebug: lua_CFunction = { L in LuaAPI.logAt(L, .debug, whereLevel: 2) }
    static let logInfo: lua_CFunction = { L in LuaAPI.logAt(L, .info, whereLevel: 2) }
    static let logWarn: lua_CFunction = { L in LuaAPI.logAt(L, .warning, whereLevel: 2) }
    static let logErr: lua_CFunction = { L in LuaAPI.logAt(L, .error, whereLevel: 2) }

    /// sni(s): the SNI the client sent on the stream's TLS connection ("" without TLS or SNI).
    static let requestedServerName: lua_CFunction = { L in
        guard let (_, s, _) = LuaAPI.resolve(L, 1, "requestedServerName") else { return LuaAPI.fail(L, LuaAPI.outside) }
        LuaAPI.push(L, s.source.serverName)
        return 1
    }

    /// route_name(s): Envoy's route name, as %ROUTE_NAME% logs it: the name of the
    /// VirtualService http route the stream matched, "default" for Istio's default route,
    /// "" before routing (a plugin running before Istio's router) or for a nameless rule.
    static let routeName: lua_CFunction = { L in
        guard let (_, s, _) = LuaAPI.resolve(L, 1, "routeName") else { return LuaAPI.fail(L, LuaAPI.outside) }
        LuaAPI.push(L, s.route.envoyRouteName)
        return 1
    }

    /// Asynchronous httpCalls in flight per VM (per event loop).
    static let maxAsyncCallsInFlight = 64

    /// The adapter: called with (the script's environment, the native helpers, whether
    /// to buffer the request, whether to buffer the response: `ScanResult.buffering`);
    /// returns the Moonlet module of the script.
    static let adapter = #"""
local env, N, buffer_request, buffer_response = ...
local on_request = rawget(env, "envoy_on_request")
local on_response = rawget(env, "envoy_on_response")
local type, tostring, tonumber, pairs, ipairs, next, error, pcall, setmetatable, rawget, rawset =
      type, tostring, tonumber, pairs, ipairs, next, error, pcall, setmetatable, rawget, rawset
local concat, floor, tointeger, sub, byte, fmt = table.concat, math.floor, math.tointeger, string.sub, string.byte, string.format
local ldebug, linfo, lwarn, lerr = moonlet.log.debug, moonlet.log.info, moonlet.log.warn, moonlet.log.err
local now, http_call, STOP = moonlet.now, moonlet.http.call, moonlet.STOP_AND_BUFFER
local set_body, override, b64, local_address, own_spiffe, script_error, fire =
      N.set_body, N.override, N.b64, N.local_address, N.own_spiffe, N.error, N.fire
local log_debug, log_info, log_warn, log_err, sni, route_name =
      N.log_debug, N.log_info, N.log_warn, N.log_err, N.sni, N.route_name

rawset(env, "EnvoyTimestampResolution", { MILLISECOND = 0, MICROSECOND = 1 })

-- A local reply ends the script, as Envoy's respond() does (it never resumes it).
local RESPONDED = {}

local function class(kind, methods)
  return {
    __index = function(_, k)
      local m = methods[k]
      if m == nil then error(fmt("%s:%s(): not supported by Moonlet's Envoy adapter", kind, tostring(k)), 2) end
      return m
    end,
    __metatable = false,
  }
end

local function str(v, what)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  error(what .. " must be a string", 3)
end

-- Headers ------------------------------------------------------------------

local REQ_PSEUDO = { ":authority", ":path", ":method", ":scheme" }

local function pseudo_get(o, k)
  if rawget(o, "trailers") then return nil end
  local s = o.s
  if o.resp then
    if k == ":status" then local st = s.response.status; return st and tostring(st) end
    return nil
  end
  if k == ":path" then return s.request.path
  elseif k == ":method" then return s.request.method
  elseif k == ":authority" then return s.request.authority
  elseif k == ":scheme" then return s.request.scheme
  end
  return nil
end

local function pseudo_set(o, k, v)
  local s = o.s
  if rawget(o, "trailers") then error(fmt("trailer %s: pseudo-headers are not trailers", k), 3) end
  if o.resp then
    if k == ":status" then
      local st = tointeger(tonumber(v))
      if not st then error(":status must be an integer", 3) end
      s.response.status = st
      return
    end
  elseif k == ":path" then s.request.path = v; return
  elseif k == ":authority" then s.request.authority = v; return
  end
  error(fmt("header %s cannot be changed in Moonlet", k), 3)
end

local function is_pseudo(k) return byte(k, 1) == 58 end

local H = {}
function H:get(k)
  k = str(k, "header name")
  if is_pseudo(k) then return pseudo_get(self, k) end
  local all = self.h:get_all(k)
  local n = #all
  if n == 0 then return nil elseif n == 1 then return all[1] end
  return concat(all, ",")
end
function H:getAtIndex(k, i)
  k = str(k, "header name")
  i = tointeger(i)
  if not i or i < 0 then return nil end
  if is_pseudo(k) then if i == 0 then return pseudo_get(self, k) end return nil end
  return self.h:get_all(k)[i + 1]
end
function H:getNumValues(k)
  k = str(k, "header name")
  if is_pseudo(k) then return pseudo_get(self, k) and 1 or 0 end
  return #self.h:get_all(k)
end
function H:add(k, v)
  k = str(k, "header name"); v = str(v, "header value")
  if is_pseudo(k) then return pseudo_set(self, k, v) end
  self.h:add(k, v)
end
function H:replace(k, v)
  k = str(k, "header name"); v = str(v, "header value")
  if is_pseudo(k) then return pseudo_set(self, k, v) end
  self.h:set(k, v)
end
function H:remove(k)
  k = str(k, "header name")
  if is_pseudo(k) then error(fmt("header %s cannot be removed", k), 2) end
  self.h:remove(k)
end
local HeadersMT = class("headers", H)
HeadersMT.__pairs = function(self)
  local list, n = {}, 0
  local trailers = rawget(self, "trailers")
  if trailers then
  elseif self.resp then
    local st = self.s.response.status
    if st then list[1] = ":status"; list[2] = tostring(st); n = 2 end
  else
    for _, k in ipairs(REQ_PSEUDO) do
      list[n + 1] = k; list[n + 2] = pseudo_get(self, k); n = n + 2
    end
  end
  for k, v in self.h:pairs() do
    if self.resp or trailers or k ~= "host" then list[n + 1] = k; list[n + 2] = v; n = n + 2 end
  end
  local i = -1
  return function()
    i = i + 2
    local k = list[i]
    if k then return k, list[i + 1] end
  end, self, nil
end

-- Buffers (the buffered request body) --------------------------------------

local B = {}
function B:length() return #self.data end
function B:getBytes(index, length)
  index = tointeger(index); length = tointeger(length)
  local d = self.data
  if not index or not length or index < 0 or length < 0 or index > #d or length > #d - index then
    error(fmt("getBytes(%s, %s): index + length out of range (buffer length %d)", tostring(index), tostring(length), #d), 2)
  end
  return sub(d, index + 1, index + length)
end
function B:setBytes(v)
  v = str(v, "setBytes(string): argument")
  if self.resp then self.s.response:set_body(v) else set_body(self.s, v) end
  self.data = v
  return #v
end
local BufferMT = class("buffer", B)

-- The buffered body of the handle's flow (request or response).
local function flow_body(self)
  local b
  if self.resp then b = self.s.response:body() else b = self.s.request:body() end
  if b == nil then error("body(): the " .. (self.resp and "response" or "request") .. " body was not buffered", 3) end
  return b
end

-- Stream info, connection, metadata -----------------------------------------

local DM = {}
local DMKEY = "envoy.dynamic_metadata"
local function dm_table(s, make)
  local v = s.vars
  local t = rawget(v, DMKEY)
  if t == nil and make then t = {}; v[DMKEY] = t end
  return t
end
function DM:get(filter) local t = dm_table(self.s, false); return t and t[filter] end
function DM:set(filter, key, value)
  filter = str(filter, "dynamicMetadata():set filter name"); key = str(key, "dynamicMetadata():set key")
  local t = dm_table(self.s, true)
  local f = t[filter]
  if f == nil then f = {}; t[filter] = f end
  f[key] = value
end
local DynamicMetadataMT = class("dynamicMetadata", DM)
DynamicMetadataMT.__pairs = function(self) return next, dm_table(self.s, false) or {}, nil end

local SSL = {}
function SSL:peerCertificatePresented() return true end
function SSL:peerCertificateValidated() return true end
function SSL:uriSanPeerCertificate() return { "spiffe://" .. self.principal } end
function SSL:uriSanLocalCertificate() return { own_spiffe() } end
local SSLMT = class("ssl", SSL)
local function ssl_of(s)
  local p = s.source.principal
  if p == nil or p == "" then return nil end
  return setmetatable({ principal = p }, SSLMT)
end

local SI = {}
function SI:protocol() return self.s.request.protocol end
function SI:downstreamLocalAddress() return local_address(self.s) end
SI.downstreamDirectLocalAddress = SI.downstreamLocalAddress
function SI:downstreamDirectRemoteAddress() return self.s.source.address end
SI.downstreamRemoteAddress = SI.downstreamDirectRemoteAddress
function SI:requestedServerName() return sni(self.s) end
function SI:routeName() return route_name(self.s) end
function SI:virtualClusterName() return "" end
function SI:dynamicMetadata() return setmetatable({ s = self.s }, DynamicMetadataMT) end
function SI:downstreamSslConnection() return ssl_of(self.s) end
local StreamInfoMT = class("streamInfo", SI)

local C = {}
function C:ssl() return ssl_of(self.s) end
local ConnectionMT = class("connection", C)

local MD = {}
function MD:get(k) local c = rawget(self, "conf"); if type(c) == "table" then return c[k] end return nil end
local MetadataMT = class("metadata", MD)
MetadataMT.__pairs = function(self) local c = rawget(self, "conf"); return next, type(c) == "table" and c or {}, nil end

-- The stream handle -----------------------------------------------------------

local S = {}
function S:headers()
  local hd = rawget(self, "hd")
  if hd == nil then
    local s = self.s
    hd = setmetatable({ s = s, resp = self.resp, h = self.resp and s.response.headers or s.request.headers }, HeadersMT)
    self.hd = hd
  end
  return hd
end
function S:body(always_wrap)
  local b = rawget(self, "buf")
  if b == nil then
    b = setmetatable({ s = self.s, resp = self.resp, data = flow_body(self) }, BufferMT)
    self.buf = b
  end
  if #b.data == 0 and not always_wrap then return nil end
  return b
end
function S:bodyChunks()
  local data = flow_body(self)
  local done = #data == 0
  local s, resp = self.s, self.resp
  return function()
    if done then return nil end
    done = true
    local b = rawget(self, "buf")
    if b == nil then b = setmetatable({ s = s, resp = resp, data = data }, BufferMT); self.buf = b end
    return b
  end
end
-- trailers(): the flow's trailers once its body is in (buffered), nil when it has none.
-- Response trailers take get/getAtIndex/getNumValues/add/replace/remove/pairs as headers;
-- request trailers are read-only (Moonlet's s.request.trailers).
function S:trailers()
  local tr = rawget(self, "tr")
  if tr == nil then
    local s = self.s
    local t = self.resp and s.response.trailers or s.request.trailers
    local any = false
    for _ in t:pairs() do any = true; break end
    if not any then return nil end
    tr = setmetatable({ s = s, resp = false, trailers = true, h = t }, HeadersMT)
    self.tr = tr
  end
  return tr
end
function S:respond(headers, body)
  if self.resp then error("respond() is only valid in the request flow", 2) end
  if type(headers) ~= "table" then error("respond(headers, body): headers must be a table", 2) end
  local status = tointeger(tonumber(headers[":status"]))
  if not status then error("respond(): the :status header must be set", 2) end
  local out = {}
  for k, v in pairs(headers) do
    if k ~= ":status" then
      if type(v) == "table" then
        -- One header line per value (set-cookie), as Envoy writes them.
        local list = {}
        for i, x in ipairs(v) do list[i] = str(x, "respond() header value") end
        out[k] = list
      else
        out[k] = str(v, "respond() header value")
      end
    end
  end
  self.s:respond(status, body ~= nil and str(body, "respond() body") or "", out)
  error(RESPONDED, 0)
end
function S:httpCall(cluster, headers, body, a4, a5)
  cluster = str(cluster, "httpCall(): cluster")
  if type(headers) ~= "table" then error("httpCall(): headers must be a table", 2) end
  local timeout, async, dups = a4, a5, false
  if type(a4) == "table" then timeout = a4.timeout_ms; async = a4.asynchronous; dups = a4.return_duplicate_headers == true end
  local h, method, path = {}, nil, nil
  for k, v in pairs(headers) do
    if k == ":method" then method = v
    elseif k == ":path" then path = v
    elseif k == ":authority" then h.host = v
    elseif not is_pseudo(k) then h[k] = v end
  end
  if not method or not path or not h.host then error("httpCall(): the :method, :path and :authority headers must be set", 2) end
  timeout = tointeger(timeout)
  if timeout == nil or timeout <= 0 or timeout > 60000 then timeout = 60000 end
  local opts = { method = method, path = path, headers = h, body = body, timeout_ms = timeout, header_lists = true }
  if async then fire(cluster, opts); return end
  local res, err = http_call(cluster, opts)
  if not res then
    ldebug("httpCall to", cluster, "failed:", err)
    return { [":status"] = "503" }, "upstream failure"
  end
  -- A repeated response header: its last value, as Envoy; every value (a table) with
  -- return_duplicate_headers = true.
  local out = { [":status"] = tostring(res.status) }
  for k, list in pairs(res.headers) do
    local n = #list
    if dups and n > 1 then out[k] = list else out[k] = list[n] end
  end
  local b = res.body
  if b == "" then b = nil end
  return out, b
end
function S:metadata() return setmetatable({ conf = rawget(self, "conf") }, MetadataMT) end
function S:streamInfo() return setmetatable({ s = self.s }, StreamInfoMT) end
function S:connection() return setmetatable({ s = self.s }, ConnectionMT) end
function S:setUpstreamOverrideHost(host, strict)
  if override(self.s, str(host, "setUpstreamOverrideHost(): host"), strict) == "respond" then error(RESPONDED, 0) end
end
function S:clearRouteCache()
  if self.s.route.cluster ~= "" then error("clearRouteCache(): the route is already decided (this plugin runs after Istio's router)", 2) end
end
function S:base64Escape(v) return b64(str(v, "base64Escape(): argument")) end
function S:timestamp() return floor(now() * 1000) end
function S:timestampString(res)
  if res == 1 then return fmt("%d", floor(now() * 1000000)) end
  return fmt("%d", floor(now() * 1000))
end
-- The log natives name the position of the script's call (these methods are not tail
-- calls: the script's frame is the one above them).
function S:logTrace(m) log_debug(m) end
function S:logDebug(m) log_debug(m) end
function S:logInfo(m) log_info(m) end
function S:logWarn(m) log_warn(m) end
function S:logErr(m) log_err(m) end
function S:logCritical(m) log_err(m) end
function S:log(level, m)
  level = tointeger(level) or 2
  if level <= 1 then log_debug(m) elseif level == 2 then log_info(m) elseif level == 3 then log_warn(m) else log_err(m) end
end
local HandleMT = class("handle", S)

local function run(fn, s, conf, resp, phase)
  local ok, err = pcall(fn, setmetatable({ s = s, conf = conf, resp = resp }, HandleMT))
  if not ok and err ~= RESPONDED then script_error(phase, type(err) == "string" and err or tostring(err)) end
end

local M = {}
if on_request then
  if buffer_request then
    function M.on_request() return STOP end
    function M.on_request_body(s, conf, chunk, eos)
      if eos then run(on_request, s, conf, false, "envoy_on_request") end
    end
  else
    function M.on_request(s, conf) run(on_request, s, conf, false, "envoy_on_request") end
  end
end
if on_response then
  if buffer_response then
    -- Envoy's body() and trailers() wait for the end of the response: the response is
    -- buffered and the script runs once it is complete, its head still editable.
    -- A local reply's body is handed over the same way.
    function M.on_response() return STOP end
    function M.on_response_body(s, conf, chunk, eos)
      if eos and s.response:body() ~= nil then run(on_response, s, conf, true, "envoy_on_response") end
    end
  else
    function M.on_response(s, conf) run(on_response, s, conf, true, "envoy_on_response") end
  end
end
return M
"""#
}
