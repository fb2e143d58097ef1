import CLua
import CLuaBounded
import MoonletCore
import NIOCore
#if canImport(Foundation)
import Foundation
#endif

// MARK: - moonlet.timer (docs/lua-api.md "Timers")
//
// `moonlet.timer.after(seconds, fn)` and `moonlet.timer.every(seconds, fn)` run `fn` on
// the VM's event loop, per VM (so once per event loop), for background work such as
// refreshing a deny list. A callback runs in a coroutine of its own under the plugin's
// instruction and wall-clock budgets (the VM's memory cap holds as for phases) and may
// wait in `moonlet.http.call`; `every` runs again `seconds` after a run ends (a run
// that waits in a call is never overlapped by the next one; it waits at least ten times
// its last run's CPU time, and all timers of a loop run at most 100 ms per second
// together: the rest is deferred, so timers cannot starve traffic). Timers belong to the plugin
// instance that made them (at load: module code or `configure`; or from a callback)
// and stop when it is released or its VM builds the filters of a newer generation
// (reload): a reloaded plugin's old timers never fire again.

/// One timer of `moonlet.timer`.
final class LuaTimer {
    let id: Int
    let owner: ObjectIdentifier
    let plugin: String
    let limits: LuaLimits
    let seconds: Double
    let repeating: Bool
    var fnRef: Int32
    var scheduled: Scheduled<Void>?
    /// The callback's coroutine while it runs or waits in moonlet.http.call.
    var thread: LuaThread?
    var request: LuaHTTPCancellable?
    var stopped = false
    /// Budget left for the rest of a run that waited in moonlet.http.call.
    var instructionsLeft = 0
    var msLeft = 0
    /// CPU time of the current run (all its resumes), for the next run's delay.
    var runNanos: UInt64 = 0
    /// Runs that failed (error or budget), and when the last one was logged.
    var errors = 0
    var lastLogNanos: UInt64 = 0

    init(id: Int, owner: ObjectIdentifier, plugin: String, limits: LuaLimits, seconds: Double, repeating: Bool, fnRef: Int32) {
        self.id = id; self.owner = owner; self.plugin = plugin; self.limits = limits
        self.seconds = seconds; self.repeating = repeating; self.fnRef = fnRef
    }
}

/// The timers of one VM.
final class LuaTimerState {
    /// Bounds: an interval of at least 10 ms and at most a day; 64 live timers per plugin.
    static let minSeconds = 0.01
    static let maxSeconds = 86_400.0
    static let maxPerPlugin = 64
    /// Timers share the loop with traffic: in each window of `windowNanos` they run for at
    /// most `shareNanos` together (a run past it is deferred to the next window), and an
    /// `every` waits at least `backoff` times its last run's duration between runs.
    static let windowNanos: UInt64 = 1_000_000_000
    static let shareNanos: UInt64 = 100_000_000
    static let backoff = 10.0
    var windowStart: UInt64 = 0
    var windowSpent: UInt64 = 0
    /// Runs deferred because the window's share was spent.
    var deferred = 0

    /// The plugin instance being loaded: moonlet.timer calls at load time belong to it.
    var loading: (owner: ObjectIdentifier, plugin: String, limits: LuaLimits)?
    /// The timer whose callback is running (moonlet.timer calls from it belong to its plugin).
    var running: LuaTimer?
    var byOwner: [ObjectIdentifier: [Int: LuaTimer]] = [:]
    var nextID = 1
    /// The stream handed to the HTTP client for a callback's moonlet.http.call: it has no
    /// configuration snapshot, so the call resolves against the loop's current one.
    lazy var stream: ProxyStream = {
        var p = HTTPHeadParser()
        var head = HTTPHead(bytes: ByteBuffer(), isRequest: true)
        if case .complete(let h, _) = p.parseRequest(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: moonlet-timer\r\n\r\n")) { head = h }
        return ProxyStream(id: 0, request: head, source: PeerInfo(address: "127.0.0.1:0"), filterCount: 0, startNanos: 0)
    }()

    /// Live timers of a plugin instance.
    func count(_ owner: ObjectIdentifier) -> Int { byOwner[owner]?.count ?? 0 }
}

/// A value confined to its event loop, carried through a task closure.
private struct LoopBox<T>: @unchecked Sendable { let value: T }

extension LuaVM {
    /// Stops every timer of a plugin instance (it is released).
    func stopTimers(owner: ObjectIdentifier) {
        guard let ts = timers.byOwner.removeValue(forKey: owner) else { return }
        for t in ts.values { stop(t) }
    }

    /// Stops the timers of every plugin instance but `owners` (the filters of a newer
    /// generation replaced them).
    func stopTimers(except owners: Set<ObjectIdentifier>) {
        for o in Array(timers.byOwner.keys) where !owners.contains(o) { stopTimers(owner: o) }
    }

