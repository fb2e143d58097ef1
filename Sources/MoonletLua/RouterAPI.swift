import CLua
import CLuaBounded
import MoonletCore
import MoonletRegex
import MoonletConfig
#if canImport(Foundation)
import Foundation
#endif

/// The router's Lua tables of one VM, per configuration snapshot: each virtual host's
/// rules are turned into Lua tables the first time a stream of that snapshot asks for
/// the host, and kept (registry references) while the snapshot is among the most
/// recent few. Compiled matchers and destination targets reach Lua as full userdata
/// handles that name an entry of this cache and an index into its objects.
final class RouterCache {
    final class Entry {
        let snapshot: ConfigSnapshot
        /// The generation handles are made in now (a handle carries it): a new one when
        /// the host tables are dropped (rotate).
        private(set) var id: UInt64
        /// VirtualHost → registry reference of its Lua table.
        var hosts: [ObjectIdentifier: Int32] = [:]
        /// What the handles of this entry stand for (MatcherBox, RegexBox, TargetBox, RuleBox).
        var objects: [AnyObject] = []
        /// The generation before `id` and its objects: a stream still holding handles of
        /// a dropped host table (a coroutine suspended across the rotation) keeps them
        /// valid for one more generation.
        private(set) var previousID: UInt64 = 0
        private(set) var previousObjects: [AnyObject] = []
        /// Registry reference of the workload table ({namespace, labels}).
        var workloadRef: Int32 = LUA_NOREF
        /// The Host last asked for, as sent, and its table's reference: a sidecar's
        /// requests mostly go to few hosts, so most lookups are one string compare.
        var lastAuthority = ""
        var lastRef: Int32 = LUA_NOREF
        init(snapshot: ConfigSnapshot, id: UInt64) { self.snapshot = snapshot; self.id = id }

        /// The object handle `i` of generation `gen` stands for, if that generation is kept.
        @inline(__always)
        func object(gen: UInt64, _ i: Int) -> AnyObject? {
            if gen == id { return i < objects.count ? objects[i] : nil }
            if gen == previousID && gen != 0 { return i < previousObjects.count ? previousObjects[i] : nil }
            return nil
        }

        /// Drops every cached host table (their registry references) and starts
        /// generation `newID`; the objects of the generation before the current one go.
        /// Memory stays bounded (at most two generations of maxHostsPerSnapshot tables'
        /// objects) whatever the number of hosts and requests.
        func rotate(_ L: OpaquePointer?, newID: UInt64) {
            for ref in hosts.values { ml_unref(L, ref) }
            hosts.removeAll(keepingCapacity: true)
            lastAuthority = ""; lastRef = LUA_NOREF
            previousID = id; previousObjects = objects
            objects = []
            id = newID
        }
    }

    /// Snapshots whose tables a VM keeps (a reload makes a new one; in-flight streams
    /// may still route on the previous ones).
    static let maxSnapshots = 4
    /// Hosts whose tables are kept per snapshot; when full, the next uncached host drops
    /// them all (Entry.rotate) before its table is built and cached.
    static let maxHostsPerSnapshot = 4096

    /// Most recent first.
    var entries: [Entry] = []
    /// The metatable every handle carries (compared by identity: no registry lookup per check).
    var handleMetatable: UnsafeRawPointer?
    var nextID: UInt64 = 1

    /// The entry of `snap`, made (and the oldest dropped) when there is none.
    @inline(__always)
    func entry(_ snap: ConfigSnapshot, _ L: OpaquePointer?) -> Entry {
        if let e = entries.first, e.snapshot === snap { return e }
        for e in entries where e.snapshot === snap { return e }
        if entries.count >= Self.maxSnapshots {
            let old = entries.removeLast()
            for ref in old.hosts.values { ml_unref(L, ref) }
            if old.workloadRef != LUA_NOREF { ml_unref(L, old.workloadRef) }
        }
        let e = Entry(snapshot: snap, id: nextID)
        nextID += 1
        entries.insert(e, at: 0)
        return e
    }

    /// The existing entry of `snap` whose current or previous generation is `id`, if any
    /// (handles are checked against it).
    @inline(__always)
    func existing(_ snap: ConfigSnapshot, id: UInt64) -> Entry? {
        for e in entries where e.snapshot === snap { return e.id == id || (id != 0 && e.previousID == id) ? e : nil }
        return nil
    }

    /// A new generation for `e` (see Entry.rotate).
    func rotate(_ e: Entry, _ L: OpaquePointer?) {
        e.rotate(L, newID: nextID)
        nextID += 1
    }

    /// Objects kept by the entry of `snap` (both generations), for tests.
    func objectCount(_ snap: ConfigSnapshot) -> Int? {
        for e in entries where e.snapshot === snap { return e.objects.count + e.previousObjects.count }
        return nil
    }
}

/// A compiled string match (exact/prefix/regex) behind a Lua handle.
final class MatcherBox {
    let match: StringMatch
    let value: [UInt8]
    init(_ m: StringMatch) { match = m; value = Array(m.value.utf8) }

    /// Istio's StringMatch on bytes: exact and prefix compare bytes (ASCII case folded
    /// with `ignoreCase`), regex is a full match (the pattern is anchored at load).
    @inline(__always)
    func test(_ b: UnsafeRawBufferPointer, ignoreCase: Bool) throws(RegexMatchError) -> Bool {
        switch match.kind {
        case .exact:
            guard b.count == value.count else { return false }
            return Self.equal(b, value, count: value.count, ignoreCase: ignoreCase)
        case .prefix:
            guard b.count >= value.count else { return false }
            return Self.equal(b, value, count: value.count, ignoreCase: ignoreCase)
        case .regex:
            guard let re = match.regex else { return false }
            return try re.search(b, from: 0) != nil
        }
    }

