import CLua
import MoonletCore
import NIOCore

// MARK: - moonlet.http.call
//
// `moonlet.http.call(target, opts)` sends an HTTP request from a filter phase and
// suspends the phase's coroutine until the response (docs/lua-api.md "HTTP calls").
// Phase calls run on the VM's shared runner coroutine; a call that yields here hands
// that coroutine to its stream (the VM takes a fresh runner from its pool for the next
// call), and the filter answers `FilterAction.pause`. When the response arrives on the
// loop, the coroutine is resumed with it, under what was left of the phase's budget
// (the wait is not counted), and the filter tells the stream how its phase ended
// (`ProxyStream.resumeFilters`). A phase that never calls it pays nothing for this:
// no allocation, no coroutine, one integer store (the phase index).

/// One request of `moonlet.http.call`, checked by the Lua side (method a token, path
/// origin-form, header names tokens and values without control bytes, sizes bounded).
public struct LuaHTTPRequest: Sendable {
    /// An `http://host[:port][/path]` URL, a mesh service host (`name.ns.svc.cluster.local`,
    /// optionally `:port`), or an Istio cluster name `outbound|PORT|SUBSET|HOST`.
    public var target: String
    public var method: String
    /// Path and query to send; nil: the URL's (or "/").
    public var path: String?
    /// Lowercase names.
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]
    public var timeoutMs: Int
    /// `header_lists = true`: `res.headers` maps each name to the list of its values (in
    /// arrival order) instead of one string with repeated values joined by ", ".
    public var headerLists = false
}

/// The response of a `moonlet.http.call`.
public struct LuaHTTPResponse: Sendable {
    public var status: Int
    /// Lowercase names, in arrival order.
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]
    public init(status: Int, headers: [(name: String, value: String)], body: [UInt8]) {
        self.status = status; self.headers = headers; self.body = body
    }
}

/// Why a `moonlet.http.call` got no response (the `err` of `nil, err`).
public struct LuaHTTPError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A request in flight that can be given up (the stream ended first).
public protocol LuaHTTPCancellable: AnyObject {
    /// Stops the request: its connection is closed and its completion never called.
    func cancel()
}

/// Where `moonlet.http.call` requests go: the proxy's client of the VM's event loop.
public protocol LuaHTTPClient: AnyObject {
    /// Starts `request` for `stream`. `done` is called exactly once, on the loop, never
    /// before `start` returns (unless the request is cancelled first).
    func start(_ request: LuaHTTPRequest, stream: ProxyStream,
               done: @escaping (Result<LuaHTTPResponse, LuaHTTPError>) -> Void) -> LuaHTTPCancellable
}

/// Bounds of `moonlet.http.call`.
public enum LuaHTTPLimits {
    /// Timeout when the call names none.
    public static let defaultTimeoutMs = 5_000
    /// Largest timeout a call may ask for.
    public static let maxTimeoutMs = 60_000
    /// Largest request and response body.
    public static let maxBodyBytes = 1 << 20
    /// Most request headers a call may send.
    public static let maxRequestHeaders = 100
}

/// A phase call suspended in `moonlet.http.call`: its coroutine, owned by the stream
/// (`StreamLuaContext.pending`) until the response resumes it or the stream ends.
final class PendingLuaCall {
    let instance: LuaPluginInstance
    let stream: ProxyStream
    let thread: LuaThread
    let phase: Int
    /// The stream's reply count when the phase started (a reply made by the phase answers).
    let replies: Int
    /// What is left of the phase's budget (instructions; milliseconds, 0 = no deadline).
    var instructionsLeft: Int
    var msLeft: Int
    var request: LuaHTTPCancellable?
    var finished = false
    /// The call asked for `header_lists` (how `res.headers` is shaped).
    var headerLists = false

    init(instance: LuaPluginInstance, stream: ProxyStream, thread: LuaThread, phase: Int, replies: Int, instructionsLeft: Int, msLeft: Int) {
        self.instance = instance; self.stream = stream; self.thread = thread; self.phase = phase
        self.replies = replies; self.instructionsLeft = instructionsLeft; self.msLeft = msLeft
    }

    /// Sends the request the coroutine yielded for.
    func send() {
        let vm = instance.vm
        guard let req = vm.pendingHTTPRequest, let client = vm.httpClient else {
            vm.pendingHTTPRequest = nil
            finish(error: "moonlet.http.call: no HTTP client")
            return
        }
        vm.pendingHTTPRequest = nil
        headerLists = req.headerLists
        request = client.start(req, stream: stream) { r in self.complete(r) }
    }

