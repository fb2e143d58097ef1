import XCTest
import NIOCore
import NIOPosix
import NIOSSL
import NIOConcurrencyHelpers
@testable import MoonletProxy
import MoonletConfig
import MoonletCore
import MoonletTLS

/// A raw TCP app on 127.0.0.1: `echo` writes back what it reads and, once the client
/// half-closes, "|EOF" then closes its side; `greet` speaks first (a server-first
/// protocol such as MySQL), then echoes.
final class TCPTestServer: @unchecked Sendable {
    /// echo: every byte back, then "|EOF" after the client's FIN; greet: a greeting
    /// first; answerOnEOF: after the client's FIN, that many bytes (the pattern of
    /// `InterceptionTests.pattern`), then FIN.
    enum Mode: Sendable { case echo, greet(String), answerOnEOF(Int) }
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var channel: Channel!
    var port: Int { channel.localAddress!.port! }
    let accepted = NIOLockedValueBox(0)
    /// Bytes the server has read, over all its connections.
    let received = NIOLockedValueBox(0)

    init(_ mode: Mode, host: String = "127.0.0.1") throws {
        let count = accepted, received = received
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { ch in
                count.withLockedValue { $0 += 1 }
                return ch.pipeline.addHandler(Handler(mode, received: received))
            }
            .bind(host: host, port: 0).wait()
    }
    func stop() { try? channel.close().wait(); try? group.syncShutdownGracefully() }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let mode: Mode
        let received: NIOLockedValueBox<Int>
        init(_ m: Mode, received: NIOLockedValueBox<Int>) { mode = m; self.received = received }
        func channelActive(context: ChannelHandlerContext) {
            if case .greet(let g) = mode { context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: g)), promise: nil) }
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let n = unwrapInboundIn(data).readableBytes
            received.withLockedValue { $0 += n }
            if case .answerOnEOF = mode { return }
            context.writeAndFlush(data, promise: nil)
        }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case ChannelEvent.inputClosed = event, case .answerOnEOF(let n) = mode {
                let written = context.eventLoop.makePromise(of: Void.self)
                context.writeAndFlush(wrapOutboundOut(ByteBuffer(bytes: InterceptionTests.pattern(n))), promise: written)
                written.futureResult.whenComplete { _ in context.close(mode: .output, promise: nil) }
            } else if case ChannelEvent.inputClosed = event {
                // Closed once written: NIO makes a half-close with the input shut a full
                // close, which would drop the echo still pending.
                let written = context.eventLoop.makePromise(of: Void.self)
                context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "|EOF")), promise: written)
                written.futureResult.whenComplete { _ in context.close(mode: .output, promise: nil) }
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }
}

extension RawClient {
    /// Everything the peer sends until it closes (or the read times out).
    func readToEOF() -> (text: String, closed: Bool) {
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n == 0 { break }
            if n < 0 { return (String(decoding: pending, as: UTF8.self), false) }
            pending += buf[0..<n]
        }
        defer { pending = [] }
        return (String(decoding: pending, as: UTF8.self), true)
    }

    /// At least `count` bytes (or what came before a timeout or close).
    func readBytes(_ count: Int) -> String {
        while pending.count < count { if !fill() { break } }
        let n = min(count, pending.count)
        defer { pending.removeFirst(n) }
        return String(decoding: pending[0..<n], as: UTF8.self)
    }

    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    /// Every byte until the peer closes (or a read times out).
    func readRawToEOF() -> [UInt8] { readRawUntilEnd().bytes }

    /// The bytes up to the end of the stream, and why reading stopped: "EOF", or the
    /// error of the last recv (EAGAIN: the receive timeout ran out).
    func readRawUntilEnd() -> (bytes: [UInt8], end: String) {
        var out = pending
        pending = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n == 0 { return (out, "EOF") }
            if n < 0 { return (out, String(cString: strerror(errno))) }
            out += buf[0..<n]
        }
    }
}

/// Intercepted connections on 127.0.0.1: the original destination is given by the test
/// (ProxySettings.originalDestinationOverride) where iptables would have kept it.
final class InterceptionTests: XCTestCase {
    static let vip = "240.0.0.10"

