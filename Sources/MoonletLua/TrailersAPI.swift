import CLua
import CLuaBounded
import MoonletCore

/// `s.request.trailers` (read) and `s.response.trailers` (get/set/remove): the stream's
/// trailer fields (HTTPTrailers), as wrappers like the headers' (light userdata checked
/// against the running stream). Names are lowercased. A message without trailers reads
/// as empty. Setting response trailers makes the response carry them where its framing
/// allows (HTTP/2; HTTP/1.1 chunked): docs/lua-api.md.
enum TrailersAPI {
    /// Bounds of what filters may set on one stream's response trailers.
    static let maxFields = 64
    static let maxValueBytes = 16 * 1024

    /// Registers the method table (called by LuaAPI.installWrapperMetatable).
    static func install(_ L: OpaquePointer) {
        lua_createtable(L, 0, 5)
        for (n, f) in [("get", tGet), ("get_all", tGetAll), ("set", tSet), ("add", tAdd), ("remove", tRemove), ("pairs", tPairs)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
        lua_setfield(L, ml_registryindex(), "moonlet.trailer_methods")
    }

    /// `wrapper[key]` on a trailers wrapper: its methods only.
    static func index(_ L: OpaquePointer?) -> Int32 {
        lua_getfield(L, ml_registryindex(), "moonlet.trailer_methods")
        lua_pushvalue(L, 2)
        lua_rawget(L, -2)
        return 1
    }

    /// The stream and which trailers the wrapper at index 1 stands for (true: the response's).
    static func target(_ L: OpaquePointer?) -> (ProxyStream, Bool)? {
        guard let (_, s, kind) = LuaAPI.resolve(L, 1, "trailers") else { return nil }
        switch kind {
        case .requestTrailers: return (s, false)
        case .responseTrailers: return (s, true)
        default: return nil
        }
    }

    static func trailers(_ s: ProxyStream, response: Bool) -> HTTPTrailers? { response ? s.responseTrailers : s.requestTrailers }

    static let tGet: lua_CFunction = { L in
        guard let (s, r) = target(L) else { return LuaAPI.fail(L, LuaAPI.outside) }
        guard let n = LuaAPI.lowerName(L, 2) else { return LuaAPI.fail(L, "trailers:get(name): name must be a non-empty string") }
        if let v = trailers(s, response: r)?.first(n) { LuaAPI.push(L, v) } else { lua_pushnil(L) }
        return 1
    }

    static let tGetAll: lua_CFunction = { L in
        guard let (s, r) = target(L) else { return LuaAPI.fail(L, LuaAPI.outside) }
        guard let n = LuaAPI.lowerName(L, 2) else { return LuaAPI.fail(L, "trailers:get_all(name): name must be a non-empty string") }
        let values = trailers(s, response: r)?.all(n) ?? []
        lua_createtable(L, Int32(values.count), 0)
        for (i, v) in values.enumerated() { LuaAPI.push(L, v); lua_rawseti(L, -2, lua_Integer(i + 1)) }
        return 1
    }

    static let tSet: lua_CFunction = { L in write(L, append: false) }
    /// trailers:add(name, value): appends a value (set replaces them all).
    static let tAdd: lua_CFunction = { L in write(L, append: true) }

    static func write(_ L: OpaquePointer?, append: Bool) -> Int32 {
        guard let (s, r) = target(L) else { return LuaAPI.fail(L, LuaAPI.outside) }
        guard r else { return LuaAPI.fail(L, "trailers:set: request trailers are read-only") }
        guard let n = LuaAPI.lowerName(L, 2), n.utf8.count <= 256, HeaderValidation.isToken(n) else {
            return LuaAPI.fail(L, "trailers:set(name, value): name must be a valid header token")
        }
        if ml_isnoneornil(L, 3) != 0 { s.responseTrailers?.remove(n); return 0 }
        guard HTTPTrailers.isAllowed(n) else {
            return LuaAPI.fail(L, "trailers:set(\(n)): framing, hop-by-hop and routing fields cannot be trailers")
        }
        guard lua_type(L, 3) == LUA_TSTRING || lua_type(L, 3) == LUA_TNUMBER, let v = LuaAPI.str(L, 3) else {
            return LuaAPI.fail(L, "trailers:set(\(n), value): value must be a string")
        }
        guard HeaderValidation.isFieldValue(v) else { return LuaAPI.fail(L, "trailers:set(\(n), value): value contains a control character (CR, LF, NUL, DEL...)") }
        guard v.utf8.count <= maxValueBytes else { return LuaAPI.fail(L, "trailers:set(\(n), value): value longer than 16 KiB") }
        var t = s.responseTrailers ?? HTTPTrailers()
        guard t.count < maxFields || (!append && t.first(n) != nil) else { return LuaAPI.fail(L, "trailers:set(\(n)): more than \(maxFields) trailers") }
        if append { t.append(n, v) } else { t.set(n, v) }
        s.responseTrailers = t
        return 0
    }

    static let tRemove: lua_CFunction = { L in
        guard let (s, r) = target(L) else { return LuaAPI.fail(L, LuaAPI.outside) }
        guard r else { return LuaAPI.fail(L, "trailers:remove: request trailers are read-only") }
        guard let n = LuaAPI.lowerName(L, 2) else { return LuaAPI.fail(L, "trailers:remove(name): name must be a non-empty string") }
        s.responseTrailers?.remove(n)
        return 0
    }

    /// trailers:pairs() → iterator over (name, value) in order.
    static let tPairs: lua_CFunction = { L in
        guard let (s, r) = target(L) else { return LuaAPI.fail(L, LuaAPI.outside) }
        let all = trailers(s, response: r)?.fields ?? []
        lua_createtable(L, Int32(all.count * 2), 0)
        for (i, f) in all.enumerated() {
            LuaAPI.push(L, f.name); lua_rawseti(L, -2, lua_Integer(2 * i + 1))
            LuaAPI.push(L, f.value); lua_rawseti(L, -2, lua_Integer(2 * i + 2))
        }
        lua_pushinteger(L, 0)
        lua_pushcclosure(L, LuaAPI.pairsNext, 2)
        return 1
    }
}