    /// The response (or error) arrived: the coroutine goes on with it.
    func complete(_ r: Result<LuaHTTPResponse, LuaHTTPError>) {
        guard !finished else { return }
        request = nil
        let vm = instance.vm
        let co = thread.L
        var nargs: Int32 = 1
        switch r {
        case .success(let res): Self.push(co, res, lists: headerLists)
        case .failure(let e): lua_pushnil(co); LuaAPI.push(co, e.message); nargs = 2
        }
        var limits = instance.limits
        limits.maxInstructions = max(Int(ML_HOOK_COUNT), instructionsLeft)
        if limits.timeoutMs > 0 { limits.timeoutMs = max(1, msLeft) }
        let prev = vm.current, prevID = vm.currentID, prevPhase = vm.phaseIndex, prevThread = vm.resumingThread
        vm.current = stream; vm.currentID = stream.id; vm.phaseIndex = phase; vm.resumingThread = co
        let out = vm.resume(co, nargs: nargs, limits: limits, plugin: instance.name)
        let left = Int(vm.limitsPtr.pointee.instr_left)
        vm.current = prev; vm.currentID = prevID; vm.phaseIndex = prevPhase; vm.resumingThread = prevThread
        let spent = LuaPluginInstance.nanos() &- out.startNanos
        if let cell = instance.cell {
            cell.stats.nanos &+= spent
            if !out.ok && !out.yielded { cell.stats.errors &+= 1; if out.aborted { cell.stats.aborted &+= 1 } }
        }
        if out.yielded {
            // Another call: the budget goes on from what this part left.
            instructionsLeft = max(0, left) * Int(ML_HOOK_COUNT)
            if msLeft > 0 { msLeft -= Int(spent / 1_000_000) }
            send()
            return
        }
        if out.ok {
            finished = true
            stream.luaCtx.pending = nil
            vm.releaseThread(thread, healthy: true)
            let action: FilterAction
            if stream.replyCount != replies { action = .respond }
            else if out.returned == "stop_and_buffer" && (phase == 0 || phase == 2) { action = .stopAndBuffer }
            else { action = .continue }
            stream.resumeFilters(action)
            return
        }
        finish(error: out.error ?? "error")
    }

    /// The phase failed after its wait: logged and counted as any phase error; the
    /// plugin's failStrategy decides (FAIL_OPEN goes on; otherwise 500, as FAIL_CLOSE:
    /// a FAIL_RELOAD plugin is not reloaded and run again after a wait).
    func finish(error: String) {
        guard !finished else { return }
        finished = true
        stream.luaCtx.pending = nil
        let vm = instance.vm
        vm.releaseThread(thread, healthy: false)
        let name = instance.name
        let msg = "plugin \(name): \(LuaPluginInstance.phaseNames[phase]): \(error)"
        vm.logger.error("\(LogText.escape(msg))", metadata: ["stream": "\(stream.id)"])
        vm.host.recordError(plugin: name, msg)
        if instance.failStrategy == .failOpen {
            stream.resumeFilters(.continue)
            return
        }
        stream.respond(500, body: "filter \(name) failed\n", headers: [("content-type", "text/plain")])
        stream.resumeFilters(.respond)
    }

    /// The stream ended while waiting: the request is cancelled and the coroutine closed
    /// (its pending __close handlers run under a small budget), never resumed.
    func abandon() {
        guard !finished else { return }
        finished = true
        request?.cancel()
        request = nil
        stream.luaCtx.pending = nil
        // Closed (pending __close handlers run under a small budget), then pooled again.
        instance.vm.releaseThread(thread, healthy: false, reuse: true)
    }