    func serviceEntry(name: String = "db", vip: String = InterceptionTests.vip, port: Int, portName: String, protocolName: String? = nil,
                      endpointPort: Int, extra: String = "") -> String {
        let proto = protocolName.map { ", protocol: \($0)" } ?? ""
        var y = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: \(name)}
        spec:
          hosts: [\(name).example.internal]
          addresses: [\(vip)]
          resolution: STATIC
          ports: [{number: \(port), name: \(portName)\(proto)}]
          endpoints:
          - {address: 127.0.0.1, ports: {\(portName): \(endpointPort)}}

        """
        if !extra.isEmpty { y += "---\n" + extra }
        return y
    }

    /// A sidecar whose outbound connections all appear sent to `original`.
    func sidecar(_ files: [String: String], original: String, port: Int, mesh: String? = nil) throws -> ProxyFixture {
        var all = files
        if let mesh { all["mesh.yaml.txt"] = mesh }
        let dst = try SocketAddress(ipAddress: original, port: port)
        return try ProxyFixture(appPort: 1, files: all, concurrency: 1) { s in
            s.originalDestinationOverride = { role, _ in role == .outbound ? dst : nil }
            if mesh != nil { s.meshConfigPath = s.configPaths[0] + "/mesh.yaml.txt" }
        }
    }

    // MARK: detection

    func testSnifferTellsHTTP1H2cPrefaceTLSClientHelloWithItsSNIAndOpaqueBytesApart() throws {
        func classify(_ s: String) -> ProtocolSniffer.Result { ProtocolSniffer.classify(ByteBuffer(string: s).readableBytesView) }
        XCTAssertEqual(classify("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), .http1)
        XCTAssertEqual(classify("POST /x?y=1 HTTP/1.0\r\n"), .http1)
        XCTAssertEqual(classify("GET / HTT"), .needMore)
        XCTAssertEqual(classify("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), .http2)
        XCTAssertEqual(classify("PRI * HTTP/2"), .needMore)
        XCTAssertEqual(classify("PUT / HTTP/1.1\r\n"), .http1)
        XCTAssertEqual(classify("hello world\n"), .tcp)
        XCTAssertEqual(classify("GET / SMTP/1.0\r\n"), .tcp)
        XCTAssertEqual(classify("\u{0}\u{1}binary"), .tcp)
        XCTAssertEqual(classify("EHLO mail.example\r\n"), .tcp)
        // A real ClientHello (BoringSSL's, through NIOSSL) with SNI db.example.internal,
        // caught by a plain TCP server.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let got = group.next().makePromise(of: ByteBuffer.self)
        let server = try ServerBootstrap(group: group).childChannelInitializer { ch in
            ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(HelloCatcher(got)) }
        }.bind(host: "127.0.0.1", port: 0).wait()
        defer { try? server.close().wait() }
        let ctx = try NIOSSLContext(configuration: .makeClientConfiguration())
        let client = try ClientBootstrap(group: group).channelInitializer { ch in
            ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: ctx, serverHostname: "DB.example.internal")) }
        }.connect(to: server.localAddress!).wait()
        defer { try? client.close().wait() }
        let hello = try got.futureResult.wait()
        XCTAssertGreaterThan(hello.readableBytes, 100)
        XCTAssertEqual(ProtocolSniffer.classify(hello.readableBytesView), .tls(sni: "db.example.internal"))
        XCTAssertEqual(ProtocolSniffer.classify(hello.getSlice(at: 0, length: 40)!.readableBytesView), .needMore)
    }

    func testPortProtocolsAreDeclaredByProtocolOrNamePrefix_asIstioReadsThem() {
        XCTAssertEqual(PortProtocol(ServicePort(number: 3306, name: "db", protocolName: "MYSQL", targetPort: nil)), .tcp)
        XCTAssertEqual(PortProtocol(ServicePort(number: 3306, name: "mysql-main", protocolName: "", targetPort: nil)), .tcp)
        XCTAssertEqual(PortProtocol(ServicePort(number: 80, name: "http-web", protocolName: "", targetPort: nil)), .http)
        XCTAssertEqual(PortProtocol(ServicePort(number: 80, name: "grpc", protocolName: "", targetPort: nil)), .grpc)
        XCTAssertEqual(PortProtocol(ServicePort(number: 443, name: "https", protocolName: "", targetPort: nil)), .tls)
        XCTAssertEqual(PortProtocol(ServicePort(number: 80, name: "web", protocolName: "", targetPort: nil)), .sniff)
    }

    func testMeshConfigProtocolDetectionTimeoutAndOutboundTrafficPolicyAreApplied() throws {
        let m = try MeshConfigFile.parse("protocolDetectionTimeout: 250ms\noutboundTrafficPolicy: {mode: REGISTRY_ONLY}\n", file: "mesh.yaml")
        XCTAssertEqual(m.telemetry.protocolDetectionTimeoutMs, 250)
        XCTAssertEqual(m.telemetry.outboundTrafficPolicy, .registryOnly)
        XCTAssertTrue(m.notApplied.isEmpty, "\(m.notApplied)")
        XCTAssertThrowsError(try MeshConfigFile.parse("protocolDetectionTimeout: soon\n", file: "mesh.yaml"))
    }

    // MARK: TCP

    func testTCPToAServiceVIPReachesItsEndpoint_andAHalfCloseTravelsThroughWhileTheOtherDirectionStaysOpen() throws {
        let app = try TCPTestServer(.echo)
        defer { app.stop() }
        let p = try sidecar(["se.yaml": serviceEntry(port: 9000, portName: "tcp-echo", endpointPort: app.port)], original: Self.vip, port: 9000)
        defer { p.stop() }
        let c = try RawClient(port: p.outbound, timeoutSeconds: 5)
        c.send("hello")
        XCTAssertEqual(c.readBytes(5), "hello")
        c.send(" again")
        c.shutdownWrite()
        let rest = c.readToEOF()
        XCTAssertEqual(rest.text, " again|EOF", "the app saw the client's FIN and could still answer")
        XCTAssertTrue(rest.closed)
        let stats = try XCTUnwrap(adminGet(p.admin, "/stats/prometheus")).body
        // Istio's TCP series, with its labels: the source reporter, the service's name.
        let labels = ["reporter=\"source\"", "destination_service=\"db.example.internal\""]
        XCTAssertEqual(Self.sample(stats, "istio_tcp_connections_opened_total", labels), "1", stats)
        XCTAssertEqual(Self.sample(stats, "istio_tcp_connections_closed_total", labels), "1", stats)
        XCTAssertEqual(Self.sample(stats, "istio_tcp_received_bytes_total", labels), "11", stats)
        XCTAssertEqual(Self.sample(stats, "istio_tcp_sent_bytes_total", labels), "15", stats)
    }

    /// The value of the Prometheus sample of `name` whose labels include every one of `labels`.
    static func sample(_ text: String, _ name: String, _ labels: [String]) -> String? {
        for line in text.split(separator: "\n") where line.hasPrefix(name + "{") && labels.allSatisfy({ line.contains($0) }) {
            return line.split(separator: " ").last.map(String.init)
        }
        return nil
    }

    static func pattern(_ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) } }

    func testAClientThatHalfClosesFirstGetsTheWholeAnswer_thoughItReadsOnlyAfterTheAppHasClosed() throws {
        // The client's FIN comes first; the app answers 4 MB and closes. The proxy's
        // writes to the client are still pending when the app's FIN arrives: shutting
        // the client's output then must not drop them (NIO makes that half-close a full
        // close, the client's input being shut already).
        let size = 4 << 20
        let app = try TCPTestServer(.answerOnEOF(size))
        defer { app.stop() }
        let p = try sidecar(["se.yaml": serviceEntry(port: 9000, portName: "tcp", endpointPort: app.port)], original: Self.vip, port: 9000)
        defer { p.stop() }
        let c = try RawClient(port: p.outbound, timeoutSeconds: 10)
        c.send("go")
        c.shutdownWrite()
        Thread.sleep(forTimeInterval: 1)   // the app has answered and closed by now
        let (back, end) = c.readRawUntilEnd()
        XCTAssertEqual(end, "EOF")
        XCTAssertEqual(back.count, size)
        XCTAssertTrue(back.elementsEqual(Self.pattern(size)), "the bytes arrived in order, unchanged")
    }

    func testEightMegabytesCrossTheTCPProxyBothWaysIntact_whileEachSideIsReadOnlyAsFastAsTheOtherTakesIt() throws {
        let app = try TCPTestServer(.echo)
        defer { app.stop() }
        let p = try sidecar(["se.yaml": serviceEntry(port: 9000, portName: "tcp", endpointPort: app.port)], original: Self.vip, port: 9000)
        defer { p.stop() }
        let c = try RawClient(port: p.outbound, timeoutSeconds: 10)
        let payload = Self.pattern(8 << 20)
        // The sender blocks whenever the proxy stops reading (the echo's way back is full).
        let sent = NIOLockedValueBox(0)
        let sender = Thread { sent.withLockedValue { $0 = c.sendCounting(payload) }; c.shutdownWrite() }
        sender.start()
        let (back, end) = c.readRawUntilEnd()
        XCTAssertEqual(sent.withLockedValue { $0 }, payload.count, "the client sent everything")
        XCTAssertEqual(app.received.withLockedValue { $0 }, payload.count, "the app received everything the client sent")
        XCTAssertEqual(back.count, payload.count + 4, "reading stopped at: \(end)")
        XCTAssertTrue(back.prefix(payload.count).elementsEqual(payload), "the bytes arrived in order, unchanged")
        XCTAssertEqual(String(decoding: back.suffix(4), as: UTF8.self), "|EOF")
    }

    func testAServerFirstProtocolOnADeclaredPortIsConnectedWithoutWaitingForTheClientsFirstByte() throws {
        let app = try TCPTestServer(.greet("220 ready\r\n"))
        defer { app.stop() }
        let p = try sidecar(["se.yaml": serviceEntry(port: 3306, portName: "db", protocolName: "MYSQL", endpointPort: app.port)], original: Self.vip, port: 3306)
        defer { p.stop() }
        let c = try RawClient(port: p.outbound, timeoutSeconds: 5)
        XCTAssertEqual(c.readBytes(11), "220 ready\r\n")
        c.send("QUIT")
        XCTAssertEqual(c.readBytes(4), "QUIT")
    }

    func testAServerFirstProtocolOnAnUndeclaredPortWaits_untilTheProtocolDetectionTimeoutMakesItTCP() throws {
        let app = try TCPTestServer(.greet("HELLO\n"))
        defer { app.stop() }
        // Undeclared (port name without a protocol prefix), 300 ms detection timeout.
        let p = try sidecar(["se.yaml": serviceEntry(port: 7000, portName: "custom", endpointPort: app.port)], original: Self.vip, port: 7000,
                            mesh: "protocolDetectionTimeout: 300ms\n")
        defer { p.stop() }
        let c = try RawClient(port: p.outbound, timeoutSeconds: 5)
        let start = Date()
        XCTAssertEqual(c.readBytes(6), "HELLO\n")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), 0.25, "the greeting waited for the detection timeout")
    }

    func testUnknownTCPDestinationsPassThroughWithAllowAny_andAreClosedWithRegistryOnly() throws {
        let app = try TCPTestServer(.echo)
        defer { app.stop() }
        let allow = try sidecar(["se.yaml": serviceEntry(port: 9000, portName: "tcp", endpointPort: 1)], original: "127.0.0.1", port: app.port)
        let c = try RawClient(port: allow.outbound, timeoutSeconds: 5)
        c.send("ping")
        XCTAssertEqual(c.readBytes(4), "ping", "PassthroughCluster to the original destination")
        allow.stop()
        let block = try sidecar(["se.yaml": serviceEntry(port: 9000, portName: "tcp", endpointPort: 1)], original: "127.0.0.1", port: app.port,
                                mesh: "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
        defer { block.stop() }
        let d = try RawClient(port: block.outbound, timeoutSeconds: 5)
        d.send("ping")
        XCTAssertEqual(d.readToEOF().text, "", "BlackHoleCluster closes the connection")
        XCTAssertEqual(app.accepted.withLockedValue { $0 }, 1)
    }

    func testAConnectionWhoseOriginalDestinationIsTheProxyItselfIsRefused() throws {
        let holder = NIOLockedValueBox(0)
        let p = try ProxyFixture(appPort: 1, files: [:], concurrency: 1) { s in
            s.originalDestinationOverride = { role, _ in
                role == .outbound ? try? SocketAddress(ipAddress: "127.0.0.1", port: holder.withLockedValue { $0 }) : nil
            }
        }
        defer { p.stop() }
        holder.withLockedValue { $0 = p.outbound }
        let c = try RawClient(port: p.outbound, timeoutSeconds: 5)
        c.send("loop?")
        XCTAssertEqual(c.readToEOF().text, "")
        let stats = try XCTUnwrap(adminGet(p.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_tcp_loop_refused_total 1"), stats)
    }

    func testAnIdleTCPConnectionIsClosedAfterTheDestinationRulesTCPIdleTimeout() throws {
        let app = try TCPTestServer(.echo)
        defer { app.stop() }
        let dr = """
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: db}
        spec:
          host: db.example.internal
          trafficPolicy: {connectionPool: {tcp: {idleTimeout: 300ms}}}
        """
        let p = try sidecar(["se.yaml": serviceEntry(port: 9000, portName: "tcp", endpointPort: app.port, extra: dr)], original: Self.vip, port: 9000)
        defer { p.stop() }
        let c = try RawClient(port: p.outbound, timeoutSeconds: 5)
        c.send("x")
        XCTAssertEqual(c.readBytes(1), "x")
        let start = Date()
        let r = c.readToEOF()
        XCTAssertTrue(r.closed)
        XCTAssertEqual(r.text, "")
        let waited = Date().timeIntervalSince(start)
        XCTAssertGreaterThanOrEqual(waited, 0.2)
        XCTAssertLessThan(waited, 4)
    }

    func testTLSTheAppOriginatesIsPassedThroughUntouched() throws {
        // The upstream is a TLS server; the client's handshake reaches it through the sidecar
        // (undeclared port: detected as TLS, relayed as TCP).
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let serverDir = try pki.issue("default", "db")
        var cfg = TLSConfiguration.makeServerConfiguration(certificateChain: try NIOSSLCertificate.fromPEMFile(serverDir + "/cert-chain.pem").map { .certificate($0) },
                                                           privateKey: .privateKey(try NIOSSLPrivateKey(file: serverDir + "/key.pem", format: .pem)))
        cfg.applicationProtocols = ["http/1.1"]
        let sctx = try NIOSSLContext(configuration: cfg)
        let up = try TestUpstream()
        defer { up.stop() }
        // A TLS-terminating relay in front of the plain test upstream.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let tlsApp = try ServerBootstrap(group: group).childChannelInitializer { ch in
            ch.eventLoop.makeCompletedFuture {
                try ch.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: sctx))
                try ch.pipeline.syncOperations.addHandler(TLSHelloResponder())
            }
        }.bind(host: "127.0.0.1", port: 0).wait()
        defer { try? tlsApp.close().wait() }
        let p = try sidecar(["se.yaml": serviceEntry(port: 8443, portName: "web", endpointPort: tlsApp.localAddress!.port!)], original: Self.vip, port: 8443)
        defer { p.stop() }
        let r = tlsRequest(port: p.outbound, certDir: nil, rootPEM: pki.ca.rootCertPEM, host: "db.example.internal")
        switch r {
        case .success(let resp): XCTAssertEqual(resp.status, 200); XCTAssertEqual(resp.body, "tls-ok")
        case .failure(let e): XCTFail("TLS through the sidecar failed: \(e)")
        }
        let stats = try XCTUnwrap(adminGet(p.admin, "/stats/prometheus")).body
        XCTAssertEqual(Self.sample(stats, "istio_tcp_connections_opened_total", ["reporter=\"source\""]), "1", stats)
    }

    func testTLSToAnUnknownAddressIsRoutedByItsSNIToTheServiceEntryHost_evenWithRegistryOnly() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let serverDir = try pki.issue("default", "api")
        let cfg = TLSConfiguration.makeServerConfiguration(certificateChain: try NIOSSLCertificate.fromPEMFile(serverDir + "/cert-chain.pem").map { .certificate($0) },
                                                           privateKey: .privateKey(try NIOSSLPrivateKey(file: serverDir + "/key.pem", format: .pem)))
        let sctx = try NIOSSLContext(configuration: cfg)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let tlsApp = try ServerBootstrap(group: group).childChannelInitializer { ch in
            ch.eventLoop.makeCompletedFuture {
                try ch.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: sctx))
                try ch.pipeline.syncOperations.addHandler(TLSHelloResponder())
            }
        }.bind(host: "127.0.0.1", port: 0).wait()
        defer { try? tlsApp.close().wait() }
        // No VIP: the app resolved the name itself and dialled an address no service has.
        let se = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: api}
        spec:
          hosts: [api.example.internal]
          resolution: STATIC
          ports: [{number: 443, name: tls, protocol: TLS}]
          endpoints:
          - {address: 127.0.0.1, ports: {tls: \(tlsApp.localAddress!.port!)}}
        """
        let p = try sidecar(["se.yaml": se], original: "203.0.113.9", port: 443, mesh: "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
        defer { p.stop() }
        func get(sni: String) -> String? { TextCollector.tlsGet(group: group, port: p.outbound, sni: sni) }
        XCTAssertEqual(get(sni: "api.example.internal")?.hasSuffix("tls-ok"), true)
        XCTAssertNil(get(sni: "other.example.internal"), "an SNI no ServiceEntry names is blocked (REGISTRY_ONLY)")
    }

    // MARK: HTTP on intercepted connections

    func testHTTPWhoseHostNamesNoServiceIsRoutedByTheVIPItWasSentTo_andUnknownOnesFollowOutboundTrafficPolicy() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let p = try sidecar(["se.yaml": serviceEntry(name: "web", port: 80, portName: "http", endpointPort: app.port)], original: Self.vip, port: 80)
        defer { p.stop() }
        let c = try RawClient(port: p.outbound)
        c.send("GET /a HTTP/1.1\r\nHost: something-else.example\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        c.send("GET /b HTTP/1.1\r\nHost: \(Self.vip)\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200, "a Host that is the VIP names the service (Istio's VIP domains)")
        XCTAssertEqual(app.seen.count, 2)

        // Unknown destination: PassthroughCluster (ALLOW_ANY), BlackHoleCluster 502 (REGISTRY_ONLY).
        let pass = try sidecar(["se.yaml": serviceEntry(name: "web", port: 80, portName: "http", endpointPort: 1)], original: "127.0.0.1", port: app.port)
        let d = try RawClient(port: pass.outbound)
        d.send("GET /c HTTP/1.1\r\nHost: unknown.example\r\n\r\n")
        XCTAssertEqual(d.read()?.status, 200)
        pass.stop()
        let block = try sidecar(["se.yaml": serviceEntry(name: "web", port: 80, portName: "http", endpointPort: 1)], original: "127.0.0.1", port: app.port,
                                mesh: "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
        defer { block.stop() }
        let e = try RawClient(port: block.outbound)
        e.send("GET /d HTTP/1.1\r\nHost: unknown.example\r\n\r\n")
        XCTAssertEqual(e.read()?.status, 502)
        XCTAssertEqual(app.seen.count, 3)
    }

    func testInboundHTTPGoesToTheAppPortTheClientAddressed() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let dst = try SocketAddress(ipAddress: "10.1.2.3", port: app.port)
        let p = try ProxyFixture(appPort: 1, files: [:], concurrency: 1) { s in
            s.originalDestinationOverride = { role, _ in role == .inbound ? dst : nil }
        }
        defer { p.stop() }
        let c = try RawClient(port: p.inbound)
        XCTAssertEqual(get(c)?.status, 200, "--app-port 1 is not used for an intercepted connection")
        XCTAssertEqual(app.seen.count, 1)
    }
}

