import CLua
import CLuaBounded
import MoonletCore
import MoonletHTTP

/// `authz.rules(policies)` / `authz.first(s, rules)`: a list of AuthorizationPolicy rules
/// evaluated in one native call.
///
/// `policies` is what istio-authz's `configure` compiled (a list of `{id, rules = {{id,
/// checks}}}`, every check `{native = attribute, neg, m = {matchers}}` or `{k =
/// "destination_port", neg, m = {ports}}`). `authz.rules` copies it into native form when
/// every check of every rule reads an attribute `authz.check` knows (source principal,
/// namespace, addresses, host, method, path) or the destination port, and returns a
/// userdata; otherwise (headers, JWT claims, any_of with several alternatives) nil, and the
/// filter evaluates that list in Lua. `authz.first(s, rules)` returns the 1-based position,
/// in policy then rule order, of the first rule whose checks all hold, or nil: the same
/// answer as the Lua evaluation, without a Lua call per check.
///
/// `authz.decider(deny, allow)` / `authz.decide(s, decider)`: the DENY-then-ALLOW evaluation
/// of istio-authz's `on_request` for a workload whose policies need nothing else (no
/// CUSTOM, AUDIT or dry-run policy; both lists compiled by `authz.rules`), in one call:
/// outside the inbound listener nothing; a matching DENY rule denies (Envoy's RBAC reply,
/// as `authz.deny` with the rule's id); with ALLOW rules, none matching denies ("none");
/// otherwise the request goes on. `envoy_http_rbac_denied` / `_allowed` count as in the Lua
/// path. Returns "respond" when it denied, nothing otherwise.
///
/// Built once per configure; the userdata's finalizer releases the native copy.
final class AuthzRuleSet {
    /// One check: `attribute` 1...7 as authz.check's attributes, 8 the destination port;
    /// its matchers are `bytes[start..<end]` (each a 2-byte length, then the matcher's
    /// userdata bytes as authz.matcher / authz.cidr lay them out), its ports
    /// `ports[start..<end]`. Flat arrays: evaluating retains nothing.
    struct Check {
        var attribute: Int
        var negated: Bool
        var start: Int
        var end: Int
    }
    var bytes: [UInt8] = []
    var ports: [Int] = []
    var checks: [Check] = []
    /// Rule `i` is `checks[ruleEnds[i-1]..<ruleEnds[i]]` (0 for the first).
    var ruleEnds: [Int] = []
    /// Rule ids in rule order (set by authz.decider for the DENY list).
    var ids: [String] = []
    var ruleCount: Int { ruleEnds.count }

    func add(matcher: UnsafeRawBufferPointer) {
        bytes.append(UInt8(truncatingIfNeeded: matcher.count >> 8))
        bytes.append(UInt8(truncatingIfNeeded: matcher.count))
        bytes.append(contentsOf: matcher)
    }

    /// Whether the value matches any matcher in `b[start..<end]`.
    @inline(__always)
    static func hit(_ b: UnsafeBufferPointer<UInt8>, _ start: Int, _ end: Int, _ v: UnsafeRawBufferPointer) -> Bool {
        var i = start
        while i + 2 <= end {
            let n = Int(b[i]) << 8 | Int(b[i + 1])
            let m = UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: b[(i + 2)..<(i + 2 + n)]))
            if LuaAPI.authzMatches(m, v) { return true }
            i += 2 + n
        }
        return false
    }

    /// Calls `body` with the bytes of the request's `attribute` (no String made for the
    /// request's own fields).
    @inline(__always)
    static func withAttribute<R>(_ s: ProxyStream, _ attribute: Int, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        func string(_ v: String) -> R { var v = v; return v.withUTF8 { body(UnsafeRawBufferPointer($0)) } }
        switch attribute {
        case 1: return string(s.source.principal)
        case 2: return string(s.source.namespace)
        case 3: return string(s.source.address)
        case 4: return string(s.destination.address)
        case 5: return string(s.withRequest { $0.host })
        case 6: return s.withRequest { h in h.bytes.withUnsafeReadableBytes { body(UnsafeRawBufferPointer(rebasing: $0[h.methodRange])) } }
        default:
            return s.withRequest { h in
                if let o = h.targetOverride { return string(o) }
                return h.bytes.withUnsafeReadableBytes { body(UnsafeRawBufferPointer(rebasing: $0[h.targetRange])) }
            }
        }
    }

    /// The 1-based position of the first rule that holds for `s`, or nil.
    func first(_ s: ProxyStream) -> Int? {
        bytes.withUnsafeBufferPointer { b in
            checks.withUnsafeBufferPointer { cs in
                ruleEnds.withUnsafeBufferPointer { ends in
                    ports.withUnsafeBufferPointer { ps in
                        var from = 0
                        for r in 0..<ends.count {
                            var all = true
                            for k in from..<ends[r] {
                                let c = cs[k]
                                var h: Bool
                                if c.attribute == 8 {
                                    let port = s.destination.port
                                    h = false
                                    for i in c.start..<c.end where ps[i] == port { h = true; break }
                                } else {
                                    h = Self.withAttribute(s, c.attribute) { Self.hit(b, c.start, c.end, $0) }
                                }
                                if h == c.negated { all = false; break }
                            }
                            if all { return r + 1 }
                            from = ends[r]
                        }
                        return nil
                    }
                }
            }
        }
    }
}

