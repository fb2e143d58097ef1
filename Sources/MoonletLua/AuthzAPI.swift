import CLua
import CLuaBounded
import MoonletCore
import MoonletTelemetry
import MoonletHTTP
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet.authz`: the native primitives of the builtin `istio-authz` filter.
///
/// - `authz.matcher(type, value [, flags])`: a compiled Istio value matcher. `type` is
///   `exact`, `prefix`, `suffix`, `nonempty` (Istio's `*`), `present` (a header's `*`) or
///   `template` (a path with `{*}` / `{**}`); `flags` may hold `i` (ignore ASCII case) and
///   `p` (the value is a request target: compare only the path, before `?` or `#`).
/// - `authz.cidr(text)`: a compiled IPv4 or IPv6 address or CIDR block (raises on a bad one).
/// - `authz.test(m, value)`: whether the string `value` matches the matcher or CIDR `m`
///   (nil never matches; for a CIDR the value is an address as `s.source.address` gives
///   it, "ip:port" or "[ipv6]:port", or a bare IPv4 address).
/// - `authz.check(s, attribute, matchers)`: whether the running request's `attribute`
///   (an integer: 1 source principal, 2 source namespace, 3 source address, 4 destination
///   address, 5 host, 6 method, 7 path) matches any matcher or CIDR of the list
///   `matchers`; one call for what `test` does per matcher after reading the attribute
///   through `s` (no string is made for the attribute, none for the matchers).
/// - `authz.inbound(s)`: whether the stream came in on the inbound listener (a table
///   standing in for `s` in a test answers by its `listener` field).
/// - `authz.stat(name | index)`: counts one of Envoy's RBAC counters under its Prometheus
///   name (`envoy_http_rbac_allowed`, `envoy_http_rbac_denied`, and the shadow counters
///   `envoy_http_rbac_istio_dry_run_{allow,deny}_shadow_{allowed,denied}`); other names
///   raise. `authz.stat_index(name)` gives the index to pass instead (no string per count).
/// - `authz.deny(s, policy)`: Envoy's RBAC denial: local reply 403 `RBAC: access denied`
///   (text/plain), response flag RBAC, response code details
///   `rbac_access_denied_matched_policy[POLICY]`; returns "respond".
///
/// - `authz.rules(policies)` / `authz.first(s, rules)`: a compiled list of rules evaluated in
///   one call; `authz.decider(deny, allow)` / `authz.decide(s, decider)`: the whole DENY
///   then ALLOW decision in one call when nothing else applies (AuthzRules.swift).
///
/// - `authz.ext_deny(s, status, body, headers)`: an external authorization (CUSTOM)
///   denial: `s:respond(status, body, headers)` with Envoy's response flag UAEX; returns
///   "respond".
///
/// Matchers are full userdata of plain bytes (no finalizer) under a locked metatable that
/// `test` checks, so a table or another userdata is refused. `test` allocates nothing.
extension LuaAPI {
    static let authzMatcherType = "moonlet.authz_matcher"

    /// Userdata layout: byte 0 kind, byte 1 flags (bit 0 ignore case, bit 1 path) or the
    /// CIDR prefix length, then the pattern bytes or the 4/16 address bytes.
    enum AuthzKind: UInt8 {
        case exact = 1, prefix, suffix, nonempty, present, template, cidr4, cidr6
    }

