import CLua
import CLuaBounded
import MoonletCore
import NIOConcurrencyHelpers
#if canImport(Foundation)
import Foundation
#endif

/// The JWT providers of the running configuration (one per RequestAuthentication
/// jwtRule), by id, for each Lua host (one per proxy). The proxy replaces them at each
/// reload; Lua reaches them through `moonlet.jwt.provider(id)`.
///
/// The proxy's ids are `NS/NAME#RULE@VERSION`, unique to a reload, so a configuration
/// being prepared never changes the providers the serving filters find. A filter may
/// name a provider without `@VERSION`: the reload preparing (on its own thread) gets
/// its own provider, everyone else the accepted configuration's.
public enum JWTProviders {
    static let lock = NIOLock()
    nonisolated(unsafe) static var byHost: [ObjectIdentifier: [String: JWTVerifying]] = [:]
    /// `NS/NAME#RULE` → id with version, of the accepted configuration.
    nonisolated(unsafe) static var accepted: [ObjectIdentifier: [String: String]] = [:]
    /// The same for the configuration being prepared, and the thread preparing it.
    nonisolated(unsafe) static var pending: [ObjectIdentifier: (thread: pthread_t, aliases: [String: String])] = [:]

    static func aliases<S: Sequence>(_ ids: S) -> [String: String] where S.Element == String {
        var a: [String: String] = [:]
        for id in ids {
            if let at = id.lastIndex(of: "@") { a[String(id[..<at])] = id } else { a[id] = id }
        }
        return a
    }

    /// Makes `providers` the set `host`'s Lua can reach (ids not in it are gone);
    /// `current` (default: all of them) are the accepted configuration's, which an id
    /// without `@VERSION` names.
    public static func replace(_ providers: [String: JWTVerifying], for host: LuaHost, current: [String]? = nil) {
        lock.withLock {
            let key = ObjectIdentifier(host)
            byHost[key] = providers.isEmpty ? nil : providers
            let a = aliases(current ?? Array(providers.keys))
            accepted[key] = a.isEmpty ? nil : a
            pending[key] = nil
        }
    }

    /// Adds `providers` to `host`'s set (a configuration being prepared, on this
    /// thread, while the current one still serves). Their ids must be unique to that
    /// configuration, so the filters serving now never find them.
    public static func merge(_ providers: [String: JWTVerifying], for host: LuaHost) {
        lock.withLock {
            let key = ObjectIdentifier(host)
            byHost[key, default: [:]].merge(providers) { _, new in new }
            pending[key] = (pthread_self(), aliases(providers.keys))
        }
    }

    /// Removes `ids` from `host`'s set (the providers of a reload that was rejected).
    public static func remove<S: Sequence>(_ ids: S, for host: LuaHost) where S.Element == String {
        lock.withLock {
            let key = ObjectIdentifier(host)
            pending[key] = nil
            guard var set = byHost[key] else { return }
            for id in ids { set[id] = nil }
            byHost[key] = set.isEmpty ? nil : set
        }
    }

    /// The id `id` names: itself when a provider has it, else (an id without
    /// `@VERSION`) that of the configuration being prepared by this thread, or of the
    /// accepted one.
    public static func resolve(_ id: String, host: LuaHost) -> String? {
        lock.withLock {
            let key = ObjectIdentifier(host)
            if byHost[key]?[id] != nil { return id }
            if let p = pending[key], pthread_equal(p.thread, pthread_self()) != 0, let v = p.aliases[id], byHost[key]?[v] != nil { return v }
            if let v = accepted[key]?[id], byHost[key]?[v] != nil { return v }
            return nil
        }
    }

    public static func lookup(_ id: String, host: LuaHost) -> JWTVerifying? { lock.withLock { byHost[ObjectIdentifier(host)]?[id] } }
}

/// `moonlet.jwt` (JWT verification for the builtin `istio-authn` filter and for user
/// filters) and the `s.auth` view of a stream's verified token.
enum AuthnAPI {
    static let providerMT = "moonlet.jwt_provider_mt"

