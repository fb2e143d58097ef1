import CLua
import CLuaBounded
import MoonletCore
import MoonletConfig
import MoonletRegex
import MoonletTelemetry
import NIOCore
import Logging
#if canImport(Foundation)
import Foundation
#endif

/// Per-call and per-VM limits of Lua code (safe defaults; per plugin in LuaPlugin.spec.limits).
public struct LuaLimits: Sendable {
    /// Instructions one phase call may run (runaway code is aborted).
    public var maxInstructions = 10_000_000
    /// Wall-clock budget of one phase call, milliseconds.
    public var timeoutMs = 100
    /// Wall-clock budget of loading a plugin (compiling it, running its file and
    /// `configure`), milliseconds; at least `timeoutMs`. Loading happens at
    /// configuration time, where a busy machine may not schedule the loop for a while:
    /// a phase's 100 ms would refuse a configuration for reasons that have nothing to do
    /// with the plugin. Moonlet's builtin filters load without a wall-clock budget (their
    /// instruction budget holds).
    public var loadTimeoutMs = 1000
    /// Memory of one VM (all plugins of one event loop), bytes.
    public var maxMemoryBytes = 64 << 20
    /// Bytes one `moonlet.shared` dict holds (process-wide, outside the VM caps).
    public var sharedDictMaxBytes = 4 << 20
    /// `moonlet.shared` dicts a process holds.
    public var maxSharedDicts = 16
    /// Metric series Lua may create (`moonlet.metrics.counter` names), process-wide.
    public var maxMetricSeries = 1000
    public init() {}
}

/// Kinds of the stream wrappers handed to Lua. A wrapper is a light userdata whose
/// value encodes (stream id << 4 | kind): no allocation per request, and a wrapper
/// kept past its stream fails its id check ("object used outside of its stream").
enum WrapperKind: UInt {
    case stream = 1, request, response, requestHeaders, responseHeaders, source, destination, route
    case requestTrailers, responseTrailers
}

/// The Lua state of one stream in one VM: its `s.vars` table.
final class StreamLuaContext: StreamScriptState {
    var varsRef: Int32 = LUA_NOREF
    /// The phase call waiting for moonlet.http.call (its coroutine), if any.
    var pending: PendingLuaCall?
}

/// A pooled coroutine (anchored in the registry).
final class LuaThread {
    let L: OpaquePointer
    let ref: Int32
    init(L: OpaquePointer, ref: Int32) { self.L = L; self.ref = ref }
}

