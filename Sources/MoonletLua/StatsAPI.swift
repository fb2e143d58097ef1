import CLua
import CLuaBounded
import MoonletCore
import MoonletHTTP
import MoonletTelemetry
#if canImport(Foundation)
import Foundation
#endif

/// Per-VM state of `moonlet.stats` and `moonlet.metrics`: the label-set handles and
/// user metric handles this VM made, and the destination services it has numbered.
struct StatsState {
    /// Request series by handle index (a `moonlet.stats.series` userdata holds the index).
    var series: [RequestSeries] = []
    /// `moonlet.metrics` handles by index (index -1 in a userdata: a refused series, a no-op).
    var userHandles: [UserMetricRegistry.Series] = []
    var userHandleIndex: [String: Int32] = [:]
    /// Destination services numbered for `stats.key` (the route host of outbound streams).
    var services: [String: Int] = [:]
    var lastHost = ""
    var lastHostID = 0

    var nextService = 1

    /// The number of a destination service (1...2^24-1); the last one is remembered, so a
    /// connection's repeated host costs one string comparison.
    mutating func serviceID(_ host: String) -> Int {
        // The route host is a new String per stream: compared by its bytes, not by `==`.
        if lastHostID != 0 && InlineUTF8.sameBytes(host, lastHost) { return lastHostID }
        var id = services[host] ?? 0
        if id == 0 {
            // Bounded: a VM that has seen 2^20 hosts starts over (numbers are not reused
            // before 2^24, so the filter's cached label sets stay right).
            if services.count >= 1 << 20 { services.removeAll() }
            if nextService >= 1 << 24 { nextService = 1 }
            id = nextService
            nextService += 1
            services[host] = id
        }
        lastHost = host; lastHostID = id
        return id
    }
}

/// `moonlet.stats`: the native primitives of the builtin `istio-stats` filter
/// (plugins/istio-stats.lua). The filter decides the labels; these keep the cost native.
///
/// - `stats.key(s)` → `k1, k2`: two integers that identify everything the standard labels
///   depend on: `k1` the peer workload (metadata exchange) and the destination service
///   (outbound) or the caller's mTLS principal (inbound),
///   `k2` the response code, response flags, mTLS, gRPC and its status, the side. Equal
///   keys mean equal labels, so the filter caches its label-set handles by them.
/// - `stats.info(s)` → a table of the attributes labels are made from (made on a cache
///   miss only): `inbound`, `service`, `code`, `flags`, `protocol` ("http", "grpc"),
///   `grpc_status` ("" when not gRPC), `mtls`, `peer` and `self` (workload, namespace, app,
///   version, canonical_service, canonical_revision, cluster, principal; `peer` nil when
///   the peer sent no metadata).
/// - `stats.series(labels)` → a label-set handle (a {name = value} table, compiled once),
///   or `nil, reason` past the per-loop cap (counted in `moonlet_metric_series_refused_total`).
/// - `stats.record(h, s)`: counts the stream in istio_requests_total and observes its
///   duration (start to now, ms), request and response body bytes into the three
///   histograms of the handle's series. No allocation.
/// - `stats.log(cache, s)`: `key`, the lookup of `cache[k1][k2]` and `record` in one call
///   (the common case of a label set seen before); returns `k1, k2` when the cache has
///   no handle for them.
extension LuaAPI {
    static let statsSeriesType = "moonlet.stats_series"
    static let metricHandleType = "moonlet.metric"