    private func stop(_ t: LuaTimer) {
        guard !t.stopped else { return }
        t.stopped = true
        t.scheduled?.cancel(); t.scheduled = nil
        t.request?.cancel(); t.request = nil
        // A callback that is running now ends by itself (runTimer sees `stopped`).
        if let th = t.thread, timers.running !== t {
            t.thread = nil
            releaseThread(th, healthy: false, reuse: true)
        }
        if t.fnRef != LUA_NOREF { ml_unref(L, t.fnRef); t.fnRef = LUA_NOREF }
    }

    private func schedule(_ t: LuaTimer, inNanos: Int64? = nil) {
        guard let loop = eventLoop, !t.stopped else { return }
        let box = LoopBox(value: (self, t))
        // `every`: the interval, or `backoff` times the last run's CPU if that is longer.
        let delay = inNanos ?? max(Int64(t.seconds * 1e9), Int64(Double(t.runNanos) * LuaTimerState.backoff))
        t.scheduled = loop.scheduleTask(in: .nanoseconds(delay)) { [box] in
            box.value.0.fire(box.value.1)
        }
    }

    private func fire(_ t: LuaTimer) {
        t.scheduled = nil
        guard !t.stopped, t.fnRef != LUA_NOREF, t.thread == nil else { return }
        // The loop's timer share for this window is spent: run at the next window.
        let now = LuaPluginInstance.nanos()
        if now &- timers.windowStart >= LuaTimerState.windowNanos { timers.windowStart = now; timers.windowSpent = 0 }
        if timers.windowSpent >= LuaTimerState.shareNanos {
            timers.deferred += 1
            let wait = LuaTimerState.windowNanos &- (now &- timers.windowStart)
            schedule(t, inNanos: Int64(wait) + Int64(t.id % 10) * 1_000_000)
            return
        }
        t.runNanos = 0
        let th = acquireThread()
        ml_getregistry_ref(th.L, t.fnRef)
        runTimer(t, th, nargs: 0, limits: t.limits)
    }

    /// Runs (or resumes) a callback on its coroutine; on a yield in moonlet.http.call the
    /// request is sent and the coroutine waits for it.
    private func runTimer(_ t: LuaTimer, _ th: LuaThread, nargs: Int32, limits: LuaLimits) {
        let prev = current, prevID = currentID, prevPhase = phaseIndex, prevRunning = timers.running
        current = nil; currentID = 0; phaseIndex = -1
        timers.running = t
        t.thread = th
        let out = resume(th.L, nargs: nargs, limits: limits, plugin: t.plugin)
        let left = Int(limitsPtr.pointee.instr_left)
        current = prev; currentID = prevID; phaseIndex = prevPhase; timers.running = prevRunning
        let spent = LuaPluginInstance.nanos() &- out.startNanos
        t.runNanos &+= spent
        timers.windowSpent &+= spent
        if let cell = metrics?.pluginCell(t.plugin) {
            cell.stats.calls &+= 1
            cell.stats.nanos &+= spent
        }
        if out.yielded {
            let req = pendingHTTPRequest
            pendingHTTPRequest = nil
            guard !t.stopped, let req, let client = httpClient else {
                t.thread = nil
                releaseThread(th, healthy: false, reuse: true)
                if !t.stopped { timerFailed(t, "moonlet.http.call: no HTTP client"); rearm(t) }
                return
            }
            t.instructionsLeft = max(0, left) * Int(ML_HOOK_COUNT)
            t.msLeft = limits.timeoutMs > 0 ? max(1, limits.timeoutMs - Int(spent / 1_000_000)) : 0
            let box = LoopBox(value: (self, t))
            t.request = client.start(req, stream: timers.stream) { r in box.value.0.timerCallDone(box.value.1, r) }
            return
        }
        t.thread = nil
        releaseThread(th, healthy: out.ok)
        if !out.ok { timerFailed(t, out.error ?? "error", aborted: out.aborted) }
        rearm(t)
    }

    private func timerCallDone(_ t: LuaTimer, _ r: Result<LuaHTTPResponse, LuaHTTPError>) {
        t.request = nil
        guard !t.stopped, let th = t.thread else { return }
        var nargs: Int32 = 1
        switch r {
        case .success(let res): PendingLuaCall.push(th.L, res)
        case .failure(let e): lua_pushnil(th.L); LuaAPI.push(th.L, e.message); nargs = 2
        }
        var limits = t.limits
        limits.maxInstructions = max(Int(ML_HOOK_COUNT), t.instructionsLeft)
        if limits.timeoutMs > 0 { limits.timeoutMs = max(1, t.msLeft) }
        runTimer(t, th, nargs: nargs, limits: limits)
    }