    /// `res`: {status = n, headers = {name = value}, body = "..."}; a repeated header's
    /// values are joined with ", " (`lists`: every name maps to a list of its values).
    static func push(_ L: OpaquePointer, _ r: LuaHTTPResponse, lists: Bool = false) {
        lua_createtable(L, 0, 3)
        lua_pushinteger(L, lua_Integer(r.status)); lua_setfield(L, -2, "status")
        lua_createtable(L, 0, Int32(min(r.headers.count, 64)))
        if lists {
            var index: [String: Int32] = [:]
            for (n, v) in r.headers {
                if let i = index[n] {
                    _ = lua_getfield(L, -1, n)
                    LuaAPI.push(L, v); lua_rawseti(L, -2, lua_Integer(i + 1))
                    index[n] = i + 1
                    ml_pop(L, 1)
                } else {
                    lua_createtable(L, 2, 0)
                    LuaAPI.push(L, v); lua_rawseti(L, -2, 1)
                    lua_setfield(L, -2, n)
                    index[n] = 1
                }
            }
            lua_setfield(L, -2, "headers")
            r.body.withUnsafeBytes { ml_pushbytes(L, $0.baseAddress, $0.count) }
            lua_setfield(L, -2, "body")
            return
        }
        var seen: [String: Int] = [:]
        var values: [String] = []
        for (n, v) in r.headers {
            if let i = seen[n] { values[i] += ", " + v } else { seen[n] = values.count; values.append(v) }
        }
        for (n, i) in seen { LuaAPI.push(L, values[i]); lua_setfield(L, -2, n) }
        lua_setfield(L, -2, "headers")
        r.body.withUnsafeBytes { ml_pushbytes(L, $0.baseAddress, $0.count) }
        lua_setfield(L, -2, "body")
    }
}

extension LuaPluginInstance {
    /// The phase yielded in moonlet.http.call: its coroutine (the VM's runner) goes to
    /// the stream, the request is sent, and the chain pauses at this filter.
    func pause(_ which: Int, _ s: ProxyStream, _ thread: LuaThread, startNanos: UInt64, replies: Int) -> FilterAction {
        if vm.runner === thread { vm.runner = nil }
        let left = Int(vm.limitsPtr.pointee.instr_left)
        let spentMs = Int((Self.nanos() &- startNanos) / 1_000_000)
        let p = PendingLuaCall(instance: self, stream: s, thread: thread, phase: which, replies: replies,
                               instructionsLeft: max(0, left) * Int(ML_HOOK_COUNT),
                               msLeft: limits.timeoutMs > 0 ? limits.timeoutMs - spentMs : 0)
        s.luaCtx.pending = p
        p.send()
        return .pause
    }
}

extension LuaAPI {
    /// `moonlet.http.call(target, {method, path, headers, body, timeout_ms})`: yields
    /// until the response; returns `res` or `nil, err`.
    static let httpCall: lua_CFunction = { L in
        let vm = LuaVM.vm(L)
        if let t = vm.timers.running, vm.currentID == 0 {
            // A moonlet.timer callback (Timers.swift) waits on its own coroutine.
            guard L == t.thread?.L else { return fail(L, "moonlet.http.call: call it from the timer callback itself, not from a coroutine it made") }
        } else {
        guard let s = vm.current, vm.currentID != 0 else {
            return fail(L, "moonlet.http.call: only inside a filter phase (on_request, on_request_body, on_response) or a moonlet.timer callback, not at load time")
        }
        // on_response waits on an upstream's response head only: a local reply's response
        // phase cannot pause (the reply is already decided).
        guard vm.phaseIndex == 0 || (vm.phaseIndex == 1 && s.bufferedRequestBody != nil && s.response == nil)
                || (vm.phaseIndex == 2 && s.localReply == nil && s.response != nil && !vm.inUpstreamFailure) else {
            let phase = (0..<LuaPluginInstance.phaseNames.count).contains(vm.phaseIndex) ? LuaPluginInstance.phaseNames[vm.phaseIndex] : "this phase"
            let why = vm.phaseIndex == 1 ? " of a streamed body (return moonlet.STOP_AND_BUFFER from on_request to get the whole body)"
                : vm.phaseIndex == 2 ? " of a local reply" : ""
            return fail(L, "moonlet.http.call: not allowed in \(phase)\(why); allowed in on_request, in on_request_body of a buffered body, and in on_response of an upstream's response")
        }
        guard L == vm.runner?.L || (vm.resumingThread != nil && L == vm.resumingThread) else {
            return fail(L, "moonlet.http.call: call it from the phase function itself, not from a coroutine it made")
        }
        }
        guard vm.httpClient != nil else { return fail(L, "moonlet.http.call: not available in this process") }
        guard lua_isyieldable(L) != 0 else {
            return fail(L, "moonlet.http.call: cannot wait here (called through a C function or metamethod)")
        }
        guard let target = str(L, 1), !target.isEmpty else { return fail(L, "moonlet.http.call: argument 1 must be a URL, service host or cluster name") }
        var req = LuaHTTPRequest(target: target, method: "GET", path: nil, headers: [], body: [], timeoutMs: LuaHTTPLimits.defaultTimeoutMs)
        let t = lua_type(L, 2)
        if t != LUA_TNONE && t != LUA_TNIL {
            guard t == LUA_TTABLE else { return fail(L, "moonlet.http.call: argument 2 must be a table") }
            if let e = readOptions(L, &req) { return fail(L, "moonlet.http.call: " + e) }
        }
        vm.pendingHTTPRequest = req
        return MOONLET_LUA_YIELD
    }

