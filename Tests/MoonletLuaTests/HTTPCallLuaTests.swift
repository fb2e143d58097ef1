import XCTest
import CLua
import NIOCore
import Logging
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// moonlet.http.call inside the Lua host, with a client that answers when the test
/// says: the phase pauses, its coroutine leaves the shared runner, and the response
/// resumes it under what was left of its budget.
final class HTTPCallLuaTests: XCTestCase {
    final class Client: LuaHTTPClient {
        final class Call: LuaHTTPCancellable {
            let request: LuaHTTPRequest
            let done: (Result<LuaHTTPResponse, LuaHTTPError>) -> Void
            var cancelled = false
            init(_ r: LuaHTTPRequest, _ d: @escaping (Result<LuaHTTPResponse, LuaHTTPError>) -> Void) { request = r; done = d }
            func cancel() { cancelled = true }
        }
        var calls: [Call] = []
        func start(_ request: LuaHTTPRequest, stream: ProxyStream, done: @escaping (Result<LuaHTTPResponse, LuaHTTPError>) -> Void) -> LuaHTTPCancellable {
            let c = Call(request, done)
            calls.append(c)
            return c
        }
    }

    final class Resumer: FilterResumer {
        var actions: [FilterAction] = []
        let chain: FilterChain
        init(_ c: FilterChain) { chain = c }
        func filtersResumed(_ stream: ProxyStream, _ action: FilterAction) {
            let next = chain.resumeRequest(stream, after: action)
            if next != .pause { actions.append(next) }
        }
    }

    var dir: String!
    var runtime: LuaLoopRuntime!
    var host: LuaHost!
    var client = Client()
    var nextID: UInt64 = 1