/// Collects a connection's first bytes until the sniffer can tell what they are.
final class HelloCatcher: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<ByteBuffer>
    var buf = ByteBuffer()
    var done = false
    init(_ p: EventLoopPromise<ByteBuffer>) { promise = p }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = unwrapInboundIn(data)
        buf.writeBuffer(&b)
        if !done, ProtocolSniffer.classify(buf.readableBytesView) != .needMore { done = true; promise.succeed(buf) }
    }
}

/// What a connection delivers, as text: until it closes or the test responder's body arrives.
final class TextCollector: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<String>
    var text = ""
    var done = false
    init(_ p: EventLoopPromise<String>) { promise = p }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        text += String(buffer: unwrapInboundIn(data))
        if text.hasSuffix("tls-ok"), !done { done = true; promise.succeed(text) }
    }
    func channelInactive(context: ChannelHandlerContext) {
        guard !done else { return }
        done = true
        if text.isEmpty { promise.fail(ChannelError.eof) } else { promise.succeed(text) }
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }

    /// Sends `GET /` over TLS with server name `sni` to 127.0.0.1:`port` (any certificate
    /// accepted) and returns what came back, or nil when nothing did within 5 s.
    static func tlsGet(group: EventLoopGroup, port: Int, sni: String) -> String? {
        var c = TLSConfiguration.makeClientConfiguration()
        c.certificateVerification = .none
        guard let cctx = try? NIOSSLContext(configuration: c) else { return nil }
        let got = group.next().makePromise(of: String.self)
        let ch = try? ClientBootstrap(group: group).channelInitializer { ch in
            ch.eventLoop.makeCompletedFuture {
                try ch.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: cctx, serverHostname: sni))
                try ch.pipeline.syncOperations.addHandler(TextCollector(got))
            }
        }.connect(host: "127.0.0.1", port: port).wait()
        ch?.writeAndFlush(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: \(sni)\r\n\r\n"), promise: nil)
        let timer = group.next().scheduleTask(in: .seconds(5)) { got.fail(ChannelError.connectTimeout(.seconds(5))) }
        defer { timer.cancel(); ch?.close(promise: nil) }
        return try? got.futureResult.wait()
    }
}

