import XCTest
import NIOCore
import NIOPosix
import NIOHTTP2
import NIOHPACK
import NIOConcurrencyHelpers
@testable import MoonletProxy
import MoonletConfig

/// A plaintext HTTP/2 app (h2c) scripted at the frame level (swift-nio-http2's
/// connection handler, no stream multiplexer): it sees each request's HEADERS, DATA and
/// trailers, grants flow-control window itself as the bytes come, and answers as its
/// `behaviour` says, so the tests can refuse streams, send GOAWAY mid-flight or send
/// large bodies.
final class ScriptedH2App: @unchecked Sendable {
    enum Behaviour {
        /// 200, body "METHOD PATH BYTES trailer=X" (X: the request's x-checksum trailer or
        /// "-"), then trailers `grpc-status: 0` and `x-got-checksum` when it had one.
        case echo
        /// The first stream of the app's life is reset with REFUSED_STREAM; then `echo`.
        case refuseFirst
        /// The first request waits for a second one; then GOAWAY with the first as the
        /// last stream taken, and the first is answered (the second never is); later
        /// connections `echo`.
        case goAwayOnSecond
        /// 200 with a body of `n` bytes (byte i is i % 251), content-length set.
        case big(Int)
        /// A 103 (Early Hints) HEADERS first, then as `echo`.
        case earlyHints
    }

    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var channel: Channel!
    let lock = NIOLock()
    let behaviour: Behaviour
    private var _connections = 0
    private var _streams = 0
    private var _refused = false
    private var _seen: [String] = []
    private var _resets = 0
    var port: Int { channel.localAddress!.port! }
    var connections: Int { lock.withLock { _connections } }
    /// Requests seen: "METHOD PATH BYTES trailer=X".
    var seen: [String] { lock.withLock { _seen } }
    /// RST_STREAM frames received from the proxy.
    var resets: Int { lock.withLock { _resets } }

    init(_ behaviour: Behaviour = .echo) throws {
        self.behaviour = behaviour
        channel = try ServerBootstrap(group: group)
            .childChannelInitializer { ch in
                let n = self.lock.withLock { self._connections += 1; return self._connections }
                return ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(RawFrameCounter(owner: self))
                    try ch.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .server, initialSettings: [
                        HTTP2Setting(parameter: .maxConcurrentStreams, value: 100),
                        HTTP2Setting(parameter: .initialWindowSize, value: 65_535),
                    ]))
                    try ch.pipeline.syncOperations.addHandler(Handler(owner: self, connection: n))
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    func stop() { try? channel.close().wait(); try? group.syncShutdownGracefully() }