    @inline(__always)
    static func equal(_ b: UnsafeRawBufferPointer, _ v: [UInt8], count: Int, ignoreCase: Bool) -> Bool {
        if !ignoreCase { return v.withUnsafeBytes { count == 0 || memcmp(b.baseAddress!, $0.baseAddress!, count) == 0 } }
        for i in 0..<count {
            var x = b[i], y = v[i]
            if x >= 65 && x <= 90 { x |= 0x20 }
            if y >= 65 && y <= 90 { y |= 0x20 }
            if x != y { return false }
        }
        return true
    }
}

/// A compiled regex for rewriting (uriRegexRewrite) behind a Lua handle.
final class RegexBox { let regex: CompiledRegex; init(_ r: CompiledRegex) { regex = r } }
/// A route destination (cluster resolved at load) behind a Lua handle.
final class TargetBox { let target: RouteTarget; init(_ t: RouteTarget) { target = t } }
/// A compiled route rule (weights, retry policy, timeout) behind a Lua handle.
final class RuleBox { let rule: CompiledRoute; init(_ r: CompiledRoute) { rule = r } }

/// `moonlet.router.*`: the native primitives plugins/istio-router.lua decides with.
/// The decision (which rule, which destination, what to edit) is Lua; these functions
/// only read prepared data and write what native code reads (s.route's native fields).
extension LuaAPI {
    enum HandleKind: UInt32 { case matcher = 1, regex, target, rule }
    static let handleMagic: UInt64 = 0x6d6f_6f6e_726f_7574 // "moonrout"
    static let handleSize = 24
    static let handleMetatable = "moonlet.router_handle"
    static let matchLimitMessage = "route match failed: a regex of the route hit its match limit"

    /// Builds the read-only `moonlet.router` table and leaves it on the stack; installs
    /// the metatable every router handle carries.
    static func installRouter(_ L: OpaquePointer) {
        lua_createtable(L, 0, 3)
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        ml_pushapifunction(L, handleToString); lua_setfield(L, -2, "__tostring")
        LuaVM.vm(L).routerCache.handleMetatable = lua_topointer(L, -1)
        lua_setfield(L, ml_registryindex(), handleMetatable)
        let fns: [(String, lua_CFunction)] = [
            ("host", rHost), ("test", rTest), ("match_path", rMatchPath), ("match_method", rMatchMethod),
            ("match_authority", rMatchAuthority), ("match_header", rMatchHeader), ("match_query", rMatchQuery),
            ("query", rQuery), ("pick", rPick), ("chance", rChance), ("forward", rForward), ("reply", rReply),
            ("delay", rDelay), ("mirror", rMirror), ("regex_replace", rRegexReplace), ("hash_cookie", rHashCookie),
            ("set_response_header", rSetResponseHeader), ("add_response_header", rAddResponseHeader),
            ("remove_response_header", rRemoveResponseHeader),
        ]
        lua_createtable(L, 0, Int32(fns.count))
        for (n, f) in fns { ml_pushapifunction(L, f); lua_setfield(L, -2, n) }
        ml_push_readonly(L, "moonlet.router")
    }

    static let handleToString: lua_CFunction = { L in
        guard lua_type(L, 1) == LUA_TUSERDATA, let p = lua_touserdata(L, 1) else { lua_pushstring(L, "moonlet.router handle"); return 1 }
        let kind = HandleKind(rawValue: p.load(fromByteOffset: 20, as: UInt32.self)).map { "\($0)" } ?? "?"
        lua_pushstring(L, "moonlet.router.\(kind)")
        return 1
    }

    // MARK: handles

    /// Pushes a new handle for `obj` (kept by `e`).
    static func pushHandle(_ L: OpaquePointer?, _ e: RouterCache.Entry, _ kind: HandleKind, _ obj: AnyObject) {
        let i = e.objects.count
        e.objects.append(obj)
        let p = ml_newuserdata(L, handleSize)!
        p.storeBytes(of: handleMagic, as: UInt64.self)
        p.storeBytes(of: e.id, toByteOffset: 8, as: UInt64.self)
        p.storeBytes(of: UInt32(i), toByteOffset: 16, as: UInt32.self)
        p.storeBytes(of: kind.rawValue, toByteOffset: 20, as: UInt32.self)
        lua_getfield(L, ml_registryindex(), handleMetatable)
        lua_setmetatable(L, -2)
    }

