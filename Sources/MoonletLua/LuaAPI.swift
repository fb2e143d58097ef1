import CLua
import CLuaBounded
import MoonletCore
import MoonletRegex
import MoonletConfig
import NIOCore
import Logging
#if canImport(Foundation)
import Foundation
#endif

/// The C functions behind the Lua API (DESIGN.md §4). Each is a Swift
/// `@convention(c)` function called through a C trampoline: on error it pushes a
/// message and returns MOONLET_LUA_RAISE, and the trampoline raises it from C, so a
/// Lua error never unwinds Swift frames.
enum LuaAPI {
    static let raise: Int32 = -1

    @inline(__always)
    static func fail(_ L: OpaquePointer?, _ msg: String) -> Int32 {
        lua_pushstring(L, msg)
        return raise
    }

    @inline(__always)
    static func str(_ L: OpaquePointer?, _ idx: Int32) -> String? {
        guard lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER else { return nil }
        var len = 0
        let p = lua_tolstring(L, idx, &len)!
        return String(decoding: UnsafeRawBufferPointer(start: p, count: len), as: UTF8.self)
    }

    /// Bytes of a Lua string argument, valid while it stays on the stack.
    @inline(__always)
    static func bytes(_ L: OpaquePointer?, _ idx: Int32) -> UnsafeRawBufferPointer? {
        guard lua_type(L, idx) == LUA_TSTRING else { return nil }
        var len = 0
        let p = lua_tolstring(L, idx, &len)!
        return UnsafeRawBufferPointer(start: p, count: len)
    }