struct AuthzDeciderError: Error { var message: String }

/// The two lists of a workload's DENY and ALLOW policies (authz.decider).
final class AuthzDecider {
    let deny: AuthzRuleSet?
    let allow: AuthzRuleSet?
    init(deny: AuthzRuleSet?, allow: AuthzRuleSet?) { self.deny = deny; self.allow = allow }
}

extension LuaAPI {
    static let authzRulesType = "moonlet.authz_rules"
    static let authzDeciderType = "moonlet.authz_decider"

    /// Adds `rules`, `first`, `decider` and `decide` to the moonlet.authz table on top of
    /// the stack.
    static func installAuthzRules(_ L: OpaquePointer) {
        let vm = LuaVM.vm(L)
        vm.authzRulesMetatable = boxedMetatable(L, authzRulesType, gc: authzRulesGC)
        vm.authzDeciderMetatable = boxedMetatable(L, authzDeciderType, gc: authzDeciderGC)
        ml_pushapifunction(L, authzRules); lua_setfield(L, -2, "rules")
        ml_pushapifunction(L, authzFirst); lua_setfield(L, -2, "first")
        ml_pushapifunction(L, authzDeciderNew); lua_setfield(L, -2, "decider")
        ml_pushapifunction(L, authzDecide); lua_setfield(L, -2, "decide")
    }

    /// Registers the locked metatable of a pushBoxed userdata type, with its finalizer;
    /// returns it for `boxed` to compare by pointer.
    static func boxedMetatable(_ L: OpaquePointer, _ type: String, gc: lua_CFunction) -> UnsafeRawPointer? {
        luaL_newmetatable(L, type)
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        ml_pushapifunction(L, gc); lua_setfield(L, -2, "__gc")
        defer { ml_pop(L, 1) }
        return lua_topointer(L, -1)
    }

    /// Pushes a full userdata holding a retained reference to `object`, with the metatable
    /// registered as `type` (whose __gc is `releaseBoxed`).
    static func pushBoxed(_ L: OpaquePointer?, _ object: AnyObject, _ type: String) {
        let slot = ml_newuserdata(L, MemoryLayout<UnsafeRawPointer?>.size)!.assumingMemoryBound(to: UnsafeRawPointer?.self)
        slot.pointee = UnsafeRawPointer(Unmanaged.passRetained(object).toOpaque())
        luaL_setmetatable(L, type)
    }

    /// The object in the userdata at `idx` when its metatable is `metatable` (compared by
    /// pointer: no registry lookup by name per call), else nil.
    @inline(__always)
    static func boxed<T: AnyObject>(_ L: OpaquePointer?, _ idx: Int32, _ metatable: UnsafeRawPointer?) -> T? {
        guard lua_type(L, idx) == LUA_TUSERDATA, lua_getmetatable(L, idx) != 0 else { return nil }
        let same = lua_topointer(L, -1) == metatable
        ml_pop(L, 1)
        guard same, let p = lua_touserdata(L, idx)?.assumingMemoryBound(to: UnsafeRawPointer?.self), let box = p.pointee else { return nil }
        return Unmanaged<T>.fromOpaque(box).takeUnretainedValue()
    }