    static func installAuthz(_ L: OpaquePointer) {
        // Called with the moonlet table on top.
        luaL_newmetatable(L, authzMatcherType)
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        LuaVM.vm(L).authzMatcherMetatable = lua_topointer(L, -1)
        ml_pop(L, 1)
        lua_createtable(L, 0, 8)
        for (n, f) in [("matcher", authzMatcher), ("cidr", authzCIDR), ("test", authzTest), ("check", authzCheck), ("inbound", authzInbound),
                       ("deny", authzDeny), ("stat", authzStat), ("stat_index", authzStatIndex), ("ext_deny", authzExtDeny)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
        installAuthzRules(L)
        ml_push_readonly(L, "moonlet.authz")
        lua_setfield(L, -2, "authz")
    }

    static func newAuthzUserdata(_ L: OpaquePointer?, kind: AuthzKind, flags: UInt8, bytes: UnsafeRawBufferPointer) {
        let p = ml_newuserdata(L, 2 + bytes.count)!.assumingMemoryBound(to: UInt8.self)
        p[0] = kind.rawValue
        p[1] = flags
        if let b = bytes.baseAddress, bytes.count > 0 { memcpy(p + 2, b, bytes.count) }
        luaL_setmetatable(L, authzMatcherType)
    }

    static let authzMatcher: lua_CFunction = { L in
        guard let t = str(L, 1) else { return fail(L, "authz.matcher(type, value, flags): type must be a string") }
        let kind: AuthzKind
        switch t {
        case "exact": kind = .exact
        case "prefix": kind = .prefix
        case "suffix": kind = .suffix
        case "nonempty": kind = .nonempty
        case "present": kind = .present
        case "template": kind = .template
        default: return fail(L, "authz.matcher: unknown type \"\(t)\"")
        }
        let value = bytes(L, 2) ?? UnsafeRawBufferPointer(start: nil, count: 0)
        var flags: UInt8 = 0
        if let f = str(L, 3) {
            if f.contains("i") { flags |= 1 }
            if f.contains("p") { flags |= 2 }
        }
        if flags & 1 != 0 {
            let lower = Array(value).map { $0 >= 65 && $0 <= 90 ? $0 + 32 : $0 }
            lower.withUnsafeBytes { newAuthzUserdata(L, kind: kind, flags: flags, bytes: $0) }
        } else {
            newAuthzUserdata(L, kind: kind, flags: flags, bytes: value)
        }
        return 1
    }

    static let authzCIDR: lua_CFunction = { L in
        guard let text = str(L, 1) else { return fail(L, "authz.cidr(text): text must be a string") }
        guard let parsed = parseCIDR(text) else { return fail(L, "authz.cidr: \"\(text)\" is not an IP address or CIDR block") }
        let (addr, bits) = parsed
        addr.withUnsafeBytes { newAuthzUserdata(L, kind: addr.count == 4 ? .cidr4 : .cidr6, flags: UInt8(bits), bytes: $0) }
        return 1
    }

    /// "1.2.3.4", "10.0.0.0/8", "2001:db8::/32" → address bytes and prefix length
    /// (Istio's rule: a bare address is a /32 or /128; host bits are ignored).
    static func parseCIDR(_ text: String) -> ([UInt8], Int)? {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let addr = parseIP(String(parts[0])) else { return nil }
        let maxBits = addr.count * 8
        if parts.count == 1 { return (addr, maxBits) }
        guard let bits = Int(parts[1]), (0...maxBits).contains(bits) else { return nil }
        return (addr, bits)
    }

    static func parseIP(_ s: String) -> [UInt8]? {
        var v4 = in_addr(), v6 = in6_addr()
        if inet_pton(AF_INET, s, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        if inet_pton(AF_INET6, s, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }

    static let authzTest: lua_CFunction = { L in
        guard let ud = authzMatcherBytes(L, 1) else { return fail(L, "authz.test(m, value): m must be an authz matcher or cidr") }
        guard let value = bytes(L, 2) else { lua_pushboolean(L, 0); return 1 }
        lua_pushboolean(L, authzMatches(ud, value) ? 1 : 0)
        return 1
    }

    /// The bytes of the authz matcher at `idx`, or nil when it is not one (its metatable
    /// is compared by pointer with the VM's).
    @inline(__always)
    static func authzMatcherBytes(_ L: OpaquePointer?, _ idx: Int32) -> UnsafeRawBufferPointer? {
        guard lua_type(L, idx) == LUA_TUSERDATA, lua_getmetatable(L, idx) != 0 else { return nil }
        let same = lua_topointer(L, -1) == LuaVM.vm(L).authzMatcherMetatable
        ml_pop(L, 1)
        guard same, let raw = lua_touserdata(L, idx) else { return nil }
        let n = Int(lua_rawlen(L, idx))
        return n >= 2 ? UnsafeRawBufferPointer(start: raw, count: n) : nil
    }

    /// Whether `value` matches the matcher or CIDR whose userdata bytes are `ud`.
    @inline(__always)
    static func authzMatches(_ ud: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) -> Bool {
        guard let kind = AuthzKind(rawValue: ud[0]) else { return false }
        let pattern = UnsafeRawBufferPointer(rebasing: ud[2...])
        switch kind {
        case .cidr4, .cidr6: return cidrContains(pattern, bits: Int(ud[1]), value)
        default: return matches(kind, flags: ud[1], pattern, value)
        }
    }

    /// authz.check(s, attribute, matchers): see the type's comment.
    static let authzCheck: lua_CFunction = { L in
        guard let (_, s, kind) = resolve(L, 1, "check"), kind == .stream else { return fail(L, outside) }
        guard lua_isinteger(L, 2) != 0, lua_type(L, 3) == LUA_TTABLE else { return fail(L, "authz.check(s, attribute, matchers): attribute must be an integer, matchers a list") }
        var value: String
        switch ml_tointeger(L, 2) {
        case 1: value = s.source.principal
        case 2: value = s.source.namespace
        case 3: value = s.source.address
        case 4: value = s.destination.address
        case 5: value = s.withRequest({ $0.host })
        case 6: value = s.withRequest({ $0.method })
        case 7: value = s.withRequest({ $0.target })
        default: return fail(L, "authz.check: unknown attribute \(ml_tointeger(L, 2))")
        }
        let n = lua_rawlen(L, 3)
        var hit = false, bad = false
        value.withUTF8 { v in
            let vb = UnsafeRawBufferPointer(v)
            var i: lua_Integer = 1
            while i <= lua_Integer(n) && !hit {
                lua_rawgeti(L, 3, i)
                if let ud = authzMatcherBytes(L, -1) { hit = authzMatches(ud, vb) } else { bad = true }
                ml_pop(L, 1)
                if bad { return }
                i += 1
            }
        }
        if bad { return fail(L, "authz.check: matchers must be authz matchers or cidrs") }
        lua_pushboolean(L, hit ? 1 : 0)
        return 1
    }

    /// authz.inbound(s): whether the stream came in on the inbound listener. A table
    /// standing in for a stream (tests of the filter's logic) answers by its `listener`.
    static let authzInbound: lua_CFunction = { L in
        if lua_type(L, 1) == LUA_TTABLE {
            lua_getfield(L, 1, "listener")
            let inbound = bytes(L, -1).map { $0.elementsEqual("inbound".utf8) } ?? false
            ml_pop(L, 1)
            lua_pushboolean(L, inbound ? 1 : 0)
            return 1
        }
        guard let (_, s, kind) = resolve(L, 1, "inbound"), kind == .stream else { return fail(L, outside) }
        lua_pushboolean(L, s.listener == .inbound ? 1 : 0)
        return 1
    }

    /// Istio's string match of `value` (cut at `?`/`#` for paths, lowered for ignore-case).
    static func matches(_ kind: AuthzKind, flags: UInt8, _ pattern: UnsafeRawBufferPointer, _ full: UnsafeRawBufferPointer) -> Bool {
        var n = full.count
        if flags & 2 != 0, let cut = full.firstIndex(where: { $0 == 63 || $0 == 35 }) { n = cut }
        let icase = flags & 1 != 0
        @inline(__always) func at(_ i: Int) -> UInt8 {
            let c = full[i]
            return icase && c >= 65 && c <= 90 ? c + 32 : c
        }
        @inline(__always) func equal(_ from: Int) -> Bool {
            for i in 0..<pattern.count where at(from + i) != pattern[i] { return false }
            return true
        }
        // Case-sensitive exact and prefix (methods, principals, most paths): one memcmp.
        if !icase && (kind == .exact || kind == .prefix) {
            guard kind == .exact ? n == pattern.count : n >= pattern.count else { return false }
            return pattern.count == 0 || memcmp(full.baseAddress!, pattern.baseAddress!, pattern.count) == 0
        }
        switch kind {
        case .present: return true
        case .nonempty: return n > 0
        case .exact: return n == pattern.count && equal(0)
        case .prefix: return n >= pattern.count && equal(0)
        case .suffix: return n >= pattern.count && equal(n - pattern.count)
        case .template: return templateMatch(pattern, 0, full, 0, n, at)
        case .cidr4, .cidr6: return false
        }
    }

    /// Istio's path templates: `{*}` one non-empty path segment, `{**}` one or more
    /// characters across segments; anything else literally.
    static func templateMatch(_ p: UnsafeRawBufferPointer, _ pi: Int, _ v: UnsafeRawBufferPointer, _ vi: Int, _ n: Int, _ at: (Int) -> UInt8) -> Bool {
        var pi = pi, vi = vi
        while pi < p.count {
            if p[pi] == 123 { // {
                if pi + 3 < p.count && p[pi + 1] == 42 && p[pi + 2] == 42 && p[pi + 3] == 125 { // {**}
                    var k = vi + 1
                    while k <= n { if templateMatch(p, pi + 4, v, k, n, at) { return true }; k += 1 }
                    return false
                }
                if pi + 2 < p.count && p[pi + 1] == 42 && p[pi + 2] == 125 { // {*}
                    var k = vi
                    while k < n && v[k] != 47 {
                        k += 1
                        if templateMatch(p, pi + 3, v, k, n, at) { return true }
                    }
                    return false
                }
            }
            guard vi < n, at(vi) == p[pi] else { return false }
            pi += 1; vi += 1
        }
        return vi == n
    }

    /// Whether the address in `value` ("ipv4", "ip:port", "[ipv6]:port") is in the block.
    static func cidrContains(_ net: UnsafeRawBufferPointer, bits: Int, _ value: UnsafeRawBufferPointer) -> Bool {
        // The address part, copied to a small NUL-terminated stack buffer for inet_pton.
        var start = 0, end = value.count
        if end > 0 && value[0] == 91 { // [v6]:port
            start = 1
            guard let close = value.firstIndex(of: 93) else { return false }
            end = close
        } else if let last = value.lastIndex(of: 58) {
            end = last // "ip:port" (an IPv6 peer's address is "ip:port" too: the port is cut at the last colon)
        }
        let len = end - start
        guard len > 0 && len < 64 else { return false }
        return withUnsafeTemporaryAllocation(of: CChar.self, capacity: 64) { buf -> Bool in
            for i in 0..<len { buf[i] = CChar(bitPattern: value[start + i]) }
            buf[len] = 0
            var a6 = in6_addr()
            return withUnsafeMutableBytes(of: &a6) { out -> Bool in
                let family = net.count == 4 ? AF_INET : AF_INET6
                guard inet_pton(family, buf.baseAddress, out.baseAddress) == 1 else {
                    // An IPv4-mapped IPv6 peer ("::ffff:1.2.3.4") against an IPv4 block.
                    guard net.count == 4, inet_pton(AF_INET6, buf.baseAddress, out.baseAddress) == 1,
                          out[0..<10].allSatisfy({ $0 == 0 }), out[10] == 0xff, out[11] == 0xff else { return false }
                    return prefixEqual(net, UnsafeRawBufferPointer(rebasing: out[12..<16]), bits)
                }
                return prefixEqual(net, UnsafeRawBufferPointer(rebasing: out[0..<net.count]), bits)
            }
        }
    }

    static func prefixEqual(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer, _ bits: Int) -> Bool {
        var left = bits, i = 0
        while left >= 8 { if a[i] != b[i] { return false }; i += 1; left -= 8 }
        if left == 0 { return true }
        let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - left))
        return a[i] & mask == b[i] & mask
    }

    /// The RBAC counters `authz.stat` may count.
    static let authzStats: Set<String> = [
        "envoy_http_rbac_allowed", "envoy_http_rbac_denied",
        "envoy_http_rbac_istio_dry_run_allow_shadow_allowed", "envoy_http_rbac_istio_dry_run_allow_shadow_denied",
        "envoy_http_rbac_istio_dry_run_deny_shadow_allowed", "envoy_http_rbac_istio_dry_run_deny_shadow_denied",
    ]

    /// The RBAC counters by index (authz.stat_index).
    static let authzStatNames: [String] = authzStats.sorted()

    static let authzStat: lua_CFunction = { L in
        if lua_isinteger(L, 1) != 0 {
            let i = Int(ml_tointeger(L, 1))
            guard i >= 1 && i <= authzStatNames.count else { return fail(L, "authz.stat(index): not an RBAC counter index") }
            LuaVM.vm(L).metrics?.count(authzStatNames[i - 1])
            return 0
        }
        guard let name = str(L, 1), authzStats.contains(name) else { return fail(L, "authz.stat(name): not an RBAC counter") }
        LuaVM.vm(L).metrics?.count(name)
        return 0
    }

    /// authz.stat_index(name): the index authz.stat takes for an RBAC counter.
    static let authzStatIndex: lua_CFunction = { L in
        guard let name = str(L, 1), let i = authzStatNames.firstIndex(of: name) else { return fail(L, "authz.stat_index(name): not an RBAC counter") }
        lua_pushinteger(L, lua_Integer(i + 1))
        return 1
    }

    static let authzDeny: lua_CFunction = { L in
        guard let (_, s, kind) = resolve(L, 1, "deny"), kind == .stream else { return fail(L, outside) }
        rbacDeny(s, policy: str(L, 2) ?? "none")
        lua_pushstring(L, "respond")
        return 1
    }

    /// Envoy's RBAC denial of `s` (authz.deny).
    static func rbacDeny(_ s: ProxyStream, policy: String) {
        s.respond(403, body: "RBAC: access denied", headers: [("content-type", "text/plain")], flags: .rbacAccessDenied)
        s.vars["response_code_details"] = "rbac_access_denied_matched_policy[\(policy)]"
    }

    /// moonlet.authz.ext_deny(s, status, body, headers): s:respond with flag UAEX.
    static let authzExtDeny: lua_CFunction = { L in
        let r = respond(L)
        if r >= 0, let s = LuaVM.vm(L).current { s.responseFlags.insert(.unauthorizedExternalService) }
        return r
    }
}
