import XCTest
import NIOCore
import NIOPosix
import NIOHTTP1
import NIOHTTP2
import NIOConcurrencyHelpers
@testable import MoonletProxy
import MoonletConfig

/// An app that speaks only HTTP/2 in plaintext (h2c prior knowledge, swift-nio-http2's
/// server), as a gRPC server does: each request is answered with "METHOD PATH BYTES" and
/// the trailers `grpc-status: 0` and, when the request had an `x-checksum` trailer,
/// `x-got-checksum` with its value.
final class H2CApp: @unchecked Sendable {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var channel: Channel!
    let lock = NIOLock()
    private var _seen: [String] = []
    private var _connections = 0
    var port: Int { channel.localAddress!.port! }
    /// "METHOD PATH te=TE scheme=SCHEME" of each request.
    var seen: [String] { lock.withLock { _seen } }
    var connections: Int { lock.withLock { _connections } }

    init() throws {
        channel = try ServerBootstrap(group: group)
            .childChannelInitializer { ch in
                self.lock.withLock { self._connections += 1 }
                return ch.eventLoop.makeCompletedFuture {
                    _ = try ch.pipeline.syncOperations.configureHTTP2Pipeline(
                        mode: .server, connectionConfiguration: .init(), streamConfiguration: .init()
                    ) { stream in
                        stream.eventLoop.makeCompletedFuture {
                            try stream.pipeline.syncOperations.addHandler(HTTP2FramePayloadToHTTP1ServerCodec())
                            try stream.pipeline.syncOperations.addHandler(Handler(owner: self))
                        }
                    }
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    func stop() { try? channel.close().wait(); try? group.syncShutdownGracefully() }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let owner: H2CApp
        var head: HTTPRequestHead?
        var bytes = 0
        init(owner: H2CApp) { self.owner = owner }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h
            case .body(let b): bytes += b.readableBytes
            case .end(let trailers):
                guard let h = head else { return }
                owner.lock.withLock { owner._seen.append("\(h.method) \(h.uri) te=\(h.headers["te"].first ?? "-")") }
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http2, status: .ok, headers: ["content-type": "application/grpc"]))), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: "\(h.method) \(h.uri) \(bytes)")))), promise: nil)
                var t: HTTPHeaders = ["grpc-status": "0"]
                if let c = trailers?["x-checksum"].first { t.add(name: "x-got-checksum", value: c) }
                context.writeAndFlush(wrapOutboundOut(.end(t)), promise: nil)
            }
        }
    }
}

/// h2c toward the app (inbound, when the workload's port is declared HTTP2/GRPC) and
/// toward plaintext HTTP2/GRPC ports (outbound without mTLS), as Istio does.
final class H2CTests: XCTestCase {
    /// A ServiceEntry selecting workload app=orders, with its port `name`/`protocol` on the app's port.
    static func ordersWorkloadEntry(appPort: Int, portName: String, protocolName: String? = nil) -> String {
        """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: orders, namespace: production}
        spec:
          hosts: [orders.production.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 50051, name: \(portName)\(protocolName.map { ", protocol: \($0)" } ?? ""), targetPort: \(appPort)}]
          workloadSelector: {labels: {app: orders}}
        """
    }

    func ordersSidecar(app: Int, entry: String) throws -> ProxyFixture {
        try ProxyFixture(appPort: app, files: ["se.yaml": entry], concurrency: 1) { s in
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
        }
    }