    /// The object a handle argument stands for, or nil when the value is not a router
    /// handle (a light userdata, another full userdata, a table...), is of another kind,
    /// or belongs to another snapshot than the running stream's.
    @inline(__always)
    static func handle<T: AnyObject>(_ L: OpaquePointer?, _ idx: Int32, _ kind: HandleKind, _ type: T.Type) -> T? {
        guard lua_type(L, idx) == LUA_TUSERDATA, lua_getmetatable(L, idx) != 0 else { return nil }
        let vm = LuaVM.vm(L)
        let same = lua_topointer(L, -1) == vm.routerCache.handleMetatable
        ml_pop(L, 1)
        guard same, Int(lua_rawlen(L, idx)) == handleSize, let p = lua_touserdata(L, idx) else { return nil }
        guard p.load(as: UInt64.self) == handleMagic, p.load(fromByteOffset: 20, as: UInt32.self) == kind.rawValue else { return nil }
        guard let s = vm.current, s.isActive, let snap = snapshot(of: s),
              let e = vm.routerCache.existing(snap, id: p.load(fromByteOffset: 8, as: UInt64.self)) else { return nil }
        let i = Int(p.load(fromByteOffset: 16, as: UInt32.self))
        // The exact class, compared by metadata pointer (the boxes are final): cheaper
        // than a dynamic cast, which this call would otherwise pay on every primitive.
        guard let o = e.object(gen: p.load(fromByteOffset: 8, as: UInt64.self), i), ObjectIdentifier(Swift.type(of: o)) == ObjectIdentifier(T.self) else { return nil }
        return unsafeDowncast(o, to: T.self)
    }

    /// The stream argument at `idx` (the `s` of a phase), or nil; nil in
    /// on_upstream_failure too (the route is decided by then).
    @inline(__always)
    static func routerStream(_ L: OpaquePointer?, _ idx: Int32) -> ProxyStream? {
        guard let (vm, s, kind) = resolve(L, idx, "router"), kind == .stream, !vm.inUpstreamFailure else { return nil }
        return s
    }

    /// Why routerStream refused its argument.
    static func routerStreamError(_ L: OpaquePointer?) -> String {
        LuaVM.vm(L).inUpstreamFailure ? "moonlet.router cannot be used in on_upstream_failure" : outside
    }

    // MARK: host index

