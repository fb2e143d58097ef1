import XCTest
import NIOCore
import NIOHTTP1
import NIOPosix
@testable import MoonletProxy
import MoonletConfig
import MoonletCore
import MoonletHTTP

/// Response stop-and-buffer: `on_response` returns `moonlet.STOP_AND_BUFFER`, the proxy
/// holds the upstream's head, buffers its body and trailers, and calls
/// `on_response_body(s, conf, body, true)` once with the whole body, where the filter may
/// replace it (`s.response:set_body`), edit headers and trailers, or answer locally; the
/// head then goes out framed for the final body. Real sockets, real upstreams.
final class ResponseBufferTests: XCTestCase {
    /// Upper-cases the buffered body of every response below 400, and says what it saw.
    static let upcase = """
    local f = {}
    function f.on_response(s, conf)
      if s.request.headers:get("x-no-buffer") or s.response.status >= 400 then return end
      return moonlet.STOP_AND_BUFFER
    end
    function f.on_response_body(s, conf, chunk, eos)
      local b = s.response:body()
      if b == nil then return end
      s.response.headers:set("x-chunk-is-body", tostring(chunk == b and eos))
      s.response.headers:set("x-original-length", tostring(#b))
      if b:find("secret", 1, true) then return s:respond(403, "blocked\\n") end
      s.response:set_body(string.upper(b) .. "!")
      local t = s.response.trailers
      local gs = t:get("grpc-status")
      if gs then s.response.headers:set("x-grpc-status", gs); t:set("x-filter-trailer", "seen") end
    end
    return f
    """

    func proxy(appPort: Int, _ filters: [String: String] = ["upcase": upcase], extra: [String: String] = [:],
               tweak: (inout ProxySettings) -> Void = { _ in }) throws -> ProxyFixture {
        var files = extra
        for (name, lua) in filters {
            files[name + ".lua"] = lua
            files[name + ".yaml"] = ProxyFixture.plugin(name, files[name + ".spec"] ?? "")
            files[name + ".spec"] = nil
        }
        return try ProxyFixture(appPort: appPort, files: files, concurrency: 1, tweak: tweak)
    }

    func test_aFilterRewritesTheBufferedUpstreamBody_andTheClientGetsItWithItsContentLength() throws {
        let app = try TestUpstream { r in
            var reply = TestUpstream.Reply()
            reply.body = "hello from \(r.uri)"
            reply.chunked = r.uri == "/chunked"
            reply.gapMs = r.uri == "/chunked" ? 30 : 0
            return reply
        }
        defer { app.stop() }
        let px = try proxy(appPort: app.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for path in ["/fixed", "/chunked"] {
            let r = try XCTUnwrap(get(c, path))
            XCTAssertEqual(r.status, 200)
            XCTAssertEqual(r.body, "HELLO FROM \(path.uppercased())!")
            XCTAssertEqual(r.header("content-length"), String(r.body.utf8.count), path)
            XCTAssertNil(r.header("transfer-encoding"), "the length is known: no chunked framing (\(path))")
            XCTAssertEqual(r.header("x-chunk-is-body"), "true", "on_response_body gets the whole body once, eos true")
            XCTAssertEqual(r.header("x-original-length"), String("hello from \(path)".utf8.count))
        }
        // A stream whose filter did not ask streams as before, on the same connection.
        let plain = try XCTUnwrap(get(c, "/fixed", headers: "x-no-buffer: 1\r\n"))
        XCTAssertEqual(plain.body, "hello from /fixed")
        XCTAssertNil(plain.header("x-chunk-is-body"))
    }

    func test_aBufferedResponseOverMaxBufferedBodyBytes_isReplacedByEnvoys500_withDetailsResponsePayloadTooLarge() throws {
        let big = String(repeating: "x", count: 2 << 20)
        let app = try TestUpstream { _ in TestUpstream.Reply(body: big) }
        defer { app.stop() }
        let logPath = NSTemporaryDirectory() + "moonlet-rb-\(UUID().uuidString).log"
        let mesh = NSTemporaryDirectory() + "moonlet-mesh-\(UUID().uuidString).yaml"
        try "accessLogFile: \(logPath)\naccessLogFormat: \"%RESPONSE_CODE% %RESPONSE_CODE_DETAILS%\\n\"\n".write(toFile: mesh, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: logPath); try? FileManager.default.removeItem(atPath: mesh) }
        let px = try proxy(appPort: app.port) { $0.meshConfigPath = mesh }
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/big"))
        XCTAssertEqual(r.status, 500)
        XCTAssertEqual(r.body, "Internal Server Error")
        // The client's connection goes on.
        let small = try XCTUnwrap(get(c, "/big", headers: "x-no-buffer: 1\r\n"))
        XCTAssertEqual(small.body.utf8.count, 2 << 20)
        var logged = ""
        for _ in 0..<60 {
            logged = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            if logged.contains("\n") { break }
            usleep(50_000)
        }
        XCTAssertTrue(logged.hasPrefix("500 response_payload_too_large\n"), logged)
    }