    /// Adds `jwt` to the `moonlet` table on top of the stack.
    static func install(_ L: OpaquePointer) {
        lua_createtable(L, 0, 3)
        ml_pushapifunction(L, provider); lua_setfield(L, -2, "provider")
        ml_pushapifunction(L, verify); lua_setfield(L, -2, "verify")
        ml_pushapifunction(L, authenticate); lua_setfield(L, -2, "authenticate")
        ml_push_readonly(L, "moonlet.jwt")
        lua_setfield(L, -2, "jwt")
        // Provider handles: full userdata with this metatable (the tag checked on use).
        lua_createtable(L, 0, 3)
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        lua_pushstring(L, "moonlet.jwt provider"); lua_setfield(L, -2, "__name")
        ml_pushapifunction(L, providerToString); lua_setfield(L, -2, "__tostring")
        lua_setfield(L, ml_registryindex(), providerMT)
    }

    /// moonlet.jwt.provider(id) → a provider handle, or raises for an unknown id.
    static let provider: lua_CFunction = { L in
        guard let name = LuaAPI.str(L, 1), let id = JWTProviders.resolve(name, host: LuaVM.vm(L).host) else {
            return LuaAPI.fail(L, "moonlet.jwt.provider(id): no JWT provider \"\(LuaAPI.prefix(L, 1, 128))\" in the configuration")
        }
        _ = ml_newuserdata(L, 0)
        LuaAPI.push(L, id); lua_setiuservalue(L, -2, 1)
        lua_getfield(L, ml_registryindex(), providerMT)
        lua_setmetatable(L, -2)
        return 1
    }

    static let providerToString: lua_CFunction = { L in
        lua_getiuservalue(L, 1, 1)
        let id = LuaAPI.str(L, -1) ?? "?"
        ml_pop(L, 1)
        LuaAPI.push(L, "moonlet.jwt provider \(id)")
        return 1
    }

