import XCTest
import NIOCore
import NIOConcurrencyHelpers
@testable import MoonletProxy
@testable import MoonletLua
import MoonletConfig

/// moonlet.http.call from Lua filter phases: the phase waits without blocking its
/// event loop (its coroutine is handed to the stream and resumed with the response).
final class HTTPCallTests: XCTestCase {
    var app: TestUpstream!
    var callee: TestUpstream!
    /// When each /slow call reached the callee.
    let slowArrivals = NIOLockedValueBox<[Date]>([])

    override func setUpWithError() throws {
        app = try TestUpstream()
        let arrivals = slowArrivals
        callee = try TestUpstream { r in
            if r.uri.hasPrefix("/slow") { arrivals.withLockedValue { $0.append(Date()) } }
            var reply = TestUpstream.Reply()
            reply.status = .created
            reply.headers = [("x-from", "callee")]
            reply.body = "pong:\(r.method):\(r.uri):\(r.body)"
            if r.uri.hasPrefix("/slow") { reply.delayMs = 500 }
            if r.uri.hasPrefix("/veryslow") { reply.delayMs = 1500 }
            return reply
        }
    }
    override func tearDown() { app?.stop(); callee?.stop() }

    /// A filter that calls `target` (path from the x-call-path request header) and
    /// writes what it got into request headers the app sees.
    func caller(_ target: String, timeoutMs: Int = 5000, version: String = "v1") -> String {
        """
        local f = {}
        function f.on_request(s, conf)
          local p = s.request.headers:get("x-call-path")
          if not p then return end
          local res, err = moonlet.http.call("\(target)", {
            method = s.request.headers:get("x-call-method") or "GET", path = p,
            headers = { ["x-a"] = "1", host = s.request.headers:get("x-call-host") }, body = s.request.headers:get("x-call-body"),
            timeout_ms = \(timeoutMs),
          })
          if not res then
            s.request.headers:set("x-err", err)
            return
          end
          s.request.headers:set("x-status", tostring(res.status))
          s.request.headers:set("x-callee", res.headers["x-from"] or "")
          s.request.headers:set("x-body", res.body)
          s.request.headers:set("x-version", "\(version)")
        end
        return f
        """
    }

    func proxy(_ lua: String, files extra: [String: String] = [:], concurrency: Int = 1) throws -> ProxyFixture {
        var files = extra
        files["caller.lua"] = lua
        files["caller.yaml"] = ProxyFixture.plugin("caller")
        return try ProxyFixture(appPort: app.port, files: files, concurrency: concurrency)
    }

    func test_httpCallToAURL_returnsStatusHeadersAndBody_andThePhaseGoesOn() throws {
        let px = try proxy(caller("http://127.0.0.1:\(callee.port)"))
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/", headers: "x-call-path: /check?q=1\r\nx-call-method: POST\r\nx-call-body: hi\r\n"))
        XCTAssertEqual(r.status, 200)
        let seen = try XCTUnwrap(app.seen.first)
        XCTAssertEqual(seen.headers["x-status"], ["201"])
        XCTAssertEqual(seen.headers["x-callee"], ["callee"])
        XCTAssertEqual(seen.headers["x-body"], ["pong:POST:/check?q=1:hi"])
        let call = try XCTUnwrap(callee.seen.first)
        XCTAssertEqual(call.headers["x-a"], ["1"])
        XCTAssertEqual(call.headers["host"], ["127.0.0.1:\(callee.port)"])
        // The same connection keeps working (a second request, a second call).
        XCTAssertEqual(get(c, "/", headers: "x-call-path: /again\r\n")?.status, 200)
        XCTAssertEqual(callee.seen.count, 2)
    }

    func test_httpCallToARegistryServiceAndItsClusterName_reachesTheServiceEndpoints() throws {
        let svc = meshService("authz.foo.svc.cluster.local", ports: [callee.port])
        for target in ["authz.foo.svc.cluster.local", "outbound|80||authz.foo.svc.cluster.local", "http://authz.foo.svc.cluster.local/ignored"] {
            let px = try proxy(caller(target), files: ["svc.yaml": svc])
            defer { px.stop() }
            let before = callee.seen.count
            let r = try XCTUnwrap(get(try RawClient(port: px.inbound), "/", headers: "x-call-path: /svc\r\n"))
            XCTAssertEqual(r.status, 200, target)
            XCTAssertEqual(app.seen.last?.headers["x-status"], ["201"], target)
            XCTAssertEqual(callee.seen.count, before + 1, target)
            XCTAssertEqual(callee.seen.last?.uri, "/svc", target)
        }
        XCTAssertEqual(callee.seen.first?.headers["host"], ["authz.foo.svc.cluster.local"])
    }