    func test_chunkedUpstreamWithTrailers_theFilterReadsAndEditsThem_andAnHTTP1ClientGetsThemChunked() throws {
        let up = try ScriptedUpstream(response: TrailersTests.trailedResponse)
        defer { up.stop() }
        let px = try proxy(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/grpc"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.body, "HELLO!")
        XCTAssertEqual(r.header("x-grpc-status"), "7", "the trailers are in when the whole body is handed over")
        XCTAssertEqual(r.header("transfer-encoding"), "chunked", "trailers to an HTTP/1.1 client need a chunked body")
        XCTAssertNil(r.header("content-length"))
        XCTAssertEqual(r.trailer("grpc-status"), "7")
        XCTAssertEqual(r.trailer("x-filter-trailer"), "seen")
        XCTAssertEqual(get(c, "/again")?.trailer("grpc-message"), "denied by app")
    }

    func test_anHTTP2Client_getsTheRewrittenBodyWithItsContentLength_andTheTrailers() throws {
        let up = try ScriptedUpstream(response: TrailersTests.trailedResponse)
        defer { up.stop() }
        let px = try proxy(appPort: up.port)
        defer { px.stop() }
        let out = try runTool("nghttp", ["-v", "-t", "10", "http://127.0.0.1:\(px.inbound)/grpc.Svc/Call"])
        XCTAssertTrue(out.contains("HELLO!"), out)
        XCTAssertTrue(out.contains("content-length: 6"), out)
        XCTAssertTrue(out.contains("x-grpc-status: 7"), out)
        XCTAssertEqual(TrailersTests.fieldsAfterData(out).filter { $0.hasPrefix("grpc-status") || $0.hasPrefix("x-filter-trailer") },
                       ["grpc-status: 7", "x-filter-trailer: seen"], out)
    }

    func test_onResponseBodyMayAnswerLocally_replacingTheBufferedResponse() throws {
        let app = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-app", "1")], body: "the secret plan") }
        defer { app.stop() }
        let px = try proxy(appPort: app.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/"))
        XCTAssertEqual(r.status, 403)
        XCTAssertEqual(r.body, "blocked\n")
        XCTAssertNil(r.header("x-app"), "the upstream's response is dropped")
        XCTAssertEqual(get(c, "/")?.status, 403, "the connection stays usable")
    }

    func test_otherFiltersOfTheChain_seeTheHeldHead_andTheBodyAsTheFiltersBeforeThemLeftIt() throws {
        let app = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-app", "1")], body: "abc") }
        defer { app.stop() }
        // outer runs first on the request, so last on the response: it sees upcase's body.
        let outer = """
        local f = {}
        function f.on_response(s, conf) s.response.headers:set("x-outer-saw-app", s.response.headers:get("x-app") or "none") end
        function f.on_response_body(s, conf, chunk, eos)
          if eos and s.response:body() then s.response.headers:set("x-outer-saw-body", s.response:body()) end
        end
        return f
        """
        let px = try proxy(appPort: app.port, ["upcase": Self.upcase, "outer": outer], extra: ["outer.spec": "  priority: 10"])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/"))
        XCTAssertEqual(r.body, "ABC!")
        XCTAssertEqual(r.header("x-outer-saw-app"), "1")
        XCTAssertEqual(r.header("x-outer-saw-body"), "ABC!")
    }

    func test_headRequests_204_andATrailersOnlyGRPCResponse_keepTheirFraming() throws {
        let up = try ScriptedUpstream(response: "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 14\r\ngrpc-message: unavailable\r\ncontent-length: 0\r\n\r\n")
        defer { up.stop() }
        let px = try proxy(appPort: up.port)
        defer { px.stop() }
        let g = try RawClient(port: px.inbound)
        g.send("POST /pkg.Svc/Get HTTP/1.1\r\nHost: app\r\ncontent-type: application/grpc\r\ncontent-length: 0\r\n\r\n")
        let trailersOnly = try XCTUnwrap(g.read())
        XCTAssertEqual(trailersOnly.status, 200)
        XCTAssertEqual(trailersOnly.header("grpc-status"), "14")
        XCTAssertEqual(trailersOnly.body, "!", "the filter's body replaces the empty one")

        let app = try TestUpstream { r in
            r.uri == "/empty" ? TestUpstream.Reply(status: .noContent, body: "") : TestUpstream.Reply(headers: [("content-length", "5")], body: "hello")
        }
        defer { app.stop() }
        let px2 = try proxy(appPort: app.port)
        defer { px2.stop() }
        let c = try RawClient(port: px2.inbound)
        c.send("HEAD /x HTTP/1.1\r\nHost: app\r\n\r\n")
        let head = try XCTUnwrap(c.read(head: true))
        XCTAssertEqual(head.status, 200)
        XCTAssertEqual(head.header("content-length"), "5", "a HEAD response keeps the length of the GET body")
        let empty = try XCTUnwrap(get(c, "/empty"))
        XCTAssertEqual(empty.status, 204)
        XCTAssertNil(empty.header("content-length"))
        XCTAssertEqual(get(c, "/x")?.body, "HELLO!", "the connection is in step after HEAD and 204")
    }

    /// An upstream that answers every request with `bytes` and closes the connection.
    final class ClosingUpstream: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let bytes: String
        init(_ bytes: String) { self.bytes = bytes }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard String(buffer: unwrapInboundIn(data)).contains("\r\n\r\n") else { return }
            context.writeAndFlush(NIOAny(ByteBuffer(string: bytes))).whenComplete { _ in context.close(promise: nil) }
        }
    }