    override func setUp() {
        dir = NSTemporaryDirectory() + "moonlet-lua-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var limits = LuaLimits()
        limits.timeoutMs = 200
        host = LuaHost(logger: Logger(label: "test"), limits: limits)
        runtime = LuaLoopRuntime(host: host, metrics: nil)
        client = Client()
        runtime.vm.httpClient = client
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func chain(_ named: [(String, String)]) throws -> FilterChain {
        let specs = named.enumerated().map { i, nc -> LuaPluginSpec in
            let path = "\(dir!)/\(nc.0).lua"
            try! nc.1.write(toFile: path, atomically: true, encoding: .utf8)
            return LuaPluginSpec(name: nc.0, namespace: "", path: path, phase: "UNSPECIFIED_PHASE", priority: 100 - i, pluginConfig: .map([]),
                                 failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "test", line: 1)
        }
        return FilterChain(runtime.filters(for: try host.prepare(specs).get()))
    }

    func stream() -> ProxyStream {
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: "GET /p HTTP/1.1\r\nHost: svc\r\n\r\n")) else { fatalError() }
        nextID += 1
        return ProxyStream(id: nextID, request: h, source: PeerInfo(address: "127.0.0.1:1"), filterCount: 0, startNanos: 0)
    }

    static let caller = """
    return { on_request = function(s)
      local res, err = moonlet.http.call("http://authz.local:8000/check", { method = "post", headers = { ["X-A"] = "1" }, body = "b", timeout_ms = 250 })
      if not res then s.request.headers:set("x-err", err); return end
      s.request.headers:set("x-status", tostring(res.status))
      s.request.headers:set("x-h", res.headers["x-h"])
      if res.status == 403 then return s:respond(403, res.body) end
    end }
    """

    func test_aCallPausesTheChain_atItsFilter_andTheResponseResumesIt_thenTheNextFilterRuns() throws {
        let c = try chain([("caller", Self.caller), ("after", "return { on_request = function(s) s.request.headers:set('x-after', 'yes') end }")])
        let s = stream()
        let r = Resumer(c)
        s.resumer = r
        let vm = runtime.vm
        XCTAssertEqual(c.runRequest(s), .pause)
        XCTAssertEqual(s.filterPause.index, 0)
        XCTAssertNil(s.request.first("x-after"), "the next filter ran before the response")
        XCTAssertNil(vm.runner, "the waiting coroutine is still the VM's runner")
        let call = try XCTUnwrap(client.calls.first)
        XCTAssertEqual(call.request.method, "POST")
        XCTAssertEqual(call.request.timeoutMs, 250)
        XCTAssertEqual(call.request.headers.map { "\($0.name)=\($0.value)" }, ["x-a=1"])
        XCTAssertEqual(call.request.body, Array("b".utf8))
        // Another stream runs meanwhile, on a fresh runner.
        let other = stream()
        other.resumer = Resumer(c)
        XCTAssertEqual(c.runRequest(other), .pause)
        XCTAssertEqual(client.calls.count, 2)
        call.done(.success(LuaHTTPResponse(status: 200, headers: [("x-h", "v")], body: [])))
        XCTAssertEqual(r.actions, [.continue])
        XCTAssertEqual(s.request.first("x-status"), "200")
        XCTAssertEqual(s.request.first("x-h"), "v")
        XCTAssertEqual(s.request.first("x-after"), "yes")
        XCTAssertNil((s.luaContext as? StreamLuaContext)?.pending)
        // The other stream's client call fails: nil, err.
        client.calls[1].done(.failure(LuaHTTPError("timeout after 250 ms")))
        XCTAssertEqual(other.request.first("x-err"), "timeout after 250 ms")
        runtime.endStream(s); runtime.endStream(other)
    }

    func test_aDenyAfterTheCall_answersLocally() throws {
        let c = try chain([("caller", Self.caller)])
        let s = stream()
        let r = Resumer(c)
        s.resumer = r
        XCTAssertEqual(c.runRequest(s), .pause)
        client.calls[0].done(.success(LuaHTTPResponse(status: 403, headers: [], body: Array("no".utf8))))
        XCTAssertEqual(r.actions, [.respond])
        XCTAssertEqual(s.localReply?.status, 403)
        XCTAssertEqual(s.localReply?.body, "no")
    }

    func test_aStreamThatEndsWhileWaiting_cancelsTheCall_andClosesTheCoroutine_neverResumingIt() throws {
        let c = try chain([("caller", Self.caller)])
        let s = stream()
        let r = Resumer(c)
        s.resumer = r
        XCTAssertEqual(c.runRequest(s), .pause)
        c.runLog(s); runtime.endStream(s); s.end()
        XCTAssertTrue(client.calls[0].cancelled)
        client.calls[0].done(.success(LuaHTTPResponse(status: 200, headers: [], body: [])))
        XCTAssertEqual(r.actions, [])
        XCTAssertNil(s.request.first("x-status"))
        XCTAssertTrue(runtime.vm.threadPool.allSatisfy { lua_status($0.L) == LUA_OK })
        XCTAssertEqual(runtime.vm.threadPool.count, 1, "the closed coroutine went back to the pool")
    }

    func test_theWaitDoesNotCountAgainstThePhaseBudget() throws {
        let c = try chain([("caller", Self.caller)])
        let s = stream()
        let r = Resumer(c)
        s.resumer = r
        XCTAssertEqual(c.runRequest(s), .pause)
        usleep(400_000)  // twice the phase's 200 ms wall-clock budget
        client.calls[0].done(.success(LuaHTTPResponse(status: 200, headers: [], body: [])))
        XCTAssertEqual(r.actions, [.continue])
        XCTAssertEqual(s.request.first("x-status"), "200")
    }

    func test_httpCallAtLoadTime_inALocalReplysOnResponse_orInAStreamedBody_isAClearError() throws {
        let errs = try chain([("load", """
        local ok, err = pcall(moonlet.http.call, "http://x/")
        moonlet.shared("t"):set("load", err)
        return {
          on_request = function(s) end,
          on_response = function(s) local ok, e = pcall(moonlet.http.call, "http://x/"); moonlet.shared("t"):set("resp", e) end,
          on_request_body = function(s) local ok, e = pcall(moonlet.http.call, "http://x/"); moonlet.shared("t"):set("body", e) end,
        }
        """), ("read", "return { on_request = function(s) local d = moonlet.shared('t'); s.request.headers:set('x-l', d:get('load') or ''); s.request.headers:set('x-r', d:get('resp') or ''); s.request.headers:set('x-b', d:get('body') or '') end }")])
        let s = stream()
        XCTAssertEqual(errs.runRequestBody(s, chunk: ByteBuffer(string: "x"), endOfStream: false), .continue)
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseResponse(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), requestWasHead: false) else { fatalError() }
        s.response = h
        // A local reply's response phase (an upstream's may call: HTTPCallTests).
        s.respond(403, body: "no")
        _ = errs.runResponse(s)
        let s2 = stream()
        XCTAssertEqual(errs.runRequest(s2), .continue)
        XCTAssertTrue(s2.request.first("x-l")?.contains("not at load time") ?? false, s2.request.first("x-l") ?? "")
        XCTAssertTrue(s2.request.first("x-r")?.contains("not allowed in on_response of a local reply") ?? false, s2.request.first("x-r") ?? "")
        XCTAssertTrue(s2.request.first("x-b")?.contains("STOP_AND_BUFFER") ?? false, s2.request.first("x-b") ?? "")
        XCTAssertTrue(client.calls.isEmpty)
    }
}
