import XCTest
import NIOCore
import NIOPosix
import NIOSSL
import NIOConcurrencyHelpers
@testable import MoonletProxy
import MoonletConfig
import MoonletTLS

/// VirtualService `tcp` and `tls` routes through the TCP proxy, with real sockets: the
/// original destination is given by the test where iptables would have kept it.
final class L4RouteProxyTests: XCTestCase {
    static let vip = "240.0.0.30"

    /// A sidecar whose outbound connections appear sent to `original` (changeable).
    func sidecar(_ files: [String: String], original: NIOLockedValueBox<SocketAddress>) throws -> ProxyFixture {
        try ProxyFixture(appPort: 1, files: files, concurrency: 1) { s in
            s.originalDestinationOverride = { role, _ in role == .outbound ? original.withLockedValue { $0 } : nil }
        }
    }

    func testAWeightedTCPRouteSplitsConnectionsOverItsSubsets_andAPortMatchSendsOnePortToOneSubset() throws {
        let v1 = try TCPTestServer(.echo), v2 = try TCPTestServer(.echo)
        defer { v1.stop(); v2.stop() }
        let config = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: db}
        spec:
          hosts: [db.example.internal]
          addresses: [\(Self.vip)]
          resolution: STATIC
          ports: [{number: 9000, name: tcp}, {number: 9001, name: tcp-admin}]
          endpoints:
          - {address: 127.0.0.1, ports: {tcp: \(v1.port), tcp-admin: \(v1.port)}, labels: {version: v1}}
          - {address: 127.0.0.1, ports: {tcp: \(v2.port), tcp-admin: \(v2.port)}, labels: {version: v2}}
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: db}
        spec:
          host: db.example.internal
          subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: db}
        spec:
          hosts: [db.example.internal]
          tcp:
          - match: [{port: 9001}]
            route: [{destination: {host: db.example.internal, subset: v2}}]
          - route:
            - {destination: {host: db.example.internal, subset: v1}, weight: 30}
            - {destination: {host: db.example.internal, subset: v2}, weight: 70}
        """
        let original = NIOLockedValueBox(try SocketAddress(ipAddress: Self.vip, port: 9000))
        let p = try sidecar(["c.yaml": config], original: original)
        defer { p.stop() }
        func roundTrip(_ text: String) throws -> String {
            let c = try RawClient(port: p.outbound, timeoutSeconds: 5)
            c.send(text)
            c.shutdownWrite()
            return c.readToEOF().text
        }
        let n = 60
        for i in 0..<n { XCTAssertEqual(try roundTrip("c\(i)"), "c\(i)|EOF") }
        let a = v1.accepted.withLockedValue { $0 }, b = v2.accepted.withLockedValue { $0 }
        XCTAssertEqual(a + b, n)
        // 30/70 of 60: both subsets get connections (a draw of 60 with p=0.3 gives fewer
        // than 3 or more than 33 with probability below 1e-6).
        XCTAssertGreaterThanOrEqual(a, 3, "v1 got \(a), v2 \(b)")
        XCTAssertGreaterThan(b, a, "v1 got \(a), v2 \(b)")
        let routed = try XCTUnwrap(adminGet(p.admin, "/stats/prometheus")).body
        XCTAssertTrue(routed.contains("moonlet_tcp_virtualservice_routed_total \(n)"), routed)

        // Port 9001 matches the first rule: v2 only.
        original.withLockedValue { $0 = try! SocketAddress(ipAddress: Self.vip, port: 9001) }
        for i in 0..<10 { XCTAssertEqual(try roundTrip("admin\(i)"), "admin\(i)|EOF") }
        XCTAssertEqual(v1.accepted.withLockedValue { $0 }, a, "nothing more reached v1")
        XCTAssertEqual(v2.accepted.withLockedValue { $0 }, b + 10)
    }

    func testTLSToAServiceVIPIsRoutedBySNI_passedThroughUntouchedToTheDestinationTheTLSRuleNames() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let serverDir = try pki.issue("default", "api")
        let cfg = TLSConfiguration.makeServerConfiguration(certificateChain: try NIOSSLCertificate.fromPEMFile(serverDir + "/cert-chain.pem").map { .certificate($0) },
                                                           privateKey: .privateKey(try NIOSSLPrivateKey(file: serverDir + "/key.pem", format: .pem)))
        let sctx = try NIOSSLContext(configuration: cfg)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        func tlsApp(_ name: String) throws -> Channel {
            try ServerBootstrap(group: group).childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: sctx))
                    try ch.pipeline.syncOperations.addHandler(NamedTLSResponder(name))
                }
            }.bind(host: "127.0.0.1", port: 0).wait()
        }
        let front = try tlsApp("front"), beta = try tlsApp("beta")
        defer { try? front.close().wait(); try? beta.close().wait() }
        let config = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: front}
        spec:
          hosts: [front.example.internal]
          addresses: [\(Self.vip)]
          resolution: STATIC
          ports: [{number: 443, name: tls, protocol: TLS}]
          endpoints: [{address: 127.0.0.1, ports: {tls: \(front.localAddress!.port!)}}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: beta}
        spec:
          hosts: [beta-backend.example.internal]
          resolution: STATIC
          ports: [{number: 8443, name: tls, protocol: TLS}]
          endpoints: [{address: 127.0.0.1, ports: {tls: \(beta.localAddress!.port!)}}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: front}
        spec:
          hosts: [front.example.internal, "*.front.example.internal"]
          tls:
          - match: [{sniHosts: ["*.front.example.internal"], port: 443}]
            route: [{destination: {host: beta-backend.example.internal, port: {number: 8443}}}]
        """
        let original = NIOLockedValueBox(try SocketAddress(ipAddress: Self.vip, port: 443))
        let p = try sidecar(["c.yaml": config], original: original)
        defer { p.stop() }
        func get(sni: String) -> String? { TextCollector.tlsGet(group: group, port: p.outbound, sni: sni) }
        XCTAssertEqual(get(sni: "eu.front.example.internal")?.hasSuffix("beta:tls-ok"), true, "the tls rule's SNI: its destination")
        XCTAssertEqual(get(sni: "front.example.internal")?.hasSuffix("front:tls-ok"), true, "no tls rule matches: the service's own endpoints")
    }
}

/// Answers any request on a TLS connection with 200 "<name>:tls-ok".
final class NamedTLSResponder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let name: String
    var seen = ""
    init(_ name: String) { self.name = name }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        seen += String(buffer: unwrapInboundIn(data))
        if seen.contains("\r\n\r\n") {
            let body = "\(name):tls-ok"
            context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: \(body.utf8.count)\r\nconnection: close\r\n\r\n\(body)")), promise: nil)
            seen = ""
        }
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}
