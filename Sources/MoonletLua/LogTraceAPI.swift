import CLua
import CLuaBounded
import MoonletCore
import MoonletHTTP
import MoonletTelemetry
import NIOConcurrencyHelpers
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet.accesslog` and `moonlet.trace`: the native primitives of the builtin
/// `istio-accesslog` and `istio-tracing` filters. The filters decide (enabled? filter
/// expression? which tracer?) in Lua; formatting, ids, clocks and I/O stay native.
///
/// - `accesslog.open(path, format)`: a handle (integer) for an access log output: `path`
///   a file (created 0644, appended to) or /dev/stdout; `format` an Envoy text format
///   string, or a list of `{key, format}` pairs for JSON (one object per line, keys in
///   that order). Compiled once; raises naming a bad operator or a file that cannot be
///   opened. Call it from `configure`: outputs live as long as the proxy (a path and
///   format used again give the same handle).
/// - `accesslog.write(s, handle)`: formats the finished stream with the compiled format
///   and appends the line to this loop's buffer for that file; a writer thread writes it
///   (bounded: past 8 MB queued, lines are dropped and counted in
///   `moonlet_access_log_dropped_lines_total`). For `on_log`.
/// - `trace.tracer(conf)`: a handle for a tracer: `conf` holds `sampling` (percent),
///   `collectors` ({address, format = "zipkin"|"otlp", max_tag_length}), `report`,
///   `service`, `canonical_service`, `canonical_revision`, `namespace`, `mesh_id`,
///   `node_id`, `inbound_operation` and `custom_tags` ({tag, kind, value, default}).
/// - `trace.start(s, tracer)`: reads the trace headers (B3 single, B3 multi, W3C), starts
///   a new trace when there is none, makes this sidecar's span a child of the caller's,
///   writes the headers the next hop reads (x-b3-*, traceparent, tracestate, and `b3`
///   when it came), and x-request-id when absent. Returns true when the span is recorded
///   (sampled and a collector to report to). For `on_request`.
/// - `trace.finish(s)`: ends the stream's recorded span and queues it for export (off the
///   loop, batched). Returns whether there was one. For `on_log`.
/// - `accesslog.writer(handles)` and `trace.starter(tracer)`: a native action (an
///   integer) doing what `for _, h in ipairs(handles) do accesslog.write(s, h) end`,
///   respectively `trace.start(s, tracer)`, do. A builtin filter's `configure` puts it in
///   `conf.shortcuts.on_log` / `conf.shortcuts.on_request` when that phase would do nothing
///   else (no condition to check): the proxy then runs the action for the phase without
///   entering Lua (see `LuaPluginInstance.native`). Plugins loaded from files (a fork or
///   a replacement of a builtin) get no shortcut: their phase functions always run.
extension LuaAPI {
    static func installLogTrace(_ L: OpaquePointer) {
        // Called with the moonlet table on top.
        lua_createtable(L, 0, 2)
        ml_pushapifunction(L, accessLogOpen); lua_setfield(L, -2, "open")
        ml_pushapifunction(L, accessLogWrite); lua_setfield(L, -2, "write")
        ml_pushapifunction(L, accessLogWriter); lua_setfield(L, -2, "writer")
        ml_push_readonly(L, "moonlet.accesslog")
        lua_setfield(L, -2, "accesslog")
        lua_createtable(L, 0, 3)
        ml_pushapifunction(L, traceTracer); lua_setfield(L, -2, "tracer")
        ml_pushapifunction(L, traceStart); lua_setfield(L, -2, "start")
        ml_pushapifunction(L, traceFinish); lua_setfield(L, -2, "finish")
        ml_pushapifunction(L, traceStarter); lua_setfield(L, -2, "starter")
        ml_push_readonly(L, "moonlet.trace")
        lua_setfield(L, -2, "trace")
    }

    static func field(_ L: OpaquePointer?, _ idx: Int32, _ key: String) -> String? {
        lua_getfield(L, idx, key)
        defer { ml_pop(L, 1) }
        return str(L, -1)
    }

    static let accessLogOpen: lua_CFunction = { L in
        guard let path = str(L, 1), !path.isEmpty else { return fail(L, "accesslog.open(path, format): path must be a non-empty string") }
        let vm = LuaVM.vm(L)
        let handle: Int
        do {
            if lua_type(L, 2) == LUA_TSTRING {
                handle = try vm.host.telemetry.accessLog(path: path, text: str(L, 2)!)
            } else if ml_istable(L, 2) != 0 {
                var labels: [(String, String)] = []
                let n = Int(lua_rawlen(L, 2))
                guard n <= 256 else { return fail(L, "accesslog.open: at most 256 JSON keys") }
                for i in 1...max(1, n) where i <= n {
                    lua_rawgeti(L, 2, lua_Integer(i))
                    defer { ml_pop(L, 1) }
                    guard ml_istable(L, -1) != 0 else { return fail(L, "accesslog.open: JSON format entry \(i) must be {key, format}") }
                    lua_rawgeti(L, -1, 1); let k = str(L, -1); ml_pop(L, 1)
                    lua_rawgeti(L, -1, 2); let v = str(L, -1); ml_pop(L, 1)
                    guard let k, let v else { return fail(L, "accesslog.open: JSON format entry \(i) must be {key, format} strings") }
                    labels.append((k, v))
                }
                handle = try vm.host.telemetry.accessLog(path: path, labels: labels)
            } else {
                return fail(L, "accesslog.open(path, format): format must be a string (text) or a list of {key, format} (JSON)")
            }
        } catch {
            return fail(L, "accesslog.open: \(error)")
        }
        lua_pushinteger(L, lua_Integer(handle))
        return 1
    }

    static let accessLogWrite: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "write"), kind == .stream else { return fail(L, outside) }
        let h = Int(ml_tointeger(L, 2))
        guard let out = vm.logTrace.output(h, vm.host.telemetry) else { return fail(L, "accesslog.write(s, handle): not an access log handle") }
        let clock = vm.logTrace.clock
        let rec = StreamLogRecord(s, now: LogTraceLoopState.monotonicNanos(), scratch: clock.scratch)
        out.buffer.appendLine { out.format.render(rec, into: &$0, clock: clock) }
        return 0
    }

    static let accessLogWriter: lua_CFunction = { L in
        guard ml_istable(L, 1) != 0 else { return fail(L, "accesslog.writer(handles): handles must be a list of access log handles") }
        let n = Int(lua_rawlen(L, 1))
        guard n <= TelemetryOutputs.maxHandles else { return fail(L, "accesslog.writer: at most \(TelemetryOutputs.maxHandles) handles") }
        var handles: [Int] = []
        let vm = LuaVM.vm(L)
        for i in 0..<n {
            lua_rawgeti(L, 1, lua_Integer(i + 1))
            let h = lua_type(L, -1) == LUA_TNUMBER ? Int(ml_tointeger(L, -1)) : -1
            ml_pop(L, 1)
            guard vm.host.telemetry.output(h) != nil else { return fail(L, "accesslog.writer: entry \(i + 1) is not an access log handle") }
            handles.append(h)
        }
        // Past the bound, nil: no shortcut, the Lua phase runs.
        if let id = vm.nativeActions.register(accessLog: handles) { lua_pushinteger(L, lua_Integer(id)) } else { lua_pushnil(L) }
        return 1
    }

    static let traceStarter: lua_CFunction = { L in
        let vm = LuaVM.vm(L)
        let h = lua_type(L, 1) == LUA_TNUMBER ? Int(ml_tointeger(L, 1)) : -1
        guard vm.host.telemetry.tracer(at: h) != nil else { return fail(L, "trace.starter(tracer): not a tracer handle") }
        if let id = vm.nativeActions.register(.traceStart(h)) { lua_pushinteger(L, lua_Integer(id)) } else { lua_pushnil(L) }
        return 1
    }

    static let traceTracer: lua_CFunction = { L in
        guard ml_istable(L, 1) != 0 else { return fail(L, "trace.tracer(conf): conf must be a table") }
        var c = TracerConfig()
        lua_getfield(L, 1, "sampling")
        if lua_type(L, -1) == LUA_TNUMBER { c.samplingPercent = min(100, max(0, ml_tonumber(L, -1))) }
        ml_pop(L, 1)
        lua_getfield(L, 1, "report")
        c.report = lua_type(L, -1) == LUA_TNIL || lua_toboolean(L, -1) != 0
        ml_pop(L, 1)
        c.service = field(L, 1, "service") ?? "unknown"
        c.canonicalService = field(L, 1, "canonical_service") ?? "unknown"
        c.canonicalRevision = field(L, 1, "canonical_revision") ?? "latest"
        c.namespace = field(L, 1, "namespace") ?? "default"
        c.meshID = field(L, 1, "mesh_id") ?? "cluster.local"
        c.nodeID = field(L, 1, "node_id") ?? ""
        c.inboundOperation = field(L, 1, "inbound_operation") ?? ""
        lua_getfield(L, 1, "collectors")
        if ml_istable(L, -1) != 0 {
            let n = Int(lua_rawlen(L, -1))
            for i in 1...max(1, n) where i <= n && i <= 16 {
                lua_rawgeti(L, -1, lua_Integer(i))
                if ml_istable(L, -1) != 0, let a = field(L, -1, "address") {
                    let f = field(L, -1, "format") ?? "zipkin"
                    lua_getfield(L, -1, "max_tag_length")
                    let maxTag = lua_type(L, -1) == LUA_TNUMBER ? Int(ml_tointeger(L, -1)) : nil
                    ml_pop(L, 1)
                    c.collectors.append((a, f == "otlp" ? .otlp : .zipkin, maxTag))
                }
                ml_pop(L, 1)
            }
        }
        ml_pop(L, 1)
        lua_getfield(L, 1, "custom_tags")
        if ml_istable(L, -1) != 0 {
            let n = Int(lua_rawlen(L, -1))
            for i in 1...max(1, n) where i <= n && i <= 64 {
                lua_rawgeti(L, -1, lua_Integer(i))
                if ml_istable(L, -1) != 0, let tag = field(L, -1, "tag"), let kind = field(L, -1, "kind"), let value = field(L, -1, "value") {
                    c.customTags.append(.init(tag: tag, kind: kind, value: value, defaultValue: field(L, -1, "default")))
                }
                ml_pop(L, 1)
            }
        }
        ml_pop(L, 1)
        let h: Int
        do { h = try LuaVM.vm(L).host.telemetry.tracer(c) } catch { return fail(L, "trace.tracer: \(error)") }
        lua_pushinteger(L, lua_Integer(h))
        return 1
    }

    static let traceStart: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "start"), kind == .stream else { return fail(L, outside) }
        guard let tracer = vm.logTrace.tracer(Int(ml_tointeger(L, 2)), vm.host.telemetry) else { return fail(L, "trace.start(s, tracer): not a tracer handle") }
        let recorded = vm.logTrace.start(s, tracer, rng: &vm.rng)
        lua_pushboolean(L, recorded ? 1 : 0)
        return 1
    }

    static let traceFinish: lua_CFunction = { L in
        guard let (vm, s, kind) = resolve(L, 1, "finish"), kind == .stream else { return fail(L, outside) }
        lua_pushboolean(L, vm.logTrace.finish(s) ? 1 : 0)
        return 1
    }
}

/// A phase of a builtin filter done natively (`accesslog.writer`, `trace.starter`,
/// `stats.logger`): what its Lua phase function would do when its configuration leaves
/// nothing to decide in Lua, without the cost of entering Lua (about 1.5k instructions
/// a call).
enum NativeAction: Equatable {
    /// `accesslog.write(s, h)` for each handle of list `i` of `NativeActions.handleLists`,
    /// in order (on_log). An index, not the list: the action is copied per call without
    /// retaining anything.
    case accessLog(Int)
    /// `trace.start(s, tracer)` (on_request).
    case traceStart(Int)
    /// `stats.log(data, s)` (on_log); declines when it gives a key back.
    case statsLog

    /// Runs the action for `s` on `vm`'s loop; `data` is the registry ref of the
    /// instance's `conf.shortcuts.data`; `state` the instance's (what the action resolved
    /// on first use, and istio-stats' last key). False: the action declined, the Lua
    /// phase runs. Handles were checked when the action was made; one that is gone
    /// (never, as outputs and tracers are not removed) is skipped.
    func run(_ vm: LuaVM, _ s: ProxyStream, data: Int32, _ state: inout NativeActionState) -> Bool {
        switch self {
        case .accessLog(let list):
            let logTrace = vm.logTrace
            if _slowPath(state.outputs == nil) {
                // Outputs are never removed: this loop's are resolved once.
                state.outputs = vm.nativeActions.handleLists[list].compactMap { logTrace.output($0, vm.host.telemetry) }
            }
            let now = Self.endNanos(vm, s)
            state.outputs!.withUnsafeBufferPointer { logTrace.writeLines($0, s, now: now) }
            return true
        case .traceStart(let h):
            if _slowPath(state.tracer == nil) { state.tracer = vm.logTrace.tracer(h, vm.host.telemetry) }
            guard let t = state.tracer else { return true }
            _ = vm.logTrace.start(s, t, rng: &vm.rng)
            return true
        case .statsLog:
            // The label set of the last stream recorded through the cache: recorded
            // again without reading the Lua table (the table changes only in the Lua
            // on_log, which runs when this declines: the instance forgets the key then).
            let (k1, k2) = LuaAPI.streamKey(vm, s)
            if k1 == state.statsK1 && k2 == state.statsK2 && state.statsSeries >= 0 {
                LuaAPI.record(vm, state.statsSeries, s, now: Self.endNanos(vm, s))
                return true
            }
            // On the main state, between calls (nothing runs on it): the cache is read
            // raw, as stats.log reads it.
            let L = vm.L
            let top = lua_gettop(L)
            ml_getregistry_ref(L, data)
            let found = LuaAPI.cachedSeries(L, top + 1, k1, k2, vm)
            lua_settop(L, top)
            switch found {
            case .series(let index):
                LuaAPI.record(vm, index, s, now: Self.endNanos(vm, s))
                state.statsK1 = k1; state.statsK2 = k2; state.statsSeries = index
                return true
            case .refused: return true
            case .none: return false
            }
        }
    }
}

extension NativeAction {
    /// The monotonic end of `s` for the native on_log actions (the access log line's
    /// DURATION, istio-stats' duration): read once per stream on its loop, so both see
    /// the same end and the clock is read once. Only on_log actions use it (nothing of
    /// the stream runs after them).
    @inline(__always)
    static func endNanos(_ vm: LuaVM, _ s: ProxyStream) -> UInt64 {
        if vm.endNanosStream == s.id { return vm.endNanosValue }
        let now = LogTraceLoopState.monotonicNanos()
        vm.endNanosStream = s.id
        vm.endNanosValue = now
        return now
    }
}

/// What a builtin instance's native actions keep between streams (on its loop only):
/// the access log outputs and the tracer their handles name, resolved on first use;
/// istio-stats' last cached key and its series (`statsSeries` -1: none).
struct NativeActionState {
    var outputs: [LogTraceLoopState.Output]? = nil
    var tracer: Tracer? = nil
    var statsK1 = -1, statsK2 = -1, statsSeries = -1

    /// Forgets istio-stats' last key (its Lua on_log ran: the cache may have changed).
    mutating func forgetStatsKey() { statsSeries = -1 }
}

/// The native actions of one VM: made at config load, never removed (an action made
/// again gives the same id, so reloads do not pile them up). Past `max` distinct
/// actions the makers return nil: the phase then runs in Lua.
struct NativeActions {
    private(set) var actions: [NativeAction] = []
    /// The handle lists of `.accessLog` actions (a list made again gives the same index).
    private(set) var handleLists: [[Int]] = []
    static let max = 1024

    mutating func register(accessLog handles: [Int]) -> Int? {
        let i: Int
        if let k = handleLists.firstIndex(of: handles) { i = k } else {
            guard handleLists.count < Self.max else { return nil }
            handleLists.append(handles)
            i = handleLists.count - 1
        }
        return register(.accessLog(i))
    }

    mutating func register(_ a: NativeAction) -> Int? {
        if let i = actions.firstIndex(of: a) { return i }
        guard actions.count < Self.max else { return nil }
        actions.append(a)
        return actions.count - 1
    }

    func action(_ id: Int) -> NativeAction? { actions.indices.contains(id) ? actions[id] : nil }
}

/// What `trace.tracer` is given (from istio-tracing's pluginConfig).
struct TracerConfig {
    struct Tag { var tag: String; var kind: String; var value: String; var defaultValue: String? }
    var samplingPercent: Double = 1
    var report = true
    var service = "unknown", canonicalService = "unknown", canonicalRevision = "latest", namespace = "default", meshID = "cluster.local"
    var nodeID = "", inboundOperation = ""
    var collectors: [(String, SpanExporter.Format, Int?)] = []
    var customTags: [Tag] = []

    var key: String {
        "\(samplingPercent)|\(report)|\(service)|\(canonicalService)|\(canonicalRevision)|\(namespace)|\(meshID)|\(nodeID)|\(inboundOperation)|"
            + collectors.map { "\($0.0),\($0.1.rawValue),\($0.2 ?? -1)" }.joined(separator: ";") + "|"
            + customTags.map { "\($0.tag),\($0.kind),\($0.value),\($0.defaultValue ?? "\u{0}")" }.joined(separator: ";")
    }
}

/// A tracer: its sampling rate, the collectors its spans go to and the tags every span
/// of this sidecar carries. Immutable once made; shared by every loop.
final class Tracer: @unchecked Sendable {
    /// Sampled when a random number below 1,000,000 is under this.
    let samplingPerMillion: UInt64
    let exporters: [(SpanExporter, Int?)]
    let report: Bool
    let service: String
    let inboundOperation: String
    /// Tags that do not depend on the request (Istio's, literal and environment custom tags).
    let fixedTags: [(String, String)]
    /// Header custom tags: tag, lowercase header name, default.
    let headerTags: [(String, String, String?)]

    init(_ c: TracerConfig, exporters: [(SpanExporter, Int?)]) {
        samplingPerMillion = UInt64((c.samplingPercent * 10_000).rounded())
        self.exporters = exporters
        report = c.report && !exporters.isEmpty
        service = c.service
        inboundOperation = c.inboundOperation
        var fixed: [(String, String)] = [("istio.canonical_service", c.canonicalService), ("istio.canonical_revision", c.canonicalRevision),
                                         ("istio.namespace", c.namespace), ("istio.mesh_id", c.meshID), ("component", "proxy")]
        if !c.nodeID.isEmpty { fixed.append(("node_id", c.nodeID)) }
        var headers: [(String, String, String?)] = []
        for t in c.customTags {
            switch t.kind {
            case "literal": fixed.append((t.tag, t.value))
            case "environment":
                if let v = ProcessInfo.processInfo.environment[t.value] { fixed.append((t.tag, v)) } else if let d = t.defaultValue { fixed.append((t.tag, d)) }
            default: headers.append((t.tag, t.value.lowercased(), t.defaultValue))
            }
        }
        fixedTags = fixed
        headerTags = headers
    }

    @inline(__always)
    func sample(_ rng: inout Xoshiro256) -> Bool {
        if samplingPerMillion >= 1_000_000 { return true }
        if samplingPerMillion == 0 { return false }
        return rng.next() % 1_000_000 < samplingPerMillion
    }
}

/// The access log outputs and tracers of one proxy (kept by its LuaHost): made at
/// config load under a lock, never removed (a path and format used again, or a tracer
/// configured the same, give the same handle, so reloads do not pile them up). Loops
/// read them through their own cache (`LogTraceLoopState`), never under this lock per
/// request.
public final class TelemetryOutputs: @unchecked Sendable {
    struct AccessLogOutput { let key: String; let format: AccessLogFormat; let sink: LogSink }
    let lock = NIOLock()
    var sinks: [String: LogSink] = [:]
    var outputs: [AccessLogOutput] = []
    var tracers: [(String, Tracer)] = []
    var exporters: [String: SpanExporter] = [:]
    /// At most this many outputs and tracers (a config that makes new ones on every
    /// reload must not grow the proxy without bound).
    static let maxHandles = 256
    /// Bytes an access log file's writer may have queued before lines are dropped
    /// (ProxySettings.accessLogMaxQueuedBytes; at least 64 KB). Set before the first load.
    public var maxQueuedBytes = 8 << 20

    public init() {}

    func accessLog(path: String, text: String) throws -> Int {
        let format = try AccessLogFormat(text: text)
        return try register(key: "\(path)\u{0}T\u{0}\(text)", path: path, format: format)
    }

    func accessLog(path: String, labels: [(String, String)]) throws -> Int {
        let format = try AccessLogFormat(json: labels)
        return try register(key: "\(path)\u{0}J\u{0}" + labels.map { "\($0.0)\u{1}\($0.1)" }.joined(separator: "\u{2}"), path: path, format: format)
    }

    func register(key: String, path: String, format: AccessLogFormat) throws -> Int {
        try lock.withLock {
            if let i = outputs.firstIndex(where: { $0.key == key }) { return i }
            guard outputs.count < Self.maxHandles else { throw TelemetryOutputError(message: "more than \(Self.maxHandles) access log outputs") }
            let sink: LogSink
            if let s = sinks[path] { sink = s } else { sink = try LogSink(path: path, maxQueuedBytes: maxQueuedBytes); sinks[path] = sink }
            outputs.append(AccessLogOutput(key: key, format: format, sink: sink))
            return outputs.count - 1
        }
    }

    func output(_ i: Int) -> AccessLogOutput? { lock.withLock { outputs.indices.contains(i) ? outputs[i] : nil } }

    func tracer(_ c: TracerConfig) throws -> Int {
        let key = c.key
        return try lock.withLock {
            if let i = tracers.firstIndex(where: { $0.0 == key }) { return i }
            guard tracers.count < Self.maxHandles else { throw TelemetryOutputError(message: "more than \(Self.maxHandles) tracers") }
            var ex: [(SpanExporter, Int?)] = []
            for (address, format, maxTag) in c.collectors {
                let ek = "\(format.rawValue)|\(address)"
                if let e = exporters[ek] { ex.append((e, maxTag)); continue }
                let e = try SpanExporter(address: address, format: format)
                exporters[ek] = e
                ex.append((e, maxTag))
            }
            tracers.append((key, Tracer(c, exporters: ex)))
            return tracers.count - 1
        }
    }

    func tracer(at i: Int) -> Tracer? { lock.withLock { tracers.indices.contains(i) ? tracers[i].1 : nil } }

    /// Makes every access log file open its path again before its next write (SIGUSR1,
    /// admin POST /reopen_logs: after logrotate moved the file).
    public func reopenLogs() { lock.withLock { for s in sinks.values { s.reopen() } } }

    /// Lines dropped because a writer's queue was full, over every file.
    public var droppedLogLines: UInt64 { lock.withLock { sinks.values.reduce(0) { $0 + $1.droppedLines } } }
    /// Lines accepted for writing, over every file.
    public var acceptedLogLines: UInt64 { lock.withLock { sinks.values.reduce(0) { $0 + $1.acceptedLines } } }
    public var sentSpans: UInt64 { lock.withLock { exporters.values.reduce(0) { $0 + $1.sentSpans } } }
    public var droppedSpans: UInt64 { lock.withLock { exporters.values.reduce(0) { $0 + $1.droppedSpans } } }

    /// Prometheus text for the counters above.
    public func prometheus() -> String {
        guard lock.withLock({ !sinks.isEmpty || !exporters.isEmpty }) else { return "" }
        var out = ""
        for (name, help, v) in [("moonlet_access_log_lines_total", "Access log lines accepted for writing", acceptedLogLines),
                                ("moonlet_access_log_dropped_lines_total", "Access log lines dropped because the writer was behind", droppedLogLines),
                                ("moonlet_tracing_spans_sent_total", "Spans a collector accepted", sentSpans),
                                ("moonlet_tracing_spans_dropped_total", "Spans dropped (queue full or collector failed)", droppedSpans)] {
            out += "# HELP \(name) \(help)\n# TYPE \(name) counter\n\(name) \(v)\n"
        }
        return out
    }

    /// Writes what is queued and stops the writer and exporter threads (proxy stop).
    public func close() {
        let (s, e) = lock.withLock { (Array(sinks.values), Array(exporters.values)) }
        for x in s { x.close() }
        for x in e { x.close() }
    }
}

struct TelemetryOutputError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// One loop's side of access logs and tracing: its buffers per output, its cache of
/// outputs and tracers, and the spans its streams have open. Used only on the loop.
final class LogTraceLoopState {
    /// A class: handing one out per line retains it once (a struct copy retained the
    /// format's parts and the buffer each).
    final class Output {
        let format: AccessLogFormat
        let buffer: LogBuffer
        init(format: AccessLogFormat, buffer: LogBuffer) { self.format = format; self.buffer = buffer }

        /// Appends the line for `rec` to this output's buffer.
        @inline(__always)
        func write(_ rec: StreamLogRecord, _ clock: AccessLogClock) {
            buffer.appendLine { format.render(rec, into: &$0, clock: clock) }
        }
    }

    /// The access log lines of `s` (ended at `now`, monotonic) for `outputs`, on this
    /// loop (the native on_log action; methods of the loop's objects, which hold what
    /// they read).
    func writeLines(_ outputs: UnsafeBufferPointer<Output>, _ s: ProxyStream, now: UInt64) {
        let rec = StreamLogRecord(s, now: now, scratch: clock.scratch, wallMinusMono: clock.wallMinusMono(mono: now))
        for out in outputs { out.write(rec, clock) }
    }
    struct Pending { let tracer: Tracer; let ctx: TraceContext; let startMicros: UInt64 }
    var outputs: [Output?] = []
    var tracers: [Tracer?] = []
    var pending: [UInt64: Pending] = [:]
    static let maxPending = 65_536
    /// START_TIME's current second, for this loop's lines.
    let clock = AccessLogClock()

    @inline(__always)
    func output(_ i: Int, _ registry: @autoclosure () -> TelemetryOutputs) -> Output? {
        if i >= 0 && i < outputs.count, let o = outputs[i] { return o }
        guard let o = registry().output(i) else { return nil }
        while outputs.count <= i { outputs.append(nil) }
        let out = Output(format: o.format.folding(alwaysEmpty: StreamLogRecord.alwaysEmpty), buffer: LogBuffer(sink: o.sink))
        outputs[i] = out
        return out
    }

    @inline(__always)
    func tracer(_ i: Int, _ registry: @autoclosure () -> TelemetryOutputs) -> Tracer? {
        if i >= 0 && i < tracers.count, let t = tracers[i] { return t }
        guard let t = registry().tracer(at: i) else { return nil }
        while tracers.count <= i { tracers.append(nil) }
        tracers[i] = t
        return t
    }

    /// Hands every pending line to its writer (a timer on the loop, and at stop).
    func flush() { for o in outputs { o?.buffer.flush() } }

    static func monotonicNanos() -> UInt64 {
        var ts = timespec(); clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    static func wallNanos() -> UInt64 {
        var ts = timespec(); clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    @inline(__always)
    static func header(_ s: ProxyStream, _ lower: String) -> String? {
        if let i = s.request.firstIndex(lowercased: lower) { return s.request.value(at: i) }
        if s.request.added.isEmpty { return nil }
        for a in s.request.added where a.name == lower { return a.value }
        return nil
    }

    /// Whether field `f`'s name is `name` (lowercase ASCII), ASCII case-insensitively.
    @inline(__always)
    static func nameIs(_ raw: UnsafeRawBufferPointer, _ f: HTTPField, _ name: StaticString) -> Bool {
        let n = name.utf8CodeUnitCount
        guard Int(f.nameLength) == n else { return false }
        return ASCIIWords.equalLowercased(raw.baseAddress! + Int(f.nameStart), UnsafeRawPointer(name.utf8Start), n)
    }

    /// Whether the request carries a trace header (original or added), and whether it
    /// has an x-request-id: one pass over the head (borrowed in place, not copied), names
    /// compared only when their length is one of the trace names' (2, 10, 11, 12, 17).
    static func scanTraceHeaders(_ h: inout HTTPHead) -> (trace: Bool, requestID: Bool) {
        var trace = false, rid = false
        h.bytes.withUnsafeReadableBytes { raw in
            h.fields.withUnsafeBufferPointer { fields in
                for f in fields where !f.removed {
                    if f.kind == .xRequestID { rid = true; continue }
                    switch f.nameLength {
                    case 2: if nameIs(raw, f, "b3") { trace = true }
                    case 10: if nameIs(raw, f, "tracestate") || nameIs(raw, f, "x-b3-flags") { trace = true }
                    case 11: if nameIs(raw, f, "traceparent") || nameIs(raw, f, "x-b3-spanid") { trace = true }
                    case 12:
                        if nameIs(raw, f, "x-b3-traceid") || nameIs(raw, f, "x-b3-sampled") { trace = true }
                        else if nameIs(raw, f, "x-request-id") { rid = true }
                    case 17: if nameIs(raw, f, "x-b3-parentspanid") { trace = true }
                    default: break
                    }
                }
            }
        }
        if !h.added.isEmpty {
            // Headers added by earlier filters (lowercase): a small name's two words
            // compared with the names' (literals, small Strings: constants); others by
            // their bytes, against the trace names of the same length only.
            let inline = HeaderLine.inlineNames
            h.added.withUnsafeBufferPointer { added in
                for k in 0..<added.count {
                    if inline {
                        let w = InlineUTF8.words(at: UnsafeRawPointer(added.baseAddress! + k))
                        let n = InlineUTF8.count(w.1)
                        if n >= 0 {
                            switch n {
                            case 2: if w == InlineUTF8.words("b3") { trace = true }
                            case 10: if w == InlineUTF8.words("tracestate") || w == InlineUTF8.words("x-b3-flags") { trace = true }
                            case 11: if w == InlineUTF8.words("traceparent") || w == InlineUTF8.words("x-b3-spanid") { trace = true }
                            case 12:
                                if w == InlineUTF8.words("x-request-id") { rid = true }
                                else if w == InlineUTF8.words("x-b3-traceid") || w == InlineUTF8.words("x-b3-sampled") { trace = true }
                            default: break
                            }
                            continue
                        }
                    }
                    let (t, r) = Self.traceNames(added[k].name)
                    if t { trace = true }
                    if r { rid = true }
                }
            }
        }
        return (trace, rid)
    }

    /// Whether an added name (lowercase) is a trace header's, or x-request-id, by its
    /// bytes (names that are not small Strings: out of line, rare).
    @inline(never)
    static func traceNames(_ name: String) -> (trace: Bool, requestID: Bool) {
        let len = name.utf8.count
        guard len == 2 || len == 10 || len == 11 || len == 12 || len == 17 else { return (false, false) }
        var trace = false, rid = false
        _ = name.utf8.withContiguousStorageIfAvailable { a in
            switch a.count {
            case 2: if bytesAre(a, "b3") { trace = true }
            case 10: if bytesAre(a, "tracestate") || bytesAre(a, "x-b3-flags") { trace = true }
            case 11: if bytesAre(a, "traceparent") || bytesAre(a, "x-b3-spanid") { trace = true }
            case 12:
                if bytesAre(a, "x-request-id") { rid = true }
                else if bytesAre(a, "x-b3-traceid") || bytesAre(a, "x-b3-sampled") { trace = true }
            case 17: if bytesAre(a, "x-b3-parentspanid") { trace = true }
            default: break
            }
        }
        return (trace, rid)
    }

    /// Whether `a` is exactly `name`'s bytes.
    @inline(__always)
    static func bytesAre(_ a: UnsafeBufferPointer<UInt8>, _ name: StaticString) -> Bool {
        a.count == name.utf8CodeUnitCount && memcmp(a.baseAddress!, name.utf8Start, a.count) == 0
    }

    /// See `trace.start`.
    func start(_ s: ProxyStream, _ t: Tracer, rng: inout Xoshiro256) -> Bool {
        let (hasTrace, hasID) = s.withRequest { Self.scanTraceHeaders(&$0) }
        if !hasTrace {
            // The common case at the first sidecar: no trace came, a new one starts. No
            // header to read or remove; the values are written straight into Strings.
            var hi = rng.next(), lo = rng.next(), span = rng.next()
            if hi == 0 && lo == 0 { lo = 1 }
            if span == 0 { span = 1 }
            let sampled = t.sample(&rng)
            // The ids stay numbers in the lines: written as hex where the head is written
            // (no String to make, check and free per request).
            s.withRequest { h in
                h.added.reserveCapacity(h.added.count + 5)
                h.added.append(HeaderLine("x-b3-traceid", hex: hi, lo))
                h.added.append(HeaderLine("x-b3-spanid", hex: span))
                h.addLowercased("x-b3-sampled", sampled ? "1" : "0")
                h.added.append(HeaderLine("traceparent", traceparent: hi, lo, span: span, sampled: sampled))
            }
            if !hasID { let a = rng.next(), b = rng.next(); s.withRequest { $0.added.append(HeaderLine("x-request-id", uuid: a, b)) } }
            guard sampled && t.report else { return false }
            let ctx = TraceContext(traceIDHigh: hi, traceIDLow: lo, is128Bit: true, spanID: span, sampled: true)
            if pending.count >= Self.maxPending { pending.removeAll() }
            let startMicros = (Self.wallNanos() &- (Self.monotonicNanos() &- s.startNanos)) / 1000
            pending[s.id] = Pending(tracer: t, ctx: ctx, startMicros: startMicros)
            return true
        }
        let incoming = TracePropagation.extract { Self.header(s, $0) }
        let hadB3Single = incoming != nil && Self.header(s, "b3") != nil
        var r = rng
        var ctx: TraceContext
        if let inc = incoming, inc.traceIDLow != 0 || inc.traceIDHigh != 0 {
            ctx = TracePropagation.start(inc, random: { r.next() }, sample: { t.sample(&r) }).child(newSpanID: r.next())
        } else {
            ctx = TracePropagation.start(incoming, random: { r.next() }, sample: { t.sample(&r) })
        }
        // tracestate travels with whichever header format won (B3 from the previous
        // sidecar, traceparent from the app): it is passed on unchanged.
        if ctx.traceState == nil, let ts = Self.header(s, "tracestate"), !ts.isEmpty { ctx.traceState = ts }
        let needID = !hasID
        let requestID = needID ? Self.uuid(&r) : ""
        rng = r
        for n in TracePropagation.headerNames { s.request.removeLowercased(n) }
        for (n, v) in TracePropagation.headers(ctx) { s.request.addLowercased(n, v) }
        if hadB3Single {
            var b3 = ctx.traceIDHex + "-" + ctx.spanIDHex + "-" + (ctx.debug ? "d" : ctx.isSampled ? "1" : "0")
            if let p = ctx.parentSpanID { b3 += "-" + TraceHex.hex(p) }
            s.request.addLowercased("b3", b3)
        }
        if needID { s.request.addLowercased("x-request-id", requestID) }
        guard ctx.isSampled && t.report else { return false }
        if pending.count >= Self.maxPending { pending.removeAll() }   // every stream ends (LuaHost.endStream); this only bounds a bug
        let startMicros = (Self.wallNanos() &- (Self.monotonicNanos() &- s.startNanos)) / 1000
        pending[s.id] = Pending(tracer: t, ctx: ctx, startMicros: startMicros)
        return true
    }

    /// A UUID v4 (x-request-id), from the loop's generator.
    static func uuid(_ r: inout Xoshiro256) -> String { Hex.uuidV4(r.next(), r.next()) }

    /// See `trace.finish`.
    func finish(_ s: ProxyStream) -> Bool {
        guard !pending.isEmpty, let p = pending.removeValue(forKey: s.id) else { return false }
        let t = p.tracer
        let inbound = s.listener == .inbound
        let status = s.status
        let authority = s.request.host
        let name: String
        if inbound { name = t.inboundOperation.isEmpty ? authority + "/*" : t.inboundOperation }
        else if !s.route.host.isEmpty { name = "\(s.route.host):\(s.route.port)/*" }
        else { name = authority + "/*" }
        var tags = t.fixedTags
        tags.reserveCapacity(tags.count + 12 + t.headerTags.count)
        tags.append(("http.url", "http://\(authority)\(s.request.target)"))
        tags.append(("http.method", s.request.method))
        tags.append(("http.protocol", s.protocolName))
        tags.append(("http.status_code", String(status)))
        tags.append(("response_flags", s.responseFlags.envoyString))
        tags.append(("response_size", String(s.responseBodyBytes)))
        tags.append(("request_size", String(s.requestBodyBytes)))
        tags.append(("upstream_cluster", s.route.cluster.isEmpty ? "-" : s.route.cluster))
        tags.append(("upstream_cluster.name", s.route.cluster.isEmpty ? "-" : s.route.cluster))
        tags.append(("peer.address", Self.host(of: s.source.address)))
        tags.append(("downstream_cluster", "-"))
        if let id = Self.header(s, "x-request-id") { tags.append(("guid:x-request-id", id)) }
        if let ua = Self.header(s, "user-agent") { tags.append(("user_agent", ua)) }
        for (tag, h, d) in t.headerTags { if let v = Self.header(s, h) ?? d { tags.append((tag, v)) } }
        if status >= 500 || status == 0 { tags.append(("error", "true")) }
        let remote = inbound ? s.source.address : s.upstreamHost
        let (rip, rport) = Self.split(remote)
        let durMicros = (Self.monotonicNanos() &- s.startNanos) / 1000
        let span = Span(traceIDHigh: p.ctx.traceIDHigh, traceIDLow: p.ctx.traceIDLow, is128Bit: p.ctx.is128Bit, id: p.ctx.spanID,
                        parentID: p.ctx.parentSpanID, name: name, kind: inbound ? .server : .client, timestampMicros: p.startMicros,
                        durationMicros: durMicros, localService: t.service, remoteIP: rip, remotePort: rport, tags: tags, debug: p.ctx.debug)
        for (e, maxTag) in t.exporters {
            if let m = maxTag, m > 0 {
                var cut = span
                cut.tags = span.tags.map { ($0.0, $0.1.count > m ? String($0.1.prefix(m)) : $0.1) }
                e.submit(cut)
            } else {
                e.submit(span)
            }
        }
        return true
    }

    static func host(of address: String) -> String { split(address).0 ?? address }

    /// "ip:port" / "[v6]:port" -> (ip, port).
    static func split(_ a: String) -> (String?, Int?) {
        if a.isEmpty { return (nil, nil) }
        if a.hasPrefix("["), let end = a.firstIndex(of: "]") {
            let ip = String(a[a.index(after: a.startIndex)..<end])
            let rest = a[a.index(after: end)...]
            return (ip, rest.hasPrefix(":") ? Int(rest.dropFirst()) : nil)
        }
        if let c = a.lastIndex(of: ":"), a.firstIndex(of: ":") == c { return (String(a[..<c]), Int(a[a.index(after: c)...])) }
        return (a, nil)
    }
}

/// A finished stream as the access log formats read it (Envoy's command operators).
struct StreamLogRecord: AccessLogRecord {
    let s: ProxyStream
    let now: UInt64
    /// Where `locate` copies the values of lines added by filters (x-request-id,
    /// x-forwarded-for at the first sidecar): the line reads them there like the head's
    /// bytes, without going back to the head. Empty: they are read from the head.
    let scratch: UnsafeMutableRawBufferPointer
    var valueScratch: UnsafeRawPointer? { UnsafeRawPointer(scratch.baseAddress) }
    /// Wall clock minus monotonic clock (nanoseconds) for START_TIME, as the loop's
    /// `AccessLogClock` keeps it; 0: read the wall clock.
    let wallMinusMono: UInt64
    init(_ s: ProxyStream, now: UInt64, scratch: UnsafeMutableRawBufferPointer = UnsafeMutableRawBufferPointer(start: nil, count: 0), wallMinusMono: UInt64 = 0) {
        self.s = s; self.now = now; self.scratch = scratch; self.wallMinusMono = wallMinusMono
    }
    static let http: [UInt8] = Array("http".utf8)

    func requestHeader(_ name: String) -> String? {
        switch name {
        case ":method": return s.request.method
        case ":path": return s.request.target
        case ":authority": let h = s.request.host; return h.isEmpty ? nil : h
        case ":scheme": return "http"
        default: return LogTraceLoopState.header(s, name)
        }
    }

    func withRequestHeader(_ name: String, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
        let h = s.request
        let range: Range<Int>
        switch name {
        case ":method": range = h.methodRange
        case ":path":
            if let t = h.targetOverride { if t.isEmpty { return false }; var v = t; v.withUTF8 { body(UnsafeRawBufferPointer($0)) }; return true }
            range = h.targetRange
        case ":authority":
            if h.hostIndex >= 0 && !h.fields[h.hostIndex].removed {
                let f = h.fields[h.hostIndex]; range = Int(f.valueStart)..<Int(f.valueStart + f.valueLength)
            } else {
                guard var v = h.first("host"), !v.isEmpty else { return false }
                v.withUTF8 { body(UnsafeRawBufferPointer($0)) }; return true
            }
        case ":scheme": Self.http.withUnsafeBytes(body); return true
        default:
            if let i = h.firstIndex(lowercased: name) {
                let f = h.fields[i]; range = Int(f.valueStart)..<Int(f.valueStart + f.valueLength)
            } else {
                guard !h.added.isEmpty else { return false }
                for a in h.added where a.name == name {
                    if a.valueIsEmpty { return false }
                    a.withValueBytes(body); return true
                }
                return false
            }
        }
        if range.isEmpty { return false }
        h.bytes.withUnsafeReadableBytes { raw in body(UnsafeRawBufferPointer(rebasing: raw[range])) }
        return true
    }

    /// One pass over the head for every regular name of the format (names compared only
    /// when their length is one of the format's); pseudo-headers from the request line
    /// and Host; headers added by filters (x-request-id at the first sidecar) looked up
    /// afterwards for the names the head did not have. Other-span codes: -2 the
    /// rewritten path, -3 Host through `first`, -4 the scheme, -(5 + k) `added[k]`.
    func withRequestHead(_ names: AccessLogHeaderNames, _ spans: UnsafeMutablePointer<AccessLogValueSpan>, _ body: (UnsafeRawBufferPointer) -> Void) {
        // The head is borrowed in place (a copy would retain each of its buffers); `body`
        // runs after that access ended, as it reads the stream again.
        let bytes = s.request.bytes
        bytes.withUnsafeReadableBytes { raw in
            s.withRequest { Self.locate(&$0, raw, names, spans, scratch) }
            body(raw)
        }
    }

    static func locate(_ h: inout HTTPHead, _ raw: UnsafeRawBufferPointer, _ names: AccessLogHeaderNames, _ spans: UnsafeMutablePointer<AccessLogValueSpan>,
                       _ scratch: UnsafeMutableRawBufferPointer) {
        var used = 0
        let n = names.count
        for i in 0..<n {
            switch names.pseudo(i) {
            case .none: spans[i] = .absent
            case .method: spans[i] = AccessLogValueSpan(start: Int32(h.methodRange.lowerBound), length: Int32(h.methodRange.count))
            case .path:
                if let t = h.targetOverride { spans[i] = t.isEmpty ? .absent : AccessLogValueSpan(start: -2, length: 0) }
                else { spans[i] = AccessLogValueSpan(start: Int32(h.targetRange.lowerBound), length: Int32(h.targetRange.count)) }
            case .authority:
                if h.hostIndex >= 0 && !h.fields[h.hostIndex].removed {
                    let f = h.fields[h.hostIndex]; spans[i] = AccessLogValueSpan(start: f.valueStart, length: f.valueLength)
                } else { spans[i] = AccessLogValueSpan(start: -3, length: 0) }
            case .scheme: spans[i] = AccessLogValueSpan(start: -4, length: 0)
            }
        }
        do {
            if names.regularCount > 0 {
                var left = names.regularCount
                let mask = names.lengthMask
                h.fields.withUnsafeBufferPointer { fields in
                    for f in fields where !f.removed && mask & (1 << UInt64(f.nameLength & 63)) != 0 {
                        let len = Int(f.nameLength)
                        for j in 0..<n where spans[j].start == -1 && names.pseudo(j) == .none && names.length(j) == len {
                            guard ASCIIWords.equalLowercased(raw.baseAddress! + Int(f.nameStart), names.bytes(j).baseAddress!, len) else { continue }
                            // The first live field wins (present but empty: length 0).
                            spans[j] = f.valueLength == 0 ? AccessLogValueSpan(start: 0, length: 0) : AccessLogValueSpan(start: f.valueStart, length: f.valueLength)
                            left -= 1
                            break
                        }
                        if left == 0 { break }
                    }
                }
                if left > 0 && !h.added.isEmpty {
                    // The names still missing, as bits (formats of up to 64 names; more
                    // take the byte compare below for every line).
                    var missing: UInt64 = 0, lengths: UInt64 = 0
                    for j in 0..<n where spans[j].start == -1 && names.pseudo(j) == .none {
                        if j < 64 { missing |= 1 &<< UInt64(j) }
                        lengths |= 1 &<< UInt64(names.length(j) & 63)
                    }
                    let inline = n <= 64 && HeaderLine.inlineNames
                    h.added.withUnsafeBufferPointer { added in
                        for k in 0..<added.count {
                            if inline {
                                // A small name (every name the proxy and the filters add
                                // per request) against the names' keys: two compares each.
                                let w = InlineUTF8.words(at: UnsafeRawPointer(added.baseAddress! + k))
                                if InlineUTF8.count(w.1) >= 0 {
                                    var m = missing
                                    var hit = false
                                    while m != 0 {
                                        let j = m.trailingZeroBitCount
                                        m &= m &- 1
                                        let key = names.keys[j]
                                        guard key.0 == w.0 && key.1 == w.1 else { continue }
                                        Self.take(added, k, j, spans, scratch, &used)
                                        missing &= ~(1 &<< UInt64(j))
                                        left -= 1
                                        hit = true
                                    }
                                    if hit && left == 0 { break }
                                    continue
                                }
                            }
                            // Each added name's length first (no copy of the String), checked
                            // against the lengths of the names still missing; its bytes only
                            // when one has that length. The first added line of a name wins.
                            let len = added[k].name.utf8.count
                            guard lengths & (1 &<< UInt64(len & 63)) != 0 else { continue }
                            let hit = added[k].name.utf8.withContiguousStorageIfAvailable { a -> Bool in
                                var hit = false
                                for j in 0..<n where spans[j].start == -1 && names.length(j) == len && names.pseudo(j) == .none {
                                    if len == 0 || Self.same(UnsafeRawPointer(a.baseAddress!), names.bytes(j).baseAddress!, len) {
                                        Self.take(added, k, j, spans, scratch, &used)
                                        if j < 64 { missing &= ~(1 &<< UInt64(j)) }
                                        left -= 1
                                        hit = true
                                    }
                                }
                                return hit
                            } ?? false
                            if hit {
                                if left == 0 { break }
                                lengths = 0
                                for j in 0..<n where spans[j].start == -1 && names.pseudo(j) == .none { lengths |= 1 &<< UInt64(names.length(j) & 63) }
                            }
                        }
                    }
                    // An empty added value: absent (the marker above keeps later lines of
                    // that name from matching; it is turned into `.absent` here).
                    for j in 0..<n where spans[j].length == -1 { spans[j] = .absent }
                }
            }
        }
    }

    /// Points span `j` at added line `k`'s value: an empty value marks the span (turned
    /// into `.absent` after the pass; the mark keeps later lines of the name from
    /// matching); a value that fits is copied into `scratch` now, while the line is in
    /// hand; a longer one is read from the line later (`withOtherRequestHeader`).
    @inline(__always)
    static func take(_ added: UnsafeBufferPointer<HeaderLine>, _ k: Int, _ j: Int, _ spans: UnsafeMutablePointer<AccessLogValueSpan>,
                     _ scratch: UnsafeMutableRawBufferPointer, _ used: inout Int) {
        let n = added[k].valueByteCount
        if n == 0 {
            spans[j] = AccessLogValueSpan(start: -6 - Int32(k), length: -1)
        } else if n <= scratch.count &- used {
            let at = used
            let dst = scratch.baseAddress!.advanced(by: at)
            // An id form (x-request-id made by the proxy) is written there as hex; a text
            // value is copied.
            if added[k].writeValue(to: dst) == 0 { added[k].withValueBytes { dst.copyMemory(from: $0.baseAddress!, byteCount: n) } }
            spans[j] = .scratch(at: at, length: n)
            used &+= n
        } else {
            spans[j] = AccessLogValueSpan(start: Int32(-5 - k), length: 0)
        }
    }

    /// Whether `n` bytes at `a` and `b` are equal: eight at a time (the last word
    /// overlapping), bytes under eight.
    @inline(__always)
    static func same(_ a: UnsafeRawPointer, _ b: UnsafeRawPointer, _ n: Int) -> Bool {
        if n >= 8 {
            var i = 0
            while i &+ 8 <= n {
                if a.loadUnaligned(fromByteOffset: i, as: UInt64.self) != b.loadUnaligned(fromByteOffset: i, as: UInt64.self) { return false }
                i &+= 8
            }
            return i == n || a.loadUnaligned(fromByteOffset: n &- 8, as: UInt64.self) == b.loadUnaligned(fromByteOffset: n &- 8, as: UInt64.self)
        }
        var i = 0
        while i < n {
            if a.load(fromByteOffset: i, as: UInt8.self) != b.load(fromByteOffset: i, as: UInt8.self) { return false }
            i &+= 1
        }
        return true
    }

    func withOtherRequestHeader(_ span: AccessLogValueSpan, index: Int, _ names: AccessLogHeaderNames, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
        if let at = span.scratchOffset {
            body(UnsafeRawBufferPointer(start: scratch.baseAddress! + at, count: Int(span.length)))
            return true
        }
        var v: String
        switch span.start {
        case -2: v = s.request.targetOverride ?? ""
        case -3: v = s.request.first("host") ?? ""
        case -4: Self.http.withUnsafeBytes(body); return true
        default:
            // An added line, read in place through inout access (no copy of the head or
            // of the value).
            let k = Int(-5 - span.start)
            return s.withRequest { h in
                h.added.withUnsafeBufferPointer { a in
                    guard k >= 0 && k < a.count, !a[k].valueIsEmpty else { return false }
                    a[k].withValueBytes(body)
                    return true
                }
            }
        }
        if v.isEmpty { return false }
        v.withUTF8 { body(UnsafeRawBufferPointer($0)) }
        return true
    }

    func withResponseHeader(lowercased name: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
        // The stream's heads are read in place through inout access: reading `s.response`
        // (or `s.localReply`) as a value copies it, retaining each of its parts.
        switch Self.responseHeader(&s.response, name, body) {
        case .written: return true
        case .empty: return false
        case .absent: break
        }
        if Self.isSome(&s.localReply), let l = s.localReply {
            for x in l.headers where x.name.lowercased().utf8.elementsEqual(name) {
                if x.value.isEmpty { return false }
                var v = x.value; v.withUTF8 { body(UnsafeRawBufferPointer($0)) }; return true
            }
        }
        return false
    }

    enum Lookup { case written, empty, absent }

    /// `v != nil` without copying `v` (an inout access of the stream's property).
    @inline(__always)
    static func isSome<T>(_ v: inout T?) -> Bool { v != nil }

    /// The first value of response header `name` (lowercase ASCII) handed to `body`.
    static func responseHeader(_ head: inout HTTPHead?, _ name: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> Void) -> Lookup {
        guard head != nil else { return .absent }
        var at = -1, len = 0
        head!.bytes.withUnsafeReadableBytes { raw in
            head!.fields.withUnsafeBufferPointer { fs in
                for f in fs where !f.removed && Int(f.nameLength) == name.count {
                    if name.isEmpty || ASCIIWords.equalLowercased(raw.baseAddress! + Int(f.nameStart), name.baseAddress!, name.count) {
                        at = Int(f.valueStart); len = Int(f.valueLength); return
                    }
                }
            }
            if at >= 0 && len > 0 { body(UnsafeRawBufferPointer(rebasing: raw[at..<(at + len)])) }
        }
        if at >= 0 { return len == 0 ? .empty : .written }
        if !head!.added.isEmpty {
            for a in head!.added where AccessLogHeaderNames.equals(a.name, name) {
                if a.valueIsEmpty { return .empty }
                a.withValueBytes(body); return .written
            }
        }
        return .absent
    }

    func responseHeader(_ name: String) -> String? {
        if let r = s.response, let i = r.firstIndex(lowercased: name) { return r.value(at: i) }
        if let r = s.response { for a in r.added where a.name == name { return a.value } }
        if let l = s.localReply { for h in l.headers where h.name.lowercased() == name { return h.value } }
        return nil
    }

    var startTimeMillis: Int64 {
        if wallMinusMono != 0 { return Int64((s.startNanos &+ wallMinusMono) / 1_000_000) }
        return Int64((LogTraceLoopState.wallNanos() &- (now &- s.startNanos)) / 1_000_000)
    }
    var protocolName: String { s.protocolName }
    var responseCode: Int { s.status }
    var responseFlags: String { s.responseFlags.envoyString }
    var responseCodeDetails: String {
        if !s.vars.isEmpty, let d = s.vars["response_code_details"] { return d }
        if Self.isSome(&s.localReply) { return s.responseFlags.isEmpty ? "direct_response" : "" }
        return Self.isSome(&s.response) ? "via_upstream" : ""
    }
    /// The operators whose values below are constant "" (the format is folded for them
    /// once per loop: `LogTraceLoopState.output`).
    static let alwaysEmpty: AccessLogFormat.AlwaysEmpty = [.connectionTerminationDetails, .upstreamTransportFailureReason, .upstreamLocalAddress]
    var connectionTerminationDetails: String { "" }
    var upstreamTransportFailureReason: String { "" }
    var bytesReceived: Int64 { s.requestBodyBytes }
    var bytesSent: Int64 { s.responseBodyBytes }
    var durationMillis: Int64 { Int64((now &- s.startNanos) / 1_000_000) }
    var upstreamHost: String { s.upstreamHost }
    var upstreamCluster: String { s.route.cluster }
    var upstreamLocalAddress: String { "" }
    /// Inbound: the "ip:port" the connection was accepted on. Outbound: not known per
    /// stream (the original destination before iptables), "-".
    var downstreamLocalAddress: String { s.listener == .inbound ? s.destination.address : "" }
    var downstreamRemoteAddress: String { s.source.address }
    var requestedServerName: String { s.source.serverName }
    /// `RouteDecision.envoyRouteName`, read field by field (calling the computed
    /// property copied the whole decision: about 650 instructions a line).
    var routeName: String {
        if let n = s.route.name { return n }
        return s.route.cluster.isEmpty ? "" : "default"
    }
}