    /// The first `max` bytes of the string (or number) at `idx`, copied without the rest.
    static func prefix(_ L: OpaquePointer?, _ idx: Int32, _ max: Int) -> String {
        var len = 0
        guard let p = lua_tolstring(L, idx, &len) else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: Swift.min(len, Swift.max(0, max))), as: UTF8.self)
    }

    static func push(_ L: OpaquePointer?, _ s: String) {
        var s = s
        s.withUTF8 { p in _ = p.baseAddress.map { lua_pushlstring(L, UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self), p.count) } ?? lua_pushstring(L, "") }
    }

    // MARK: wrappers

    static func wrapper(_ id: UInt64, _ kind: WrapperKind) -> UInt { UInt(id) << 4 | kind.rawValue }

    /// Resolves a wrapper argument to the running stream, or fails.
    @inline(__always)
    static func resolve(_ L: OpaquePointer?, _ idx: Int32, _ fn: String) -> (LuaVM, ProxyStream, WrapperKind)? {
        guard ml_islight(L, idx) != 0 else { return nil }
        let v = ml_tolight(L, idx)
        let vm = LuaVM.vm(L)
        guard let kind = WrapperKind(rawValue: v & 0xF), let s = vm.current, UInt64(v >> 4) == vm.currentID, s.isActive else { return nil }
        return (vm, s, kind)
    }

    static let outside = "object used outside of its stream"
    /// Installs the metatable shared by all light userdata (only wrappers are ever light
    /// userdata inside the sandbox).
    static func installWrapperMetatable(_ L: OpaquePointer) {
        ml_pushlight(L, 0)
        lua_createtable(L, 0, 3)
        ml_pushapifunction(L, index); lua_setfield(L, -2, "__index")
        ml_pushapifunction(L, newindex); lua_setfield(L, -2, "__newindex")
        ml_pushapifunction(L, tostringW); lua_setfield(L, -2, "__tostring")
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        lua_setmetatable(L, -2)
        ml_pop(L, 1)
        // Method tables, kept in the registry by name.
        lua_createtable(L, 0, 8)
        for (n, f) in [("get", hGet), ("get_all", hGetAll), ("set", hSet), ("add", hAdd), ("remove", hRemove), ("pairs", hPairs)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
        lua_setfield(L, ml_registryindex(), "moonlet.header_methods")
        TrailersAPI.install(L)
        ml_pushapifunction(L, respond); lua_setfield(L, ml_registryindex(), "moonlet.respond")
        ml_pushapifunction(L, body); lua_setfield(L, ml_registryindex(), "moonlet.body")
        ml_pushapifunction(L, setBody); lua_setfield(L, ml_registryindex(), "moonlet.set_body")
        lua_createtable(L, 0, 1)
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        lua_setfield(L, ml_registryindex(), "moonlet.vars_mt")
    }

    static let tostringW: lua_CFunction = { L in
        let v = ml_tolight(L, 1)
        lua_pushstring(L, "moonlet.\(WrapperKind(rawValue: v & 0xF).map { "\($0)" } ?? "?")#\(v >> 4)")
        return 1
    }

    static let index: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "index") else { return fail(L, outside) }
        if kind == .requestHeaders || kind == .responseHeaders {
            // Methods only: looked up by the key as given, no string made.
            lua_getfield(L, ml_registryindex(), "moonlet.header_methods")
            lua_pushvalue(L, 2)
            lua_rawget(L, -2)
            return 1
        }
        if kind == .requestTrailers || kind == .responseTrailers { return TrailersAPI.index(L) }
        guard let key = bytes(L, 2) else { lua_pushnil(L); return 1 }
        let id = s.id
        // Keys are compared as bytes (no String per access): the common ones first.
        @inline(__always) func kw(_ lit: StaticString) -> Bool {
            lit.utf8CodeUnitCount == key.count && memcmp(key.baseAddress!, lit.utf8Start, key.count) == 0
        }
        switch kind {
        case .stream:
            if kw("request") { ml_pushlight(L, wrapper(id, .request)) }
            else if kw("response") { ml_pushlight(L, wrapper(id, .response)) }
            else if kw("vars") {
                let ctx = s.luaCtx
                if ctx.varsRef == LUA_NOREF {
                    // Locked metatable: a plugin cannot make another's reads of s.vars run its code.
                    lua_createtable(L, 0, 4)
                    lua_getfield(L, ml_registryindex(), "moonlet.vars_mt")
                    lua_setmetatable(L, -2)
                    ctx.varsRef = ml_ref(L)
                }
                ml_getregistry_ref(L, ctx.varsRef)
            }
            else if kw("route") { ml_pushlight(L, wrapper(id, .route)) }
            else if kw("respond") { lua_getfield(L, ml_registryindex(), "moonlet.respond") }
            else if kw("source") { ml_pushlight(L, wrapper(id, .source)) }
            else if kw("destination") { ml_pushlight(L, wrapper(id, .destination)) }
            else if kw("id") { lua_pushinteger(L, lua_Integer(s.id)) }
            else if kw("listener") { lua_pushstring(L, s.listener == .inbound ? "inbound" : "outbound") }
            else if kw("request_id") { push(L, s.withRequest({ $0.first("x-request-id") }) ?? "") }
            else if kw("auth") { AuthnAPI.pushAuth(L, s) }
            else { lua_pushnil(L) }
        case .request:
            if kw("headers") { ml_pushlight(L, wrapper(id, .requestHeaders)) }
            else if kw("trailers") { ml_pushlight(L, wrapper(id, .requestTrailers)) }
            else if kw("path") { push(L, s.withRequest({ $0.target })) }
            else if kw("original_path") { push(L, s.originalPath ?? s.withRequest({ $0.target })) }
            else if kw("method") { push(L, s.withRequest({ $0.method })) }
            else if kw("authority") { push(L, s.withRequest({ $0.host })) }
            else if kw("scheme") { push(L, "http") }
            else if kw("protocol") { push(L, s.protocolName) }
            else if kw("body") { lua_getfield(L, ml_registryindex(), "moonlet.body") }
            else if kw("set_body") { lua_getfield(L, ml_registryindex(), "moonlet.set_body") }
            else { lua_pushnil(L) }
        case .response:
            if kw("headers") { ml_pushlight(L, wrapper(id, .responseHeaders)) }
            else if kw("trailers") { ml_pushlight(L, wrapper(id, .responseTrailers)) }
            else if kw("status") {
                let st = s.status
                if st == 0 { lua_pushnil(L) } else { lua_pushinteger(L, lua_Integer(st)) }
            }
            else if kw("body") { lua_getfield(L, ml_registryindex(), "moonlet.body") }
            else if kw("set_body") { lua_getfield(L, ml_registryindex(), "moonlet.set_body") }
            else { lua_pushnil(L) }
        case .requestHeaders, .responseHeaders, .requestTrailers, .responseTrailers:
            lua_pushnil(L) // handled above
        case .source, .destination, .route:
            let k = String(decoding: key, as: UTF8.self)
            switch (kind, k) {
            case (.source, "address"): push(L, s.source.address)
            case (.source, "principal"): push(L, s.source.principal)
            case (.source, "namespace"): push(L, s.source.namespace)
            case (.destination, "address"): push(L, s.destination.address)
            case (.destination, "port"): lua_pushinteger(L, lua_Integer(s.destination.port))
            case (.destination, "service"): push(L, s.destination.service)
            case (.route, "cluster"): push(L, s.route.cluster)
            case (.route, "host"): push(L, s.route.host)
            case (.route, "subset"): push(L, s.route.subset)
            case (.route, "port"): lua_pushinteger(L, lua_Integer(s.route.port))
            case (.route, "timeout_ms"): lua_pushinteger(L, lua_Integer(s.route.timeoutMs))
            case (.route, "endpoint"):
                let e = s.route.endpoint
                if e.isEmpty { lua_pushnil(L) } else { push(L, e.contains(":") ? "[\(e)]:\(s.route.endpointPort)" : "\(e):\(s.route.endpointPort)") }
            case (.route, "retry"): pushRetry(L, s.route.retry)
            default: lua_pushnil(L)
            }
        }
        _ = vm
        return 1
    }

    static let newindex: lua_CFunction = { L in
        guard let (_, s, kind) = resolve(L, 1, "newindex") else { return fail(L, outside) }
        guard let k = str(L, 2) else { return fail(L, "field name must be a string") }
        if kind == .route && LuaVM.vm(L).inUpstreamFailure { return fail(L, "route.\(k): s.route cannot be changed in on_upstream_failure") }
        switch (kind, k) {
        case (.request, "path"):
            guard let v = str(L, 3), v.utf8.withContiguousStorageIfAvailable({ HTTPHeadParser.isOriginForm(UnsafeRawBufferPointer($0)) }) ?? false else {
                return fail(L, "request.path must be origin-form: \"/\", then visible ASCII without \"#\"")
            }
            s.request.targetOverride = v
        case (.request, "authority"):
            guard let v = str(L, 3), v.utf8.count <= 16 * 1024, v.utf8.withContiguousStorageIfAvailable({ isHostValue(UnsafeRawBufferPointer($0)) }) ?? false else {
                return fail(L, "request.authority: not a valid host[:port]")
            }
            s.request.setHost(v)
        case (.route, "cluster"):
            return setCluster(L, s)
        case (.route, "endpoint"):
            return setEndpoint(L, s)
        case (.route, "retry"):
            return setRetry(L, s)
        case (.route, "host"), (.route, "subset"):
            guard let v = str(L, 3), HeaderValidation.isValidValue(v) else { return fail(L, "route.\(k) must be a string") }
            if k == "host" { s.route.host = v } else { s.route.subset = v }
        case (.route, "port"):
            guard lua_isinteger(L, 3) != 0, (0...65535).contains(ml_tointeger(L, 3)) else { return fail(L, "route.port must be an integer 0-65535") }
            s.route.port = Int(ml_tointeger(L, 3))
        case (.route, "timeout_ms"):
            guard lua_isinteger(L, 3) != 0, (0...maxTimeoutMs).contains(ml_tointeger(L, 3)) else {
                return fail(L, "route.timeout_ms must be an integer 0-\(maxTimeoutMs) (0: the listener's stream timeout)")
            }
            s.route.timeoutMs = Int(ml_tointeger(L, 3))
        case (.response, "status"):
            guard lua_isinteger(L, 3) != 0 else { return fail(L, "response.status must be an integer") }
            let st = Int(ml_tointeger(L, 3))
            guard (200...599).contains(st) else { return fail(L, "response.status must be 200-599, got \(st)") }
            if s.localReply != nil { s.localReply!.status = st }
            else if let old = s.response?.status, LuaVM.vm(L).phaseIndex == 2 || (LuaVM.vm(L).phaseIndex == 3 && s.bufferedResponseBody != nil) {
                // The upstream's response, in on_response, or with its whole body held
                // (on_response_body after STOP_AND_BUFFER; the head is framed after it),
                // as Envoy lets a script replace :status. 204 and 304 have no body: a change to or from them would
                // break the framing of the body that follows.
                if old != st && (old == 204 || old == 304 || st == 204 || st == 304) {
                    return fail(L, "response.status: \(old) -> \(st) would change whether the response has a body")
                }
                s.response!.status = st
            }
            else { return fail(L, "response.status can be set on local replies, in on_response, and in on_response_body with the whole body held") }
        default:
            return fail(L, "cannot set field '\(k)'")
        }
        return 0
    }

    // MARK: route steering

    /// Bounds of what a filter may write into `s.route` (documented in docs/lua-api.md):
    /// a stream timeout of at most 24 hours, at most 10 retries (11 upstream tries), a
    /// per-try timeout of at most one hour.
    static let maxTimeoutMs: lua_Integer = 86_400_000
    static let maxRetryAttempts: lua_Integer = 10
    static let maxPerTryTimeoutMs: lua_Integer = 3_600_000

    /// A value of a filter quoted in an error message: control characters escaped, cut at 256 bytes.
    static func quoted(_ v: String) -> String {
        let cut = v.utf8.count > 256 ? String(decoding: v.utf8.prefix(256), as: UTF8.self) + "…" : v
        return "'" + LogText.escape(cut) + "'"
    }

    /// s.route.cluster = "outbound|PORT|SUBSET|HOST" | "PassthroughCluster" | "":
    /// resolved against the stream's snapshot; sets the whole upstream side of the route
    /// (cluster, host, subset, port, destination service, hash key) and drops any
    /// endpoint pick. "" clears the steering (the router decides).
    static func setCluster(_ L: OpaquePointer?, _ s: ProxyStream) -> Int32 {
        guard lua_type(L, 3) == LUA_TSTRING, let v = str(L, 3) else { return fail(L, "route.cluster must be a string (outbound|PORT|SUBSET|HOST or PassthroughCluster)") }
        if v.isEmpty {
            s.route.cluster = ""; s.route.host = ""; s.route.subset = ""; s.route.port = 0
            s.route.upstreamCluster = nil
            s.route.endpoint = ""; s.route.endpointPort = 0; s.route.endpointIndex = -1
            s.route.hashKey = nil
            return 0
        }
        guard let snap = snapshot(of: s) else { return fail(L, "route.cluster: unknown cluster \(quoted(v)): the stream has no configuration snapshot") }
        let target = snap.routes.resolveCluster(v)
        if target != nil {
            s.route.endpoint = ""; s.route.endpointPort = 0; s.route.endpointIndex = -1
            s.route.hashKey = nil
        }
        switch target {
        case .cluster(let n)?:
            s.route.cluster = n.cluster.name
            s.route.upstreamCluster = n.cluster
            s.route.host = n.host
            s.route.subset = n.subset
            s.route.port = n.port
            s.destination.service = n.host
            if let hp = n.cluster.hashPolicy { hashKey(s, hp, vm: LuaVM.vm(L)) }
        case .passthrough?:
            s.route.cluster = RouteTable.passthroughCluster
            s.route.upstreamCluster = nil
            s.route.host = ""; s.route.subset = ""; s.route.port = 0
        case nil:
            let form = RouteTable.splitClusterName(v) == nil ? " (names have the form outbound|PORT|SUBSET|HOST, or PassthroughCluster)" : ""
            return fail(L, "route.cluster: unknown cluster \(quoted(v))\(form)")
        }
        return 0
    }

    /// Splits "ip:port" or "[ipv6]:port" (port 1-65535).
    static func splitHostPort(_ v: String) -> (String, Int)? {
        var host: Substring, portText: Substring
        if v.hasPrefix("[") {
            guard let close = v.firstIndex(of: "]"), v[v.index(after: close)...].hasPrefix(":") else { return nil }
            host = v[v.index(after: v.startIndex)..<close]
            portText = v[v.index(close, offsetBy: 2)...]
        } else {
            guard let colon = v.lastIndex(of: ":"), !v[..<colon].contains(":") else { return nil }
            host = v[..<colon]
            portText = v[v.index(after: colon)...]
        }
        guard !host.isEmpty, portText.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let port = Int(portText), (1...65535).contains(port) else { return nil }
        return (String(host), port)
    }

    /// Whether `a` is an IPv4 or IPv6 literal.
    static func isIPLiteral(_ a: String) -> Bool {
        var buf = [UInt8](repeating: 0, count: 16)
        return inet_pton(AF_INET, a, &buf) == 1 || inet_pton(AF_INET6, a, &buf) == 1
    }

    /// s.route.endpoint = "ip:port" | nil: overrides the balancer's pick (Envoy's
    /// setUpstreamOverrideHost). The endpoint must be one of the route's cluster's, so
    /// its pool, TLS and outlier state apply; with PassthroughCluster any IP literal.
    static func setEndpoint(_ L: OpaquePointer?, _ s: ProxyStream) -> Int32 {
        if ml_isnoneornil(L, 3) != 0 {
            s.route.endpoint = ""; s.route.endpointPort = 0; s.route.endpointIndex = -1
            return 0
        }
        guard lua_type(L, 3) == LUA_TSTRING, let v = str(L, 3), let (addr, port) = splitHostPort(v) else {
            return fail(L, "route.endpoint must be \"ip:port\" or \"[ipv6]:port\"")
        }
        if let c = s.route.upstreamCluster {
            let want = addr.lowercased()
            for i in 0..<c.endpointCount {
                let e = c.endpoint(i)
                guard e.port == port else { continue }
                var a = Substring(e.address)
                if a.hasPrefix("[") && a.hasSuffix("]") { a = a.dropFirst().dropLast() }
                guard a.lowercased() == want else { continue }
                s.route.endpointIndex = i
                s.route.endpoint = e.address
                s.route.endpointPort = e.port
                s.destination.address = e.address
                s.destination.port = e.port
                return 0
            }
            return fail(L, "route.endpoint: \(quoted(v)) is not an endpoint of cluster \(quoted(s.route.cluster))")
        }
        if s.route.cluster == RouteTable.passthroughCluster {
            guard isIPLiteral(addr) else { return fail(L, "route.endpoint: \(quoted(v)): PassthroughCluster needs an IP address") }
            s.route.endpointIndex = -1
            s.route.endpoint = addr
            s.route.endpointPort = port
            s.destination.address = addr
            s.destination.port = port
            return 0
        }
        return fail(L, "route.endpoint: the route has no cluster yet: set route.cluster first (the endpoint must be one of its endpoints)")
    }

    /// s.route.retry = { attempts = N, per_try_timeout_ms = T, retry_on = "..." } | nil.
    static func setRetry(_ L: OpaquePointer?, _ s: ProxyStream) -> Int32 {
        if ml_isnoneornil(L, 3) != 0 { s.route.retry = nil; return 0 }
        guard ml_istable(L, 3) != 0 else { return fail(L, "route.retry must be a table {attempts, per_try_timeout_ms, retry_on} or nil") }
        var attempts: lua_Integer?
        var perTry: lua_Integer = 0
        var retryOn = RetrySpec.istioDefault.retryOn
        lua_pushnil(L)
        while lua_next(L, 3) != 0 {
            guard lua_type(L, -2) == LUA_TSTRING, let k = str(L, -2) else { ml_pop(L, 2); return fail(L, "route.retry: field names must be strings") }
            switch k {
            case "attempts":
                guard lua_isinteger(L, -1) != 0, (0...maxRetryAttempts).contains(ml_tointeger(L, -1)) else {
                    ml_pop(L, 2); return fail(L, "route.retry.attempts must be an integer 0-\(maxRetryAttempts)")
                }
                attempts = ml_tointeger(L, -1)
            case "per_try_timeout_ms":
                guard lua_isinteger(L, -1) != 0, (0...maxPerTryTimeoutMs).contains(ml_tointeger(L, -1)) else {
                    ml_pop(L, 2); return fail(L, "route.retry.per_try_timeout_ms must be an integer 0-\(maxPerTryTimeoutMs) (0: none)")
                }
                perTry = ml_tointeger(L, -1)
            case "retry_on":
                guard lua_type(L, -1) == LUA_TSTRING, let v = str(L, -1) else { ml_pop(L, 2); return fail(L, "route.retry.retry_on must be a string") }
                if let bad = RetrySpec.unknownRetryOnToken(v) { ml_pop(L, 2); return fail(L, "route.retry.retry_on: unknown condition \(quoted(bad))") }
                retryOn = v
            default:
                ml_pop(L, 2); return fail(L, "route.retry: unknown field \(quoted(k)) (attempts, per_try_timeout_ms, retry_on)")
            }
            ml_pop(L, 1)
        }
        guard let attempts else { return fail(L, "route.retry.attempts is required (0-\(maxRetryAttempts))") }
        s.route.retry = RetrySpec(attempts: Int(attempts), perTryTimeoutMs: Int(perTry), retryOn: retryOn)
        return 0
    }

    /// Pushes a retry policy as {attempts, per_try_timeout_ms, retry_on}, or nil.
    static func pushRetry(_ L: OpaquePointer?, _ r: RetrySpec?) {
        guard let r else { lua_pushnil(L); return }
        lua_createtable(L, 0, 3)
        lua_pushinteger(L, lua_Integer(r.attempts)); lua_setfield(L, -2, "attempts")
        lua_pushinteger(L, lua_Integer(r.perTryTimeoutMs)); lua_setfield(L, -2, "per_try_timeout_ms")
        push(L, r.retryOn); lua_setfield(L, -2, "retry_on")
    }

    // MARK: headers

    /// Runs `body` on the head the headers wrapper at index 1 stands for.
    @inline(__always)
    static func withHead<T>(_ L: OpaquePointer?, _ body: (inout HTTPHead, ProxyStream) -> T) -> T? {
        guard let (_, s, kind) = resolve(L, 1, "headers") else { return nil }
        if kind == .requestHeaders { return body(&s.request, s) }
        if kind == .responseHeaders, s.response != nil { return body(&s.response!, s) }
        return nil
    }

    static func lowerName(_ L: OpaquePointer?, _ idx: Int32) -> String? {
        guard let b = bytes(L, idx), b.count > 0 else { return nil }
        var out = [UInt8](b)
        for i in out.indices where out[i] >= 65 && out[i] <= 90 { out[i] |= 0x20 }
        return String(decoding: out, as: UTF8.self)
    }

    static let hGet: lua_CFunction = { L in
        guard let name = bytes(L, 2), name.count > 0, name.count <= 256 else { return fail(L, "headers:get(name): name must be a non-empty string") }
        var lower = [UInt8](repeating: 0, count: name.count)
        for i in 0..<name.count { var c = name[i]; if c >= 65 && c <= 90 { c |= 0x20 }; lower[i] = c }
        let found: Bool? = withHead(L) { head, _ in
            let n = lower.withUnsafeBytes { lb -> Int? in
                for i in 0..<head.fields.count where !head.fields[i].removed && head.nameEquals(i, lowercased: lb) { return i }
                return nil
            }
            if let i = n {
                let f = head.fields[i]
                _ = head.bytes.withUnsafeReadableBytes { raw in
                    lua_pushlstring(L, raw.baseAddress!.advanced(by: Int(f.valueStart)).assumingMemoryBound(to: CChar.self), Int(f.valueLength))
                }
                return true
            }
            if !head.added.isEmpty {
                let ln = String(decoding: lower, as: UTF8.self)
                for a in head.added where a.name == ln {
                    a.withValueBytes { v in
                        if let b = v.baseAddress { lua_pushlstring(L, b.assumingMemoryBound(to: CChar.self), v.count) } else { lua_pushstring(L, "") }
                    }
                    return true
                }
            }
            return false
        }
        guard let found else { return fail(L, outside) }
        if !found { lua_pushnil(L) }
        return 1
    }

    static let hGetAll: lua_CFunction = { L in
        guard let name = lowerName(L, 2) else { return fail(L, "headers:get_all(name): name must be a non-empty string") }
        guard let values = withHead(L, { head, _ in head.all(name) }) else { return fail(L, outside) }
        lua_createtable(L, Int32(values.count), 0)
        for (i, v) in values.enumerated() { push(L, v); lua_rawseti(L, -2, lua_Integer(i + 1)) }
        return 1
    }

    static func nameValue(_ L: OpaquePointer?, _ fn: String) -> (String, String)? {
        guard let n = str(L, 2), HeaderValidation.isToken(n) else { return nil }
        guard lua_type(L, 3) == LUA_TSTRING || lua_type(L, 3) == LUA_TNUMBER, let v = str(L, 3) else { return nil }
        return (n, v)
    }

    static func setOrAdd(_ L: OpaquePointer?, add: Bool) -> Int32 {
        let fn = add ? "add" : "set"
        if !add && ml_isnoneornil(L, 3) != 0 {
            guard let n = lowerName(L, 2) else { return fail(L, "headers:set(name, nil): bad name") }
            if let why = removeRefused(L, n) { return fail(L, "headers:set(\(n), nil): \(why)") }
            guard withHead(L, { head, _ in head.removeLowercased(n) }) != nil else { return fail(L, outside) }
            return 0
        }
        // Name: checked as a token and lowercased straight from Lua's bytes.
        guard let nb = bytes(L, 2), nb.count > 0, nb.count <= 256 else { return fail(L, "headers:\(fn)(name, value): name must be a valid header token") }
        var valid = true
        let lower = String(unsafeUninitializedCapacity: nb.count) { out in
            for i in 0..<nb.count {
                var c = nb[i]
                if !HeaderValidation.isTchar(c) { valid = false }
                if c >= 65 && c <= 90 { c |= 0x20 }
                out[i] = c
            }
            return nb.count
        }
        guard valid else { return fail(L, "headers:\(fn)(name, value): name must be a valid header token") }
        guard lua_type(L, 3) == LUA_TSTRING || lua_type(L, 3) == LUA_TNUMBER, let vb = bytes(L, 3) ?? (lua_type(L, 3) == LUA_TNUMBER ? { _ = lua_tolstring(L, 3, nil); return bytes(L, 3) }() : nil) else {
            return fail(L, "headers:\(fn)(\(lower), value): value must be a string")
        }
        // The parser's field-value rule (HeaderValidation.isFieldValue): no control byte but HTAB, no DEL.
        for c in vb where (c < 32 && c != 9) || c == 127 { return fail(L, "headers:\(fn)(\(lower), value): value contains a control character (CR, LF, NUL, DEL...)") }
        guard vb.count <= 16 * 1024 else { return fail(L, "headers:\(fn)(\(lower), value): value longer than 16 KiB") }
        let v = String(decoding: vb, as: UTF8.self)
        if let why = managedHeader(lower) { return fail(L, "headers:\(fn)(\(lower)): \(why)") }
        if lower == "host" {
            // One Host, as Envoy's :authority: set replaces it, add is refused.
            if add { return fail(L, "headers:add(host): a request has one Host; use headers:set(\"host\", v) to replace it") }
            guard isHostValue(vb) else { return fail(L, "headers:set(host, value): not a valid host[:port]") }
        }
        let done: Bool? = withHead(L) { head, _ in
            // What filters add is held per head outside the VM: bounded in count and bytes.
            // The proxy's own lines, added before the filter chain started, are not counted.
            guard head.added.count - head.addedBeforeFilters < maxAddedHeaders,
                  head.added.reduce(lower.utf8.count + vb.count, { $0 + $1.name.utf8.count + $1.value.utf8.count })
                    - head.addedBytesBeforeFilters <= maxAddedHeaderBytes
            else { return false }
            if lower == "host" { head.setHost(v) }
            else if add { head.addLowercased(lower, v) } else { head.removeLowercased(lower); head.addLowercased(lower, v) }
            return true
        }
        guard let done else { return fail(L, outside) }
        guard done else { return fail(L, "headers:\(fn)(\(lower)): more than \(maxAddedHeaders) headers or \(maxAddedHeaderBytes / 1024) KiB added to this head") }
        return 0
    }

    /// Headers filters may add or set on one head, and their total bytes (names and values).
    static let maxAddedHeaders = 100
    static let maxAddedHeaderBytes = 64 * 1024

    /// Why Lua may not write header `lower` (lowercased), or nil when it may. Framing and
    /// hop-by-hop headers are the proxy's: each hop gets its own (RFC 9110 §7.6.1).
    @inline(__always)
    static func managedHeader(_ lower: String) -> String? {
        ManagedHeaders.isFramingOrHopByHop(lower) ? "framing and hop-by-hop headers are managed by the proxy" : nil
    }

    /// A Host value by the parser's rule (host[:port], port 1-65535): nothing the edge
    /// would refuse, nothing that could make the upstream see another target.
    static func isHostValue(_ v: UnsafeRawBufferPointer) -> Bool {
        HTTPHeadParser.isValidHost(v)
    }

    /// Why removing `lower` from the headers at index 1 is refused: framing and
    /// hop-by-hop headers are the proxy's, and a request keeps its Host.
    static func removeRefused(_ L: OpaquePointer?, _ lower: String) -> String? {
        if let why = managedHeader(lower) { return why }
        if lower == "host" && ml_islight(L, 1) != 0 && WrapperKind(rawValue: ml_tolight(L, 1) & 0xF) == .requestHeaders {
            return "a request keeps its Host; set another value instead"
        }
        return nil
    }

    static let hSet: lua_CFunction = { L in setOrAdd(L, add: false) }
    static let hAdd: lua_CFunction = { L in setOrAdd(L, add: true) }

    static let hRemove: lua_CFunction = { L in
        guard let n = lowerName(L, 2) else { return fail(L, "headers:remove(name): name must be a non-empty string") }
        if let why = removeRefused(L, n) { return fail(L, "headers:remove(\(n)): \(why)") }
        guard withHead(L, { head, _ in head.removeLowercased(n) }) != nil else { return fail(L, outside) }
        return 0
    }

    /// headers:pairs() → iterator over (lowercased name, value), originals then additions.
    static let hPairs: lua_CFunction = { L in
        guard let all = withHead(L, { head, _ in head.allFields() }) else { return fail(L, outside) }
        lua_createtable(L, Int32(all.count * 2), 0)
        for (i, f) in all.enumerated() {
            push(L, f.name.lowercased()); lua_rawseti(L, -2, lua_Integer(2 * i + 1))
            push(L, f.value); lua_rawseti(L, -2, lua_Integer(2 * i + 2))
        }
        lua_pushinteger(L, 0)
        lua_pushcclosure(L, pairsNext, 2)
        return 1
    }

    static let pairsNext: lua_CFunction = { L in
        let i = ml_tointeger(L, ml_upvalueindex(2))
        lua_rawgeti(L, ml_upvalueindex(1), 2 * i + 1)
        if ml_isnil(L, -1) != 0 { return 1 }
        lua_rawgeti(L, ml_upvalueindex(1), 2 * i + 2)
        lua_pushinteger(L, i + 1); lua_copy(L, -1, ml_upvalueindex(2)); ml_pop(L, 1)
        return 2
    }

    // MARK: s:respond, s.request:body()

    /// Local-reply bounds checked in the binding (the writer validates the whole reply again).
    static let maxLocalReplyHeaders = 64
    static let maxLocalReplyValue = 16 * 1024

    static let respond: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "respond"), kind == .stream else { return fail(L, outside) }
        if vm.inUpstreamFailure { return fail(L, "s:respond cannot be used in on_upstream_failure (return moonlet.NO_RETRY to keep the failure)") }
        guard lua_isinteger(L, 2) != 0 else { return fail(L, "s:respond(status, body, headers): status must be an integer") }
        let status = Int(ml_tointeger(L, 2))
        guard (200...599).contains(status) else { return fail(L, "s:respond: status \(status) out of range 200-599") }
        var body = ""
        if ml_isnoneornil(L, 3) == 0 {
            guard let b = str(L, 3) else { return fail(L, "s:respond: body must be a string") }
            body = b
        }
        var headers: [(name: String, value: String)] = []
        if ml_isnoneornil(L, 4) == 0 {
            guard ml_istable(L, 4) != 0 else { return fail(L, "s:respond: headers must be a table") }
            lua_pushnil(L)
            while lua_next(L, 4) != 0 {
                // A value, or a list of values: one header line each (set-cookie).
                var values: [String] = []
                if ml_istable(L, -1) != 0 {
                    let count = Int(lua_rawlen(L, -1))
                    var i = 1
                    while i <= count && i <= maxLocalReplyHeaders + 1 {
                        lua_rawgeti(L, -1, lua_Integer(i))
                        guard let v = str(L, -1) else { ml_pop(L, 3); return fail(L, "s:respond: header names must be tokens and values strings (or lists of strings)") }
                        values.append(v); ml_pop(L, 1); i += 1
                    }
                } else if let v = str(L, -1) { values.append(v) }
                guard let n = str(L, -2), HeaderValidation.isToken(n), !values.isEmpty || ml_istable(L, -1) != 0 else {
                    ml_pop(L, 2); return fail(L, "s:respond: header names must be tokens and values strings (or lists of strings)")
                }
                let lower = n.lowercased()
                for v in values {
                    guard HeaderValidation.isFieldValue(v) else { ml_pop(L, 2); return fail(L, "s:respond: header \(n) value contains a control character (CR, LF, NUL, DEL...)") }
                    if let why = managedHeader(lower) { ml_pop(L, 2); return fail(L, "s:respond: header \(lower): \(why)") }
                    guard v.utf8.count <= maxLocalReplyValue else { ml_pop(L, 2); return fail(L, "s:respond: header \(lower) value longer than 16 KiB") }
                    guard headers.count < maxLocalReplyHeaders else { ml_pop(L, 2); return fail(L, "s:respond: more than \(maxLocalReplyHeaders) headers") }
                    headers.append((lower, v))
                }
                ml_pop(L, 1)
            }
        }
        s.respond(status, body: body, headers: headers)
        lua_pushstring(L, "respond")
        return 1
    }

    /// s.request:body() / s.response:body(): the buffered body (stop-and-buffer), nil
    /// when the body is not buffered (or, for the response, not complete yet).
    static let body: lua_CFunction = { L in
        guard let (_, s, kind) = resolve(L, 1, "body"), kind == .request || kind == .response else { return fail(L, outside) }
        let buffered = kind == .request ? s.bufferedRequestBody : s.bufferedResponseBody
        guard let b = buffered else { lua_pushnil(L); return 1 }
        b.withUnsafeReadableBytes { raw in
            ml_pushbytes(L, raw.baseAddress, raw.count)
        }
        return 1
    }

    /// s.request:set_body(bytes) / s.response:set_body(bytes): replaces the buffered body
    /// in the body phase's call with the whole body (the request's before it goes
    /// upstream, the response's before its head goes out); the content-length follows.
    /// At most maxBufferedBodyBytes. Anywhere else it raises an error.
    static let setBody: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "set_body"), kind == .request || kind == .response else { return fail(L, outside) }
        guard let b = bytes(L, 2) else { return fail(L, "set_body(string): argument must be a string") }
        let max = vm.maxBufferedBodyBytes
        guard b.count <= max else { return fail(L, "set_body(): body of \(b.count) bytes is larger than the proxy's buffered body bound (\(max) bytes)") }
        if kind == .request {
            guard vm.phaseIndex == 1, s.bufferedRequestBody != nil, s.response == nil else {
                return fail(L, "s.request:set_body(): only in on_request_body with the whole body (after moonlet.STOP_AND_BUFFER)")
            }
            var buf = ByteBufferAllocator().buffer(capacity: b.count)
            buf.writeBytes(b)
            s.bufferedRequestBody = buf
            if s.request.first("content-length") != nil { s.request.set("content-length", String(b.count)) }
        } else {
            guard vm.phaseIndex == 3, s.bufferedResponseBody != nil, s.response != nil else {
                return fail(L, "s.response:set_body(): only in on_response_body with the whole body (after moonlet.STOP_AND_BUFFER from on_response)")
            }
            var buf = ByteBufferAllocator().buffer(capacity: b.count)
            buf.writeBytes(b)
            s.bufferedResponseBody = buf
        }
        return 0
    }

    // MARK: load / require

    /// Largest chunk `load` compiles (compiling is charged to the call's budget per
    /// KiB, but some inputs compile in quadratic time).
    static let maxLoadChunk = 64 << 10

    /// load(chunk [, name, mode, env]): text chunks only, in the calling plugin's
    /// environment (upvalue 2) unless env is given.
    static let load: lua_CFunction = { L in
        guard let chunk = bytes(L, 1) else { return fail(L, "load: only string chunks are allowed") }
        if chunk.first == 0x1B { lua_pushnil(L); lua_pushstring(L, "load: precompiled bytecode is not allowed"); return 2 }
        if chunk.count > maxLoadChunk { lua_pushnil(L); lua_pushstring(L, "load: chunk larger than \(maxLoadChunk) bytes"); return 2 }
        let name = str(L, 2) ?? "=(load)"
        let rc = name.withCString { ml_guest_loadtext(L, chunk.baseAddress!.assumingMemoryBound(to: CChar.self), chunk.count, $0) }
        if rc != LUA_OK { lua_pushnil(L); ml_insert(L, -2); return 2 }
        lua_pushvalue(L, lua_type(L, 4) == LUA_TTABLE ? 4 : ml_upvalueindex(2))
        if lua_setupvalue(L, -2, 1) == nil { ml_pop(L, 1) }
        return 1
    }

    /// require(name): modules from the plugin directories only, text only, run in the
    /// calling plugin's environment (upvalue 2) and cached per plugin (upvalue 3).
    static let require: lua_CFunction = { L in
        guard let name = str(L, 1), !name.isEmpty, name.utf8.allSatisfy({ ($0 >= 48 && $0 <= 57) || ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) || $0 == 95 || $0 == 46 || $0 == 45 }) else {
            return fail(L, "require: module name must be letters, digits, '_', '-' and '.'")
        }
        lua_pushvalue(L, ml_upvalueindex(3))
        lua_getfield(L, -1, name)
        if ml_isnil(L, -1) == 0 { return 1 }
        ml_pop(L, 1)
        let vm = LuaVM.vm(L)
        let rel = name.replacingOccurrences(of: ".", with: "/") + ".lua"
        guard let (path, src) = vm.host.findModule(rel) else {
            return fail(L, "require: module '\(name)' not found in the plugin directories (\(vm.host.pluginDirs.joined(separator: ", ")))")
        }
        let rc = src.withCString { p in ml_guest_loadtext(L, p, strlen(p), "@" + path) }
        if rc != LUA_OK { return raise }
        lua_pushvalue(L, ml_upvalueindex(2))
        if lua_setupvalue(L, -2, 1) == nil { ml_pop(L, 1) }
        lua_pushstring(L, name)
        if ml_guest_pcall(L, 1, 1) != LUA_OK { return raise }
        if ml_isnil(L, -1) != 0 { ml_pop(L, 1); lua_pushboolean(L, 1) }
        lua_pushvalue(L, -1)
        lua_setfield(L, -3, name)
        return 1
    }

    // MARK: moonlet module

    /// The values of moonlet.RETRY and moonlet.NO_RETRY (what on_upstream_failure returns).
    static let retryVerdict = "retry"
    static let noRetryVerdict = "no_retry"

    static func installModule(_ L: OpaquePointer) {
        // Called with the global table on top.
        lua_createtable(L, 0, 8)
        lua_createtable(L, 0, 4)
        for (n, f) in [("debug", logDebug), ("info", logInfo), ("warn", logWarn), ("err", logErr)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
        ml_push_readonly(L, "moonlet.log")
        lua_setfield(L, -2, "log")
        ml_pushapifunction(L, now); lua_setfield(L, -2, "now")
        ml_pushapifunction(L, variant); lua_setfield(L, -2, "variant")
        lua_createtable(L, 0, 3)
        ml_pushapifunction(L, reMatch); lua_setfield(L, -2, "match")
        ml_pushapifunction(L, reFind); lua_setfield(L, -2, "find")
        ml_pushapifunction(L, reGsub); lua_setfield(L, -2, "gsub")
        ml_push_readonly(L, "moonlet.regex")
        lua_setfield(L, -2, "regex")
        ml_pushapifunction(L, shared); lua_setfield(L, -2, "shared")
        installRouter(L)
        lua_setfield(L, -2, "router")
        lua_pushstring(L, "stop_and_buffer"); lua_setfield(L, -2, "STOP_AND_BUFFER")
        lua_pushstring(L, retryVerdict); lua_setfield(L, -2, "RETRY")
        lua_pushstring(L, noRetryVerdict); lua_setfield(L, -2, "NO_RETRY")
        installMetrics(L)
        installStats(L)
        installAuthz(L)
        AuthnAPI.install(L)
        lua_createtable(L, 0, 1)
        ml_pushapifunction(L, httpCall); lua_setfield(L, -2, "call")
        ml_push_readonly(L, "moonlet.http")
        lua_setfield(L, -2, "http")
        installTimers(L)
        lua_setfield(L, -2, "timer")
        installLogTrace(L)
        lua_setfield(L, -2, "moonlet")
        // Shared-dict methods.
        lua_createtable(L, 0, 6)
        for (n, f) in [("get", dGet), ("set", dSet), ("incr", dIncr), ("cas", dCas), ("delete", dDelete)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
        ml_push_readonly(L, "moonlet.shared dict")
        lua_createtable(L, 0, 2)
        ml_insert(L, -2); lua_setfield(L, -2, "__index")
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        lua_setfield(L, ml_registryindex(), "moonlet.shared_mt")
    }

    /// Longest log line a filter writes (the rest is cut): a log call is I/O outside the budget.
    static let maxLogLine = 4096

    /// moonlet.log.* and print: one line at `level`, with the plugin and Lua position.
    /// Nothing is formatted below the logger's level; values go through a protected
    /// tostring (a failing __tostring cannot unwind Swift frames).
    /// `whereLevel`: the stack level whose position is logged (1: the caller; the Envoy
    /// adapter's log natives pass 2, the script that called the handle's log method).
    static func logAt(_ L: OpaquePointer?, _ level: Logger.Level, whereLevel: Int32 = 1) -> Int32 {
        let vm = LuaVM.vm(L)
        guard vm.logger.logLevel <= level else { return 0 }
        let n = lua_gettop(L)
        var line = ""
        for i in 1...max(1, n) where i <= n && line.utf8.count < maxLogLine {
            if i > 1 { line += " " }
            let t = lua_type(L, i)
            if t == LUA_TSTRING || t == LUA_TNUMBER { line += prefix(L, i, maxLogLine + 1 - line.utf8.count) } else {
                // nil: the budget ran out inside __tostring; raise it as pcall would.
                guard ml_tolstring_protected(L, i, nil) != nil else { return raise }
                line += prefix(L, -1, maxLogLine + 1 - line.utf8.count)
                ml_pop(L, 1)
            }
        }
        if line.utf8.count > maxLogLine { line = String(decoding: line.utf8.prefix(maxLogLine), as: UTF8.self) + "…" }
        luaL_where(L, whereLevel)
        let whereStr = str(L, -1) ?? ""
        // Filters log request data (paths, headers): control characters are escaped so a
        // value cannot forge a log line.
        vm.logger.log(level: level, "\(whereStr)\(LogText.escape(line))", metadata: ["plugin": .string(vm.currentPlugin)])
        return 0
    }
    static let logDebug: lua_CFunction = { L in logAt(L, .debug) }
    static let logInfo: lua_CFunction = { L in logAt(L, .info) }
    static let logWarn: lua_CFunction = { L in logAt(L, .warning) }
    static let logErr: lua_CFunction = { L in logAt(L, .error) }

    static let now: lua_CFunction = { L in
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        lua_pushnumber(L, Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9)
        return 1
    }

    /// Longest Lua metric name (names are kept, per VM and process-wide).
    static let maxMetricName = 128

    /// `moonlet.metrics.counter(name, n)` (a number second): counts n on the unlabelled
    /// counter `moonlet_lua_<name>` at once (the form before handles).
    static func legacyCounter(_ L: OpaquePointer?) -> Int32 {
        guard lua_rawlen(L, 1) <= maxMetricName, let name = str(L, 1), name.utf8.allSatisfy({ ($0 >= 48 && $0 <= 57) || ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) || $0 == 95 }) else {
            return fail(L, "metrics.counter(name, by): name must match [a-zA-Z0-9_]+ and be at most \(maxMetricName) bytes")
        }
        let by = lua_isinteger(L, 2) != 0 ? UInt64(max(0, ml_tointeger(L, 2))) : 1
        let vm = LuaVM.vm(L)
        guard let series = vm.metricSeries(name) else {
            vm.metrics?.count(LuaHost.refusedSeriesMetric, 1)
            lua_pushnil(L); lua_pushstring(L, "too many metric series (at most \(vm.host.defaultLimits.maxMetricSeries))")
            return 2
        }
        vm.metrics?.count(series, by)
        lua_pushboolean(L, 1)
        return 1
    }

    // MARK: router

    /// The configuration snapshot a stream started with: the one place the Lua side
    /// turns the stream's opaque `config` into a ConfigSnapshot.
    @inline(__always)
    static func snapshot(of s: ProxyStream) -> ConfigSnapshot? {
        guard let cfg = s.config else { return nil }
        return unsafeDowncast(cfg, to: ConfigSnapshot.self)
    }

    // The router primitives (`moonlet.router.*`) are in RouterAPI.swift.

    // MARK: regex

    /// Longest pattern `moonlet.regex` compiles (each loop caches 1024 patterns) and
    /// longest result of `moonlet.regex.gsub` (built outside the VM).
    static let maxRegexPattern = 4096
    static let maxRegexOutput = 16 << 20

    enum Compiled { case success(CompiledRegex), failure(String) }
    static func compiled(_ L: OpaquePointer?, _ idx: Int32) -> Compiled {
        guard lua_rawlen(L, idx) <= maxRegexPattern else { return .failure("pattern longer than \(maxRegexPattern) bytes") }
        guard let p = str(L, idx) else { return .failure("pattern must be a string") }
        do { return .success(try RegexCache.get(p)) } catch { return .failure(String(describing: error)) }
    }

    /// moonlet.regex.match(subject, pattern) → whole match and captures, or nil.
    static let reMatch: lua_CFunction = { L in
        guard let subj = bytes(L, 1) else { return fail(L, "regex.match(subject, pattern): subject must be a string") }
        let re: CompiledRegex
        switch compiled(L, 2) { case .success(let r): re = r; case .failure(let m): return fail(L, "regex.match: \(m)") }
        let found: [Range<Int>?]?
        do { found = try re.search(subj, from: 0) } catch { return fail(L, "regex.match: \(error)") }
        guard let m = found else { lua_pushnil(L); return 1 }
        // Captures are copies (host allocations, never refused): bounded like gsub's result.
        guard m.reduce(0, { $0 + ($1?.count ?? 0) }) <= maxRegexOutput else { return fail(L, "regex.match: captures longer than \(maxRegexOutput) bytes in all") }
        lua_createtable(L, Int32(m.count), 0)
        for (i, r) in m.enumerated() {
            if let r { lua_pushlstring(L, subj.baseAddress!.advanced(by: r.lowerBound).assumingMemoryBound(to: CChar.self), r.count) } else { lua_pushboolean(L, 0) }
            lua_rawseti(L, -2, lua_Integer(i))
        }
        return 1
    }

    /// moonlet.regex.find(subject, pattern) → start, end (1-based, inclusive) or nil.
    static let reFind: lua_CFunction = { L in
        guard let subj = bytes(L, 1) else { return fail(L, "regex.find(subject, pattern): subject must be a string") }
        let re: CompiledRegex
        switch compiled(L, 2) { case .success(let r): re = r; case .failure(let m): return fail(L, "regex.find: \(m)") }
        let found: [Range<Int>?]?
        do { found = try re.search(subj, from: 0) } catch { return fail(L, "regex.find: \(error)") }
        guard let m = found, let w = m[0] else { lua_pushnil(L); return 1 }
        lua_pushinteger(L, lua_Integer(w.lowerBound + 1)); lua_pushinteger(L, lua_Integer(w.upperBound))
        return 2
    }

    /// moonlet.regex.gsub(subject, pattern, replacement) → string ($1/\1 name groups).
    static let reGsub: lua_CFunction = { L in
        guard let subj = str(L, 1), let repl = str(L, 3) else { return fail(L, "regex.gsub(subject, pattern, replacement): strings expected") }
        let re: CompiledRegex
        switch compiled(L, 2) { case .success(let r): re = r; case .failure(let m): return fail(L, "regex.gsub: \(m)") }
        do { push(L, try re.replacing(in: subj, with: repl, maxBytes: maxRegexOutput)) } catch { return fail(L, "regex.gsub: \(error)") }
        return 1
    }

    // MARK: shared dict

    static let shared: lua_CFunction = { L in
        guard let name = str(L, 1), !name.isEmpty else { return fail(L, "moonlet.shared(name): name must be a string") }
        let lim = LuaVM.vm(L).host.defaultLimits
        guard SharedDict.named(name, maxBytes: lim.sharedDictMaxBytes, maxDicts: lim.maxSharedDicts) != nil else {
            return fail(L, "moonlet.shared(\(name)): too many shared dicts (at most \(lim.maxSharedDicts))")
        }
        let ud = ml_newuserdata(L, 0)
        _ = ud
        push(L, name); lua_setiuservalue(L, -2, 1)
        lua_getfield(L, ml_registryindex(), "moonlet.shared_mt")
        lua_setmetatable(L, -2)
        return 1
    }

    static func dict(_ L: OpaquePointer?) -> SharedDict? {
        guard lua_type(L, 1) == LUA_TUSERDATA else { return nil }
        lua_getiuservalue(L, 1, 1)
        defer { ml_pop(L, 1) }
        guard let n = str(L, -1) else { return nil }
        return SharedDict.named(n) // made by moonlet.shared, so it exists
    }

    static func sharedValue(_ L: OpaquePointer?, _ idx: Int32) -> SharedDict.Value? {
        switch lua_type(L, idx) {
        case LUA_TNUMBER: return lua_isinteger(L, idx) != 0 ? .int(Int64(ml_tointeger(L, idx))) : .double(ml_tonumber(L, idx))
        case LUA_TSTRING: return .string(str(L, idx)!)
        case LUA_TBOOLEAN: return .bool(lua_toboolean(L, idx) != 0)
        default: return nil
        }
    }

    static func pushShared(_ L: OpaquePointer?, _ v: SharedDict.Value?) {
        switch v {
        case .none: lua_pushnil(L)
        case .int(let i): lua_pushinteger(L, lua_Integer(i))
        case .double(let d): lua_pushnumber(L, d)
        case .string(let s): push(L, s)
        case .bool(let b): lua_pushboolean(L, b ? 1 : 0)
        }
    }

    static func ttl(_ L: OpaquePointer?, _ idx: Int32) -> Double? {
        lua_type(L, idx) == LUA_TNUMBER ? ml_tonumber(L, idx) : nil
    }

    static let dGet: lua_CFunction = { L in
        guard let d = dict(L), let k = str(L, 2) else { return fail(L, "dict:get(key): key must be a string") }
        pushShared(L, d.get(k)); return 1
    }
    static let dSet: lua_CFunction = { L in
        guard let d = dict(L), let k = str(L, 2) else { return fail(L, "dict:set(key, value, ttl): key must be a string") }
        if ml_isnoneornil(L, 3) != 0 { d.delete(k); return 0 }
        guard let v = sharedValue(L, 3) else { return fail(L, "dict:set: value must be a number, string or boolean") }
        switch d.set(k, v, ttl: ttl(L, 4)) {
        case .ok: lua_pushboolean(L, 1); return 1
        case .full: lua_pushboolean(L, 0); lua_pushstring(L, "no memory"); return 2
        }
    }
    static let dIncr: lua_CFunction = { L in
        guard let d = dict(L), let k = str(L, 2) else { return fail(L, "dict:incr(key, by, init, ttl): key must be a string") }
        let by = lua_type(L, 3) == LUA_TNUMBER ? Int64(ml_tointeger(L, 3)) : 1
        let initial: Int64? = lua_type(L, 4) == LUA_TNUMBER ? Int64(ml_tointeger(L, 4)) : nil
        switch d.incr(k, by: by, initial: initial, ttl: ttl(L, 5)) {
        case .ok(let v): lua_pushinteger(L, lua_Integer(v)); return 1
        case .missing: lua_pushnil(L); lua_pushstring(L, "not found"); return 2
        case .notInteger: lua_pushnil(L); lua_pushstring(L, "not an integer"); return 2
        case .full: lua_pushnil(L); lua_pushstring(L, "no memory"); return 2
        }
    }
    static let dCas: lua_CFunction = { L in
        guard let d = dict(L), let k = str(L, 2) else { return fail(L, "dict:cas(key, old, new, ttl): key must be a string") }
        let old = sharedValue(L, 3)
        let new = sharedValue(L, 4)
        switch d.cas(k, expected: old, new: new, ttl: ttl(L, 5)) {
        case .ok: lua_pushboolean(L, 1); return 1
        case .full: lua_pushboolean(L, 0); lua_pushstring(L, "no memory"); return 2
        case nil: lua_pushboolean(L, 0); return 1
        }
    }
    static let dDelete: lua_CFunction = { L in
        guard let d = dict(L), let k = str(L, 2) else { return fail(L, "dict:delete(key): key must be a string") }
        d.delete(k); return 0
    }
}