    /// __gc of a pushBoxed userdata of metatable `type`: releases its object once.
    static func releaseBoxed(_ L: OpaquePointer?, _ type: String) {
        if let p = luaL_testudata(L, 1, type)?.assumingMemoryBound(to: UnsafeRawPointer?.self), let box = p.pointee {
            Unmanaged<AnyObject>.fromOpaque(box).release()
            p.pointee = nil
        }
    }

    static let authzDeciderGC: lua_CFunction = { L in releaseBoxed(L, authzDeciderType); return 0 }

    /// The rule set of a compiled policy list (the table at `idx`: `native` from
    /// authz.rules and `ids`), nil for an empty list; fails on a list authz.rules refused.
    static func ruleSet(_ L: OpaquePointer?, _ idx: Int32) -> Result<AuthzRuleSet?, AuthzDeciderError> {
        guard lua_type(L, idx) == LUA_TTABLE else { return .failure(AuthzDeciderError(message: "authz.decider(deny, allow): both must be compiled policy lists")) }
        if lua_rawlen(L, idx) == 0 { return .success(nil) }
        lua_getfield(L, idx, "native")
        defer { ml_pop(L, 1) }
        guard let set: AuthzRuleSet = boxed(L, -1, LuaVM.vm(L).authzRulesMetatable) else {
            return .failure(AuthzDeciderError(message: "authz.decider: a list without native rules (authz.rules returned nil for it)"))
        }
        lua_getfield(L, idx, "ids")
        defer { ml_pop(L, 1) }
        var ids: [String] = []
        if lua_type(L, -1) == LUA_TTABLE {
            let n = lua_rawlen(L, -1)
            var i: lua_Integer = 1
            while i <= lua_Integer(n) { lua_rawgeti(L, -1, i); ids.append(str(L, -1) ?? ""); ml_pop(L, 1); i += 1 }
        }
        guard ids.count == set.ruleCount else { return .failure(AuthzDeciderError(message: "authz.decider: ids must name every rule")) }
        set.ids = ids
        return .success(set)
    }

    /// authz.decider(deny, allow): see AuthzDecider.
    static let authzDeciderNew: lua_CFunction = { L in
        let deny: AuthzRuleSet?, allow: AuthzRuleSet?
        switch ruleSet(L, 1) { case .success(let s): deny = s; case .failure(let e): return fail(L, e.message) }
        switch ruleSet(L, 2) { case .success(let s): allow = s; case .failure(let e): return fail(L, e.message) }
        pushBoxed(L, AuthzDecider(deny: deny, allow: allow), authzDeciderType)
        return 1
    }