    func test_anUpstreamThatFailsWhileTheBodyIsBuffered_resetsTheClient_withNothingOfTheResponseSent() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let server = try ServerBootstrap(group: group)
            .childChannelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(ClosingUpstream("HTTP/1.1 200 OK\r\ncontent-length: 100\r\nx-app: 1\r\n\r\npartial")) } }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? server.close().wait() }
        let px = try proxy(appPort: server.localAddress!.port!)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        while c.fill() {}
        XCTAssertTrue(c.pending.isEmpty, "the head was held: nothing went out before the reset: \(String(decoding: c.pending, as: UTF8.self))")
        XCTAssertTrue(c.isClosed())
        // Without buffering the same upstream's head goes out before the failure.
        let d = try RawClient(port: px.inbound)
        d.send("GET / HTTP/1.1\r\nHost: app\r\nx-no-buffer: 1\r\n\r\n")
        while d.fill() {}
        XCTAssertTrue(String(decoding: d.pending, as: UTF8.self).hasPrefix("HTTP/1.1 200"), String(decoding: d.pending, as: UTF8.self))
    }

    // MARK: the Swift filter API

    /// A native filter: asks for the whole response body and wraps it.
    final class Wrapper: Filter {
        let name = "wrapper"
        var wantsResponseBody: Bool { true }
        var bodies: [String] = []
        func onResponse(_ stream: ProxyStream) -> FilterAction { .stopAndBuffer }
        func onResponseBody(_ stream: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction {
            bodies.append(String(buffer: chunk))
            guard endOfStream, let b = stream.bufferedResponseBody else { return .continue }
            stream.bufferedResponseBody = ByteBuffer(string: "<" + String(buffer: b) + ">")
            return .continue
        }
    }

    func test_aNativeFilter_asksForTheWholeResponseBody_andTheChainHandsItOverOnce() throws {
        var parser = HTTPHeadParser()
        guard case .complete(let head, _) = parser.parseRequest(ByteBuffer(string: "GET / HTTP/1.1\r\nhost: a\r\n\r\n")) else { return XCTFail("parse") }
        let w = Wrapper()
        let chain = FilterChain([w])
        let s = ProxyStream(id: 1, request: head, source: PeerInfo(address: "127.0.0.1:1"), filterCount: 1, startNanos: 0)
        XCTAssertEqual(chain.runResponse(s), .stopAndBuffer)
        s.bufferedResponseBody = ByteBuffer(string: "abc")
        XCTAssertEqual(chain.runBufferedResponseBody(s), .continue)
        XCTAssertEqual(w.bodies, ["abc"])
        XCTAssertEqual(s.bufferedResponseBody.map { String(buffer: $0) }, "<abc>")
        // A local reply's body goes to it the same way; the content-length follows.
        w.bodies = []
        s.bufferedResponseBody = nil
        s.respond(404, body: "nope")
        let (reply, body) = LocalReplyBuilder.build(s, chain: chain, limits: ProxyLimits(), requestWasHead: false,
                                                    allocator: ByteBufferAllocator()) { _ in }
        XCTAssertEqual(w.bodies, ["nope"])
        XCTAssertEqual(body.map { String(buffer: $0) }, "<nope>")
        XCTAssertEqual(reply.status, 404)
        XCTAssertEqual(reply.all("content-length"), ["6"])
        XCTAssertEqual(s.responseBodyBytes, 6)
    }

    // MARK: Envoy scripts (written from Envoy's lua_filter documentation)

    func test_envoyScript_rewritesTheResponseBodyWithSetBytes_andTheContentLengthFollows() throws {
        let app = try TestUpstream { _ in TestUpstream.Reply(headers: [("content-type", "text/plain")], body: "original body") }
        defer { app.stop() }
        let script = """
        function envoy_on_response(response_handle)
          local body = response_handle:body()
          local size = body:length()
          response_handle:headers():add("response-body-size", tostring(size))
          local first = body:getBytes(0, 8)
          local n = 0
          for chunk in response_handle:bodyChunks() do n = n + chunk:length() end
          response_handle:headers():add("x-chunks-length", tostring(n))
          response_handle:body():setBytes("<html><b>" .. first .. "</b></html>")
          response_handle:headers():replace("content-type", "text/html")
        end
        """
        let px = try proxy(appPort: app.port, ["envoy": script])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.body, "<html><b>original</b></html>")
        XCTAssertEqual(r.header("content-length"), String(r.body.utf8.count))
        XCTAssertEqual(r.header("response-body-size"), "13")
        XCTAssertEqual(r.header("x-chunks-length"), "13")
        XCTAssertEqual(r.header("content-type"), "text/html")
    }

    func test_envoyScript_readsAndEditsResponseTrailers_fromAnUpstreamThatSendsChunkedTrailers() throws {
        let up = try ScriptedUpstream(response: TrailersTests.trailedResponse)
        defer { up.stop() }
        let script = """
        function envoy_on_response(response_handle)
          local trailers = response_handle:trailers()
          if trailers == nil then
            response_handle:headers():add("x-trailers", "none")
            return
          end
          response_handle:headers():add("x-grpc-status", trailers:get("grpc-status"))
          local names = {}
          for k, v in pairs(trailers) do names[#names + 1] = k end
          response_handle:headers():add("x-trailer-names", table.concat(names, ","))
          trailers:replace("grpc-message", "rewritten")
          trailers:add("x-envoy-script", "1")
          trailers:remove("x-absent")
        end
        """
        let px = try proxy(appPort: up.port, ["envoy": script])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.body, "hello")
        XCTAssertEqual(r.header("x-grpc-status"), "7")
        XCTAssertEqual(r.header("x-trailer-names"), "grpc-status,grpc-message")
        XCTAssertEqual(r.trailer("grpc-message"), "rewritten")
        XCTAssertEqual(r.trailer("x-envoy-script"), "1")
        let out = try runTool("nghttp", ["-v", "-t", "10", "http://127.0.0.1:\(px.inbound)/h2"])
        XCTAssertTrue(out.contains("x-grpc-status: 7"), out)
        XCTAssertTrue(TrailersTests.fieldsAfterData(out).contains("grpc-message: rewritten"), out)
    }
}