    /// The id of the provider handle at `idx`, checked by its metatable tag.
    static func providerID(_ L: OpaquePointer?, _ idx: Int32) -> String? {
        guard lua_type(L, idx) == LUA_TUSERDATA, lua_getmetatable(L, idx) != 0 else { return nil }
        lua_getfield(L, ml_registryindex(), providerMT)
        let tagged = lua_rawequal(L, -1, -2) != 0
        ml_pop(L, 2)
        guard tagged else { return nil }
        lua_getiuservalue(L, idx, 1)
        defer { ml_pop(L, 1) }
        return LuaAPI.str(L, -1)
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// Common part of verify and authenticate: token at `t`, provider at `p`.
    static func check(_ L: OpaquePointer?, _ t: Int32, _ p: Int32, _ fn: String) -> Result<RequestAuthResult, JWTFailure>? {
        guard let id = providerID(L, p) else { return nil }
        // A provider a reload removed while this stream ran: nothing can be verified.
        guard let v = JWTProviders.lookup(id, host: LuaVM.vm(L).host) else { return .failure(.jwksFetchFailed) }
        guard lua_type(L, t) == LUA_TSTRING else { return .failure(.badFormat) }
        // Longer tokens are refused before a String is made of them.
        guard lua_rawlen(L, t) <= 8 * 1024, let token = LuaAPI.str(L, t) else { return .failure(.badFormat) }
        return v.verify(token, now: now())
    }

    static func pushFailure(_ L: OpaquePointer?, _ f: JWTFailure) -> Int32 {
        lua_pushnil(L); LuaAPI.push(L, f.message); lua_pushinteger(L, lua_Integer(f.status))
        return 3
    }

    /// moonlet.jwt.verify(token, provider) → claims (a table) or nil, Envoy's error
    /// text, HTTP status (401, or 403 for a disallowed audience).
    static let verify: lua_CFunction = { L in
        guard let r = check(L, 1, 2, "verify") else { return LuaAPI.fail(L, "moonlet.jwt.verify(token, provider): provider must come from moonlet.jwt.provider") }
        switch r {
        case .success(let a): pushJSON(L, a.claims, readOnly: false, depth: 0); return 1
        case .failure(let f): return pushFailure(L, f)
        }
    }

    /// moonlet.jwt.authenticate(s, token, provider) → the claims (a table), recording the
    /// verified token as the stream's `s.auth` (the first one only), or nil, error, status.
    static let authenticate: lua_CFunction = { L in
        guard let (_, s, kind) = LuaAPI.resolve(L, 1, "authenticate"), kind == .stream else { return LuaAPI.fail(L, LuaAPI.outside) }
        guard let r = check(L, 2, 3, "authenticate") else { return LuaAPI.fail(L, "moonlet.jwt.authenticate(s, token, provider): provider must come from moonlet.jwt.provider") }
        switch r {
        case .success(let a):
            if s.auth == nil { s.auth = a }
            pushJSON(L, a.claims, readOnly: false, depth: 0); return 1
        case .failure(let f): return pushFailure(L, f)
        }
    }

    /// `s.auth`: nil, or a read-only table {principal, issuer, subject, audiences,
    /// presenter, claims} built from the stream's native result.
    static func pushAuth(_ L: OpaquePointer?, _ s: ProxyStream) {
        guard let a = s.auth else { lua_pushnil(L); return }
        lua_createtable(L, 0, 6)
        LuaAPI.push(L, a.principal); lua_setfield(L, -2, "principal")
        LuaAPI.push(L, a.issuer); lua_setfield(L, -2, "issuer")
        LuaAPI.push(L, a.subject); lua_setfield(L, -2, "subject")
        LuaAPI.push(L, a.presenter); lua_setfield(L, -2, "presenter")
        pushJSON(L, JSONValue.array(a.audiences.map { JSONValue.string($0) }), readOnly: true, depth: 0); lua_setfield(L, -2, "audiences")
        pushJSON(L, a.claims, readOnly: true, depth: 0); lua_setfield(L, -2, "claims")
        readOnly(L)
    }

    /// Replaces the table on top with a read-only proxy whose `#` is the real table's.
    static func readOnly(_ L: OpaquePointer?) {
        ml_push_readonly(L, "s.auth")
        if lua_getmetatable(L, -1) != 0 {
            ml_pushapifunction(L, readOnlyLen); lua_setfield(L, -2, "__len")
            ml_pop(L, 1)
        }
    }

    static let readOnlyLen: lua_CFunction = { L in
        guard lua_getmetatable(L, 1) != 0 else { lua_pushinteger(L, 0); return 1 }
        lua_getfield(L, -1, "__index")
        lua_pushinteger(L, lua_Integer(lua_rawlen(L, -1)))
        return 1
    }

    /// Pushes a JSON value as Lua data: objects and arrays as tables (read-only when `ro`),
    /// null as nil (so a null member is absent and a null array element leaves a hole).
    /// Nesting past 40 levels, or a Lua stack that cannot grow, is pushed as nil.
    static func pushJSON(_ L: OpaquePointer?, _ v: JSONValue, readOnly ro: Bool, depth: Int) {
        guard depth < 40, lua_checkstack(L, 4) != 0 else { lua_pushnil(L); return }
        switch v {
        case .null: lua_pushnil(L)
        case .bool(let b): lua_pushboolean(L, b ? 1 : 0)
        case .int(let i): lua_pushinteger(L, lua_Integer(i))
        case .double(let d): lua_pushnumber(L, d)
        case .string(let s): LuaAPI.push(L, s)
        case .array(let a):
            lua_createtable(L, Int32(min(a.count, 1024)), 0)
            for (i, e) in a.enumerated() { pushJSON(L, e, readOnly: ro, depth: depth + 1); lua_rawseti(L, -2, lua_Integer(i + 1)) }
            if ro { readOnly(L) }
        case .object(let m):
            lua_createtable(L, 0, Int32(min(m.count, 1024)))
            for (k, e) in m { LuaAPI.push(L, k); pushJSON(L, e, readOnly: ro, depth: depth + 1); lua_rawset(L, -3) }
            if ro { readOnly(L) }
        }
    }
}
