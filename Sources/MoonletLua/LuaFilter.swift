import CLua
import MoonletCore
import MoonletConfig
import MoonletTelemetry
import NIOCore
#if canImport(Foundation)
import Foundation
#endif

/// One plugin loaded into one VM: the registry refs of its phase functions and of its
/// `conf`. It is a `Filter`; streams that started with it keep it (and so this
/// version of the plugin) until they end, which is how a reload never changes the
/// code under an in-flight stream.
public final class LuaPluginInstance: Filter {
    public let name: String
    public let phase: FilterPhase
    public let priority: Int
    public private(set) var wantsRequestBody = false
    public private(set) var wantsResponseBody = false
    /// Whether the module defines `on_upstream_failure`.
    public private(set) var wantsUpstreamFailure = false
    let vm: LuaVM
    let source: LuaPluginSource
    let limits: LuaLimits
    var moduleRef: Int32 = LUA_NOREF
    var confRef: Int32 = LUA_NOREF
    /// on_request, on_request_body, on_response, on_response_body, on_log, on_upstream_failure
    var fn: [Int32] = [LUA_NOREF, LUA_NOREF, LUA_NOREF, LUA_NOREF, LUA_NOREF, LUA_NOREF] { didSet { phases = Self.mask(fn) } }
    /// Bit `i` set when `fn[i]` is a function: a phase the module does not define
    /// returns without reading the array.
    var phases: UInt8 = 0

    static func mask(_ fn: [Int32]) -> UInt8 {
        var m: UInt8 = 0
        for (i, r) in fn.enumerated() where r != LUA_NOREF { m |= 1 << UInt8(i) }
        return m
    }
    let failStrategy: FailStrategy
    let cell: PluginCell?
    /// A builtin filter shipped with Moonlet (`builtin://` source, not a LuaPlugin that
    /// replaced it): its phases run without the instruction-count hook. Lua 5.4 calls
    /// the hook's trace function before every VM instruction while a count hook is set,
    /// which about doubles the cost of interpreting a filter; the builtins are our own
    /// code whose loops are bounded by the configuration, so only plugins loaded from
    /// files pay for the runaway guard. Allocation caps still apply to every plugin.
    let trusted: Bool
    /// Native shortcuts of a builtin's phases (`conf.shortcuts.on_request` /
    /// `conf.shortcuts.on_log`, set by its `configure` from `accesslog.writer`,
    /// `trace.starter` or `stats.logger` when the phase has nothing else to decide): the
    /// phase runs the action and does not enter Lua (unless the action declines). Only for trusted (builtin) instances; a plugin loaded from
    /// a file always runs its functions.
    var nativeRequest: NativeAction?
    var nativeLog: NativeAction?
    /// Registry ref of `conf.shortcuts.data` (what the action reads, e.g. istio-stats' cache).
    var nativeData: Int32 = LUA_NOREF
    /// What the native actions resolved on first use and istio-stats' last key.
    var nativeState = NativeActionState()
    static let phaseNames = ["on_request", "on_request_body", "on_response", "on_response_body", "on_log", "on_upstream_failure"]
    static let upstreamFailurePhase = 5

    init(vm: LuaVM, source: LuaPluginSource) throws {
        self.vm = vm
        self.source = source
        name = source.spec.name
        phase = FilterPhase(istio: source.spec.phase) ?? .unspecified
        priority = source.spec.priority
        failStrategy = source.spec.failStrategy
        var l = vm.host.defaultLimits
        if let v = source.spec.maxInstructions { l.maxInstructions = v }
        if let v = source.spec.timeoutMs { l.timeoutMs = v }
        limits = l
        trusted = source.spec.path.hasPrefix("builtin://")
        cell = vm.metrics?.pluginCell(source.spec.name)
        try load()
        wantsRequestBody = fn[1] != LUA_NOREF
        wantsResponseBody = fn[3] != LUA_NOREF
        wantsUpstreamFailure = fn[Self.upstreamFailurePhase] != LUA_NOREF
    }

    deinit { release() }