extension MTLSTests {
    /// Envoy's lua_filter example of reading a gRPC status: the client sidecar's script reads
    /// the grpc-status trailer of a response that crossed two sidecars over mTLS HTTP/2.
    func test_envoyScriptOnTheClientSidecar_readsTheGrpcStatusTrailer_throughTwoSidecars() throws {
        let up = try ScriptedUpstream(response: TrailersTests.trailedResponse)
        defer { up.stop() }
        let script = """
        function envoy_on_response(response_handle)
          local trailers = response_handle:trailers()
          local status = trailers and trailers:get("grpc-status") or "none"
          response_handle:headers():add("x-grpc-status", status)
          response_handle:logInfo("grpc-status " .. status)
        end
        """
        let (client, server) = try twoSidecars(clientFiles: {
            ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "orders", portName: "grpc"),
             "envoy.lua": script, "envoy.yaml": ProxyFixture.plugin("envoy")]
        }, appPort: up.port)
        defer { client.stop(); server.stop() }
        let out = try runTool("nghttp", ["-v", "-t", "10", "-H", ":authority: orders.production.svc.cluster.local",
                                         "http://127.0.0.1:\(client.outbound)/grpc.Svc/Call"])
        XCTAssertTrue(out.contains("x-grpc-status: 7"), out)
        XCTAssertEqual(TrailersTests.fieldsAfterData(out), ["grpc-status: 7", "grpc-message: denied by app"], out)
        let stats = try XCTUnwrap(adminGet(client.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_upstream_cx_http2_total 1\n"), "the sidecars spoke HTTP/2:\n\(stats)")
    }
}