    func test_inbound_toAnAppPortDeclaredGRPC_speaksH2C_andCarriesTrailersBothWays() throws {
        let app = try H2CApp()
        defer { app.stop() }
        let px = try ordersSidecar(app: app.port, entry: Self.ordersWorkloadEntry(appPort: app.port, portName: "grpc-orders"))
        defer { px.stop() }
        // An HTTP/1.1 client: the app's trailers come back as a chunked trailer section.
        let c = try RawClient(port: px.inbound)
        for i in 0..<3 {
            c.send("POST /orders.Orders/Get\(i) HTTP/1.1\r\nHost: orders\r\nTE: trailers\r\nContent-Length: 4\r\n\r\nabcd")
            let r = try XCTUnwrap(c.read())
            XCTAssertEqual(r.status, 200, r.body)
            XCTAssertEqual(r.body, "POST /orders.Orders/Get\(i) 4")
            XCTAssertEqual(r.trailer("grpc-status"), "0")
        }
        // An HTTP/2 client's request trailers reach the app.
        let body = NSTemporaryDirectory() + "moonlet-h2c-\(UUID().uuidString)"
        try "0123456789".write(toFile: body, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: body) }
        let out = try runTool("nghttp", ["-v", "-t", "10", "-H", "te: trailers", "--no-content-length", "--trailer=x-checksum: sha-9", "-d", body, "http://127.0.0.1:\(px.inbound)/orders.Orders/Put"])
        XCTAssertTrue(out.contains("POST /orders.Orders/Put 10"), out)
        XCTAssertEqual(TrailersTests.fieldsAfterData(out), ["grpc-status: 0", "x-got-checksum: sha-9"], out)
        XCTAssertEqual(app.seen.first, "POST /orders.Orders/Get0 te=trailers", "TE: trailers reaches the app (gRPC servers require it)")
        XCTAssertEqual(app.connections, 1, "the h2c connection to the app carries every request")
    }

    func test_inbound_toAnAppPortNotDeclaredHTTP2_staysHTTP1() throws {
        let up = try TestUpstream()
        defer { up.stop() }
        let px = try ordersSidecar(app: up.port, entry: Self.ordersWorkloadEntry(appPort: up.port, portName: "http-web"))
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c, "/x")?.body, "hello")
        // protocol: GRPC declares it whatever the name.
        let app = try H2CApp()
        defer { app.stop() }
        let px2 = try ordersSidecar(app: app.port, entry: Self.ordersWorkloadEntry(appPort: app.port, portName: "web", protocolName: "GRPC"))
        defer { px2.stop() }
        XCTAssertEqual(get(try RawClient(port: px2.inbound), "/y")?.body, "GET /y 0")
    }

    /// A Kubernetes Service selecting the workload declares its app port's protocol as
    /// Istio reads it: `appProtocol: grpc` is h2c; a `grpc-web` port name is gRPC-Web,
    /// which is HTTP/1.1.
    func test_inbound_aKubernetesServiceDeclaresTheAppPort_appProtocolGRPCIsH2C_aGRPCWebNameIsHTTP1() throws {
        func service(_ port: String, target: Int) -> String {
            "apiVersion: v1\nkind: Service\nmetadata: {name: orders, namespace: production}\nspec:\n  selector: {app: orders}\n  ports: [\(port)]\n"
                .replacingOccurrences(of: "TARGET", with: String(target))
        }
        let app = try H2CApp()
        defer { app.stop() }
        let px = try ordersSidecar(app: app.port, entry: service("{name: api, port: 50051, targetPort: TARGET, appProtocol: grpc}", target: app.port))
        defer { px.stop() }
        XCTAssertEqual(get(try RawClient(port: px.inbound), "/orders.Orders/Get")?.body, "GET /orders.Orders/Get 0", "the h2c app answered")
        XCTAssertEqual(app.connections, 1)
        let up = try TestUpstream()
        defer { up.stop() }
        let px2 = try ordersSidecar(app: up.port, entry: service("{name: grpc-web, port: 8080, targetPort: TARGET}", target: up.port))
        defer { px2.stop() }
        XCTAssertEqual(get(try RawClient(port: px2.inbound), "/x")?.body, "hello", "HTTP/1.1 to a gRPC-Web port")
    }

    /// gRPC's trailers-only answer (one HEADERS frame with END_STREAM and grpc-status):
    /// the client gets one header-only block, without a `content-length: 0` of the
    /// proxy's among its metadata.
    func test_aHeaderOnlyResponse_toAnHTTP2Client_isOneHeadersFrame_withoutContentLengthZero() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(headers: [("grpc-status", "7"), ("grpc-message", "denied")], body: "") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let out = try runTool("nghttp", ["-v", "-t", "10", "http://127.0.0.1:\(px.inbound)/t.Svc/Fail"])
        XCTAssertTrue(out.contains("grpc-status: 7"), out)
        XCTAssertFalse(out.contains("content-length: 0"), out)
        XCTAssertTrue(out.range(of: "recv HEADERS frame <length=[0-9]+, flags=0x05", options: .regularExpression) != nil, "one HEADERS frame ends the stream: \(out)")
        XCTAssertFalse(out.contains("recv DATA frame"), out)
    }

    /// A response with a body: its HEADERS frame (written as the head arrives) does not
    /// end the stream; the one DATA frame does. Last-Modified, ETag and Accept-Ranges
    /// arrive under their static-table names, lowercase.
    func test_aResponseWithABody_toAnHTTP2Client_isHeadersThenOneDataFrameEndingTheStream() throws {
        let up = try TestUpstream { _ in
            TestUpstream.Reply(headers: [("Last-Modified", "Sun, 06 Dec 2026 10:00:00 GMT"), ("ETag", "\"5-a\""), ("Accept-Ranges", "bytes")], body: "hello")
        }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let out = try runTool("nghttp", ["-v", "-t", "10", "http://127.0.0.1:\(px.inbound)/x"])
        XCTAssertTrue(out.range(of: "recv HEADERS frame <length=[0-9]+, flags=0x04", options: .regularExpression) != nil, "HEADERS without END_STREAM: \(out)")
        XCTAssertTrue(out.range(of: "recv DATA frame <length=5, flags=0x01", options: .regularExpression) != nil, "one DATA frame ends the stream: \(out)")
        XCTAssertTrue(out.contains("last-modified: Sun, 06 Dec 2026 10:00:00 GMT"), out)
        XCTAssertTrue(out.contains("etag: \"5-a\""), out)
        XCTAssertTrue(out.contains("accept-ranges: bytes"), out)
    }

    /// A chunked response whose body turns out empty: its HEADERS frame, written before
    /// the end was known and still unsent, takes END_STREAM; no DATA frame follows.
    func test_anEmptyChunkedResponse_toAnHTTP2Client_endsTheStreamOnItsHeadersFrame() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-kind", "empty")], body: "", chunked: true) }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let out = try runTool("nghttp", ["-v", "-t", "10", "http://127.0.0.1:\(px.inbound)/x"])
        XCTAssertTrue(out.contains("x-kind: empty"), out)
        XCTAssertTrue(out.range(of: "recv HEADERS frame <length=[0-9]+, flags=0x05", options: .regularExpression) != nil, "one HEADERS frame ends the stream: \(out)")
        XCTAssertFalse(out.contains("recv DATA frame"), out)
    }

    func test_outbound_toAPlaintextGRPCPort_speaksH2C() throws {
        let app = try H2CApp()
        defer { app.stop() }
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
        let px = try ProxyFixture(appPort: 1, files: ["se.yaml": entry])
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        c.send("GET /legacy.Svc/Call HTTP/1.1\r\nHost: legacy.example.com:9000\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.body, "GET /legacy.Svc/Call 0")
        XCTAssertEqual(r.trailer("grpc-status"), "0")
    }
}