    /// Drops the registry refs (the module becomes garbage).
    func release() {
        vm.stopTimers(owner: ObjectIdentifier(self))
        let L = vm.L
        for r in fn + [moduleRef, confRef, nativeData] where r != LUA_NOREF && r != LUA_REFNIL { ml_unref(L, r) }
        fn = fn.map { _ in LUA_NOREF }
        moduleRef = LUA_NOREF; confRef = LUA_NOREF
        nativeRequest = nil; nativeLog = nil; nativeData = LUA_NOREF
        nativeState = NativeActionState()
    }

    func load() throws {
        let L = vm.L
        // moonlet.timer calls of the module code and configure belong to this instance.
        let loadingBefore = vm.timers.loading
        vm.timers.loading = (ObjectIdentifier(self), name, limits)
        defer { vm.timers.loading = loadingBefore }
        // Loading has a wall-clock budget of its own (LuaLimits.loadTimeoutMs); none for
        // the builtins, which a configuration pushed to a busy sidecar must not lose to
        // the scheduler (a NACK of the whole version).
        var loadLimits = limits
        loadLimits.timeoutMs = trusted ? 0 : max(limits.timeoutMs, limits.loadTimeoutMs)
        moduleRef = try vm.loadModule(source: source.source, chunkName: source.spec.path, limits: loadLimits)
        ml_getregistry_ref(L, moduleRef)
        for (i, n) in Self.phaseNames.enumerated() {
            LuaVM.pushRawField(L, n)
            if ml_isfunction(L, -1) != 0 { fn[i] = ml_ref(L) }
            else if ml_isnil(L, -1) != 0 { ml_pop(L, 1) }
            else { ml_pop(L, 2); throw LuaError.runtime("\(source.spec.path): '\(n)' must be a function") }
        }
        // conf = configure(pluginConfig) or pluginConfig itself.
        LuaVM.pushRawField(L, "configure")
        let hasConfigure = ml_isfunction(L, -1) != 0
        let co = vm.acquireThread()
        if hasConfigure {
            lua_xmove(L, co.L, 1)
            Self.push(co.L, source.spec.pluginConfig)
            let out = vm.resume(co.L, nargs: 1, limits: loadLimits, plugin: name, keepResults: true)
            guard out.ok else {
                vm.releaseThread(co, healthy: false); ml_pop(L, 1)
                throw LuaError.runtime("configure: \(out.error ?? "error")")
            }
            lua_xmove(co.L, L, 1)
        } else {
            ml_pop(L, 1)
            Self.push(L, source.spec.pluginConfig)
        }
        vm.releaseThread(co, healthy: true)
        if trusted && ml_istable(L, -1) != 0 {
            LuaVM.pushRawField(L, "shortcuts")
            if ml_istable(L, -1) != 0 {
                nativeRequest = Self.nativeAction(vm, L, "on_request", ifDefined: fn[0])
                nativeLog = Self.nativeAction(vm, L, "on_log", ifDefined: fn[4])
                LuaVM.pushRawField(L, "data")
                if ml_isnil(L, -1) == 0 { nativeData = ml_ref(L) } else { ml_pop(L, 1) }
            }
            ml_pop(L, 1)
        }
        confRef = ml_ref(L)
        ml_pop(L, 1)
    }

    /// The native action at `t[phase]` (t on top of the stack), when the phase has a
    /// function (the action stands for it) and the value is an action id.
    static func nativeAction(_ vm: LuaVM, _ L: OpaquePointer, _ phase: String, ifDefined ref: Int32) -> NativeAction? {
        LuaVM.pushRawField(L, phase)
        defer { ml_pop(L, 1) }
        guard ref != LUA_NOREF, lua_type(L, -1) == LUA_TNUMBER else { return nil }
        return vm.nativeActions.action(Int(ml_tointeger(L, -1)))
    }

    /// A phase done by its native action: counted as a call (not timed: the shortcut
    /// exists to avoid the per-call overhead). False: it declined, the Lua phase runs
    /// (and counts the call).
    @inline(__always)
    func runNative(_ a: NativeAction, _ s: ProxyStream) -> Bool {
        guard a.run(vm, s, data: nativeData, &nativeState) else { return false }
        if let cell { cell.stats.calls &+= 1 }
        return true
    }