    /// Counts the RST_STREAM frames on the wire (swift-nio-http2 drops one for a closed
    /// stream before a handler would see it), passing the bytes on unchanged.
    final class RawFrameCounter: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias InboundOut = ByteBuffer
        let owner: ScriptedH2App
        var pending = ByteBuffer()
        var prefaceLeft = 24
        init(owner: ScriptedH2App) { self.owner = owner }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = unwrapInboundIn(data)
            pending.writeBuffer(&b)
            if prefaceLeft > 0 {
                let n = min(prefaceLeft, pending.readableBytes)
                pending.moveReaderIndex(forwardBy: n)
                prefaceLeft -= n
            }
            while prefaceLeft == 0, pending.readableBytes >= 9,
                  let len = pending.getInteger(at: pending.readerIndex, as: UInt32.self).map({ Int($0 >> 8) }),
                  pending.readableBytes >= 9 + len {
                if pending.getInteger(at: pending.readerIndex + 3, as: UInt8.self) == 3 { owner.lock.withLock { owner._resets += 1 } }
                pending.moveReaderIndex(forwardBy: 9 + len)
            }
            pending.discardReadBytes()
            context.fireChannelRead(data)
        }
    }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTP2Frame
        typealias OutboundOut = HTTP2Frame
        struct Request { var headers: HPACKHeaders; var bytes = 0; var checksum: String? }
        let owner: ScriptedH2App
        let connection: Int
        var requests: [HTTP2StreamID: Request] = [:]
        var held: HTTP2StreamID?
        init(owner: ScriptedH2App, connection: Int) { self.owner = owner; self.connection = connection }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let frame = unwrapInboundIn(data)
            let id = frame.streamID
            switch frame.payload {
            case .headers(let h):
                if requests[id] == nil {
                    if case .refuseFirst = owner.behaviour, owner.lock.withLock({ () -> Bool in
                        defer { owner._refused = true }
                        return !owner._refused
                    }) {
                        context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .rstStream(.refusedStream))), promise: nil)
                        return
                    }
                    requests[id] = Request(headers: h.headers)
                    if case .goAwayOnSecond = owner.behaviour, connection == 1, let first = held {
                        // The second request: GOAWAY leaves it out; the first is answered.
                        context.write(wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: first, errorCode: .noError, opaqueData: nil))), promise: nil)
                        held = nil
                        answer(context, first)
                        return
                    }
                } else {
                    requests[id]?.checksum = h.headers.first(name: "x-checksum")
                }
                if h.endStream { ended(context, id) }
            case .data(let d):
                if case .byteBuffer(let b) = d.data, b.readableBytes > 0 {
                    requests[id]?.bytes += b.readableBytes
                    // The window comes back as the bytes arrive (connection and stream).
                    context.write(wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: b.readableBytes))), promise: nil)
                    if !d.endStream {
                        context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .windowUpdate(windowSizeIncrement: b.readableBytes))), promise: nil)
                    }
                    context.flush()
                }
                if d.endStream { ended(context, id) }
            default:
                break
            }
        }

        func ended(_ context: ChannelHandlerContext, _ id: HTTP2StreamID) {
            if case .goAwayOnSecond = owner.behaviour, connection == 1 {
                if held == nil && requests.count == 1 { held = id; return }
                return
            }
            answer(context, id)
        }

        func answer(_ context: ChannelHandlerContext, _ id: HTTP2StreamID) {
            guard let r = requests[id] else { return }
            let method = r.headers.first(name: ":method") ?? "", path = r.headers.first(name: ":path") ?? ""
            let line = "\(method) \(path) \(r.bytes) trailer=\(r.checksum ?? "-")"
            owner.lock.withLock { owner._seen.append(line) }
            if case .big(let n) = owner.behaviour {
                context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .headers(.init(headers: [":status": "200", "content-length": String(n)])))), promise: nil)
                var sent = 0
                while sent < n {
                    let k = min(16_384, n - sent)
                    var b = context.channel.allocator.buffer(capacity: k)
                    for i in sent..<(sent + k) { b.writeInteger(UInt8(i % 251)) }
                    sent += k
                    context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(b), endStream: sent == n)))), promise: nil)
                }
                context.flush()
                return
            }
            if case .earlyHints = owner.behaviour {
                context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .headers(.init(headers: [":status": "103", "link": "</style.css>; rel=preload"])))), promise: nil)
            }
            context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .headers(.init(headers: [":status": "200", "content-type": "text/plain"])))), promise: nil)
            context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(ByteBuffer(string: line)))))), promise: nil)
            var t: HPACKHeaders = ["grpc-status": "0"]
            if let c = r.checksum { t.add(name: "x-got-checksum", value: c) }
            context.writeAndFlush(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .headers(.init(headers: t, endStream: true)))), promise: nil)
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }
}