    static func installStats(_ L: OpaquePointer) {
        luaL_newmetatable(L, statsSeriesType)
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        // Handles are recognised by this pointer (no registry lookup by name per record).
        LuaVM.vm(L).statsSeriesMetatable = lua_topointer(L, -1)
        ml_pop(L, 1)
        lua_createtable(L, 0, 6)
        for (n, f) in [("key", statsKey), ("info", statsInfo), ("series", statsSeries), ("record", statsRecord), ("attr", statsAttr), ("log", statsLog), ("logger", statsLogger)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
        ml_push_readonly(L, "moonlet.stats")
        lua_setfield(L, -2, "stats")
    }

    /// Whether the stream is a gRPC call, as Istio's stats filter decides it
    /// (`Grpc::Common::isGrpcRequestHeaders`): the request's content-type, on any HTTP
    /// version, by the rule the proxy uses everywhere (`GRPC.isGRPCRequest`: headers a
    /// filter set count; `application/grpc-web` is not gRPC).
    @inline(__always)
    static func isGRPC(_ s: ProxyStream) -> Bool {
        // Read in place: `s.request` would copy the head (its buffer and fields retained,
        // then released).
        s.withRequest { GRPC.isGRPCRequest($0) }
    }

    /// The response's grpc-status (0-16), or -1: from its trailers (where a gRPC server
    /// sends it after the messages), else from its head (a trailers-only response, or a
    /// local reply in gRPC form).
    static func grpcStatus(_ s: ProxyStream) -> Int {
        if let t = s.responseTrailers, let v = t.first("grpc-status").flatMap({ Int($0) }), (0...16).contains(v) { return v }
        guard let r = s.response, let i = r.firstIndex(lowercased: "grpc-status"), let v = Int(r.value(at: i)), (0...16).contains(v) else { return -1 }
        return v
    }

    static let statsKey: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "key"), kind == .stream else { return fail(L, outside) }
        let (k1, k2) = streamKey(vm, s)
        lua_pushinteger(L, lua_Integer(k1))
        lua_pushinteger(L, lua_Integer(k2))
        return 2
    }

    /// `stats.key`'s two integers for a finished stream.
    @inline(__always)
    static func streamKey(_ vm: LuaVM, _ s: ProxyStream) -> (Int, Int) {
        let inbound = s.listener == .inbound
        let mtls = inbound ? !s.source.principal.isEmpty : s.upstreamMeshMTLS
        // Outbound: the destination service; inbound: the caller's mTLS principal (the
        // service is this workload's), numbered in the same table.
        let svc = inbound ? (mtls ? vm.stats.serviceID(s.source.principal) : 0) : vm.stats.serviceID(s.route.host)
        let peer = s.peerWorkload?.serial ?? 0
        let code = min(max(s.status, 0), 1023)
        var grpc = 0, gs = 31
        if isGRPC(s) { grpc = 1; let st = grpcStatus(s); gs = st < 0 ? 31 : st }
        let k2 = code | Int(s.responseFlags.rawValue & 0xFFFF) << 10 | (mtls ? 1 << 26 : 0) | grpc << 27 | gs << 28 | (inbound ? 1 << 33 : 0)
        return (peer << 24 | svc, k2)
    }

    /// The series index of the `stats.series` handle at `idx`, or nil when the value
    /// there is not one.
    @inline(__always)
    static func seriesIndex(_ L: OpaquePointer?, _ idx: Int32, _ vm: LuaVM) -> Int? {
        guard lua_type(L, idx) == LUA_TUSERDATA, lua_getmetatable(L, idx) != 0 else { return nil }
        let same = lua_topointer(L, -1) == vm.statsSeriesMetatable
        ml_pop(L, 1)
        guard same, let raw = lua_touserdata(L, idx) else { return nil }
        return raw.load(as: Int.self)
    }

    /// Records `s` in the series at `index` (istio_requests_total and the three histograms).
    @inline(__always)
    static func record(_ vm: LuaVM, _ index: Int, _ s: ProxyStream) {
        var ts = timespec(); clock_gettime(CLOCK_MONOTONIC, &ts)
        record(vm, index, s, now: UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec))
    }

    /// `record` with the stream's end (monotonic nanoseconds) read by the caller.
    @inline(__always)
    static func record(_ vm: LuaVM, _ index: Int, _ s: ProxyStream, now: UInt64) {
        guard index >= 0 && index < vm.stats.series.count else { return }
        vm.stats.series[index].record(durationMs: Double(now &- s.startNanos) / 1e6, requestBytes: s.requestBodyBytes, responseBytes: s.responseBodyBytes)
    }

    /// `stats.log(cache, s)`: istio-stats' per-request path in one call. Computes the
    /// stream's key (`stats.key`), looks up `cache[k1][k2]` (raw reads) and, when that
    /// is a `stats.series` handle, records the stream in it (`stats.record`) and returns
    /// nothing; `false` there (a label set the series cap refused) also returns nothing.
    /// Anything else (no entry yet, or a table of handles by attribute values) returns
    /// `k1, k2` for the filter to go on as with `stats.key`.
    static let statsLog: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 2, "log"), kind == .stream else { return fail(L, outside) }
        guard let (k1, k2) = logCached(L, 1, vm, s) else { return 0 }
        lua_pushinteger(L, lua_Integer(k1))
        lua_pushinteger(L, lua_Integer(k2))
        return 2
    }

    /// `stats.log`'s work: nil when the cache at `idx` had the stream's label set (it is
    /// recorded, or refused), else the key. Leaves what it pushed on the stack.
    @inline(__always)
    static func logCached(_ L: OpaquePointer?, _ idx: Int32, _ vm: LuaVM, _ s: ProxyStream) -> (Int, Int)? {
        let (k1, k2) = streamKey(vm, s)
        switch cachedSeries(L, idx, k1, k2, vm) {
        case .series(let index): record(vm, index, s); return nil
        case .refused: return nil
        case .none: return (k1, k2)
        }
    }

    enum CachedSeries { case series(Int), refused, none }

    /// What `cache[k1][k2]` holds (the cache table at `idx`, read raw): a series handle's
    /// index, `false` (refused), or nothing usable. Leaves what it pushed on the stack.
    @inline(__always)
    static func cachedSeries(_ L: OpaquePointer?, _ idx: Int32, _ k1: Int, _ k2: Int, _ vm: LuaVM) -> CachedSeries {
        if lua_type(L, idx) == LUA_TTABLE {
            if lua_rawgeti(L, idx, lua_Integer(k1)) == LUA_TTABLE {
                let t = lua_rawgeti(L, -1, lua_Integer(k2))
                if t == LUA_TBOOLEAN && lua_toboolean(L, -1) == 0 { return .refused }
                if t == LUA_TUSERDATA, let index = seriesIndex(L, -1, vm) { return .series(index) }
            }
        }
        return .none
    }

    /// `stats.logger()`: the native action of istio-stats' on_log (`conf.shortcuts.on_log`,
    /// with the cache table as `conf.shortcuts.data`): `stats.log(data, s)` without entering
    /// Lua; when that gives a key back (a label set not cached yet) the Lua on_log runs.
    static let statsLogger: lua_CFunction = { L in
        if let id = LuaVM.vm(L).nativeActions.register(.statsLog) { lua_pushinteger(L, lua_Integer(id)) } else { lua_pushnil(L) }
        return 1
    }

    static func pushWorkload(_ L: OpaquePointer?, _ w: MeshWorkload, principal: String) {
        lua_createtable(L, 0, 8)
        for (k, v) in [("workload", w.workload), ("namespace", w.namespace), ("app", w.app.isEmpty ? "unknown" : w.app),
                       ("version", w.version.isEmpty ? "unknown" : w.version), ("canonical_service", w.canonicalService),
                       ("canonical_revision", w.canonicalRevision), ("cluster", w.cluster.isEmpty ? "unknown" : w.cluster),
                       ("principal", principal)] {
            push(L, v); lua_setfield(L, -2, k)
        }
    }

    static let statsInfo: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "info"), kind == .stream else { return fail(L, outside) }
        let inbound = s.listener == .inbound
        let mtls = inbound ? !s.source.principal.isEmpty : s.upstreamMeshMTLS
        let own = vm.host.ownWorkload
        let td = vm.host.trustDomain
        lua_createtable(L, 0, 10)
        lua_pushboolean(L, inbound ? 1 : 0); lua_setfield(L, -2, "inbound")
        push(L, inbound ? "" : (s.route.host.isEmpty ? "unknown" : s.route.host)); lua_setfield(L, -2, "service")
        lua_pushinteger(L, lua_Integer(s.status)); lua_setfield(L, -2, "code")
        push(L, s.responseFlags.envoyString); lua_setfield(L, -2, "flags")
        let grpc = isGRPC(s)
        lua_pushstring(L, grpc ? "grpc" : "http"); lua_setfield(L, -2, "protocol")
        let gs = grpc ? grpcStatus(s) : -1
        push(L, gs < 0 ? "" : String(gs)); lua_setfield(L, -2, "grpc_status")
        lua_pushboolean(L, mtls ? 1 : 0); lua_setfield(L, -2, "mtls")
        pushWorkload(L, own, principal: mtls ? "spiffe://\(td)/ns/\(own.namespace)/sa/\(own.serviceAccount)" : "unknown")
        lua_setfield(L, -2, "self")
        if let p = s.peerWorkload {
            let principal: String
            if inbound { principal = mtls ? "spiffe://" + s.source.principal : "unknown" }
            else { principal = mtls && !p.serviceAccount.isEmpty ? "spiffe://\(td)/ns/\(p.namespace)/sa/\(p.serviceAccount)" : "unknown" }
            pushWorkload(L, p, principal: principal)
            lua_setfield(L, -2, "peer")
        } else if inbound && mtls {
            // A mesh peer that sent no metadata: its principal is still known.
            lua_createtable(L, 0, 1)
            push(L, "spiffe://" + s.source.principal); lua_setfield(L, -2, "principal")
            lua_setfield(L, -2, "peer_identity")
        }
        return 1
    }

    /// Reads a {name = value} label table at `idx` into pairs; nil and a message when a
    /// name is not a Prometheus label name, a value not a string or number, or the table
    /// too large. `forbidden`: names refused besides those starting with "__".
    static func labelPairs(_ L: OpaquePointer?, _ idx: Int32, forbidden: Set<String> = []) -> ([(String, String)]?, String) {
        var pairs: [(String, String)] = []
        if ml_isnoneornil(L, idx) != 0 { return (pairs, "") }
        guard ml_istable(L, idx) != 0 else { return (nil, "labels must be a table {name = value}") }
        lua_pushnil(L)
        while lua_next(L, idx) != 0 {
            guard lua_type(L, -2) == LUA_TSTRING, let k = str(L, -2), isPromName(k, colons: false), !k.hasPrefix("__"), !forbidden.contains(k) else {
                ml_pop(L, 2); return (nil, "label names must match [a-zA-Z_][a-zA-Z0-9_]* (not \"__...\"\(forbidden.isEmpty ? "" : ", not " + forbidden.sorted().joined(separator: ", ")))")
            }
            let t = lua_type(L, -1)
            guard t == LUA_TSTRING || t == LUA_TNUMBER, lua_rawlen(L, -1) <= 1024 || t == LUA_TNUMBER else {
                ml_pop(L, 2); return (nil, "label \(k): the value must be a string of at most 1024 bytes or a number")
            }
            pairs.append((k, prefix(L, -1, 1024)))
            ml_pop(L, 1)
            guard pairs.count <= 32 else { ml_pop(L, 1); return (nil, "at most 32 labels") }
        }
        return (pairs, "")
    }

    /// Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*; colons only when `colons`) or label name.
    static func isPromName(_ s: String, colons: Bool) -> Bool {
        guard let first = s.utf8.first, s.utf8.count <= maxMetricName else { return false }
        func letter(_ c: UInt8) -> Bool { (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 95 || (colons && c == 58) }
        return letter(first) && s.utf8.allSatisfy { letter($0) || ($0 >= 48 && $0 <= 57) }
    }

    static let statsSeries: lua_CFunction = { L in
        let vm = LuaVM.vm(L)
        var per: [RequestLabels?] = []
        // series(labels) or, per metric, series(count, duration, request_bytes,
        // response_bytes) where `false` leaves that metric out.
        for i in Int32(1)...(lua_gettop(L) > 1 ? 4 : 1) {
            if lua_type(L, i) == LUA_TBOOLEAN && lua_toboolean(L, i) == 0 { per.append(nil); continue }
            let (pairs, why) = labelPairs(L, i)
            guard let pairs else { return fail(L, "stats.series: \(why)") }
            per.append(RequestLabels(pairs))
        }
        guard let shard = vm.metrics else { lua_pushnil(L); lua_pushstring(L, "no metrics here"); return 2 }
        let made: RequestSeries?
        if per.count == 1, let l = per[0] { made = shard.requestSeries(l) } else {
            while per.count < 4 { per.append(nil) }
            made = shard.requestSeries(perMetric: per)
        }
        guard let series = made else {
            lua_pushnil(L); lua_pushstring(L, "too many Istio metric series (at most \(shard.maxSeries) per event loop)")
            return 2
        }
        let index = vm.stats.series.count
        vm.stats.series.append(series)
        let p = ml_newuserdata(L, MemoryLayout<Int>.size)!
        p.storeBytes(of: index, as: Int.self)
        luaL_setmetatable(L, statsSeriesType)
        return 1
    }

    static let statsRecord: lua_CFunction = { L in
        guard let index = seriesIndex(L, 1, LuaVM.vm(L)) else { return fail(L, "stats.record(h, s): h must be a stats.series handle") }
        guard let (vm, s, kind) = resolve(L, 2, "record"), kind == .stream else { return fail(L, outside) }
        record(vm, index, s)
        return 0
    }

    /// `stats.attr(s, name)`: an Istio attribute of the finished stream as a string, for
    /// Telemetry tagOverrides values (TelemetryPolicy.tagAttributes and
    /// `request.headers.NAME`); "unknown" when it has none.
    static let statsAttr: lua_CFunction = { L in
        guard let (_, s, kind) = resolve(L, 1, "attr"), kind == .stream else { return fail(L, outside) }
        guard let name = str(L, 2) else { return fail(L, "stats.attr(s, name): name must be a string") }
        var v: String?
        switch name {
        case "request.method": v = s.request.method
        case "request.host": v = s.request.host
        case "request.path": v = s.request.target
        case "request.url_path": v = String(s.request.target.prefix { $0 != "?" })
        case "request.scheme": v = "http"
        case "request.protocol": v = s.protocolName
        case "request.useragent": v = s.request.first("user-agent")
        case "request.id": v = s.request.first("x-request-id")
        case "request.referer": v = s.request.first("referer")
        case "request.size", "request.total_size": v = String(s.requestBodyBytes)
        case "response.code": v = String(s.status)
        case "response.code_details": v = StreamLogRecord(s, now: 0).responseCodeDetails
        case "response.flags": v = s.responseFlags.envoyString
        case "response.size", "response.total_size": v = String(s.responseBodyBytes)
        case "response.grpc_status": let g = grpcStatus(s); v = g < 0 ? nil : String(g)
        case "source.address": v = LogTraceLoopState.split(s.source.address).0
        case "source.port": v = LogTraceLoopState.split(s.source.address).1.map { String($0) }
        case "destination.address": v = LogTraceLoopState.split(s.destination.address).0
        case "destination.port": v = LogTraceLoopState.split(s.destination.address).1.map { String($0) }
        case "connection.mtls": v = (s.listener == .inbound ? !s.source.principal.isEmpty : s.upstreamMeshMTLS) ? "true" : "false"
        case "connection.requested_server_name": v = s.source.serverName
        case "upstream.address": v = LogTraceLoopState.split(s.upstreamHost).0
        case "upstream.port": v = LogTraceLoopState.split(s.upstreamHost).1.map { String($0) }
        case "xds.cluster_name": v = s.route.cluster
        case "xds.route_name": v = s.route.envoyRouteName
        default:
            if name.hasPrefix("request.headers.") { v = s.request.first(String(name.dropFirst(16))) }
            else { return fail(L, "stats.attr: \"\(name)\" is not an attribute Moonlet knows") }
        }
        push(L, (v?.isEmpty ?? true) ? "unknown" : v!)
        return 1
    }

    // MARK: moonlet.metrics

    static func installMetrics(_ L: OpaquePointer) {
        luaL_newmetatable(L, metricHandleType)
        lua_createtable(L, 0, 4)
        for (n, f) in [("inc", metricInc), ("dec", metricDec), ("set", metricSet), ("observe", metricObserve)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
        ml_push_readonly(L, "moonlet.metric handle")
        lua_setfield(L, -2, "__index")
        lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable")
        ml_pop(L, 1)
        lua_createtable(L, 0, 3)
        for (n, f) in [("counter", metricCounter), ("gauge", metricGauge), ("histogram", metricHistogram)] as [(String, lua_CFunction)] {
            ml_pushapifunction(L, f); lua_setfield(L, -2, n)
        }
        ml_push_readonly(L, "moonlet.metrics")
        lua_setfield(L, -2, "metrics")
    }

    /// Name prefixes a filter's metric may not take (the proxy's own families).
    static let reservedMetricPrefixes = ["istio_", "envoy_", "moonlet_"]

    static func makeMetric(_ L: OpaquePointer?, _ kind: UserMetricRegistry.Kind) -> Int32 {
        let fn = "metrics.\(kind.rawValue)"
        guard lua_type(L, 1) == LUA_TSTRING, let name = str(L, 1), isPromName(name, colons: false), !name.hasPrefix("__") else {
            return fail(L, "\(fn)(name, labels): name must be a Prometheus metric name, [a-zA-Z_][a-zA-Z0-9_]* of at most \(maxMetricName) bytes")
        }
        if let p = reservedMetricPrefixes.first(where: { name.hasPrefix($0) }) {
            return fail(L, "\(fn): \"\(name)\": names starting with \(p) are the proxy's own")
        }
        let (pairs, why) = labelPairs(L, 2, forbidden: kind == .histogram ? ["le"] : [])
        guard let pairs else { return fail(L, "\(fn) \(name): \(why)") }
        var buckets: [Double] = []
        if kind == .histogram {
            if ml_isnoneornil(L, 3) != 0 { buckets = UserMetricRegistry.defaultBuckets } else {
                guard ml_istable(L, 3) != 0 else { return fail(L, "\(fn) \(name): buckets must be a list of increasing numbers") }
                let n = Int(lua_rawlen(L, 3))
                guard (1...64).contains(n) else { return fail(L, "\(fn) \(name): 1 to 64 buckets") }
                for i in 1...n {
                    lua_rawgeti(L, 3, lua_Integer(i))
                    let ok = lua_type(L, -1) == LUA_TNUMBER
                    let v = ml_tonumber(L, -1)
                    ml_pop(L, 1)
                    guard ok, v.isFinite, buckets.last.map({ v > $0 }) ?? true else { return fail(L, "\(fn) \(name): buckets must be a list of increasing finite numbers") }
                    buckets.append(v)
                }
            }
        }
        let labels = RequestLabels(pairs).text
        let vm = LuaVM.vm(L)
        let key = "\(kind.rawValue) \(name){\(labels)"
        var index: Int32
        var warning: String?
        if let i = vm.stats.userHandleIndex[key] { index = i } else {
            switch vm.host.userMetrics.series(name: name, kind: kind, labels: labels, buckets: buckets) {
            case .success(let s):
                index = Int32(vm.stats.userHandles.count)
                vm.stats.userHandles.append(s)
                vm.stats.userHandleIndex[key] = index
            case .failure(.conflict(let why)):
                return fail(L, "\(fn): \(why)")
            case .failure(.full):
                vm.metrics?.count(LuaHost.refusedSeriesMetric, 1)
                index = -1
                warning = "too many metric series (at most \(vm.host.userMetrics.maxSeries)): updates to this one are dropped"
            }
        }
        let p = ml_newuserdata(L, MemoryLayout<Int32>.size)!
        p.storeBytes(of: index, as: Int32.self)
        luaL_setmetatable(L, metricHandleType)
        if let warning { push(L, warning); return 2 }
        return 1
    }

    static let metricCounter: lua_CFunction = { L in
        // The older form counter(name, n) counts n at once on moonlet_lua_<name>.
        if lua_type(L, 2) == LUA_TNUMBER { return legacyCounter(L) }
        return makeMetric(L, .counter)
    }
    static let metricGauge: lua_CFunction = { L in makeMetric(L, .gauge) }
    static let metricHistogram: lua_CFunction = { L in makeMetric(L, .histogram) }

    /// The handle at 1 and its series (nil series: a refused one, updates dropped).
    @inline(__always)
    static func metricHandle(_ L: OpaquePointer?, _ method: String) -> (LuaVM, UserMetricRegistry.Series?)? {
        guard let raw = luaL_testudata(L, 1, metricHandleType) else { return nil }
        let index = Int(raw.load(as: Int32.self))
        let vm = LuaVM.vm(L)
        return (vm, index >= 0 && index < vm.stats.userHandles.count ? vm.stats.userHandles[index] : nil)
    }

    static func number(_ L: OpaquePointer?, _ idx: Int32, default d: Double) -> Double? {
        if ml_isnoneornil(L, idx) != 0 { return d }
        guard lua_type(L, idx) == LUA_TNUMBER else { return nil }
        let v = ml_tonumber(L, idx)
        return v.isFinite ? v : nil
    }

    static let metricInc: lua_CFunction = { L in
        guard let (vm, series) = metricHandle(L, "inc") else { return fail(L, "h:inc(n): h must be a moonlet.metrics handle") }
        guard let v = number(L, 2, default: 1) else { return fail(L, "h:inc(n): n must be a finite number") }
        guard let s = series else { return 0 }
        switch s.kind {
        case .counter:
            guard v >= 0 else { return fail(L, "counter:inc(n): n must not be negative") }
            vm.metrics?.userAdd(s.index, v)
        case .gauge: s.gauge?.add(v)
        case .histogram: return fail(L, "a histogram has observe(v), not inc")
        }
        return 0
    }
    static let metricDec: lua_CFunction = { L in
        guard let (_, series) = metricHandle(L, "dec") else { return fail(L, "h:dec(n): h must be a moonlet.metrics handle") }
        guard let v = number(L, 2, default: 1) else { return fail(L, "h:dec(n): n must be a finite number") }
        guard let s = series else { return 0 }
        guard s.kind == .gauge else { return fail(L, "only a gauge has dec(n)") }
        s.gauge?.add(-v)
        return 0
    }
    static let metricSet: lua_CFunction = { L in
        guard let (_, series) = metricHandle(L, "set") else { return fail(L, "h:set(v): h must be a moonlet.metrics handle") }
        guard let v = number(L, 2, default: .nan) else { return fail(L, "h:set(v): v must be a finite number") }
        guard let s = series else { return 0 }
        guard s.kind == .gauge else { return fail(L, "only a gauge has set(v)") }
        guard !v.isNaN else { return fail(L, "h:set(v): v must be a finite number") }
        s.gauge?.set(v)
        return 0
    }
    static let metricObserve: lua_CFunction = { L in
        guard let (vm, series) = metricHandle(L, "observe") else { return fail(L, "h:observe(v): h must be a moonlet.metrics handle") }
        guard lua_type(L, 2) == LUA_TNUMBER, let v = number(L, 2, default: 0) else { return fail(L, "h:observe(v): v must be a finite number") }
        guard let s = series else { return 0 }
        guard s.kind == .histogram else { return fail(L, "only a histogram has observe(v)") }
        vm.metrics?.userObserve(s.index, v, bounds: s.buckets)
        return 0
    }
}