    func test_httpCallPastItsTimeout_returnsNilAndAnError() throws {
        let px = try proxy(caller("http://127.0.0.1:\(callee.port)", timeoutMs: 100))
        defer { px.stop() }
        let t0 = Date()
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound), "/", headers: "x-call-path: /slow\r\n"))
        XCTAssertEqual(r.status, 200)
        XCTAssertLessThan(Date().timeIntervalSince(t0), 0.45)
        XCTAssertEqual(app.seen.first?.headers["x-err"], ["timeout after 100 ms"])
        XCTAssertNil(app.seen.first?.headers.first(name: "x-status"))
    }

    func test_httpCallToAnUnknownServiceOrAClosedPort_returnsNilAndAnError() throws {
        let refusing = try RefusingPort()
        for (target, expected) in [("nowhere.svc.cluster.local", "unknown service host nowhere.svc.cluster.local"),
                                   ("http://127.0.0.1:\(refusing.port)", "connection to 127.0.0.1:\(refusing.port) failed")] {
            let px = try proxy(caller(target))
            defer { px.stop() }
            XCTAssertEqual(get(try RawClient(port: px.inbound), "/", headers: "x-call-path: /\r\n")?.status, 200)
            let err = app.seen.last?.headers.first(name: "x-err") ?? ""
            XCTAssertTrue(err.hasPrefix(expected), "\(target): \(err)")
        }
    }

    func test_httpCallToTheSidecarsOwnAdminPort_isRefused_soAPluginCannotReloadOrDumpIt() throws {
        let px = try proxy("""
        return { on_request = function(s)
          local res, err = moonlet.http.call(s.request.headers:get("x-target"), { method = "POST", path = "/plugins/reload", timeout_ms = 2000 })
          s.request.headers:set("x-err", err or ("status " .. res.status))
        end }
        """)
        defer { px.stop() }
        for host in ["127.0.0.1", "localhost", "127.0.0.2", "[::1]"] {
            XCTAssertEqual(get(try RawClient(port: px.inbound), "/", headers: "x-target: http://\(host):\(px.admin)/\r\n")?.status, 200)
            let err = app.seen.last?.headers.first(name: "x-err") ?? ""
            XCTAssertTrue(err.contains("own admin port (\(px.admin)) is not a target"), "\(host): \(err)")
        }
        // Other local ports stay reachable (the app here).
        XCTAssertEqual(get(try RawClient(port: px.inbound), "/", headers: "x-target: http://127.0.0.1:\(app.port)/\r\n")?.status, 200)
        XCTAssertEqual(app.seen.last?.headers.first(name: "x-err"), "status 200")
    }

    /// The calls wait together: each is held 0.5 s by the callee, and every one of them
    /// reaches it before the first answer goes out (a loop that waited on one call
    /// before sending the next could not); so the 20 finish in about one wait, not 10 s.
    func test_twentyWaitingCallsOnOneEventLoop_areAllInFlightAtOnce_andAPlainRequestIsNotDelayed() throws {
        let px = try proxy(caller("http://127.0.0.1:\(callee.port)"), concurrency: 1)
        defer { px.stop() }
        let statuses = NIOLockedValueBox<[Int]>([])
        let t0 = Date()
        let threads = (0..<20).map { _ in
            Thread {
                let status = (try? RawClient(port: px.inbound)).flatMap { get($0, "/", headers: "x-call-path: /slow\r\n") }?.status ?? 0
                statuses.withLockedValue { $0.append(status) }
            }
        }
        threads.forEach { $0.start() }
        usleep(150_000)
        let p0 = Date()
        XCTAssertEqual(get(try RawClient(port: px.inbound), "/plain")?.status, 200)
        let plain = Date().timeIntervalSince(p0)
        while statuses.withLockedValue({ $0.count }) < 20 && Date().timeIntervalSince(t0) < 10 { usleep(10_000) }
        let all = Date().timeIntervalSince(t0)
        XCTAssertEqual(statuses.withLockedValue { $0 }, [Int](repeating: 200, count: 20))
        let arrived = slowArrivals.withLockedValue { $0 }
        XCTAssertEqual(arrived.count, 20)
        let spread = (arrived.max() ?? t0).timeIntervalSince(arrived.min() ?? t0)
        XCTAssertLessThan(spread, 0.5, "the 20th call reached the callee \(spread) s after the first: a call waited for another")
        XCTAssertLessThan(all, 1.5, "20 calls of 0.5 s each on one loop took \(all) s (10 s one after another)")
        XCTAssertLessThan(plain, 0.3, "a plain request waited \(plain) s behind the calls")
        XCTAssertEqual(app.seen.filter { $0.headers["x-status"] == ["201"] }.count, 20)
    }

    func test_aClientThatLeavesWhileItsCallWaits_isCleanedUp_andTheCoroutineIsClosed() throws {
        let px = try proxy(caller("http://127.0.0.1:\(callee.port)"))
        defer { px.stop() }
        do {
            let c = try RawClient(port: px.inbound)
            c.send("GET / HTTP/1.1\r\nHost: app\r\nx-call-path: /veryslow\r\n\r\n")
            usleep(200_000)
        } // closed here, the call still waiting
        XCTAssertEqual(try px.liveHandlersOnceSettled(), 0)
        let ctx = px.server.contexts[0]
        // The waiting coroutine was closed (not pooled) and no stream is left.
        XCTAssertEqual(try ctx.loop.submit { ctx.activeStreams }.wait(), 0)
        usleep(1_500_000)
        XCTAssertEqual(app.seen.count, 0, "the request of a client gone went upstream")
        XCTAssertEqual(get(try RawClient(port: px.inbound), "/", headers: "x-call-path: /after\r\n")?.status, 200)
        XCTAssertEqual(app.seen.last?.headers["x-status"], ["201"])
    }

    func test_aReloadWhileACallWaits_letsThatStreamFinishWithItsPlugin_andTheNextGetsTheNewOne() throws {
        let px = try proxy(caller("http://127.0.0.1:\(callee.port)", version: "v1"))
        defer { px.stop() }
        let firstBox = NIOLockedValueBox<Int?>(nil)
        let t = Thread { let r = (try? RawClient(port: px.inbound)).flatMap { get($0, "/", headers: "x-call-path: /slow\r\n") }; firstBox.withLockedValue { $0 = r?.status ?? 0 } }
        t.start()
        usleep(150_000)
        try px.write("caller.lua", caller("http://127.0.0.1:\(callee.port)", version: "v2"))
        guard case .success = px.server.reload(reason: "test") else { return XCTFail("reload failed") }
        let second = try XCTUnwrap(get(try RawClient(port: px.inbound), "/", headers: "x-call-path: /fast\r\n"))
        XCTAssertEqual(second.status, 200)
        for _ in 0..<200 where firstBox.withLockedValue({ $0 }) == nil { usleep(10_000) }
        XCTAssertEqual(firstBox.withLockedValue { $0 }, 200)
        let versions = app.seen.map { ($0.headers.first(name: "x-body") ?? "", $0.headers.first(name: "x-version") ?? "") }
        XCTAssertTrue(versions.contains { $0.0.hasPrefix("pong:GET:/slow") && $0.1 == "v1" }, "\(versions)")
        XCTAssertTrue(versions.contains { $0.0.hasPrefix("pong:GET:/fast") && $0.1 == "v2" }, "\(versions)")
    }

    func test_aRequestBodyThatArrivesWhileTheCallWaits_isHeld_andReachesTheAppWhole() throws {
        let px = try proxy(caller("http://127.0.0.1:\(callee.port)"))
        defer { px.stop() }
        let body = String(repeating: "0123456789", count: 20_000)
        for framing in ["content-length: \(body.utf8.count)\r\n", "transfer-encoding: chunked\r\n"] {
            let c = try RawClient(port: px.inbound)
            let payload = framing.hasPrefix("transfer") ? String(body.utf8.count, radix: 16) + "\r\n" + body + "\r\n0\r\n\r\n" : body
            c.send("POST /up HTTP/1.1\r\nHost: app\r\nx-call-path: /slow\r\n\(framing)\r\n" + payload)
            let r = try XCTUnwrap(c.read())
            XCTAssertEqual(r.status, 200, framing)
            XCTAssertEqual(app.seen.last?.bodyBytes, body.utf8.count, framing)
            XCTAssertEqual(app.seen.last?.headers["x-status"], ["201"], framing)
        }
    }

    /// on_response waits on the upstream's head: the call named by x-resp-call-path.
    var responseCaller: String {
        """
        return { on_response = function(s)
          local p = s.request.headers:get("x-resp-call-path")
          if not p or s.response.status ~= 200 then return end
          local res, err = moonlet.http.call("http://127.0.0.1:\(callee.port)" .. p, { timeout_ms = 5000 })
          s.response.headers:set("x-call", res and tostring(res.status) or tostring(err))
        end }
        """
    }

    func test_anHTTP2StreamsResponse_waitsForACallInOnResponse_andGoesOnWhole() throws {
        let body = String(repeating: "h2", count: 40_000)
        app.stop()
        app = try TestUpstream { _ in var r = TestUpstream.Reply(); r.body = body; return r }
        let px = try proxy(responseCaller)
        defer { px.stop() }
        let out = try runTool("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-D", "-", "-H", "x-resp-call-path: /slow",
                                       "-w", " proto=%{http_version} status=%{http_code}", "http://127.0.0.1:\(px.inbound)/h2"])
        XCTAssertTrue(out.hasSuffix(body + " proto=2 status=200"), String(out.suffix(200)))
        XCTAssertTrue(out.lowercased().contains("x-call: 201"), String(out.prefix(400)))
    }

    func test_aClientThatLeavesWhileAResponseCallWaits_isCleanedUp_andTheNextStreamIsServed() throws {
        let px = try proxy(responseCaller)
        defer { px.stop() }
        do {
            let c = try RawClient(port: px.inbound)
            c.send("GET / HTTP/1.1\r\nHost: app\r\nx-resp-call-path: /veryslow\r\n\r\n")
            usleep(300_000)
        } // closed here, the call still waiting
        XCTAssertEqual(try px.liveHandlersOnceSettled(), 0)
        let ctx = px.server.contexts[0]
        XCTAssertEqual(try ctx.loop.submit { ctx.activeStreams }.wait(), 0)
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound), "/", headers: "x-resp-call-path: /again\r\n"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("x-call"), "201")
    }

    func test_anHTTP2StreamWithABody_waitsForItsCall_andGoesOnWhole() throws {
        let px = try proxy(caller("http://127.0.0.1:\(callee.port)"))
        defer { px.stop() }
        let out = try runTool("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-H", "x-call-path: /slow", "--data-binary", String(repeating: "b", count: 50_000),
                                       "-w", " proto=%{http_version} status=%{http_code}", "http://127.0.0.1:\(px.inbound)/h2"])
        XCTAssertTrue(out.hasSuffix("proto=2 status=200"), out)
        XCTAssertEqual(app.seen.last?.bodyBytes, 50_000)
        XCTAssertEqual(app.seen.last?.headers["x-status"], ["201"])
    }

    func test_aCallFromTheBufferedBodyPhase_seesTheWholeBody_andSendsIt() throws {
        let lua = """
        return {
          on_request = function(s) return moonlet.STOP_AND_BUFFER end,
          on_request_body = function(s, conf, body, eos)
            local res, err = moonlet.http.call("http://127.0.0.1:\(callee.port)/body", { method = "POST", body = body })
            s.request.headers:set("x-body", res and res.body or err)
          end,
        }
        """
        let px = try proxy(lua)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("POST /up HTTP/1.1\r\nHost: app\r\ncontent-length: 5\r\n\r\nhello")
        XCTAssertEqual(c.read()?.status, 200)
        XCTAssertEqual(app.seen.last?.headers["x-body"], ["pong:POST:/body:hello"])
        XCTAssertEqual(app.seen.last?.body, "hello")
    }

    func test_httpCallInALocalReplysResponsePhase_isAClearError() throws {
        let lua = """
        return {
          on_request = function(s) return s:respond(403, "no") end,
          on_response = function(s)
            local ok, err = pcall(moonlet.http.call, "http://127.0.0.1:1/")
            s.response.headers:set("x-err", tostring(err))
          end,
        }
        """
        let px = try proxy(lua)
        defer { px.stop() }
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound), "/"))
        XCTAssertEqual(r.status, 403)
        XCTAssertTrue(r.header("x-err")?.contains("not allowed in on_response of a local reply") ?? false, r.header("x-err") ?? "")
    }

    func test_httpCallInOnResponse_holdsTheUpstreamsResponseUntilItsAnswer_andTheBodyFollowsWhole() throws {
        let lua = """
        return {
          on_response = function(s)
            -- The reply made below goes through on_response too, where it cannot call.
            if s.response.status == 451 then return end
            local res, err = moonlet.http.call("http://127.0.0.1:\(callee.port)/slow", { timeout_ms = 3000 })
            s.response.headers:set("x-call", res and tostring(res.status) or tostring(err))
            if res and s.request.headers:get("x-deny") then return s:respond(451, "denied after the call") end
          end,
        }
        """
        // The app answers 256 KiB: what arrives while the call waits is held.
        let body = String(repeating: "0123456789abcdef", count: 16_384)
        app.stop()
        app = try TestUpstream { _ in var r = TestUpstream.Reply(); r.body = body; return r }
        let px = try proxy(lua)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/big"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("x-call"), "201")
        XCTAssertEqual(r.body.utf8.count, body.utf8.count)
        XCTAssertTrue(r.body == body)
        // The connection goes on, and a reply made after the call replaces the response.
        let denied = try XCTUnwrap(get(c, "/", headers: "x-deny: 1\r\n"))
        XCTAssertEqual(denied.status, 451)
        XCTAssertEqual(denied.body, "denied after the call")
        XCTAssertEqual(get(c, "/")?.header("x-call"), "201")
    }

    func test_aPhaseThatNeverCalls_usesTheSharedRunner_andNoCoroutineOfItsOwn() throws {
        let px = try proxy("return { on_request = function(s) s.request.headers:set('x-plain', '1') end }")
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for _ in 0..<5 { XCTAssertEqual(get(c, "/")?.status, 200) }
        let ctx = px.server.contexts[0]
        let (runner, pooled) = try ctx.loop.submit { (ctx.lua.vm.runner != nil, ctx.lua.vm.threadPool.count) }.wait()
        XCTAssertTrue(runner)
        XCTAssertLessThanOrEqual(pooled, 1)
    }
}