/// The upstream HTTP/2 client on Moonlet's own codec (UpstreamH2Connection): streams
/// refused or left out by GOAWAY are retried, flow control holds both ways (a large
/// response to a slow client, a large upload against a 64 KB window), trailers go both
/// ways (also after a content-length body), and one connection between two sidecars
/// carries 100 concurrent streams.
final class UpstreamH2ClientTests: XCTestCase {
    /// A sidecar whose outbound side reaches `app` at legacy.example.com:9000, a plaintext
    /// gRPC port (h2c, with Istio's default retry policy).
    func outbound(to app: ScriptedH2App) throws -> ProxyFixture {
        let entry = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: legacy, namespace: default}
        spec:
          hosts: [legacy.example.com]
          resolution: STATIC
          ports: [{number: 9000, name: grpc-legacy}]
          endpoints: [{address: 127.0.0.1, ports: {grpc-legacy: \(app.port)}}]
        """
        return try ProxyFixture(appPort: 1, files: ["se.yaml": entry], concurrency: 1)
    }

    func test_requestsWithoutBody_endOnTheirHEADERS_andTheStreamClosesWithoutRST_STREAM() throws {
        let app = try ScriptedH2App()
        defer { app.stop() }
        let px = try outbound(to: app)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        for i in 0..<3 {
            c.send("GET /get\(i) HTTP/1.1\r\nHost: legacy.example.com:9000\r\n\r\n")
            let r = try XCTUnwrap(c.read())
            XCTAssertEqual(r.status, 200, r.body)
            XCTAssertEqual(r.body, "GET /get\(i) 0 trailer=-")
        }
        // A reset would reach the app after the response: give it the time to arrive.
        Thread.sleep(forTimeInterval: 0.2)
        XCTAssertEqual(app.resets, 0, "a stream both sides ended needs no RST_STREAM (one more frame and wake-up per request)")
        XCTAssertEqual(app.connections, 1)
    }

    func test_anInterim103FromTheUpstream_isConsumed_andTheFinalResponseReachesTheClient() throws {
        let app = try ScriptedH2App(.earlyHints)
        defer { app.stop() }
        let px = try outbound(to: app)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        for i in 0..<2 {
            c.send("GET /hints\(i) HTTP/1.1\r\nHost: legacy.example.com:9000\r\n\r\n")
            let r = try XCTUnwrap(c.read())
            XCTAssertEqual(r.status, 200, r.body)
            XCTAssertEqual(r.body, "GET /hints\(i) 0 trailer=-")
            XCTAssertEqual(r.trailer("grpc-status"), "0")
        }
        XCTAssertEqual(app.connections, 1)
        XCTAssertEqual(app.resets, 0, "an interim response is no protocol error")
    }

    func test_aStreamRefusedWithREFUSED_STREAM_isRetried_onTheSameConnection() throws {
        let app = try ScriptedH2App(.refuseFirst)
        defer { app.stop() }
        let px = try outbound(to: app)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        c.send("GET /refused HTTP/1.1\r\nHost: legacy.example.com:9000\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200, r.body)
        XCTAssertEqual(r.body, "GET /refused 0 trailer=-")
        XCTAssertEqual(r.trailer("grpc-status"), "0")
        XCTAssertEqual(app.connections, 1, "REFUSED_STREAM ends the stream, not the connection")
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_upstream_retries_total 1"), stats)
    }

    func test_aStreamLeftOutByGOAWAY_isRetriedOnANewConnection_andTheOneTakenCompletes() throws {
        let app = try ScriptedH2App(.goAwayOnSecond)
        defer { app.stop() }
        let px = try outbound(to: app)
        defer { px.stop() }
        let first = try RawClient(port: px.outbound)
        first.send("GET /first HTTP/1.1\r\nHost: legacy.example.com:9000\r\n\r\n")
        // The first is held by the app until the second arrives on the same connection.
        Thread.sleep(forTimeInterval: 0.3)
        let second = try RawClient(port: px.outbound)
        second.send("GET /second HTTP/1.1\r\nHost: legacy.example.com:9000\r\n\r\n")
        let r1 = try XCTUnwrap(first.read())
        XCTAssertEqual(r1.body, "GET /first 0 trailer=-")
        let r2 = try XCTUnwrap(second.read())
        XCTAssertEqual(r2.status, 200, r2.body)
        XCTAssertEqual(r2.body, "GET /second 0 trailer=-")
        XCTAssertEqual(app.connections, 2, "no new stream after GOAWAY: the retry opened a connection")
        // New requests go to the new connection.
        let third = try RawClient(port: px.outbound)
        third.send("GET /third HTTP/1.1\r\nHost: legacy.example.com:9000\r\n\r\n")
        XCTAssertEqual(third.read()?.body, "GET /third 0 trailer=-")
        XCTAssertEqual(app.connections, 2)
    }

    func test_a3MBResponse_reachesASlowClientWhole_throughTheStreamWindow() throws {
        let n = 3 * 1024 * 1024
        let app = try ScriptedH2App(.big(n))
        defer { app.stop() }
        let px = try outbound(to: app)
        defer { px.stop() }
        let file = NSTemporaryDirectory() + "moonlet-h2big-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: file) }
        // 1 MB/s: the client's socket fills, the sidecar stops giving the upstream window back.
        let code = try runTool("curl", ["-s", "-o", file, "-w", "%{http_code} %{size_download}", "--limit-rate", "1M", "-m", "30",
                                        "-H", "Host: legacy.example.com:9000", "http://127.0.0.1:\(px.outbound)/big"])
        XCTAssertEqual(code, "200 \(n)")
        let got = try Data(contentsOf: URL(fileURLWithPath: file))
        XCTAssertEqual(got.count, n)
        XCTAssertTrue(got.enumerated().allSatisfy { $0.element == UInt8($0.offset % 251) }, "every byte in order")
    }

    func test_a1MBUpload_goesThroughA64KBWindow_withContentLengthAndChunked() throws {
        let app = try ScriptedH2App(.echo)
        defer { app.stop() }
        let px = try outbound(to: app)
        defer { px.stop() }
        let file = NSTemporaryDirectory() + "moonlet-h2up-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: file) }
        try Data(repeating: 0x61, count: 1024 * 1024).write(to: URL(fileURLWithPath: file))
        let url = "http://127.0.0.1:\(px.outbound)/upload"
        let sized = try runTool("curl", ["-s", "-m", "30", "-H", "Host: legacy.example.com:9000", "--data-binary", "@" + file, url])
        XCTAssertEqual(sized, "POST /upload 1048576 trailer=-")
        let chunked = try runTool("curl", ["-s", "-m", "30", "-H", "Host: legacy.example.com:9000", "-H", "Transfer-Encoding: chunked", "--data-binary", "@" + file, url])
        XCTAssertEqual(chunked, "POST /upload 1048576 trailer=-")
        XCTAssertEqual(app.connections, 1)
    }

    /// HTTP/2 allows trailers after a body of known length (RFC 9113 §8.1); they used to
    /// be lost at the next hop.
    func test_requestTrailers_afterAContentLengthBody_reachAnHTTP2Upstream_andResponseTrailersComeBack() throws {
        let app = try ScriptedH2App(.echo)
        defer { app.stop() }
        let px = try outbound(to: app)
        defer { px.stop() }
        let body = NSTemporaryDirectory() + "moonlet-h2tr-\(UUID().uuidString)"
        try "0123456789".write(toFile: body, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: body) }
        for lengthFlag in [[], ["--no-content-length"]] {
            let out = try runTool("nghttp", ["-v", "-t", "10", "-H", "te: trailers", "-H", ":authority: legacy.example.com:9000", "--trailer=x-checksum: sha-9", "-d", body]
                                    + lengthFlag + ["http://127.0.0.1:\(px.outbound)/orders.Orders/Put"])
            XCTAssertTrue(out.contains("POST /orders.Orders/Put 10 trailer=sha-9"), "\(lengthFlag): \(out)")
            XCTAssertEqual(TrailersTests.fieldsAfterData(out), ["grpc-status: 0", "x-got-checksum: sha-9"], out)
        }
    }

    func test_100ConcurrentGRPCCallsOnOneChannel_allSucceed_throughTwoSidecars() throws {
        try GRPCFixtures.requireGRPC()
        let m = try GRPCThroughSidecarsTests.Mesh()
        defer { m.stop() }
        // No call before: the 100 arrive while the first connection is being set up.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: GRPCFixtures.python)
        p.arguments = [GRPCFixtures.dir + "/client.py", "127.0.0.1:\(m.client.outbound)", GRPCThroughSidecarsTests.authority, "concurrent", "100"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertTrue(text.contains("\"ok\": true"), text)
        XCTAssertTrue(text.contains("\"calls\": 100"), text)
        // The server sidecar accepted one connection for all of them: the client sidecar's
        // h2 connection carried the 100 streams at once.
        let stats = try XCTUnwrap(adminGet(m.server.admin, "/stats/prometheus")).body
        let accepted = stats.split(separator: "\n").filter { $0.hasPrefix("moonlet_downstream_connections_total") }
        XCTAssertEqual(accepted.map { $0.split(separator: " ").last.map(String.init) ?? "" }, ["1"], stats)
    }
}