/// One Lua 5.4 VM, owned by one event loop: every call happens on that loop's thread.
/// Holds the sandboxed globals, the `moonlet` module, a pool of coroutines and the
/// stream currently being served (the only one wrappers may reach).
public final class LuaVM {
    public let L: OpaquePointer
    let limitsPtr: UnsafeMutablePointer<ml_limits>
    public let host: LuaHost
    public let metrics: MetricsShard?
    var threadPool: [LuaThread] = []
    /// The stream of the running phase call, and its id (0 = none).
    var current: ProxyStream?
    var currentID: UInt64 = 0
    /// True while an on_upstream_failure phase runs: s.route and s:respond are refused
    /// (the attempt's cluster, slots and replay are the proxy's until it decides).
    var inUpstreamFailure = false
    var currentPlugin: String = ""
    /// The phase of the running call (LuaPluginInstance.phaseNames index), read by
    /// moonlet.http.call to refuse phases that cannot wait.
    var phaseIndex = -1
    /// The request moonlet.http.call asked for, set just before it yields (taken by the
    /// phase call that sees the yield).
    var pendingHTTPRequest: LuaHTTPRequest?
    /// The coroutine of a stream being resumed after moonlet.http.call (nil otherwise).
    var resumingThread: OpaquePointer?
    /// Where moonlet.http.call requests go (the proxy's client of this loop); nil: the
    /// function fails with "not available".
    public var httpClient: LuaHTTPClient?
    /// Randomness for routing decisions made from this VM (weights, fault percentages).
    var rng = Xoshiro256(seed: SystemRandomNumberGenerator())
    /// The router's Lua tables per configuration snapshot (RouterAPI.swift).
    var routerCache = RouterCache()
    /// The metatable of moonlet.authz matchers (compared by pointer: no registry lookup by name per test).
    var authzMatcherMetatable: UnsafeRawPointer?
    /// The metatables of authz.rules and authz.decider userdata (AuthzRules.swift).
    var authzRulesMetatable: UnsafeRawPointer?
    var authzDeciderMetatable: UnsafeRawPointer?
    /// The metatable of moonlet.stats.series handles (StatsAPI.swift), compared by pointer.
    var statsSeriesMetatable: UnsafeRawPointer?
    /// Access log buffers and open spans of this loop (LogTraceAPI.swift).
    let logTrace = LogTraceLoopState()
    /// Native phases of builtin filters (`accesslog.writer`, `trace.starter`).
    var nativeActions = NativeActions()
    /// The end of the stream whose native on_log actions run (`NativeAction.endNanos`):
    /// the access log line and istio-stats read one clock for it. Stream ids are unique
    /// on a loop; `UInt64.max` is none.
    var endNanosStream: UInt64 = .max
    var endNanosValue: UInt64 = 0
    let logger: Logger
    /// Metric names this VM has had admitted by the host, with their full series name.
    var admittedSeries: [String: String] = [:]
    /// moonlet.stats and moonlet.metrics handles of this VM (StatsAPI.swift).
    var stats = StatsState()
    /// moonlet.timer timers of this VM (Timers.swift).
    let timers = LuaTimerState()
    /// The event loop this VM serves: where moonlet.timer callbacks run (nil: timers are
    /// accepted and never fire, as in the scratch VM that validates plugins).
    public var eventLoop: EventLoop?
    /// The proxy's bound on a buffered request body: what a filter may set as one too.
    public var maxBufferedBodyBytes = 1 << 20
    /// Envoy-style asynchronous httpCalls of this VM in flight (EnvoyCompat.fire).
    var asyncCallsInFlight = 0
    /// The experiments of this loop by plugin name (Experiments.swift): counters and
    /// the arm of each running stream, read by moonlet.variant().
    var experiments: [String: ExperimentLoopStats] = [:]

    public init(host: LuaHost, metrics: MetricsShard?) {
        self.host = host
        self.metrics = metrics
        self.logger = host.logger
        limitsPtr = UnsafeMutablePointer<ml_limits>.allocate(capacity: 1)
        limitsPtr.initialize(to: ml_limits())
        limitsPtr.pointee.cap = 0
        limitsPtr.pointee.host = 1     // host code allocates freely; phase calls run as guest
        L = ml_newstate(limitsPtr)!
        ml_setvm(L, Unmanaged.passUnretained(self).toOpaque())
        openSandbox()
        limitsPtr.pointee.cap = host.defaultLimits.maxMemoryBytes
        ml_sethook(L)
    }

    deinit {
        lua_close(L)
        limitsPtr.deinitialize(count: 1)
        limitsPtr.deallocate()
    }

    /// Bytes the VM has allocated.
    public var memoryUsed: Int { limitsPtr.pointee.used }

    /// Hands this loop's pending access log lines to their writers (a timer on the loop
    /// calls it every 100 ms, and the proxy at stop).
    public func flushLogs() { logTrace.flush() }

    static func vm(_ L: OpaquePointer?) -> LuaVM {
        Unmanaged<LuaVM>.fromOpaque(ml_getvm(L)!).takeUnretainedValue()
    }

    // MARK: sandbox