/// moonlet.http.call to a mesh service behind a STRICT sidecar: the call goes out with
/// mesh mTLS (auto mTLS, the workload certificate), as any upstream request does.
final class HTTPCallMTLSTests: XCTestCase {
    func test_httpCallToAMeshServiceBehindAStrictSidecar_usesMutualTLS_withTheCallersIdentity() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let serverApp = try TestUpstream(), clientApp = try TestUpstream()
        defer { serverApp.stop(); clientApp.stop() }
        let server = try ProxyFixture(appPort: serverApp.port, files: [
            "pa.yaml": peerAuthentication("ns", namespace: "production", mode: "STRICT"),
            "echo.lua": principalEcho, "echo.yaml": ProxyFixture.plugin("echo"),
        ], concurrency: 1) { s in
            s.certsDirectory = try? pki.issue("production", "orders")
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
        }
        defer { server.stop() }
        let clientCerts = try pki.issue("default", "frontend")
        let client = try ProxyFixture(appPort: clientApp.port, files: [
            "se.yaml": MTLSTests.ordersEntry(port: server.inbound, serviceAccount: "orders"),
            "caller.lua": """
            return { on_request = function(s)
              local res, err = moonlet.http.call("orders.production.svc.cluster.local", { path = "/check" })
              s.request.headers:set("x-result", res and (res.status .. " " .. (res.headers["x-peer"] or "")) or err)
            end }
            """,
            "caller.yaml": ProxyFixture.plugin("caller"),
        ], concurrency: 1) { s in
            s.certsDirectory = clientCerts
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend"])
        }
        defer { client.stop() }
        let r = try XCTUnwrap(get(try RawClient(port: client.inbound), "/"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(clientApp.seen.last?.headers["x-result"], ["200 cluster.local/ns/default/sa/frontend"])
        XCTAssertEqual(serverApp.seen.last?.uri, "/check")
    }
}