    /// `every` runs again; `after` is done.
    private func rearm(_ t: LuaTimer) {
        if t.repeating && !t.stopped { schedule(t); return }
        if !t.stopped {
            stop(t)
            timers.byOwner[t.owner]?.removeValue(forKey: t.id)
            if timers.byOwner[t.owner]?.isEmpty == true { timers.byOwner[t.owner] = nil }
        }
    }

    /// A failed run: counted on /plugins (errors, aborted), its message kept as the
    /// plugin's last error, logged at most once a second per timer. An `every` timer
    /// keeps running.
    private func timerFailed(_ t: LuaTimer, _ error: String, aborted: Bool = false) {
        t.errors += 1
        if let cell = metrics?.pluginCell(t.plugin) {
            cell.stats.errors &+= 1
            if aborted { cell.stats.aborted &+= 1 }
        }
        let msg = "plugin \(t.plugin): timer \(t.id): \(error)"
        host.recordError(plugin: t.plugin, msg)
        let now = LuaPluginInstance.nanos()
        if t.lastLogNanos == 0 || now &- t.lastLogNanos >= 1_000_000_000 {
            t.lastLogNanos = now
            logger.error("\(LogText.escape(msg))", metadata: ["failures": "\(t.errors)"])
        }
    }
}

extension LuaAPI {
    /// The `moonlet.timer` table (on top of the stack when this returns).
    static func installTimers(_ L: OpaquePointer) {
        lua_createtable(L, 0, 3)
        ml_pushapifunction(L, timerAfter); lua_setfield(L, -2, "after")
        ml_pushapifunction(L, timerEvery); lua_setfield(L, -2, "every")
        ml_pushapifunction(L, timerCancel); lua_setfield(L, -2, "cancel")
        ml_push_readonly(L, "moonlet.timer")
    }

    static let timerAfter: lua_CFunction = { L in addTimer(L, repeating: false) }
    static let timerEvery: lua_CFunction = { L in addTimer(L, repeating: true) }

    /// moonlet.timer.after/every(seconds, fn): the timer's id.
    static func addTimer(_ L: OpaquePointer?, repeating: Bool) -> Int32 {
        let fn = repeating ? "moonlet.timer.every" : "moonlet.timer.after"
        let vm = LuaVM.vm(L)
        let owner: (owner: ObjectIdentifier, plugin: String, limits: LuaLimits)
        if let l = vm.timers.loading { owner = l }
        else if let r = vm.timers.running { owner = (r.owner, r.plugin, r.limits) }
        else { return fail(L, "\(fn): call it at load time (module code or configure) or from a timer callback, not in a filter phase") }
        guard lua_type(L, 1) == LUA_TNUMBER else { return fail(L, "\(fn)(seconds, fn): seconds must be a number") }
        let secs = lua_tonumberx(L, 1, nil)
        guard secs >= LuaTimerState.minSeconds && secs <= LuaTimerState.maxSeconds else {
            return fail(L, "\(fn): seconds must be \(LuaTimerState.minSeconds) to \(Int(LuaTimerState.maxSeconds)), got \(secs)")
        }
        guard lua_type(L, 2) == LUA_TFUNCTION else { return fail(L, "\(fn)(seconds, fn): fn must be a function") }
        guard vm.timers.count(owner.owner) < LuaTimerState.maxPerPlugin else {
            return fail(L, "\(fn): a plugin has at most \(LuaTimerState.maxPerPlugin) live timers")
        }
        lua_pushvalue(L, 2)
        let ref = ml_ref(L)
        let id = vm.timers.nextID
        vm.timers.nextID += 1
        let t = LuaTimer(id: id, owner: owner.owner, plugin: owner.plugin, limits: owner.limits, seconds: secs, repeating: repeating, fnRef: ref)
        vm.timers.byOwner[owner.owner, default: [:]][id] = t
        vm.startTimer(t)
        lua_pushinteger(L, lua_Integer(id))
        return 1
    }

    /// moonlet.timer.cancel(id): true when a live timer of the calling plugin was stopped.
    static let timerCancel: lua_CFunction = { L in
        let vm = LuaVM.vm(L)
        guard lua_isinteger(L, 1) != 0 else { return fail(L, "moonlet.timer.cancel(id): id must be an integer") }
        let id = Int(ml_tointeger(L, 1))
        let owner = vm.timers.loading?.owner ?? vm.timers.running?.owner
        guard let o = owner, let t = vm.timers.byOwner[o]?[id] else { lua_pushboolean(L, 0); return 1 }
        vm.cancelTimer(t)
        lua_pushboolean(L, 1)
        return 1
    }
}

extension LuaVM {
    func startTimer(_ t: LuaTimer) { schedule(t) }

    func cancelTimer(_ t: LuaTimer) {
        stop(t)
        timers.byOwner[t.owner]?.removeValue(forKey: t.id)
        if timers.byOwner[t.owner]?.isEmpty == true { timers.byOwner[t.owner] = nil }
    }
}