    /// Builds the sandbox (DESIGN.md §4, docs/lua-api.md "Isolation"): the global table
    /// becomes the template every plugin's own environment is copied from; the library
    /// tables and the `moonlet` module in it are read-only proxies shared by all plugins;
    /// the string metatable and the wrapper metatables are hidden (`__metatable`).
    func openSandbox() {
        luaL_openlibs(L)
        // Library functions that loop in C charge the call's budget; setmetatable refuses
        // __gc (finalizers run with hooks off); rawset refuses read-only tables.
        ml_open_bounded(L)
        // Remove what a filter must not reach.
        ml_pushglobaltable(L)
        for name in ["io", "debug", "dofile", "loadfile", "package", "require", "load", "collectgarbage"] {
            lua_pushnil(L); lua_setfield(L, -2, name)
        }
        // print: a log line at info (as OpenResty's print), never a write to stdout.
        ml_pushapifunction(L, LuaAPI.logInfo); lua_setfield(L, -2, "print")
        // os: time and clock only.
        lua_createtable(L, 0, 2)
        lua_getglobal(L, "os"); lua_getfield(L, -1, "time"); lua_setfield(L, -3, "time")
        lua_getfield(L, -1, "clock"); lua_setfield(L, -3, "clock"); ml_pop(L, 1)
        lua_setfield(L, -2, "os")
        // string.dump produces bytecode: gone. math.randomseed would let one plugin fix
        // the generator every plugin of the VM draws from: gone.
        lua_getglobal(L, "string"); lua_pushnil(L); lua_setfield(L, -2, "dump"); ml_pop(L, 1)
        lua_getglobal(L, "math"); lua_pushnil(L); lua_setfield(L, -2, "randomseed"); ml_pop(L, 1)
        LuaAPI.installModule(L)
        for lib in ["string", "table", "math", "utf8", "coroutine", "os", "moonlet"] {
            lua_getfield(L, -1, lib)
            ml_push_readonly(L, lib)
            lua_setfield(L, -2, lib)
        }
        ml_pop(L, 1)
        // The string metatable: getmetatable("") gives false, so its __index (the real
        // string table) is out of reach.
        lua_pushstring(L, "")
        if lua_getmetatable(L, -1) != 0 { lua_pushboolean(L, 0); lua_setfield(L, -2, "__metatable"); ml_pop(L, 1) }
        ml_pop(L, 1)
        LuaAPI.installWrapperMetatable(L)
        ml_gc_generational(L)
    }

    /// Pushes a new global environment for one plugin: the sandbox's globals (functions
    /// and read-only library proxies) copied into a table of its own, with `_G`, and
    /// `load` and `require` bound to it. What a plugin assigns to a global stays there.
    func pushPluginEnvironment() {
        lua_createtable(L, 0, 40)
        ml_pushglobaltable(L)
        lua_pushnil(L)
        while lua_next(L, -2) != 0 {        // env G k v
            lua_pushvalue(L, -2)            // env G k v k
            ml_insert(L, -2)                // env G k k v
            lua_rawset(L, -5)               // env G k
        }
        ml_pop(L, 1)
        lua_pushvalue(L, -1); lua_setfield(L, -2, "_G")
        // math of its own: a random generator no other plugin draws from or observes,
        // seeded from the system's generator (Lua would seed every plugin of a VM
        // loaded in the same second alike).
        _ = luaopen_math(L)
        var seeder = SystemRandomNumberGenerator()
        lua_getfield(L, -1, "randomseed")
        lua_pushinteger(L, lua_Integer(truncatingIfNeeded: seeder.next() as UInt64))
        lua_pushinteger(L, lua_Integer(truncatingIfNeeded: seeder.next() as UInt64))
        _ = ml_pcall(L, 2, 0, 0)
        lua_pushnil(L); lua_setfield(L, -2, "randomseed")
        ml_push_readonly(L, "math")
        lua_setfield(L, -2, "math")
        lua_pushvalue(L, -1)
        ml_pushapiclosure(L, LuaAPI.load, 1)
        lua_setfield(L, -2, "load")
        lua_pushvalue(L, -1)
        lua_createtable(L, 0, 4)            // this plugin's loaded modules
        ml_pushapiclosure(L, LuaAPI.require, 2)
        lua_setfield(L, -2, "require")
    }

    /// The series name of Lua metric `name` ("moonlet_lua_<name>"), or nil when it would
    /// be a new series past the host's cap. Known names cost one dictionary lookup.
    @inline(__always)
    func metricSeries(_ name: String) -> String? {
        if let s = admittedSeries[name] { return s }
        guard host.admitMetricSeries(name) else { return nil }
        let s = "moonlet_lua_" + name
        admittedSeries[name] = s
        return s
    }

    // MARK: threads

    /// The coroutine phase calls run on (replaced when a call dies with an error).
    var runner: LuaThread?

    @inline(__always)
    func runnerThread() -> LuaThread {
        if let r = runner { return r }
        let r = acquireThread()
        runner = r
        return r
    }

    /// The runner died with an error: drop it; the next call gets a fresh one.
    func runnerFailed() {
        if let r = runner { releaseThread(r, healthy: false) }
        runner = nil
    }