    /// Reads the options table at index 2 (raw reads: no metamethod runs in host code).
    static func readOptions(_ L: OpaquePointer?, _ req: inout LuaHTTPRequest) -> String? {
        func field(_ name: String) -> Int32 { lua_pushstring(L, name); return lua_rawget(L, 2) }
        defer { lua_settop(L, 2) }
        if field("method") != LUA_TNIL {
            guard let m = str(L, -1), !m.isEmpty, m.utf8.count <= 32, m.utf8.allSatisfy({ HTTPToken.isTokenByte($0) }) else { return "method must be an HTTP token" }
            req.method = m.uppercased()
        }
        lua_settop(L, 2)
        if field("path") != LUA_TNIL {
            guard let p = str(L, -1), p.utf8.first == UInt8(ascii: "/"), p.utf8.count <= 8192,
                  !p.utf8.contains(where: { $0 <= 32 || $0 == 127 }) else { return "path must start with / and have no space or control byte" }
            req.path = p
        }
        lua_settop(L, 2)
        if field("timeout_ms") != LUA_TNIL {
            guard lua_isinteger(L, -1) != 0 else { return "timeout_ms must be an integer" }
            let v = Int(ml_tointeger(L, -1))
            guard (1...LuaHTTPLimits.maxTimeoutMs).contains(v) else { return "timeout_ms must be 1 to \(LuaHTTPLimits.maxTimeoutMs)" }
            req.timeoutMs = v
        }
        lua_settop(L, 2)
        if field("header_lists") != LUA_TNIL { req.headerLists = lua_toboolean(L, -1) != 0 }
        lua_settop(L, 2)
        if field("body") != LUA_TNIL {
            guard let b = bytes(L, -1) else { return "body must be a string" }
            guard b.count <= LuaHTTPLimits.maxBodyBytes else { return "body larger than \(LuaHTTPLimits.maxBodyBytes) bytes" }
            req.body = Array(b)
        }
        lua_settop(L, 2)
        if field("headers") != LUA_TNIL {
            guard ml_istable(L, -1) != 0 else { return "headers must be a table of name = value" }
            let h = lua_gettop(L)
            lua_pushnil(L)
            while lua_next(L, h) != 0 {
                guard lua_type(L, -2) == LUA_TSTRING, let name = str(L, -2), !name.isEmpty,
                      name.utf8.allSatisfy({ HTTPToken.isTokenByte($0) }) else { lua_settop(L, h); return "a header name is not an HTTP token" }
                var vals: [String] = []
                if ml_istable(L, -1) != 0 {
                    let n = lua_rawlen(L, -1)
                    for i in 1...max(1, Int(n)) where i <= Int(n) {
                        lua_rawgeti(L, -1, lua_Integer(i))
                        guard let v = str(L, -1) else { lua_settop(L, h); return "header \(name): values must be strings" }
                        vals.append(v); ml_pop(L, 1)
                    }
                } else {
                    guard let v = str(L, -1) else { lua_settop(L, h); return "header \(name): value must be a string" }
                    vals.append(v)
                }
                for v in vals {
                    guard v.utf8.count <= 8192, !v.utf8.contains(where: { ($0 < 32 && $0 != 9) || $0 == 127 }) else {
                        lua_settop(L, h); return "header \(name): value has a control byte or is too long"
                    }
                    req.headers.append((name.lowercased(), v))
                }
                guard req.headers.count <= LuaHTTPLimits.maxRequestHeaders else { lua_settop(L, h); return "more than \(LuaHTTPLimits.maxRequestHeaders) headers" }
                ml_pop(L, 1)
            }
        }
        return nil
    }
}

/// RFC 9110 token bytes.
enum HTTPToken {
    static func isTokenByte(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): return true
        default: return "!#$%&'*+-.^_`|~".utf8.contains(b)
        }
    }
}