    /// authz.decide(s, decider): see AuthzDecider.
    static let authzDecide: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "decide"), kind == .stream else { return fail(L, outside) }
        guard let d: AuthzDecider = boxed(L, 2, vm.authzDeciderMetatable) else {
            return fail(L, "authz.decide(s, decider): decider must come from authz.decider")
        }
        guard s.listener == .inbound else { return 0 }
        if let deny = d.deny, let i = deny.first(s) {
            vm.metrics?.count("envoy_http_rbac_denied")
            rbacDeny(s, policy: deny.ids[i - 1])
            lua_pushstring(L, "respond")
            return 1
        }
        if let allow = d.allow, allow.first(s) == nil {
            vm.metrics?.count("envoy_http_rbac_denied")
            rbacDeny(s, policy: "none")
            lua_pushstring(L, "respond")
            return 1
        }
        if d.deny != nil || d.allow != nil { vm.metrics?.count("envoy_http_rbac_allowed") }
        return 0
    }

    static let authzRulesGC: lua_CFunction = { L in releaseBoxed(L, authzRulesType); return 0 }

    /// Reads field `k` of the table at `idx` as a Lua integer (or nil).
    static func intField(_ L: OpaquePointer?, _ idx: Int32, _ k: String) -> Int? {
        lua_getfield(L, idx, k)
        defer { ml_pop(L, 1) }
        return lua_isinteger(L, -1) != 0 ? Int(ml_tointeger(L, -1)) : nil
    }

    /// Adds the compiled check (table at the top of the stack) to `set`; false when it
    /// is not one the native side reads.
    static func addNativeCheck(_ L: OpaquePointer?, _ set: AuthzRuleSet) -> Bool {
        lua_getfield(L, -1, "neg")
        let neg = lua_toboolean(L, -1) != 0
        ml_pop(L, 1)
        var attribute = intField(L, -1, "native") ?? 0
        if attribute == 0 {
            lua_getfield(L, -1, "k")
            let port = bytes(L, -1).map { $0.elementsEqual("destination_port".utf8) } ?? false
            ml_pop(L, 1)
            guard port else { return false }
            attribute = 8
        }
        guard (1...8).contains(attribute) else { return false }
        lua_getfield(L, -1, "m")
        defer { ml_pop(L, 1) }
        guard lua_type(L, -1) == LUA_TTABLE else { return false }
        let start = attribute == 8 ? set.ports.count : set.bytes.count
        let n = lua_rawlen(L, -1)
        var i: lua_Integer = 1
        while i <= lua_Integer(n) {
            lua_rawgeti(L, -1, i)
            defer { ml_pop(L, 1) }
            if attribute == 8 {
                guard lua_isinteger(L, -1) != 0 else { return false }
                set.ports.append(Int(ml_tointeger(L, -1)))
            } else {
                guard let ud = authzMatcherBytes(L, -1), ud.count < 65536 else { return false }
                set.add(matcher: ud)
            }
            i += 1
        }
        let end = attribute == 8 ? set.ports.count : set.bytes.count
        set.checks.append(AuthzRuleSet.Check(attribute: attribute, negated: neg, start: start, end: end))
        return true
    }

    /// authz.rules(policies): see AuthzRuleSet.
    static let authzRules: lua_CFunction = { L in
        guard lua_type(L, 1) == LUA_TTABLE else { return fail(L, "authz.rules(policies): policies must be a list") }
        let set = AuthzRuleSet()
        let np = lua_rawlen(L, 1)
        var p: lua_Integer = 1
        while p <= lua_Integer(np) {
            lua_rawgeti(L, 1, p)
            guard lua_type(L, -1) == LUA_TTABLE else { return fail(L, "authz.rules: policy \(p) is not a table") }
            lua_getfield(L, -1, "rules")
            guard lua_type(L, -1) == LUA_TTABLE else { return fail(L, "authz.rules: policy \(p) has no rules") }
            let nr = lua_rawlen(L, -1)
            var r: lua_Integer = 1
            while r <= lua_Integer(nr) {
                lua_rawgeti(L, -1, r)
                lua_getfield(L, -1, "checks")
                guard lua_type(L, -1) == LUA_TTABLE else { return fail(L, "authz.rules: rule \(r) of policy \(p) has no checks") }
                let nc = lua_rawlen(L, -1)
                var c: lua_Integer = 1
                while c <= lua_Integer(nc) {
                    lua_rawgeti(L, -1, c)
                    let ok = lua_type(L, -1) == LUA_TTABLE && addNativeCheck(L, set)
                    ml_pop(L, 1)
                    // A check only Lua can read: the whole list stays in Lua.
                    guard ok else { lua_pushnil(L); return 1 }
                    c += 1
                }
                set.ruleEnds.append(set.checks.count)
                ml_pop(L, 2)
                r += 1
            }
            ml_pop(L, 2)
            p += 1
        }
        pushBoxed(L, set, authzRulesType)
        return 1
    }

    /// authz.first(s, rules): see AuthzRuleSet.
    static let authzFirst: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "first"), kind == .stream else { return fail(L, outside) }
        guard let set: AuthzRuleSet = boxed(L, 2, vm.authzRulesMetatable) else {
            return fail(L, "authz.first(s, rules): rules must come from authz.rules")
        }
        if let i = set.first(s) {
            lua_pushinteger(L, lua_Integer(i))
        } else {
            lua_pushnil(L)
        }
        return 1
    }
}