    func acquireThread() -> LuaThread {
        if let t = threadPool.popLast() { return t }
        let co = lua_newthread(L)!
        let ref = ml_ref(L)
        return LuaThread(L: co, ref: ref)
    }

    /// `reuse`: a coroutine suspended in moonlet.http.call whose stream went away goes
    /// back to the pool once closed cleanly (its __close handlers ran without error).
    func releaseThread(_ t: LuaThread, healthy: Bool, reuse: Bool = false) {
        if healthy && threadPool.count < 256 && lua_status(t.L) == LUA_OK {
            lua_settop(t.L, 0)
            threadPool.append(t)
        } else {
            // Closing a failed coroutine runs its pending __close handlers (plugin code):
            // under a small budget of their own, as guest.
            _ = ml_arm_now(limitsPtr, Int64(Self.closeBudgetInstructions), Self.closeBudgetMs)
            limitsPtr.pointee.host = 0
            let rc = ml_resetthread(t.L)
            limitsPtr.pointee.host = 1
            limitsPtr.pointee.deadline.tv_sec = 0
            if reuse && rc == LUA_OK && threadPool.count < 256 && lua_status(t.L) == LUA_OK {
                lua_settop(t.L, 0)
                threadPool.append(t)
                return
            }
            ml_unref(L, t.ref)
        }
    }

    /// Budget of the __close handlers a failed call left pending (they run after the
    /// call, when its coroutine is closed).
    static let closeBudgetMs = 10
    static let closeBudgetInstructions = 1_000_000

    /// Frees the stream's Lua state (`s.vars` released).
    public func endStream(_ s: ProxyStream) {
        guard let ctx = s.luaContext as? StreamLuaContext else { return }
        // A phase still waiting for moonlet.http.call: its request is cancelled and its
        // coroutine closed (never resumed into a stream that is gone).
        if let p = ctx.pending { p.abandon() }
        if ctx.varsRef != LUA_NOREF { ml_unref(L, ctx.varsRef) }
        s.luaContext = nil
    }

    // MARK: calls

    public struct CallOutcome {
        public var ok: Bool
        public var error: String?
        public var aborted: Bool
        /// First return value as a string, when it was one (e.g. "stop_and_buffer").
        public var returned: String?
        /// Monotonic nanoseconds when the call started.
        public var startNanos: UInt64 = 0
        /// The call yielded in moonlet.http.call: the coroutine is suspended, its request
        /// in `pendingHTTPRequest`.
        public var yielded = false
    }

    /// Arms the budget and runs the function on top of `co` (with `nargs` args above it).
    /// `hooked: false` (a builtin filter, LuaPluginInstance.trusted) runs it without the
    /// instruction-count hook, which goes back on `co` when the call returns or yields.
    func resume(_ co: OpaquePointer, nargs: Int32, limits: LuaLimits, plugin: String, keepResults: Bool = false, hooked: Bool = true) -> CallOutcome {
        let t0 = ml_arm_now(limitsPtr, Int64(limits.maxInstructions), limits.timeoutMs)
        currentPlugin = plugin
        var nres: Int32 = 0
        limitsPtr.pointee.host = 0
        if !hooked { lua_sethook(co, nil, 0, 0) }
        let st = ml_resume(co, L, nargs, &nres)
        if !hooked { ml_sethook(co) }
        limitsPtr.pointee.host = 1
        let aborted = limitsPtr.pointee.aborted != 0
        limitsPtr.pointee.deadline.tv_sec = 0
        if st == LUA_OK {
            var ret: String? = nil
            if nres > 0 && lua_type(co, -nres) == LUA_TSTRING { ret = String(cString: ml_tostring(co, -nres)) }
            if keepResults { lua_settop(co, nres > 0 ? -nres : 0); if nres == 0 { lua_pushnil(co) } } else { lua_settop(co, 0) }
            return CallOutcome(ok: true, error: nil, aborted: false, returned: ret, startNanos: t0)
        }
        if st == LUA_YIELD {
            if pendingHTTPRequest != nil {
                // moonlet.http.call: the coroutine waits (its yielded values are none).
                if nres > 0 { ml_pop(co, nres) }
                return CallOutcome(ok: false, error: nil, aborted: false, returned: nil, startNanos: t0, yielded: true)
            }
            lua_settop(co, 0)
            return CallOutcome(ok: false, error: "\(plugin): coroutine.yield from a filter phase is not resumed (moonlet.http.call is the way to wait)", aborted: false, returned: nil, startNanos: t0)
        }
        var msg = "error object is not a string"
        if let b = LuaAPI.bytes(co, -1) {
            // Cut as log lines are: the message is logged and kept as the plugin's last error.
            msg = String(decoding: b.prefix(LuaAPI.maxLogLine), as: UTF8.self) + (b.count > LuaAPI.maxLogLine ? "…" : "")
        }
        if st == LUA_ERRMEM { msg = "not enough memory (cap \(limitsPtr.pointee.cap) bytes)" }
        ml_gc_collect(L)
        return CallOutcome(ok: false, error: msg, aborted: aborted || st == LUA_ERRMEM, returned: nil, startNanos: t0)
    }