    /// moonlet.router.host(s) → the table of the request's virtual host (see
    /// docs/lua-api.md), nil when no host is known (404 NR; a second result, true, when
    /// the Sidecar's outboundTrafficPolicy is REGISTRY_ONLY: 502, Istio's
    /// BlackHoleCluster), false on the inbound listener (its route is the local
    /// application), true when an earlier filter already set s.route.cluster. Built once
    /// per VM and snapshot.
    static let rHost: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, "router.host(s): s must be the running stream (" + routerStreamError(L) + ")") }
        if s.listener == .inbound { lua_pushboolean(L, 0); return 1 }
        // A route an earlier filter chose (s.route.cluster) is left alone: one call
        // answers both questions the router asks first.
        if !s.route.cluster.isEmpty { lua_pushboolean(L, 1); return 1 }
        guard let snap = snapshot(of: s) else { lua_pushnil(L); return 1 }
        let e = LuaVM.vm(L).routerCache.entry(snap, L)
        let authority = s.withRequest({ $0.host })
        if e.lastRef != LUA_NOREF && authority == e.lastAuthority { ml_getregistry_ref(L, e.lastRef); return 1 }
        // An intercepted request whose Host names no service: the service whose VIP the
        // client connected to (s.destination.original), as Istio's VIP domains route it.
        let byHost = snap.routes.lookup(authority)
        guard let vh = byHost ?? (s.destination.original.isEmpty ? nil : snap.routes.lookup(s.destination.original)) else {
            lua_pushnil(L)
            if snap.routes.scope.outboundTrafficPolicy == .registryOnly { lua_pushboolean(L, 1); return 2 }
            return 1
        }
        let key = ObjectIdentifier(vh)
        if let ref = e.hosts[key] {
            if byHost != nil { e.lastAuthority = authority; e.lastRef = ref }
            ml_getregistry_ref(L, ref)
            return 1
        }
        // Full: drop the cached tables before building this one, so no handle of this
        // call is made in a generation that goes; handles made before stay valid one
        // generation more (Entry.previousObjects).
        if e.hosts.count >= RouterCache.maxHostsPerSnapshot { LuaVM.vm(L).routerCache.rotate(e, L) }
        buildHost(L, vh, e, snap.routes)
        lua_pushvalue(L, -1)
        let ref = ml_ref(L)
        e.hosts[key] = ref
        if byHost != nil { e.lastAuthority = authority; e.lastRef = ref }
        return 1
    }

    static func setString(_ L: OpaquePointer?, _ k: String, _ v: String) { push(L, v); lua_setfield(L, -2, k) }
    static func setInt(_ L: OpaquePointer?, _ k: String, _ v: Int) { lua_pushinteger(L, lua_Integer(v)); lua_setfield(L, -2, k) }
    static func setNumber(_ L: OpaquePointer?, _ k: String, _ v: Double) { lua_pushnumber(L, v); lua_setfield(L, -2, k) }
    static func setBool(_ L: OpaquePointer?, _ k: String, _ v: Bool) { lua_pushboolean(L, v ? 1 : 0); lua_setfield(L, -2, k) }

    /// Pushes the table of a virtual host: {fqdn, workload, rules | default, default_hash}.
    static func buildHost(_ L: OpaquePointer?, _ vh: VirtualHost, _ e: RouterCache.Entry, _ table: RouteTable) {
        lua_createtable(L, 0, 5)
        setString(L, "fqdn", vh.fqdn)
        if e.workloadRef == LUA_NOREF {
            lua_createtable(L, 0, 2)
            setString(L, "namespace", table.localNamespace)
            lua_createtable(L, 0, Int32(table.localLabels.count))
            for (k, v) in table.localLabels { setString(L, k, v) }
            lua_setfield(L, -2, "labels")
            e.workloadRef = ml_ref(L)
        }
        ml_getregistry_ref(L, e.workloadRef)
        lua_setfield(L, -2, "workload")
        if vh.routes != nil {
            setString(L, "virtual_service", vh.virtualService)
            lua_createtable(L, Int32(vh.compiled.count), 0)
            for (i, r) in vh.compiled.enumerated() {
                buildRule(L, r, e)
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
            lua_setfield(L, -2, "rules")
        } else if let t = vh.defaultTarget {
            pushHandle(L, e, .target, TargetBox(t)); lua_setfield(L, -2, "default")
            pushHash(L, t); lua_setfield(L, -2, "default_hash")
        }
    }

    /// The consistent-hash policy of a target's cluster as a table, or false.
    static func pushHash(_ L: OpaquePointer?, _ t: RouteTarget) {
        guard let hp = t.cluster?.hashPolicy else { lua_pushboolean(L, 0); return }
        lua_createtable(L, 0, 4)
        switch hp {
        case .header(let n): setString(L, "kind", "header"); setString(L, "name", n)
        case .cookie(let n, let path, let ttl): setString(L, "kind", "cookie"); setString(L, "name", n); setString(L, "path", path); setInt(L, "ttl", ttl)
        case .sourceIP: setString(L, "kind", "source_ip")
        case .queryParameter(let q): setString(L, "kind", "query"); setString(L, "name", q)
        }
    }

    static func pushMatcher(_ L: OpaquePointer?, _ m: StringMatch?, _ e: RouterCache.Entry) {
        if let m { pushHandle(L, e, .matcher, MatcherBox(m)) } else { lua_pushboolean(L, 0) }
    }

    /// {{name, matcher | false}, ...} (false: the name alone must be present).
    static func pushConditions(_ L: OpaquePointer?, _ list: [(String, StringMatch?)], _ e: RouterCache.Entry) {
        lua_createtable(L, Int32(list.count), 0)
        for (i, (n, m)) in list.enumerated() {
            lua_createtable(L, 2, 0)
            push(L, n); lua_rawseti(L, -2, 1)
            pushMatcher(L, m, e); lua_rawseti(L, -2, 2)
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
    }

    static func pushHeaderOps(_ L: OpaquePointer?, _ ops: HeaderOps) {
        lua_createtable(L, 0, 3)
        for (k, list) in [("set", ops.sets), ("add", ops.adds)] {
            lua_createtable(L, Int32(list.count), 0)
            for (i, (n, v)) in list.enumerated() {
                lua_createtable(L, 2, 0)
                push(L, n); lua_rawseti(L, -2, 1)
                push(L, v); lua_rawseti(L, -2, 2)
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
            lua_setfield(L, -2, k)
        }
        lua_createtable(L, Int32(ops.removes.count), 0)
        for (i, n) in ops.removes.enumerated() { push(L, n); lua_rawseti(L, -2, lua_Integer(i + 1)) }
        lua_setfield(L, -2, "remove")
    }

    /// Pushes the table of one http route rule (field names in docs/lua-api.md).
    static func buildRule(_ L: OpaquePointer?, _ c: CompiledRoute, _ e: RouterCache.Entry) {
        let r = c.rule
        lua_createtable(L, 0, 16)
        pushHandle(L, e, .rule, RuleBox(c)); lua_setfield(L, -2, "ref")
        setString(L, "name", r.name)
        lua_createtable(L, Int32(r.matches.count), 0)
        for (i, m) in r.matches.enumerated() {
            lua_createtable(L, 0, 12)
            if let u = m.uri {
                pushMatcher(L, u, e); lua_setfield(L, -2, "uri")
                if u.kind == .prefix { setString(L, "uri_prefix", u.value) }
            }
            if m.ignoreUriCase { setBool(L, "ignore_uri_case", true) }
            if let x = m.scheme { pushMatcher(L, x, e); lua_setfield(L, -2, "scheme") }
            if let x = m.method { pushMatcher(L, x, e); lua_setfield(L, -2, "method") }
            if let x = m.authority { pushMatcher(L, x, e); lua_setfield(L, -2, "authority") }
            if let p = m.port { setInt(L, "port", p) }
            if !m.headers.isEmpty { pushConditions(L, m.headers, e); lua_setfield(L, -2, "headers") }
            if !m.withoutHeaders.isEmpty { pushConditions(L, m.withoutHeaders, e); lua_setfield(L, -2, "without_headers") }
            if !m.queryParams.isEmpty { pushConditions(L, m.queryParams, e); lua_setfield(L, -2, "query_params") }
            if !m.sourceLabels.isEmpty {
                lua_createtable(L, 0, Int32(m.sourceLabels.count))
                for (k, v) in m.sourceLabels { setString(L, k, v) }
                lua_setfield(L, -2, "source_labels")
            }
            if let ns = m.sourceNamespace { setString(L, "source_namespace", ns) }
            // The entry's single condition, when it has one of the two common kinds: the
            // router tests it without looking for the others.
            let others = m.scheme != nil || m.method != nil || m.authority != nil || m.port != nil || !m.withoutHeaders.isEmpty
                || !m.queryParams.isEmpty || !m.sourceLabels.isEmpty || m.sourceNamespace != nil
            if !others && m.uri == nil && !m.headers.isEmpty { setString(L, "only", "headers") }
            if !others && m.uri != nil && m.headers.isEmpty { setString(L, "only", "uri") }
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
        lua_setfield(L, -2, "matches")
        if let f = r.fault {
            lua_createtable(L, 0, 4)
            if let s = f.abortStatus { setInt(L, "abort_status", s); setNumber(L, "abort_percent", f.abortPercent) }
            // At most a day, what delay() takes (a longer fixedDelay waits a day).
            if let d = f.delayMs { setInt(L, "delay_ms", min(d, Int(maxTimeoutMs))); setNumber(L, "delay_percent", f.delayPercent) }
            lua_setfield(L, -2, "fault")
        }
        if let cors = r.cors {
            lua_createtable(L, 0, 7)
            lua_createtable(L, Int32(cors.allowOrigins.count), 0)
            for (i, m) in cors.allowOrigins.enumerated() { pushMatcher(L, m, e); lua_rawseti(L, -2, lua_Integer(i + 1)) }
            lua_setfield(L, -2, "allow_origins")
            if !cors.allowMethods.isEmpty { setString(L, "allow_methods", cors.allowMethods) }
            if !cors.allowHeaders.isEmpty { setString(L, "allow_headers", cors.allowHeaders) }
            if !cors.exposeHeaders.isEmpty { setString(L, "expose_headers", cors.exposeHeaders) }
            if let m = cors.maxAgeSeconds { setString(L, "max_age", String(m)) }
            if cors.allowCredentials { setBool(L, "allow_credentials", true) }
            lua_setfield(L, -2, "cors")
        }
        if let red = r.redirect {
            lua_createtable(L, 0, 5)
            if let v = red.uri { setString(L, "uri", v) }
            if let v = red.authority { setString(L, "authority", v) }
            if let v = red.scheme { setString(L, "scheme", v) }
            if let v = red.port { setString(L, "port", String(v)) }
            setInt(L, "code", red.code)
            lua_setfield(L, -2, "redirect")
        }
        if let d = r.directResponse {
            lua_createtable(L, 0, 2)
            setInt(L, "status", d.status); setString(L, "body", d.body)
            lua_setfield(L, -2, "direct_response")
        }
        if let rw = r.rewrite {
            lua_createtable(L, 0, 4)
            if let v = rw.uri { setString(L, "uri", v) }
            if let v = rw.authority { setString(L, "authority", v) }
            if let re = rw.regex { pushHandle(L, e, .regex, RegexBox(re)); lua_setfield(L, -2, "regex"); setString(L, "regex_rewrite", rw.regexRewrite) }
            lua_setfield(L, -2, "rewrite")
        }
        lua_createtable(L, Int32(c.targets.count), 0)
        for (i, t) in c.targets.enumerated() { pushHandle(L, e, .target, TargetBox(t)); lua_rawseti(L, -2, lua_Integer(i + 1)) }
        lua_setfield(L, -2, "targets")
        lua_createtable(L, Int32(c.targets.count), 0)
        for (i, t) in c.targets.enumerated() { pushHash(L, t); lua_rawseti(L, -2, lua_Integer(i + 1)) }
        lua_setfield(L, -2, "hashes")
        setInt(L, "total_weight", c.totalWeight)
        // A rule that only sends to weighted destinations (most rules): the router takes
        // a short path past the checks for the fields this rule does not have.
        if r.fault == nil && r.cors == nil && r.redirect == nil && r.directResponse == nil && r.rewrite == nil
            && r.requestHeaders.isEmpty && r.responseHeaders.isEmpty && c.mirrorTargets.isEmpty && c.totalWeight > 0
            && c.targets.allSatisfy({ $0.cluster?.hashPolicy == nil }) {
            setBool(L, "plain", true)
        }
        if !r.requestHeaders.isEmpty { pushHeaderOps(L, r.requestHeaders); lua_setfield(L, -2, "request_headers") }
        if !r.responseHeaders.isEmpty { pushHeaderOps(L, r.responseHeaders); lua_setfield(L, -2, "response_headers") }
        if !c.mirrorTargets.isEmpty {
            lua_createtable(L, Int32(c.mirrorTargets.count), 0)
            for (i, m) in c.mirrorTargets.enumerated() {
                lua_createtable(L, 0, 2)
                setNumber(L, "percent", m.percent)
                pushHandle(L, e, .target, TargetBox(m.target)); lua_setfield(L, -2, "target")
                lua_rawseti(L, -2, lua_Integer(i + 1))
            }
            lua_setfield(L, -2, "mirrors")
        }
    }

    // MARK: matching

    /// Pushes the result of a match: true/false, or nil when a regex hit its match limit
    /// (the router answers 500 rather than skip a rule that may deny).
    @inline(__always)
    static func pushTest(_ L: OpaquePointer?, _ m: MatcherBox, _ b: UnsafeRawBufferPointer, ignoreCase: Bool = false) -> Int32 {
        do throws(RegexMatchError) { lua_pushboolean(L, try m.test(b, ignoreCase: ignoreCase) ? 1 : 0) } catch { lua_pushnil(L) }
        return 1
    }

    @inline(__always)
    static func pushTest(_ L: OpaquePointer?, _ m: MatcherBox, _ s: String, ignoreCase: Bool = false) -> Int32 {
        var s = s
        return s.withUTF8 { pushTest(L, m, UnsafeRawBufferPointer($0), ignoreCase: ignoreCase) }
    }

    static let badMatcher = "expected a matcher of the running stream's route table"

    /// moonlet.router.test(matcher, value) → whether the string matches (nil: regex limit).
    static let rTest: lua_CFunction = { L in
        guard let m = handle(L, 1, .matcher, MatcherBox.self) else { return fail(L, "router.test(matcher, value): \(badMatcher)") }
        guard let b = bytes(L, 2) else { return fail(L, "router.test(matcher, value): value must be a string") }
        return pushTest(L, m, b)
    }

    /// moonlet.router.match_path(s, matcher, ignore_case) → the path (without query) matches.
    static let rMatchPath: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let m = handle(L, 2, .matcher, MatcherBox.self) else { return fail(L, "router.match_path(s, matcher): \(badMatcher)") }
        let ic = lua_toboolean(L, 3) != 0
        var t = s.withRequest({ $0.target })
        return t.withUTF8 { p in
            var n = p.count
            if let q = p.firstIndex(of: UInt8(ascii: "?")) { n = q }
            return pushTest(L, m, UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(p)[0..<n]), ignoreCase: ic)
        }
    }

    /// moonlet.router.match_method(s, matcher).
    static let rMatchMethod: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let m = handle(L, 2, .matcher, MatcherBox.self) else { return fail(L, "router.match_method(s, matcher): \(badMatcher)") }
        return pushTest(L, m, s.withRequest({ $0.method }))
    }

    /// moonlet.router.match_authority(s, matcher): the Host as the client sent it.
    static let rMatchAuthority: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let m = handle(L, 2, .matcher, MatcherBox.self) else { return fail(L, "router.match_authority(s, matcher): \(badMatcher)") }
        return pushTest(L, m, s.withRequest({ $0.host }))
    }

    /// The optional matcher argument at `idx`: nil/false mean "present is enough".
    @inline(__always)
    static func optionalMatcher(_ L: OpaquePointer?, _ idx: Int32) -> (ok: Bool, m: MatcherBox?) {
        if lua_type(L, idx) == LUA_TNIL || lua_type(L, idx) == LUA_TNONE || (lua_type(L, idx) == LUA_TBOOLEAN && lua_toboolean(L, idx) == 0) { return (true, nil) }
        guard let m = handle(L, idx, .matcher, MatcherBox.self) else { return (false, nil) }
        return (true, m)
    }

    /// moonlet.router.match_header(s, name, matcher | false) → the request has header
    /// `name` (lowercase) and its value matches (several values joined with ",", as
    /// Envoy matches them; false: present is enough).
    static let rMatchHeader: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let raw = bytes(L, 2) else { return fail(L, "router.match_header(s, name, matcher): name must be a string") }
        let (ok, m) = optionalMatcher(L, 3)
        guard ok else { return fail(L, "router.match_header(s, name, matcher): \(badMatcher)") }
        // The route table's names are lowercase already: looked up as bytes, no String.
        let lower = !raw.contains { $0 >= 65 && $0 <= 90 }
        let name = lower ? nil : String(decoding: raw, as: UTF8.self)
        guard let first = lower ? s.withRequest({ $0.first(lowercasedASCII: raw) }) : s.withRequest({ $0.first(name!) }) else { lua_pushboolean(L, 0); return 1 }
        guard let m else { lua_pushboolean(L, 1); return 1 }
        // A header given several times is matched on its values joined with "," (Envoy's
        // HeaderUtility::getAllOfHeaderAsString); once, on its value.
        let all = s.request.all(name ?? String(decoding: raw, as: UTF8.self))
        return pushTest(L, m, all.count > 1 ? all.joined(separator: ",") : first)
    }

    /// First value of query parameter `name` of a request target, percent-decoded
    /// (names are compared decoded too).
    static func queryValue(_ target: String, _ name: String) -> String? {
        guard let q = target.firstIndex(of: "?") else { return nil }
        for pair in target[target.index(after: q)...].split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let k = String(kv[0]).removingPercentEncoding ?? String(kv[0])
            if k == name { return kv.count > 1 ? (String(kv[1]).removingPercentEncoding ?? String(kv[1])) : "" }
        }
        return nil
    }

    /// The consistent-hash key of a request for `hp`, as istio-router.lua computes it
    /// (for a route a filter set with s.route.cluster): for a cookie policy with a ttl
    /// and no cookie yet, makes one and sets it on the response (Envoy's behaviour).
    static func hashKey(_ s: ProxyStream, _ hp: HashPolicy, vm: LuaVM) {
        var key: String?
        switch hp {
        case .header(let n): key = s.withRequest({ $0.first(n) })
        case .sourceIP: key = s.source.address.split(separator: ":").dropLast().joined(separator: ":")
        case .queryParameter(let q): key = queryValue(s.withRequest({ $0.target }), q)
        case .cookie(let name, let path, let ttl):
            for c in s.withRequest({ $0.all("cookie") }) {
                for part in c.split(separator: ";") {
                    let kv = part.split(separator: "=", maxSplits: 1)
                    if kv.count == 2, kv[0].trimmingCharacters(in: .whitespaces) == name { key = String(kv[1]) }
                }
            }
            if key == nil && ttl > 0 {
                let v = String(vm.rng.next(), radix: 16)
                key = v
                s.route.responseAdd.append(("set-cookie", "\(name)=\(v); Max-Age=\(ttl); Path=\(path); HttpOnly"))
            }
        }
        if let key { s.route.hashKey = HashRing.hash(key) }
    }

    /// moonlet.router.query(s, name) → the first value of a query parameter, decoded, or nil.
    static let rQuery: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let name = str(L, 2) else { return fail(L, "router.query(s, name): name must be a string") }
        if let v = queryValue(s.withRequest({ $0.target }), name) { push(L, v) } else { lua_pushnil(L) }
        return 1
    }

    /// moonlet.router.match_query(s, name, matcher | false): like match_header for a query parameter.
    static let rMatchQuery: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let name = str(L, 2) else { return fail(L, "router.match_query(s, name, matcher): name must be a string") }
        let (ok, m) = optionalMatcher(L, 3)
        guard ok else { return fail(L, "router.match_query(s, name, matcher): \(badMatcher)") }
        guard let v = queryValue(s.withRequest({ $0.target }), name) else { lua_pushboolean(L, 0); return 1 }
        guard let m else { lua_pushboolean(L, 1); return 1 }
        return pushTest(L, m, v)
    }

    // MARK: randomness

    /// moonlet.router.pick(rule) → 1-based index of a destination, drawn by weight
    /// with the VM's generator (weights pre-summed at load).
    static let rPick: lua_CFunction = { L in
        guard let r = handle(L, 1, .rule, RuleBox.self)?.rule else { return fail(L, "router.pick(rule): expected a rule of the running stream's route table") }
        let total = r.totalWeight
        guard total > 0 else { lua_pushinteger(L, 1); return 1 }
        let pick = Int(LuaVM.vm(L).rng.next() % UInt64(total))
        let cw = r.cumulativeWeights
        var k = 0
        while k < cw.count - 1 && pick >= cw[k] { k += 1 }
        lua_pushinteger(L, lua_Integer(k + 1))
        return 1
    }

    /// moonlet.router.chance(percent) → true with that probability (0-100, fractions allowed).
    static let rChance: lua_CFunction = { L in
        guard lua_type(L, 1) == LUA_TNUMBER else { return fail(L, "router.chance(percent): percent must be a number") }
        let percent = ml_tonumber(L, 1)
        let hit: Bool
        if percent >= 100 { hit = true } else if percent <= 0 || percent.isNaN { hit = false } else {
            hit = Double(LuaVM.vm(L).rng.next() % 1_000_000) < percent * 10_000
        }
        lua_pushboolean(L, hit ? 1 : 0)
        return 1
    }

    // MARK: route writes

    /// moonlet.router.forward(s, target, rule | nil, hash_key | nil) → true, having
    /// written s.route (cluster, host, subset, port, the upstream cluster, the rule's
    /// retry policy and timeout, the hash key) and s.destination.service; false when
    /// the target has no endpoint (s.route.cluster then names it, for the 503 UH).
    static let rForward: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let t = handle(L, 2, .target, TargetBox.self)?.target else { return fail(L, "router.forward(s, target): expected a target of the running stream's route table") }
        var rule: CompiledRoute?
        if !(ml_isnoneornil(L, 3) != 0) {
            guard let r = handle(L, 3, .rule, RuleBox.self) else { return fail(L, "router.forward(s, target, rule): expected a rule of the running stream's route table") }
            rule = r.rule
        }
        guard let c = t.cluster, c.endpointCount > 0 else {
            s.route.cluster = t.missing
            lua_pushboolean(L, 0)
            return 1
        }
        s.route.cluster = c.name
        s.route.host = t.fqdn
        s.route.subset = t.subset
        s.route.port = t.servicePort
        s.route.upstreamCluster = c
        s.route.retry = rule?.retries ?? .istioDefault
        s.route.name = rule?.rule.name
        if let ms = rule?.timeoutMs { s.route.timeoutMs = ms }
        if let key = bytes(L, 4) { s.route.hashKey = HashRing.hash(String(decoding: key, as: UTF8.self)) }
        s.destination.service = t.fqdn
        if !s.route.overrideHost.isEmpty {
            // An Envoy script's setUpstreamOverrideHost made before the route was decided.
            let addr = s.route.overrideHost, port = s.route.overrideHostPort, strict = s.route.overrideHostStrict
            s.route.overrideHost = ""
            if !pinEndpoint(s, c, addr: addr, port: port == 0 ? nil : port) && strict {
                s.respond(503, body: "no healthy upstream\n", headers: [("content-type", "text/plain")], flags: .noHealthyUpstream)
            }
        }
        lua_pushboolean(L, 1)
        return 1
    }

    /// Pins the endpoint of cluster `c` at `addr` (and `port`, when given) for the stream,
    /// as Envoy's setUpstreamOverrideHost does; false when the cluster has no such endpoint.
    static func pinEndpoint(_ s: ProxyStream, _ c: UpstreamCluster, addr: String, port: Int?) -> Bool {
        for i in 0..<c.endpointCount {
            let e = c.endpoint(i)
            var a = Substring(e.address)
            if a.hasPrefix("[") && a.hasSuffix("]") { a = a.dropFirst().dropLast() }
            guard a.lowercased() == addr.lowercased(), port == nil || port == e.port else { continue }
            s.route.endpointIndex = i; s.route.endpoint = e.address; s.route.endpointPort = e.port
            s.destination.address = e.address; s.destination.port = e.port
            return true
        }
        return false
    }

    /// moonlet.router.reply(s, status, body, flag, location) → "respond": a local reply
    /// with an Envoy response flag ("NR", "UH", "FI" or nil) and, for redirects, a
    /// location. Response header edits already recorded apply to it.
    static let rReply: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard lua_isinteger(L, 2) != 0 else { return fail(L, "router.reply(s, status, ...): status must be an integer") }
        let status = Int(ml_tointeger(L, 2))
        guard (200...599).contains(status) else { return fail(L, "router.reply: status \(status) out of range 200-599") }
        let body = ml_isnoneornil(L, 3) != 0 ? "" : str(L, 3)
        guard let body else { return fail(L, "router.reply: body must be a string") }
        var flags: ResponseFlags = []
        if ml_isnoneornil(L, 4) == 0 {
            switch str(L, 4) ?? "" {
            case "NR": flags = .noRouteFound
            case "UH": flags = .noHealthyUpstream
            case "FI": flags = .faultInjected
            default: return fail(L, "router.reply: flag must be \"NR\", \"UH\", \"FI\" or nil")
            }
        }
        var headers: [(name: String, value: String)] = []
        if ml_isnoneornil(L, 5) == 0 {
            guard let loc = str(L, 5), HeaderValidation.isFieldValue(loc) else { return fail(L, "router.reply: location must be a header value") }
            headers.append(("location", loc))
        }
        s.respond(status, body: body, headers: headers, flags: flags)
        lua_pushstring(L, "respond")
        return 1
    }

    /// moonlet.router.delay(s, ms): fault injection delay before going upstream (DI).
    static let rDelay: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard lua_isinteger(L, 2) != 0, (0...maxTimeoutMs).contains(ml_tointeger(L, 2)) else {
            return fail(L, "router.delay(s, ms): ms must be an integer 0-\(maxTimeoutMs)")
        }
        s.route.delayMs = Int(ml_tointeger(L, 2))
        return 0
    }

    /// moonlet.router.mirror(s, target): sends a copy of the request to the target's
    /// cluster (authority: the request's host with "-shadow"); nothing when it has no endpoint.
    static let rMirror: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let t = handle(L, 2, .target, TargetBox.self)?.target else { return fail(L, "router.mirror(s, target): expected a target of the running stream's route table") }
        guard let c = t.cluster, c.endpointCount > 0 else { return 0 }
        s.route.mirrors.append((cluster: c as UpstreamCluster, authority: HostName.normalize(s.withRequest({ $0.host })) + "-shadow"))
        return 0
    }

    /// moonlet.router.regex_replace(regex, subject, replacement) → subject with every
    /// match replaced (\1 names a group), for uriRegexRewrite.
    static let rRegexReplace: lua_CFunction = { L in
        guard let re = handle(L, 1, .regex, RegexBox.self)?.regex else { return fail(L, "router.regex_replace(regex, ...): expected a regex of the running stream's route table") }
        guard let subj = str(L, 2), let repl = str(L, 3) else { return fail(L, "router.regex_replace(regex, subject, replacement): strings expected") }
        do { push(L, try re.replacing(in: subj, with: repl, maxBytes: maxRegexOutput)) } catch { return fail(L, "router.regex_replace: \(error)") }
        return 1
    }

    /// moonlet.router.hash_cookie(s, name, path, ttl) → a new random cookie value, set
    /// on the response (Max-Age ttl, HttpOnly): Envoy's cookie generation for
    /// consistentHash.httpCookie with a ttl when the request has no such cookie.
    static let rHashCookie: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let name = str(L, 2), HeaderValidation.isToken(name), let path = str(L, 3), HeaderValidation.isFieldValue(path),
              !path.contains(";"), lua_isinteger(L, 4) != 0 else {
            return fail(L, "router.hash_cookie(s, name, path, ttl): name a token, path a value without ';', ttl an integer")
        }
        let v = String(LuaVM.vm(L).rng.next(), radix: 16)
        s.route.responseAdd.append(("set-cookie", "\(name)=\(v); Max-Age=\(ml_tointeger(L, 4)); Path=\(path); HttpOnly"))
        push(L, v)
        return 1
    }

    /// A response header edit's name and value, checked as the headers API checks them.
    static func responseEdit(_ L: OpaquePointer?, value: Bool) -> (String, String)? {
        guard let n = str(L, 2), HeaderValidation.isToken(n), managedHeader(n.lowercased()) == nil else { return nil }
        if !value { return (n.lowercased(), "") }
        guard let v = str(L, 3), HeaderValidation.isFieldValue(v) else { return nil }
        return (n.lowercased(), v)
    }

    /// moonlet.router.set_response_header(s, name, value): the route's response edit
    /// (applied to the upstream response and to local replies, before response filters).
    static let rSetResponseHeader: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let (n, v) = responseEdit(L, value: true) else { return fail(L, "router.set_response_header(s, name, value): bad or managed name, or bad value") }
        s.route.responseSet.append((n, v))
        return 0
    }

    /// moonlet.router.add_response_header(s, name, value).
    static let rAddResponseHeader: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let (n, v) = responseEdit(L, value: true) else { return fail(L, "router.add_response_header(s, name, value): bad or managed name, or bad value") }
        s.route.responseAdd.append((n, v))
        return 0
    }

    /// moonlet.router.remove_response_header(s, name).
    static let rRemoveResponseHeader: lua_CFunction = { L in
        guard let s = routerStream(L, 1) else { return fail(L, routerStreamError(L)) }
        guard let (n, _) = responseEdit(L, value: false) else { return fail(L, "router.remove_response_header(s, name): bad or managed name") }
        s.route.responseRemove.append(n)
        return 0
    }
}