    /// Pushes a config value as Lua data.
    static func push(_ L: OpaquePointer?, _ v: ConfigValue) {
        switch v {
        case .null: lua_pushnil(L)
        case .bool(let b): lua_pushboolean(L, b ? 1 : 0)
        case .int(let i): lua_pushinteger(L, lua_Integer(i))
        case .double(let d): lua_pushnumber(L, d)
        case .string(let s): LuaAPI.push(L, s)
        case .array(let a):
            lua_createtable(L, Int32(a.count), 0)
            for (i, e) in a.enumerated() { push(L, e); lua_rawseti(L, -2, lua_Integer(i + 1)) }
        case .map(let kv):
            lua_createtable(L, 0, Int32(kv.count))
            for (k, e) in kv { push(L, e); lua_setfield(L, -2, k) }
        }
    }

    // MARK: phases

    @inline(__always)
    func call(_ which: Int, _ s: ProxyStream, chunk: ByteBuffer? = nil, eos: Bool = false, retried: Bool = false) -> FilterAction {
        if phases & (1 &<< UInt8(truncatingIfNeeded: which)) == 0 { return .continue }
        let ref = fn[which]
        if ref == LUA_NOREF { return .continue }
        // Phase calls run to completion (no yields yet), so they share the VM's runner
        // coroutine: one hot stack instead of one per concurrent stream. A stream gets a
        // coroutine of its own only when yields (http.call, timers) arrive.
        let thread = vm.runnerThread()
        let co = thread.L
        ml_getregistry_ref(co, ref)
        ml_pushlight(co, LuaAPI.wrapper(s.id, .stream))
        ml_getregistry_ref(co, confRef)
        var nargs: Int32 = 2
        if which == 1 || which == 3 {
            if let c = chunk {
                c.withUnsafeReadableBytes { raw in ml_pushbytes(co, raw.baseAddress, raw.count) }
            } else { lua_pushnil(co) }
            lua_pushboolean(co, eos ? 1 : 0)
            nargs = 4
        }
        let replies = s.replyCount
        let prev = vm.current, prevID = vm.currentID
        vm.current = s; vm.currentID = s.id
        vm.phaseIndex = which
        let out = vm.resume(co, nargs: nargs, limits: limits, plugin: name, hooked: !trusted)
        vm.current = prev; vm.currentID = prevID
        if let cell {
            cell.stats.calls &+= 1
            cell.stats.nanos &+= Self.nanos() &- out.startNanos
            if !out.ok && !out.yielded { cell.stats.errors &+= 1; if out.aborted { cell.stats.aborted &+= 1 } }
        }
        // moonlet.http.call: the stream keeps this coroutine until the response (HTTPCall.swift).
        if out.yielded { return pause(which, s, thread, startNanos: out.startNanos, replies: replies) }
        if out.ok {
            // Only a reply made by this call counts (a local reply's own response
            // phase already has one).
            if s.replyCount != replies && which != 4 { return .respond }
            if out.returned == "stop_and_buffer" && (which == 0 || which == 2) { return .stopAndBuffer }
            return .continue
        }
        // The coroutine died with the error: give it back and start a fresh one next time.
        vm.runnerFailed()
        let msg = "plugin \(name): \(Self.phaseNames[which]): \(out.error ?? "error")"
        vm.logger.error("\(LogText.escape(msg))", metadata: ["stream": "\(s.id)"])
        vm.host.recordError(plugin: name, msg)
        if which == 4 { return .continue }
        switch failStrategy {
        case .failOpen:
            return .continue
        case .failReload where !retried:
            release()
            do { try load() } catch { vm.logger.error("plugin \(name): reload failed: \(error)") ; break }
            return call(which, s, chunk: chunk, eos: eos, retried: true)
        default:
            break
        }
        if which <= 1 || s.response == nil || which == 2 || (which == 3 && eos && s.bufferedResponseBody != nil) {
            s.respond(500, body: "filter \(name) failed\n", headers: [("content-type", "text/plain")])
            return .respond
        }
        return .continue
    }