    /// Loads and runs a plugin file in this VM, in a global environment of its own;
    /// returns the module table's registry ref.
    func loadModule(source: String, chunkName: String, limits: LuaLimits) throws -> Int32 {
        let co = acquireThread()
        defer { releaseThread(co, healthy: lua_status(co.L) == LUA_OK) }
        // Compiling runs under the plugin's budget too (it is C work outside the hook).
        _ = ml_arm_now(limitsPtr, Int64(limits.maxInstructions), limits.timeoutMs)
        let rc = source.withCString { p in ml_loadtext(co.L, p, strlen(p), "@" + chunkName) }
        limitsPtr.pointee.deadline.tv_sec = 0
        if rc != LUA_OK {
            let m = String(cString: ml_tostring(co.L, -1)); lua_settop(co.L, 0)
            throw LuaError.compile(m)
        }
        pushPluginEnvironment()
        defer { ml_pop(L, 1) }
        lua_pushvalue(L, -1)
        lua_xmove(L, co.L, 1)
        _ = lua_setupvalue(co.L, -2, 1)     // the chunk's _ENV
        let out = resume(co.L, nargs: 0, limits: limits, plugin: chunkName, keepResults: true)
        guard out.ok else { lua_settop(co.L, 0); throw LuaError.runtime(out.error ?? "error") }
        if Self.definesEnvoyEntryPoints(L) {
            // An Envoy script (EnvoyCompat.swift): the adapter makes its module.
            if lua_gettop(co.L) > 0 && ml_isnil(co.L, -1) == 0 {
                lua_settop(co.L, 0)
                throw LuaError.runtime("\(chunkName): a script that defines envoy_on_request/envoy_on_response must not return a module (it is adapted as an Envoy Lua script)")
            }
            lua_settop(co.L, 0)
            try EnvoyCompat.adapt(self, co.L, source: source, chunkName: chunkName, limits: limits)
        }
        guard ml_istable(co.L, -1) != 0 else {
            lua_settop(co.L, 0)
            throw LuaError.runtime("\(chunkName): a filter module must return a table of phase functions")
        }
        lua_xmove(co.L, L, 1)
        lua_settop(co.L, 0)
        return ml_ref(L)
    }
}

extension LuaVM {
    /// Pushes t[name], t being the table on top of the stack, without metamethods: the
    /// host reads plugin tables outside any budget, where an __index function would
    /// run unbounded (and an error in it would have no protected call to land in).
    static func pushRawField(_ L: OpaquePointer, _ name: String) {
        lua_pushstring(L, name)
        lua_rawget(L, -2)
    }

    /// Whether the plugin environment on top of the stack defines Envoy's entry points.
    static func definesEnvoyEntryPoints(_ L: OpaquePointer) -> Bool {
        ["envoy_on_request", "envoy_on_response"].contains { name in
            pushRawField(L, name)
            defer { ml_pop(L, 1) }
            return ml_isfunction(L, -1) != 0
        }
    }
}

public enum LuaError: Error, CustomStringConvertible {
    case compile(String)
    case runtime(String)
    public var description: String {
        switch self { case .compile(let m): return m; case .runtime(let m): return m }
    }
}

extension ProxyStream {
    var luaCtx: StreamLuaContext {
        // Only MoonletLua sets luaContext, always to a StreamLuaContext.
        if let c = luaContext { return unsafeDowncast(c, to: StreamLuaContext.self) }
        let c = StreamLuaContext(); luaContext = c; return c
    }
}