/// Answers any request on a TLS connection with 200 "tls-ok".
final class TLSHelloResponder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    var seen = ""
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        seen += String(buffer: unwrapInboundIn(data))
        if seen.contains("\r\n\r\n") {
            context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\ntls-ok")), promise: nil)
            seen = ""
        }
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}

/// Proxied TCP between two sidecars on 127.0.0.1: auto mTLS (Istio's TCP ALPN), the
/// server side's STRICT mTLS and AuthorizationPolicy for TCP.
final class InterceptedTCPMTLSTests: XCTestCase {
    var pki: FixturePKI!
    override func setUp() async throws { pki = try FixturePKI() }
    override func tearDown() async throws { pki.cleanup() }

    static func policy(_ name: String, action: String = "ALLOW", rule: String) -> String {
        """
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: \(name), namespace: production}
        spec:
          action: \(action)
          rules:
          - \(rule)

        """
    }

    /// frontend's sidecar (outbound: every connection sent to the orders VIP on `port`)
    /// and orders' sidecar (STRICT; inbound: the app at `appPort`).
    func sidecars(appPort: Int, port: Int = 9000, portName: String = "tcp", serverFiles: [String: String] = [:]) throws -> (client: ProxyFixture, server: ProxyFixture) {
        var files = serverFiles
        files["pa.yaml"] = peerAuthentication("ns", namespace: "production", mode: "STRICT")
        let serverCerts = try pki.issue("production", "orders")
        let app = try SocketAddress(ipAddress: "10.0.0.2", port: appPort)
        let server = try ProxyFixture(appPort: 1, files: files, concurrency: 1) { s in
            s.certsDirectory = serverCerts
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
            s.originalDestinationOverride = { role, _ in role == .inbound ? app : nil }
        }
        let se = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: orders, namespace: production}
        spec:
          hosts: [orders.production.svc.cluster.local]
          addresses: [\(InterceptionTests.vip)]
          resolution: STATIC
          ports: [{number: \(port), name: \(portName)}]
          endpoints:
          - {address: 127.0.0.1, ports: {\(portName): \(server.inbound)}, serviceAccount: orders, labels: {security.istio.io/tlsMode: istio}}
        """
        let clientCerts = try pki.issue("default", "frontend")
        let vip = try SocketAddress(ipAddress: InterceptionTests.vip, port: port)
        let client = try ProxyFixture(appPort: 1, files: ["se.yaml": se], concurrency: 1) { s in
            s.certsDirectory = clientCerts
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend"])
            s.originalDestinationOverride = { role, _ in role == .outbound ? vip : nil }
        }
        return (client, server)
    }

    func testTCPBetweenSidecarsUsesAutoMTLS_andTheServersTCPAuthorizationAllowsTheCallersPrincipal() throws {
        let app = try TCPTestServer(.echo)
        defer { app.stop() }
        let allow = Self.policy("allow-frontend", rule: "{from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}], to: [{operation: {ports: [\"\(app.port)\"]}}]}")
        let (client, server) = try sidecars(appPort: app.port, serverFiles: ["authz.yaml": allow])
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound, timeoutSeconds: 5)
        c.send("over mtls")
        c.shutdownWrite()
        XCTAssertEqual(c.readToEOF().text, "over mtls|EOF", "bytes and the half-close crossed both sidecars")
        let stats = try XCTUnwrap(adminGet(server.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("envoy_tcp_rbac_allowed 1"), stats)
        XCTAssertFalse(stats.contains("moonlet_inbound_tls_refused_total"), "the client sidecar spoke mTLS (STRICT)")
        // Istio's TCP series on the server: the destination reporter, the caller's principal, mutual TLS.
        let inbound = ["reporter=\"destination\"", "source_principal=\"spiffe://cluster.local/ns/default/sa/frontend\"",
                       "connection_security_policy=\"mutual_tls\""]
        XCTAssertTrue(try eventually {
            guard let r = try adminGet(server.admin, "/stats/prometheus") else { return false }
            return InterceptionTests.sample(r.body, "istio_tcp_connections_closed_total", inbound) == "1"
        }, stats)
        XCTAssertEqual(InterceptionTests.sample(stats, "istio_tcp_connections_opened_total", inbound), "1", stats)
    }

    func testTCPAuthorizationDeniesOtherPrincipals_anAllowRuleWithHTTPOnlyFieldsNeverMatchesTCP_andADenyRuleIgnoresThem() throws {
        let app = try TCPTestServer(.echo)
        defer { app.stop() }
        let cases: [(String, String)] = [
            ("other principal", Self.policy("allow-other", rule: "{from: [{source: {principals: [cluster.local/ns/default/sa/other]}}]}")),
            ("HTTP-only field in ALLOW", Self.policy("allow-get", rule: "{from: [{source: {principals: [cluster.local/ns/default/sa/frontend]}}], to: [{operation: {methods: [GET]}}]}")),
            ("HTTP-only field in DENY", Self.policy("deny-post", action: "DENY", rule: "{from: [{source: {namespaces: [default]}}], to: [{operation: {methods: [POST]}}]}")),
        ]
        for (what, policy) in cases {
            let (client, server) = try sidecars(appPort: app.port, serverFiles: ["authz.yaml": policy])
            let c = try RawClient(port: client.outbound, timeoutSeconds: 5)
            c.send("denied?")
            let start = Date()
            let r = c.readToEOF()
            XCTAssertEqual(r.text, "", what)
            XCTAssertTrue(r.closed, "\(what): the client's connection is closed")
            XCTAssertLessThan(Date().timeIntervalSince(start), 3, what)
            // The client goes too (the server's TLS close waits for its close_notify).
            shutdown(c.fd, Int32(SHUT_RDWR))
            let stats = try XCTUnwrap(adminGet(server.admin, "/stats/prometheus")).body
            XCTAssertTrue(stats.contains("envoy_tcp_rbac_denied 1"), "\(what): \(stats)")
            client.stop(); server.stop()
        }
        XCTAssertEqual(app.accepted.withLockedValue { $0 }, 0)
    }

    func testBothSidecarsLearnThePeersWorkloadThroughIstiosTCPMetadataExchange_andTheAppSeesOnlyItsOwnBytes() throws {
        let app = try TCPTestServer(.echo)
        defer { app.stop() }
        let (client, server) = try sidecars(appPort: app.port)
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound, timeoutSeconds: 5)
        c.send("exchanged")
        c.shutdownWrite()
        XCTAssertEqual(c.readToEOF().text, "exchanged|EOF", "the exchange headers never reach either app")
        // The destination reporter knows the caller's workload, the source reporter the server's.
        let inbound = ["reporter=\"destination\"", "source_workload=\"frontend\"", "source_app=\"frontend\"",
                       "source_workload_namespace=\"default\"", "destination_workload=\"orders\""]
        let outbound = ["reporter=\"source\"", "source_workload=\"frontend\"", "destination_workload=\"orders\"",
                        "destination_app=\"orders\"", "destination_workload_namespace=\"production\""]
        for (fixture, labels) in [(server, inbound), (client, outbound)] {
            var stats = ""
            XCTAssertTrue(try eventually {
                stats = try adminGet(fixture.admin, "/stats/prometheus")?.body ?? ""
                return InterceptionTests.sample(stats, "istio_tcp_connections_closed_total", labels) == "1"
            }, stats)
            XCTAssertEqual(InterceptionTests.sample(stats, "istio_tcp_connections_opened_total", labels), "1", stats)
            XCTAssertEqual(InterceptionTests.sample(stats, "istio_tcp_received_bytes_total", labels), "9", stats)
            XCTAssertTrue(stats.contains("moonlet_tcp_peer_exchange_total 1"), stats)
        }
    }

    func testAServerFirstProtocolCrossesBothSidecars_theServerSideKnowsTCPFromTheMTLSALPN() throws {
        let app = try TCPTestServer(.greet("* OK IMAP ready\r\n"))
        defer { app.stop() }
        let (client, server) = try sidecars(appPort: app.port, port: 143, portName: "tcp-imap")
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound, timeoutSeconds: 5)
        XCTAssertEqual(c.readBytes(17), "* OK IMAP ready\r\n")
    }
}
