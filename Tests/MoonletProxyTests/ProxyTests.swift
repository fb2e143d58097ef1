import XCTest
import NIOCore
import NIOHTTP1
@testable import MoonletProxy

final class ProxyCoreTests: XCTestCase {
    var up: TestUpstream!
    var px: ProxyFixture!

    override func setUpWithError() throws {
        up = try TestUpstream()
        px = try ProxyFixture(appPort: up.port)
    }
    override func tearDown() { px?.stop(); up?.stop() }

    func test_inboundRequest_reachesApp_withProxyHeaders_andHopByHopRemoved() throws {
        let c = try RawClient(port: px.inbound)
        c.send("GET /orders?id=1 HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 10.1.1.1\r\nUpgrade: h2c\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.body, "hello")
        XCTAssertEqual(r.header("server"), "moonlet")
        let seen = try XCTUnwrap(up.seen.first)
        XCTAssertEqual(seen.uri, "/orders?id=1")
        XCTAssertEqual(seen.headers["x-forwarded-for"], ["10.1.1.1, 127.0.0.1"])
        // A version 4 UUID, as Envoy makes.
        let id = try XCTUnwrap(seen.headers["x-request-id"].first)
        XCTAssertNotNil(id.range(of: "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", options: .regularExpression), id)
        XCTAssertEqual(seen.headers["x-forwarded-proto"], ["http"])
        for h in ["x-hop", "keep-alive", "upgrade"] { XCTAssertFalse(seen.headers.contains(name: h), h) }
        // `TE: trailers` goes on, as Envoy forwards it (gRPC servers require it).
        XCTAssertEqual(seen.headers["te"], ["trailers"])
    }

    func test_requestID_isKeptWhenPresent() throws {
        let c = try RawClient(port: px.inbound)
        _ = get(c, headers: "x-request-id: abc-123\r\n")
        XCTAssertEqual(up.seen.first?.headers["x-request-id"], ["abc-123"])
    }

    func test_keepAlive_reusesOneUpstreamConnection() throws {
        let c = try RawClient(port: px.inbound)
        for i in 0..<20 { XCTAssertEqual(get(c, "/\(i)")?.status, 200) }
        XCTAssertEqual(up.seen.count, 20)
        XCTAssertEqual(up.connections, 1)
    }

    func test_pipelinedRequests_areAnsweredInOrder() throws {
        let c = try RawClient(port: px.inbound)
        c.send("GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
        for _ in 0..<3 { XCTAssertEqual(c.read()?.status, 200) }
        XCTAssertEqual(up.seen.map(\.uri), ["/1", "/2", "/3"])
    }

    /// Responses are flushed at the end of the loop's batch, not at each write: a burst
    /// of pipelined requests ending in `connection: close` still gets every response,
    /// whole and in order, before the close.
    func test_aBurstOfPipelinedRequestsEndingInClose_getsEveryResponseBeforeTheClose() throws {
        up.respond = { r in TestUpstream.Reply(body: "body of " + r.uri, chunked: r.uri.hasSuffix("7")) }
        let c = try RawClient(port: px.inbound)
        var burst = ""
        for i in 0..<40 { burst += "GET /\(i) HTTP/1.1\r\nHost: a\r\n\(i == 39 ? "Connection: close\r\n" : "")\r\n" }
        c.send(burst)
        for i in 0..<40 {
            let r = try XCTUnwrap(c.read(), "response \(i)")
            XCTAssertEqual(r.status, 200)
            XCTAssertEqual(r.body, "body of /\(i)")
        }
        XCTAssertTrue(c.isClosed())
        XCTAssertEqual(up.seen.map(\.uri), (0..<40).map { "/\($0)" })
    }

    /// Slowloris: a request head still incomplete after requestHeaderTimeoutMs gets 408
    /// and the connection closes; nothing reaches the upstream.
    func test_aRequestHeadThatStalls_gets408WhenTheHeaderTimeoutEnds() throws {
        let slow = try ProxyFixture(appPort: up.port) { $0.limits.requestHeaderTimeoutMs = 300 }
        defer { slow.stop() }
        let c = try RawClient(port: slow.inbound)
        let t0 = Date()
        c.send("GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        let r = try XCTUnwrap(c.read())
        let after = Date().timeIntervalSince(t0)
        XCTAssertEqual(r.status, 408)
        XCTAssertGreaterThanOrEqual(after, 0.29)
        XCTAssertLessThan(after, 1.5)
        XCTAssertTrue(c.isClosed())
        XCTAssertEqual(up.seen.count, 0)
    }

    /// downstreamIdleTimeoutMs (Envoy's idle_timeout) closes a keep-alive connection
    /// with no request open, and never one whose request is still being answered.
    func test_anIdleKeepAliveConnection_isClosedAfterTheIdleTimeout_butNotDuringASlowResponse() throws {
        up.respond = { r in TestUpstream.Reply(body: "late", delayMs: r.uri == "/slow" ? 900 : 0) }
        let idle = try ProxyFixture(appPort: up.port) { $0.limits.downstreamIdleTimeoutMs = 300 }
        defer { idle.stop() }
        let c = try RawClient(port: idle.inbound)
        XCTAssertEqual(get(c, "/slow")?.body, "late", "a response slower than the idle timeout still arrives")
        XCTAssertEqual(get(c, "/again")?.status, 200, "and the connection stays usable")
        let t0 = Date()
        XCTAssertTrue(c.isClosed())
        let after = Date().timeIntervalSince(t0)
        XCTAssertGreaterThanOrEqual(after, 0.25)
        XCTAssertLessThan(after, 1.5)
    }

    func test_chunkedRequestBody_andChunkedResponse_streamThrough() throws {
        up.respond = { r in TestUpstream.Reply(body: "echo:" + r.body, chunked: true) }
        let c = try RawClient(port: px.inbound)
        c.send("POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("transfer-encoding"), "chunked")
        XCTAssertEqual(r.body, "echo:hello world")
        XCTAssertEqual(up.seen.first?.body, "hello world")
        // Same connection still works.
        XCTAssertEqual(get(c)?.status, 200)
    }

    func test_contentLengthBody_isForwarded() throws {
        up.respond = { r in TestUpstream.Reply(body: "got \(r.bodyBytes)") }
        let c = try RawClient(port: px.inbound)
        c.send("PUT /p HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world")
        XCTAssertEqual(c.read()?.body, "got 11")
    }

    func test_expect100Continue_isAnsweredByTheProxy() throws {
        let c = try RawClient(port: px.inbound)
        c.send("POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        XCTAssertTrue(c.fill())
        XCTAssertTrue(String(decoding: c.pending, as: UTF8.self).hasPrefix("HTTP/1.1 100 Continue\r\n\r\n"))
        c.pending.removeFirst(25)
        c.send("abc")
        XCTAssertEqual(c.read()?.status, 200)
        XCTAssertEqual(up.seen.first?.body, "abc")
        XCTAssertFalse(up.seen.first?.headers.contains(name: "expect") ?? true)
    }

    func test_headAnd204_haveNoBody() throws {
        up.respond = { r in r.uri == "/none" ? TestUpstream.Reply(status: .noContent, body: "") : TestUpstream.Reply(body: "abcdef") }
        let c = try RawClient(port: px.inbound)
        c.send("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        let h = try XCTUnwrap(c.read(head: true))
        XCTAssertEqual(h.status, 200)
        XCTAssertEqual(h.header("content-length"), "6")
        XCTAssertEqual(get(c, "/none")?.status, 204)
        XCTAssertEqual(get(c, "/")?.body, "abcdef") // framing stayed in sync
    }

    func test_http10Client_getsCloseDelimitedOrKeepAlive() throws {
        let c = try RawClient(port: px.inbound)
        c.send("GET / HTTP/1.0\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.body, "hello")
        XCTAssertEqual(r.header("connection"), "close")
        XCTAssertTrue(c.isClosed())
    }

    func test_smugglingShapes_get400_close_andNothingReachesUpstream() throws {
        let shapes = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd",
            "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\u{0}b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\n\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
        ]
        for s in shapes {
            let c = try RawClient(port: px.inbound)
            c.send(s)
            let r = c.read()
            XCTAssertEqual(r?.status, 400, s.debugDescription)
            XCTAssertTrue(c.isClosed(), s.debugDescription)
        }
        // Bad chunk sizes are found while streaming: nothing complete reaches the app.
        let c = try RawClient(port: px.inbound)
        c.send("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 400)
        usleep(100_000)
        XCTAssertEqual(up.seen.count, 0)
    }

    func test_tooManyHeaders_get431() throws {
        let c = try RawClient(port: px.inbound)
        var req = "GET / HTTP/1.1\r\nHost: a\r\n"
        for i in 0..<150 { req += "x-h\(i): v\r\n" }
        c.send(req + "\r\n")
        XCTAssertEqual(c.read()?.status, 431)
        XCTAssertEqual(up.seen.count, 0)
    }

    func test_outboundWithoutRoute_is404NR() throws {
        let c = try RawClient(port: px.outbound)
        let r = try XCTUnwrap(get(c))
        XCTAssertEqual(r.status, 404)
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus"))
        XCTAssertTrue(stats.body.contains("response_code=\"404\",response_flags=\"NR\""), stats.body)
    }

    func test_appDown_is503UF() throws {
        let dead = try RefusingPort()
        defer { withExtendedLifetime(dead) {} }
        let p2 = try ProxyFixture(appPort: dead.port)
        defer { p2.stop() }
        let c = try RawClient(port: p2.inbound)
        let r = try XCTUnwrap(get(c))
        XCTAssertEqual(r.status, 503)
        XCTAssertTrue(r.body.contains("connection failure"), r.body)
        let stats = try XCTUnwrap(adminGet(p2.admin, "/stats/prometheus"))
        XCTAssertTrue(stats.body.contains("response_code=\"503\",response_flags=\"UF\""))
    }

    func test_aStreamedResponse_reachesTheClientAsItArrives_notWhenTheUpstreamFinishes() throws {
        up.respond = { _ in TestUpstream.Reply(body: "first-half|second-half", chunked: true, gapMs: 1500) }
        let c = try RawClient(port: px.inbound)
        let t0 = Date()
        c.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        while !String(decoding: c.pending, as: UTF8.self).contains("first-half") {
            guard c.fill() else { return XCTFail("the connection ended before the first chunk") }
        }
        XCTAssertLessThan(Date().timeIntervalSince(t0), 1.0, "the first chunk waited for the rest of the response")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.body, "first-half|second-half")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(t0), 1.4)
    }

    func test_streamTimeout_is504UT() throws {
        up.respond = { _ in TestUpstream.Reply(delayMs: 1500) }
        let p2 = try ProxyFixture(appPort: up.port) { $0.limits.streamTimeoutMs = 200 }
        defer { p2.stop() }
        let c = try RawClient(port: p2.inbound)
        let t0 = Date()
        XCTAssertEqual(get(c)?.status, 504)
        XCTAssertLessThan(Date().timeIntervalSince(t0), 1.2)
    }

    func test_admin_readyConfigDumpAndPlugins() throws {
        XCTAssertEqual(adminGet(px.admin, "/ready")?.status, 200)
        XCTAssertEqual(adminGet(px.admin, "/config_dump")?.status, 200)
        let p = try XCTUnwrap(adminGet(px.admin, "/plugins"))
        XCTAssertTrue(p.body.hasPrefix("{\"plugins\":["), p.body)
        XCTAssertEqual(adminGet(px.admin, "/plugins/reload", method: "POST")?.status, 200)
    }

    func test_drain_finishesInFlightRequests_closesTheirConnections_andStopsAccepting() throws {
        up.respond = { _ in TestUpstream.Reply(body: "slow", delayMs: 300) }
        let c = try RawClient(port: px.inbound)
        c.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        usleep(50_000)
        let port = px.inbound
        let done = expectation(description: "drained")
        DispatchQueue.global().async { self.px.server.drainAndStop(); done.fulfill() }
        let r = c.read()
        XCTAssertEqual(r?.body, "slow")
        XCTAssertEqual(r?.header("connection"), "close", "the response in flight during the drain does not close its connection")
        wait(for: [done], timeout: 10)
        XCTAssertThrowsError(try RawClient(port: port))
        px = nil
    }

    func test_closedConnections_releaseTheirHandlers_soMemoryDoesNotGrowWithConnectionChurn() throws {
        let up = try TestUpstream()
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, concurrency: 1)
        defer { px.stop() }
        for _ in 0..<200 {
            let c = try RawClient(port: px.inbound)
            c.send("GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            XCTAssertEqual(c.read()?.status, 200)
        }
        XCTAssertEqual(try px.liveHandlersOnceSettled(), 0, "handlers of closed connections are still alive")
    }
}

final class DNSEndpointTests: XCTestCase {
    func test_anEndpointGivenByName_isResolvedOffTheEventLoop_andServes() throws {
        // Listen where the name resolves first (127.0.0.1 or ::1, by this machine's hosts file).
        let first = try SocketAddress.makeAddressResolvingHost("localhost", port: 0).ipAddress ?? "127.0.0.1"
        let up = try TestUpstream(host: first) { r in TestUpstream.Reply(body: "via name \(r.uri)") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: 1, files: ["se.yaml": meshService("byname", ports: [up.port], address: "localhost", resolution: "DNS")], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        for i in 0..<3 {
            c.send("GET /\(i) HTTP/1.1\r\nHost: byname\r\n\r\n")
            let r = c.read()
            XCTAssertEqual(r?.body, "via name /\(i)", r.map { "\($0.status) \($0.body)" } ?? "no response")
        }
        XCTAssertEqual(up.connections, 1, "the resolved address is kept and the connection reused")
    }

    func test_aNameThatDoesNotResolve_gets503UF_namingTheHost() throws {
        let px = try ProxyFixture(appPort: 1, files: ["se.yaml": meshService("nowhere", ports: [80], address: "no-such-host.invalid", resolution: "DNS")], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound, timeoutSeconds: 30)
        c.send("GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
        let r = c.read()
        XCTAssertEqual(r?.status, 503)
        XCTAssertTrue(r?.body.contains("DNS resolution of no-such-host.invalid failed") == true, r?.body ?? "")
    }
}