extension ResponseBufferTests {
    /// A response filter that waits in moonlet.http.call (the head phase pauses) and then
    /// asks for the whole body: the held chunks and the rest are buffered, and the body
    /// phase gets them once.
    func test_aResponseFilterThatWaitsForACall_thenAsksForTheWholeBody_getsItOnce() throws {
        let callee = try TestUpstream { _ in TestUpstream.Reply(body: "verdict-ok") }
        defer { callee.stop() }
        let app = try TestUpstream { _ in
            var reply = TestUpstream.Reply(body: String(repeating: "ab", count: 40_000))
            reply.chunked = true
            return reply
        }
        defer { app.stop() }
        let lua = """
        local f = {}
        function f.on_response(s, conf)
          local res = moonlet.http.call("http://127.0.0.1:\(callee.port)/check", {timeout_ms = 2000})
          s.vars.verdict = res and res.body or "none"
          return moonlet.STOP_AND_BUFFER
        end
        function f.on_response_body(s, conf, chunk, eos)
          local b = s.response:body()
          if b == nil then return end
          s.response:set_body(s.vars.verdict .. ":" .. #b)
        end
        return f
        """
        let px = try proxy(appPort: app.port, ["waitbuf": lua])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for _ in 0..<2 {
            let r = try XCTUnwrap(get(c, "/x"))
            XCTAssertEqual(r.status, 200)
            XCTAssertTrue(r.body == "verdict-ok:80000", "got \(r.body.utf8.count) bytes: \(r.body.prefix(40))")
            XCTAssertEqual(r.header("content-length"), String(r.body.utf8.count))
        }
    }
}

extension ResponseBufferTests {
    /// An empty buffered body to an HTTP/1.1 client still carries `content-length: 0`
    /// (no framing would read as "until close"), and the body phase may set the status.
    func test_anEmptyBufferedBody_goesOutWithContentLengthZero_andTheBodyPhaseMaySetTheStatus() throws {
        let app = try TestUpstream { _ in TestUpstream.Reply(body: "") }
        defer { app.stop() }
        let lua = """
        local f = {}
        function f.on_response(s, conf) return moonlet.STOP_AND_BUFFER end
        function f.on_response_body(s, conf, chunk, eos)
          if s.response:body() == nil then return end
          s.response.status = 202
        end
        return f
        """
        let px = try proxy(appPort: app.port, ["empty": lua])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for _ in 0..<2 {
            let r = try XCTUnwrap(get(c, "/e"), "the keep-alive connection answers again")
            XCTAssertEqual(r.status, 202)
            XCTAssertEqual(r.header("content-length"), "0")
            XCTAssertEqual(r.body, "")
        }
    }
}