    static func nanos() -> UInt64 {
        var ts = timespec(); clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// `on_request`, when the request head arrived (after the filters before this one):
    /// the plugin's verdict (`respond` when it replied, `stopAndBuffer`, `pause` while it
    /// waits in `moonlet.http.call`), or its native shortcut, which always continues.
    public func onRequest(_ stream: ProxyStream) -> FilterAction {
        if let a = nativeRequest, runNative(a, stream) { return .continue }
        return call(0, stream)
    }
    public func onRequestBody(_ stream: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction { call(1, stream, chunk: chunk, eos: endOfStream) }
    public func onResponse(_ stream: ProxyStream) -> FilterAction { call(2, stream) }
    public func onResponseBody(_ stream: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction { call(3, stream, chunk: chunk, eos: endOfStream) }
    /// `on_log`, once when the stream ended (local replies and errors included): the
    /// native shortcut when it takes the stream, else the Lua function; nothing to return.
    public func onLog(_ stream: ProxyStream) {
        if let a = nativeLog, runNative(a, stream) { return }
        // The Lua on_log may change what the native action read (istio-stats' cache).
        nativeState.forgetStatsKey()
        _ = call(4, stream)
    }

    /// `on_upstream_failure(s, conf, failure)`: `failure` is {kind, status, attempt,
    /// endpoint, grpc_status (when the response head had one)}; returning moonlet.RETRY or moonlet.NO_RETRY decides, anything else
    /// leaves it to the next filter and the route's policy. An error (or a budget
    /// abort) is logged and counted, and reads as `.routePolicy`: this phase never fails
    /// the stream by itself, whatever the plugin's failStrategy. Writing s.route and
    /// s:respond raise a Lua error here (the stream is between upstream attempts).
    public func onUpstreamFailure(_ s: ProxyStream, _ failure: UpstreamFailureInfo) -> RetryVerdict {
        let ref = fn[Self.upstreamFailurePhase]
        if ref == LUA_NOREF { return .routePolicy }
        let thread = vm.runnerThread()
        let co = thread.L
        ml_getregistry_ref(co, ref)
        ml_pushlight(co, LuaAPI.wrapper(s.id, .stream))
        ml_getregistry_ref(co, confRef)
        lua_createtable(co, 0, 5)
        LuaAPI.push(co, failure.kind.rawValue); lua_setfield(co, -2, "kind")
        lua_pushinteger(co, lua_Integer(failure.status)); lua_setfield(co, -2, "status")
        lua_pushinteger(co, lua_Integer(failure.attempt)); lua_setfield(co, -2, "attempt")
        LuaAPI.push(co, failure.endpoint); lua_setfield(co, -2, "endpoint")
        if failure.grpcStatus >= 0 { lua_pushinteger(co, lua_Integer(failure.grpcStatus)); lua_setfield(co, -2, "grpc_status") }
        let prev = vm.current, prevID = vm.currentID
        vm.current = s; vm.currentID = s.id
        vm.inUpstreamFailure = true
        vm.phaseIndex = Self.upstreamFailurePhase
        let out = vm.resume(co, nargs: 3, limits: limits, plugin: name, hooked: !trusted)
        vm.inUpstreamFailure = false
        vm.current = prev; vm.currentID = prevID
        if let cell {
            cell.stats.calls &+= 1
            cell.stats.nanos &+= Self.nanos() &- out.startNanos
            if !out.ok { cell.stats.errors &+= 1; if out.aborted { cell.stats.aborted &+= 1 } }
        }
        guard out.ok else {
            vm.runnerFailed()
            let msg = "plugin \(name): on_upstream_failure: \(out.error ?? "error")"
            vm.logger.error("\(LogText.escape(msg))", metadata: ["stream": "\(s.id)"])
            vm.host.recordError(plugin: name, msg)
            return .routePolicy
        }
        switch out.returned {
        case LuaAPI.retryVerdict?: return .retry
        case LuaAPI.noRetryVerdict?: return .noRetry
        default: return .routePolicy
        }
    }
}
