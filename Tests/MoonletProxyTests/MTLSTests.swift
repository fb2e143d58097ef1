import XCTest
import NIOCore
import NIOPosix
import NIOHTTP1
import NIOSSL
import NIOTLS
import NIOConcurrencyHelpers
import Logging
@testable import MoonletProxy
import MoonletConfig
import MoonletTLS
import MoonletCore

/// A fixture PKI made by the tests: a mesh root, a foreign root, and workload bundles.
final class FixturePKI {
    let dir = NSTemporaryDirectory() + "moonlet-pki-\(UUID().uuidString)"
    let ca: MeshCA
    let foreign: MeshCA
    /// The mesh root's root-cert.pem, as a file.
    var rootCertPEMPath: String { dir + "/mesh-root-cert.pem" }

    init() throws {
        ca = try MeshCA.create()
        foreign = try MeshCA.create()
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try ca.rootCertPEM.write(toFile: rootCertPEMPath, atomically: true, encoding: .utf8)
    }

    /// Issues `ns/sa` into a new directory and returns it.
    @discardableResult
    func issue(_ ns: String, _ sa: String, name: String? = nil, by authority: MeshCA? = nil, ttl: TimeInterval = 86400, now: Date = Date(), keyType: KeyType = .ecdsaP256) throws -> String {
        let d = dir + "/" + (name ?? "\(ns)-\(sa)")
        let a = authority ?? ca
        var b = try a.issue(try a.identity(namespace: ns, serviceAccount: sa), keyType: keyType, ttl: ttl, now: now)
        if authority != nil { b.rootCertPEM = ca.rootCertPEM } // a foreign cert presented to a mesh that trusts only `ca`
        try b.write(to: d)
        return d
    }

    func cleanup() { try? FileManager.default.removeItem(atPath: dir) }
}

/// One HTTPS/1.1 request with an optional client certificate. Returns status, headers
/// and body, or the error that ended the handshake or connection.
/// `maxVersion`, `ciphers`: limit what the client offers (to test the server's policy).
func tlsRequest(port: Int, certDir: String?, rootPEM: String, host: String = "app", path: String = "/", method: HTTPMethod = .GET, alpn: [String] = ["http/1.1"],
                expectedServer: [String] = [], maxVersion: TLSVersion? = nil, ciphers: String? = nil, extraHeaders: [(String, String)] = [],
                serverName: String? = nil) -> Result<(status: Int, headers: HTTPHeaders, body: String), Error> {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    defer { try? group.syncShutdownGracefully() }
    do {
        var cfg = TLSConfiguration.makeClientConfiguration()
        cfg.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(rootPEM.utf8)))
        cfg.certificateVerification = .noHostnameVerification
        cfg.applicationProtocols = alpn
        if let v = maxVersion { cfg.maximumTLSVersion = v }
        if let c = ciphers { cfg.cipherSuites = c }
        if let d = certDir {
            cfg.certificateChain = try NIOSSLCertificate.fromPEMFile(d + "/cert-chain.pem").map { .certificate($0) }
            cfg.privateKey = .privateKey(try NIOSSLPrivateKey(file: d + "/key.pem", format: .pem))
        }
        let ctx = try NIOSSLContext(configuration: cfg)
        let promise = group.next().makePromise(of: (Int, HTTPHeaders, String).self)
        let ch = try ClientBootstrap(group: group)
            .connectTimeout(.seconds(5))
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(try TLSMaterial.makeClientHandler(context: ctx, serverName: serverName, expected: expectedServer))
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(Collect(promise))
                }
            }
            .connect(host: "127.0.0.1", port: port).wait()
        ch.write(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: HTTPHeaders([("host", host), ("connection", "close"), ("content-length", "0")] + extraHeaders))), promise: nil)
        ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let timer = group.next().scheduleTask(in: .seconds(5)) { promise.fail(ChannelError.connectTimeout(.seconds(5))) }
        defer { timer.cancel(); ch.close(promise: nil) }
        let (s, h, b) = try promise.futureResult.wait()
        return .success((s, h, b))
    } catch {
        return .failure(error)
    }
}

private final class Collect: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    let promise: EventLoopPromise<(Int, HTTPHeaders, String)>
    var status = 0
    var headers = HTTPHeaders()
    var body = ""
    init(_ p: EventLoopPromise<(Int, HTTPHeaders, String)>) { promise = p }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): status = Int(h.status.code); headers = h.headers
        case .body(let b): body += String(buffer: b)
        case .end: promise.succeed((status, headers, body))
        }
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) { promise.fail(error); context.close(promise: nil) }
    func channelInactive(context: ChannelHandlerContext) { promise.fail(ChannelError.ioOnClosedChannel) }
}

/// A Lua filter that shows the caller's identity in response headers.
let principalEcho = """
return {
  on_response = function(s)
    s.response.headers:set("x-peer", s.source.principal)
    s.response.headers:set("x-peer-ns", s.source.namespace)
  end
}
"""

func peerAuthentication(_ name: String, namespace: String, mode: String, selector: String = "", portLevel: String = "") -> String {
    """
    apiVersion: security.istio.io/v1beta1
    kind: PeerAuthentication
    metadata: {name: \(name), namespace: \(namespace)}
    spec:
    \(selector.isEmpty ? "" : "  selector: {matchLabels: {\(selector)}}\n")  mtls: {mode: \(mode)}
    \(portLevel.isEmpty ? "" : "  portLevelMtls: {\(portLevel)}\n")
    """
}

final class MTLSTests: XCTestCase {
    var pki: FixturePKI!
    var app: TestUpstream!

    override func setUp() async throws {
        pki = try FixturePKI()
        app = try TestUpstream()
    }
    override func tearDown() async throws { app.stop(); pki.cleanup() }

    /// The server-side sidecar of workload production/orders with `files` (its app: `app`,
    /// unless `appPort` names another).
    func serverSidecar(_ files: [String: String], certs: String?, appPort: Int? = nil) throws -> ProxyFixture {
        var all = files
        all["echo.lua"] = principalEcho
        all["echo.yaml"] = ProxyFixture.plugin("echo")
        return try ProxyFixture(appPort: appPort ?? app.port, files: all, concurrency: 1) { s in
            s.certsDirectory = certs
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
        }
    }

    func test_strictMTLS_refusesPlaintextNoCertForeignCAAndExpiredClients_andServesMeshClients() throws {
        let server = try serverSidecar(["pa.yaml": peerAuthentication("strict", namespace: "production", mode: "STRICT")],
                                       certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        // Plaintext: no HTTP byte is read, no response, the app sees nothing.
        let plain = try RawClient(port: server.inbound, timeoutSeconds: 3)
        plain.send("GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        XCTAssertNil(plain.read())
        // TLS without a client certificate, with a foreign CA's, with an expired one.
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: nil, rootPEM: pki.ca.rootCertPEM).get())
        let foreign = try pki.issue("default", "frontend", name: "foreign", by: pki.foreign)
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: foreign, rootPEM: pki.ca.rootCertPEM).get())
        let expired = try pki.issue("default", "frontend", name: "expired", ttl: 3600, now: Date().addingTimeInterval(-3 * 3600))
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: expired, rootPEM: pki.ca.rootCertPEM).get())
        XCTAssertEqual(app.seen.count, 0)
        // A mesh client: served, and its principal reaches the Lua filter.
        let ok = try tlsRequest(port: server.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM,
                                expectedServer: ["spiffe://cluster.local/ns/production/sa/orders"]).get()
        XCTAssertEqual(ok.status, 200)
        XCTAssertEqual(ok.headers.first(name: "x-peer"), "cluster.local/ns/default/sa/frontend")
        XCTAssertEqual(ok.headers.first(name: "x-peer-ns"), "default")
        XCTAssertEqual(app.seen.count, 1)
        // Telemetry labels the request mutual_tls with the caller's SPIFFE id.
        let metrics = adminGet(server.admin, "/stats/prometheus")?.body ?? ""
        XCTAssertTrue(metrics.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/frontend\""), metrics)
        XCTAssertTrue(metrics.contains("connection_security_policy=\"mutual_tls\""), metrics)
    }

    func test_permissiveMTLS_servesPlaintextAndMutualTLSOnTheSamePort() throws {
        let server = try serverSidecar(["pa.yaml": peerAuthentication("mesh", namespace: "istio-system", mode: "PERMISSIVE")],
                                       certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        let plain = try RawClient(port: server.inbound)
        let r = get(plain)
        XCTAssertEqual(r?.status, 200)
        XCTAssertEqual(r?.header("x-peer"), "")
        let tls = try tlsRequest(port: server.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM).get()
        XCTAssertEqual(tls.status, 200)
        XCTAssertEqual(tls.headers.first(name: "x-peer"), "cluster.local/ns/default/sa/frontend")
        // TLS in PERMISSIVE is still mutual: a client without a mesh certificate is refused.
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: nil, rootPEM: pki.ca.rootCertPEM).get())
    }

    func test_aTLSHandshakeThatDoesNotFinishInTime_isClosed_inStrictAndPermissiveModes() throws {
        for mode in ["STRICT", "PERMISSIVE"] {
            var all = ["pa.yaml": peerAuthentication("p", namespace: "production", mode: mode)]
            all["echo.lua"] = principalEcho
            let certs = try pki.issue("production", "orders", name: "hs-\(mode)")
            let server = try ProxyFixture(appPort: app.port, files: all, concurrency: 1) { s in
                s.certsDirectory = certs
                s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders")
                s.limits.tlsHandshakeTimeoutMs = 300
            }
            defer { server.stop() }
            // A client that connects and says nothing, and one that starts a TLS record and stalls.
            let silent = try RawClient(port: server.inbound, timeoutSeconds: 5)
            let stalled = try RawClient(port: server.inbound, timeoutSeconds: 5)
            stalled.send([0x16, 0x03, 0x01, 0x00, 0x40])
            let start = Date()
            XCTAssertTrue(silent.isClosed(), mode)
            XCTAssertTrue(stalled.isClosed(), mode)
            XCTAssertLessThan(Date().timeIntervalSince(start), 3, mode)
        }
    }

    func test_alpnNegotiatesHTTP2OverMutualTLS_andIstiosALPNValuesAreAccepted() throws {
        let server = try serverSidecar(["pa.yaml": peerAuthentication("strict", namespace: "production", mode: "STRICT")],
                                       certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        let fe = try pki.issue("default", "frontend")
        try pki.ca.rootCertPEM.write(toFile: pki.dir + "/root.pem", atomically: true, encoding: .utf8)
        let out = try runTool("curl", ["-s", "--max-time", "10", "--http2", "--cacert", pki.dir + "/root.pem", "-k", "--cert", fe + "/cert-chain.pem",
                                       "--key", fe + "/key.pem", "-D", "-", "-o", "/dev/null", "-w", "proto=%{http_version}", "https://127.0.0.1:\(server.inbound)/h2"])
        XCTAssertTrue(out.contains("proto=2"), out)
        XCTAssertTrue(out.contains("x-peer: cluster.local/ns/default/sa/frontend"), out)
        // An Istio client offering only its own ALPN values is served (HTTP/1.1 on the wire).
        let istio = try tlsRequest(port: server.inbound, certDir: fe, rootPEM: pki.ca.rootCertPEM, alpn: ["istio-peer-exchange", "istio"]).get()
        XCTAssertEqual(istio.status, 200)
    }

    func test_peerAuthentication_mostSpecificWins_andPolicyChangesApplyWithoutRestart() throws {
        // Mesh STRICT, but the workload's port-level setting disables mTLS on the app port.
        let server = try serverSidecar([
            "mesh.yaml": peerAuthentication("mesh", namespace: "istio-system", mode: "STRICT"),
            "wl.yaml": peerAuthentication("orders", namespace: "production", mode: "UNSET", selector: "app: orders", portLevel: "'\(app.port)': {mode: DISABLE}"),
        ], certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        XCTAssertEqual(get(try RawClient(port: server.inbound))?.status, 200)
        // The workload policy goes away: the mesh's STRICT applies to the next connection.
        try FileManager.default.removeItem(atPath: server.dir + "/wl.yaml")
        var refused = false
        for _ in 0..<40 {
            let c = try RawClient(port: server.inbound, timeoutSeconds: 2)
            c.send("GET / HTTP/1.1\r\nHost: app\r\n\r\n")
            if c.read() == nil { refused = true; break }
            usleep(100_000)
        }
        XCTAssertTrue(refused, "STRICT did not apply after the workload policy was removed")
    }

    /// Two sidecars on 127.0.0.1: frontend's outbound -> orders' inbound with mTLS.
    func twoSidecars(clientFiles: (Int) -> [String: String], serverCerts: String? = nil, clientCerts: String? = nil,
                     serverPolicy: String = "STRICT", appPort: Int? = nil) throws -> (client: ProxyFixture, server: ProxyFixture) {
        let server = try serverSidecar(["pa.yaml": peerAuthentication("ns", namespace: "production", mode: serverPolicy)],
                                       certs: try serverCerts ?? pki.issue("production", "orders"), appPort: appPort)
        let clientDir = try clientCerts ?? pki.issue("default", "frontend")
        let client = try ProxyFixture(appPort: 1, files: clientFiles(server.inbound), concurrency: 1) { s in
            s.certsDirectory = clientDir
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend"])
        }
        return (client, server)
    }

    static func ordersEntry(port: Int, serviceAccount: String, trafficPolicy: String? = nil, portName: String = "http") -> String {
        var y = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: orders, namespace: production}
        spec:
          hosts: [orders.production.svc.cluster.local]
          resolution: STATIC
          ports: [{number: 80, name: \(portName)}]
          endpoints:
          - {address: 127.0.0.1, ports: {\(portName): \(port)}, serviceAccount: \(serviceAccount), labels: {security.istio.io/tlsMode: istio}}

        """
        if let trafficPolicy {
            y += "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: orders, namespace: production}\nspec:\n  host: orders.production.svc.cluster.local\n  trafficPolicy: \(trafficPolicy)\n"
        }
        return y
    }

    func test_sidecarToSidecar_autoMTLS_carriesTheCallersPrincipalToTheServersLuaFilter() throws {
        let (client, server) = try twoSidecars(clientFiles: { ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "orders")] })
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound)
        for _ in 0..<3 {
            c.send("GET /orders HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
            let r = c.read()
            XCTAssertEqual(r?.status, 200, r?.body ?? "")
            XCTAssertEqual(r?.header("x-peer"), "cluster.local/ns/default/sa/frontend")
        }
        XCTAssertEqual(app.seen.count, 3)
        XCTAssertEqual(app.connections, 1, "the inbound sidecar reuses its app connection")
        let stats = try XCTUnwrap(adminGet(client.admin, "/stats/prometheus")).body
        XCTAssertFalse(stats.contains("moonlet_upstream_cx_http2_total"), "a port declared HTTP stays HTTP/1.1 between the sidecars, as in Istio")
    }

    func test_sidecarToSidecar_autoMTLS_worksInAMeshWhoseTrustDomainIsNotClusterLocal() throws {
        // The expected server identity is formed from the ServiceEntry's service account;
        // it must be checked in the mesh's trust domain (the sidecar's own), not cluster.local.
        let mesh = try MeshCA.create(trustDomain: "shop.example")
        func issue(_ ns: String, _ sa: String) throws -> String {
            let d = pki.dir + "/shop-\(ns)-\(sa)"
            try mesh.issue(try mesh.identity(namespace: ns, serviceAccount: sa)).write(to: d)
            return d
        }
        // One request from a frontend sidecar to an orders sidecar, the ServiceEntry naming `expected` as the server's account.
        func call(expecting expected: String) throws -> RawClient.Response? {
            let (client, server) = try twoSidecars(clientFiles: { ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: expected)] },
                                                   serverCerts: try issue("production", "orders"), clientCerts: try issue("default", "frontend"))
            defer { client.stop(); server.stop() }
            let c = try RawClient(port: client.outbound)
            c.send("GET /orders HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
            return c.read()
        }
        let r = try call(expecting: "orders")
        XCTAssertEqual(r?.status, 200, r?.body ?? "")
        XCTAssertEqual(r?.header("x-peer"), "shop.example/ns/default/sa/frontend")
        // A server of another service account is still refused in that trust domain.
        let refused = try call(expecting: "payments")
        XCTAssertEqual(refused?.status, 503, refused?.body ?? "")
    }

    func test_sidecarToSidecar_onAnUndeclaredPort_speaksWhatTheClientSpoke() throws {
        let (client, server) = try twoSidecars(clientFiles: { ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "orders", portName: "web")] })
        defer { client.stop(); server.stop() }
        let url = "http://127.0.0.1:\(client.outbound)/h2"
        let out = try runTool("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-H", "host: orders.production.svc.cluster.local", "-D", "-", url])
        XCTAssertTrue(out.hasPrefix("HTTP/2 200"), out)
        XCTAssertTrue(out.contains("x-peer: cluster.local/ns/default/sa/frontend"), out)
        let c = try RawClient(port: client.outbound)
        c.send("GET /h1 HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        let stats = try XCTUnwrap(adminGet(client.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_upstream_cx_http2_total 1\n"), "the h2 client's request went over h2, the HTTP/1.1 client's did not:\n\(stats)")
        XCTAssertEqual(app.seen.map(\.uri), ["/h2", "/h1"])
    }

    func test_sidecarToSidecar_withH2UpgradePolicyUpgrade_speaksHTTP2OverOneMutualTLSConnection_forConcurrentRequestsWithBodies() throws {
        app.stop()
        app = try TestUpstream { r in
            TestUpstream.Reply(body: r.uri == "/big" ? String(repeating: "x", count: 600_000) : "\(r.method) \(r.uri) \(r.bodyBytes)")
        }
        let (client, server) = try twoSidecars(clientFiles: {
            ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "orders", trafficPolicy: "{connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}")]
        })
        defer { client.stop(); server.stop() }
        let host = "Host: orders.production.svc.cluster.local\r\n"
        let first = try RawClient(port: client.outbound)
        first.send("GET /first HTTP/1.1\r\n\(host)\r\n")
        XCTAssertEqual(first.read()?.body, "GET /first 0")
        // Eight clients at once, each with three requests: GET, POST with a length, POST chunked.
        let failures = NIOLockedValueBox<[String]>([])
        let workers = (0..<8).map { i in
            Thread {
                guard let c = try? RawClient(port: client.outbound) else { failures.withLockedValue { $0.append("connect") }; return }
                c.send("GET /g\(i) HTTP/1.1\r\n\(host)\r\n")
                let g = c.read()
                if g?.status != 200 || g?.body != "GET /g\(i) 0" || g?.header("x-peer") != "cluster.local/ns/default/sa/frontend" {
                    failures.withLockedValue { $0.append("GET: \(String(describing: g))") }
                }
                c.send("POST /p\(i) HTTP/1.1\r\n\(host)content-length: 5\r\n\r\nhello")
                let p = c.read()
                if p?.body != "POST /p\(i) 5" { failures.withLockedValue { $0.append("POST: \(String(describing: p))") } }
                c.send("POST /c\(i) HTTP/1.1\r\n\(host)transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
                let ch = c.read()
                if ch?.body != "POST /c\(i) 7" { failures.withLockedValue { $0.append("chunked: \(String(describing: ch))") } }
            }
        }
        workers.forEach { $0.start() }
        workers.forEach { while !$0.isFinished { usleep(10_000) } }
        XCTAssertEqual(failures.withLockedValue { $0 }, [])
        let c = try RawClient(port: client.outbound)
        c.send("HEAD /h HTTP/1.1\r\n\(host)\r\n")
        let h = c.read(head: true)
        XCTAssertEqual(h?.status, 200)
        XCTAssertEqual(h?.body, "")
        c.send("GET /after-head HTTP/1.1\r\n\(host)\r\n")
        XCTAssertEqual(c.read()?.body, "GET /after-head 0", "the connection stays in step after a HEAD")
        // Bodies larger than HTTP/2's flow-control windows, both ways.
        c.send("POST /up HTTP/1.1\r\n\(host)content-length: 2000000\r\n\r\n" + String(repeating: "y", count: 2_000_000))
        XCTAssertEqual(c.read()?.body, "POST /up 2000000")
        c.send("GET /big HTTP/1.1\r\n\(host)\r\n")
        XCTAssertEqual(c.read()?.body.count, 600_000)
        // Finished streams close without RST_STREAM: 250 more requests stay on the same
        // connection (peers close connections that reset streams rapidly, HTTP/2 rapid reset).
        for i in 0..<250 {
            c.send("GET /seq\(i) HTTP/1.1\r\n\(host)\r\n")
            if c.read()?.status != 200 { XCTFail("request \(i) failed"); break }
        }
        XCTAssertEqual(app.seen.count, 279)
        let clientStats = try XCTUnwrap(adminGet(client.admin, "/stats/prometheus")).body
        let serverStats = try XCTUnwrap(adminGet(server.admin, "/stats/prometheus")).body
        XCTAssertTrue(clientStats.contains("moonlet_upstream_cx_http2_total 1\n"), "one HTTP/2 connection carried every request:\n\(clientStats)")
        XCTAssertTrue(serverStats.contains("moonlet_downstream_cx_http2_total 1\n"), serverStats)
        XCTAssertFalse(serverStats.contains("response_flags=\"DC\""), "streams that ended normally are not downstream disconnects:\n\(serverStats)")
    }

    /// The upgrade asks for HTTP/2, but the mesh endpoint's TLS offers only http/1.1 (an
    /// older sidecar): every request goes whole as HTTP/1.1 after all, a request without
    /// body with its head written once the connection's protocol is known.
    func test_anUpgradeToAnEndpointThatOnlySpeaksHTTP1_sendsEachRequestWholeAsHTTP1() throws {
        let certs = try pki.issue("production", "orders")
        var cfg = TLSConfiguration.makeServerConfiguration(certificateChain: try NIOSSLCertificate.fromPEMFile(certs + "/cert-chain.pem").map { .certificate($0) },
                                                           privateKey: .privateKey(try NIOSSLPrivateKey(file: certs + "/key.pem", format: .pem)))
        cfg.applicationProtocols = ["http/1.1"]
        let sctx = try NIOSSLContext(configuration: cfg)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let h1 = try ServerBootstrap(group: group).childChannelInitializer { ch in
            ch.eventLoop.makeCompletedFuture {
                try ch.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: sctx))
                try ch.pipeline.syncOperations.configureHTTPServerPipeline()
                try ch.pipeline.syncOperations.addHandler(HTTP1RequestEcho())
            }
        }.bind(host: "127.0.0.1", port: 0).wait()
        defer { try? h1.close().wait() }
        // Under /nr retries are off: no request keeps a replay copy there.
        let vs = """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: orders, namespace: production}
        spec:
          hosts: [orders.production.svc.cluster.local]
          http:
          - match: [{uri: {prefix: /nr}}]
            route: [{destination: {host: orders.production.svc.cluster.local}}]
            retries: {attempts: 0}
          - route: [{destination: {host: orders.production.svc.cluster.local}}]
        """
        let client = try ProxyFixture(appPort: 1, files: [
            "se.yaml": Self.ordersEntry(port: h1.localAddress!.port!, serviceAccount: "orders", trafficPolicy: "{connectionPool: {http: {h2UpgradePolicy: UPGRADE, maxRequestsPerConnection: 1}}}"),
            "vs.yaml": vs,
        ], concurrency: 1) { s in
            s.certsDirectory = try? self.pki.issue("default", "frontend")
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend"])
        }
        defer { client.stop() }
        let host = "Host: orders.production.svc.cluster.local\r\n"
        // One request per upstream connection (maxRequestsPerConnection 1): each request
        // comes while its connection is being made.
        let requests = ["", "/nr"].flatMap { p in [
            ("GET \(p)/g HTTP/1.1\r\n\(host)\r\n", "GET \(p)/g 0 -"),
            ("POST \(p)/p HTTP/1.1\r\n\(host)content-length: 5\r\n\r\nhello", "POST \(p)/p 5 -"),
            ("POST \(p)/c HTTP/1.1\r\n\(host)transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n", "POST \(p)/c 7 chunked"),
        ] }
        for round in 0..<2 {
            for (request, expected) in requests {
                let c = try RawClient(port: client.outbound)
                c.send(request)
                let r = c.read()
                XCTAssertEqual(r?.status, 200, "round \(round): \(request)")
                XCTAssertEqual(r?.body, expected, "round \(round)")
            }
        }
        let stats = try XCTUnwrap(adminGet(client.admin, "/stats/prometheus")).body
        XCTAssertNil(stats.range(of: #"moonlet_upstream_cx_http2_total [1-9]"#, options: .regularExpression), stats)
    }

    func test_sidecarToSidecar_destinationRuleIstioMutual_works() throws {
        let (client, server) = try twoSidecars(clientFiles: {
            ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "orders", trafficPolicy: "{tls: {mode: ISTIO_MUTUAL}}")]
        })
        defer { client.stop(); server.stop() }
        let r = get(try RawClient(port: client.outbound), "/", headers: "") // Host: app has no route
        XCTAssertEqual(r?.status, 404)
        let c = try RawClient(port: client.outbound)
        c.send("GET / HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
        XCTAssertEqual(c.read()?.header("x-peer"), "cluster.local/ns/default/sa/frontend")
    }

    func test_serverIdentityThatDoesNotMatchTheServiceAccount_isRefusedByTheClient() throws {
        // The endpoint is declared as payments, but the server presents orders.
        let (client, server) = try twoSidecars(clientFiles: { ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "payments")] })
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound)
        c.send("GET / HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
        let r = c.read()
        XCTAssertEqual(r?.status, 503)
        XCTAssertTrue(r?.body.contains("does not match the expected") == true, r?.body ?? "")
        XCTAssertEqual(app.seen.count, 0)
    }

    func test_destinationRuleSimpleAndMutual_reachTLSUpstreamsWithTheGivenFiles_andRefuseWhatDoesNotVerify() throws {
        let serverDir = try pki.issue("external", "api")
        let clientDir = try pki.issue("default", "frontend")
        func serverContext(requireClientCertificate: Bool) throws -> NIOSSLContext {
            var c = TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMFile(serverDir + "/cert-chain.pem").map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(file: serverDir + "/key.pem", format: .pem)))
            if requireClientCertificate {
                c.certificateVerification = .noHostnameVerification
                c.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(serverDir + "/root-cert.pem"))
            }
            return try NIOSSLContext(configuration: c)
        }
        let simpleUp = try TestUpstream(tls: serverContext(requireClientCertificate: false))
        let mutualUp = try TestUpstream(tls: serverContext(requireClientCertificate: true))
        defer { simpleUp.stop(); mutualUp.stop() }
        let ca = "caCertificates: \(serverDir)/root-cert.pem"
        let px = try ProxyFixture(appPort: 1, files: [
            // The issued certificate names a SPIFFE id, not a DNS name: check that instead of the host.
            "simple.yaml": meshService("simple.example", ports: [simpleUp.port],
                                       trafficPolicy: "{tls: {mode: SIMPLE, \(ca), insecureSkipVerify: true, subjectAltNames: ['spiffe://cluster.local/ns/external/sa/api']}}"),
            "mutual.yaml": meshService("mutual.example", ports: [mutualUp.port],
                                       trafficPolicy: "{tls: {mode: MUTUAL, \(ca), insecureSkipVerify: true, clientCertificate: \(clientDir)/cert-chain.pem, privateKey: \(clientDir)/key.pem}}"),
            "nocert.yaml": meshService("nocert.example", ports: [mutualUp.port], trafficPolicy: "{tls: {mode: SIMPLE, \(ca), insecureSkipVerify: true}}"),
            "hostname.yaml": meshService("hostname.example", ports: [simpleUp.port], trafficPolicy: "{tls: {mode: SIMPLE, \(ca), sni: hostname.example}}"),
            "wrongsan.yaml": meshService("wrongsan.example", ports: [simpleUp.port],
                                         trafficPolicy: "{tls: {mode: SIMPLE, \(ca), insecureSkipVerify: true, subjectAltNames: ['spiffe://cluster.local/ns/other/sa/x']}}"),
            "badfile.yaml": meshService("badfile.example", ports: [simpleUp.port], trafficPolicy: "{tls: {mode: SIMPLE, caCertificates: /nonexistent/ca.pem}}"),
        ], concurrency: 1)
        defer { px.stop() }
        func call(_ host: String) -> RawClient.Response? {
            guard let c = try? RawClient(port: px.outbound) else { return nil }
            c.send("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n")
            return c.read()
        }
        XCTAssertEqual(call("simple.example")?.status, 200)
        XCTAssertEqual(call("mutual.example")?.status, 200)
        XCTAssertEqual(call("nocert.example")?.status, 503, "the server requires a client certificate")
        XCTAssertEqual(call("hostname.example")?.status, 503, "the certificate does not name hostname.example")
        XCTAssertEqual(call("wrongsan.example")?.status, 503)
        let bad = call("badfile.example")
        XCTAssertEqual(bad?.status, 503)
        XCTAssertTrue(bad?.body.contains("the DestinationRule's TLS files could not be loaded") == true, bad?.body ?? "")
        XCTAssertFalse(bad?.body.contains("/nonexistent") == true, "a local reply never shows a file system path: \(bad?.body ?? "")")
        XCTAssertEqual(simpleUp.seen.count, 1)
        XCTAssertEqual(mutualUp.seen.count, 1)
    }

    func test_istioMutualWithoutAWorkloadCertificate_failsWithUF_butAutoMTLSFallsBackToPlaintext() throws {
        let server = try serverSidecar(["pa.yaml": peerAuthentication("ns", namespace: "production", mode: "PERMISSIVE")], certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        let explicit = try ProxyFixture(appPort: 1, files: ["se.yaml": Self.ordersEntry(port: server.inbound, serviceAccount: "orders", trafficPolicy: "{tls: {mode: ISTIO_MUTUAL}}")], concurrency: 1)
        defer { explicit.stop() }
        let c = try RawClient(port: explicit.outbound)
        c.send("GET / HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
        let r = c.read()
        XCTAssertEqual(r?.status, 503)
        XCTAssertTrue(r?.body.contains("ISTIO_MUTUAL needs a workload certificate") == true, r?.body ?? "")
        let auto = try ProxyFixture(appPort: 1, files: ["se.yaml": Self.ordersEntry(port: server.inbound, serviceAccount: "orders")], concurrency: 1)
        defer { auto.stop() }
        let a = try RawClient(port: auto.outbound)
        a.send("GET / HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
        let ar = a.read()
        XCTAssertEqual(ar?.status, 200)
        XCTAssertEqual(ar?.header("x-peer"), "", "plaintext: no principal")
    }

    func test_certificateRotationUnderLoad_dropsNoRequest_andNewHandshakesUseTheNewCertificate() throws {
        let serverCerts = try pki.issue("production", "orders")
        let clientCerts = try pki.issue("default", "frontend")
        let (client, server) = try twoSidecars(clientFiles: { ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "orders", trafficPolicy: "{connectionPool: {http: {maxRequestsPerConnection: 5}}}")] },
                                               serverCerts: serverCerts, clientCerts: clientCerts)
        defer { client.stop(); server.stop() }
        let before = server.server.currentTLS!.notAfter
        let failures = NIOLockedValueBox(0), done = NIOLockedValueBox(0)
        let stop = ManagedAtomicFlag()
        let workers = (0..<4).map { _ in
            Thread {
                guard let c = try? RawClient(port: client.outbound) else { failures.withLockedValue { $0 += 1 }; return }
                while !stop.isSet {
                    c.send("GET / HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
                    if c.read()?.status == 200 { done.withLockedValue { $0 += 1 } } else { failures.withLockedValue { $0 += 1 }; return }
                }
            }
        }
        workers.forEach { $0.start() }
        // Three rotations of both certificates while traffic flows.
        for i in 0..<3 {
            usleep(400_000)
            try pki.ca.issue(try pki.ca.identity(namespace: "production", serviceAccount: "orders"), ttl: 7200 + Double(i) * 60).write(to: serverCerts)
            try pki.ca.issue(try pki.ca.identity(namespace: "default", serviceAccount: "frontend"), ttl: 7200 + Double(i) * 60).write(to: clientCerts)
        }
        var rotated = false
        for _ in 0..<30 { if server.server.currentTLS!.notAfter != before { rotated = true; break }; usleep(100_000) }
        usleep(1_500_000)
        stop.set()
        workers.forEach { while !$0.isFinished { usleep(10_000) } }
        XCTAssertTrue(rotated, "the server did not load the new certificate")
        XCTAssertEqual(failures.withLockedValue { $0 }, 0)
        XCTAssertGreaterThan(done.withLockedValue { $0 }, 50)
        // New handshakes present the new certificate.
        let r = tlsRequest(port: server.inbound, certDir: clientCerts, rootPEM: pki.ca.rootCertPEM)
        XCTAssertEqual(try r.get().status, 200)
        XCTAssertLessThan(abs(server.server.currentTLS!.notAfter.timeIntervalSinceNow - (7200 + 120)), 120)
    }

    func test_badCertificateFilesOnRotation_areRejected_andTheLastGoodCertificateKeepsServing() throws {
        let certs = try pki.issue("production", "orders")
        let server = try serverSidecar(["pa.yaml": peerAuthentication("s", namespace: "production", mode: "STRICT")], certs: certs)
        defer { server.stop() }
        let good = server.server.currentTLS!
        // A key that does not belong to the certificate.
        let other = try pki.issue("production", "other")
        try FileManager.default.removeItem(atPath: certs + "/key.pem")
        try FileManager.default.copyItem(atPath: other + "/key.pem", toPath: certs + "/key.pem")
        var err: String?
        for _ in 0..<30 { err = server.server.lock.withLock { server.server.lastCertError }; if err != nil { break }; usleep(100_000) }
        XCTAssertTrue(err?.contains("key.pem: does not match the certificate") == true, err ?? "no error")
        XCTAssertTrue(server.server.currentTLS === good)
        XCTAssertEqual(try tlsRequest(port: server.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM).get().status, 200)
    }

    func test_sidecarGetsAndRenewsItsCertificateFromTheCA_withABootstrapToken() throws {
        let caGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? caGroup.syncShutdownGracefully() }
        let service = CAService(ca: pki.ca, tokens: ["t0ken": try pki.ca.identity(namespace: "production", serviceAccount: "orders")], maxTTL: 4)
        let caChannel = try service.bind(group: caGroup, host: "127.0.0.1", port: 0)
        defer { try? caChannel.close().wait() }
        let caAddr = "127.0.0.1:\(caChannel.localAddress!.port!)"
        let certs = pki.dir + "/from-ca"
        try FileManager.default.createDirectory(atPath: certs, withIntermediateDirectories: true)
        try pki.ca.rootCertPEM.write(toFile: certs + "/root-cert.pem", atomically: true, encoding: .utf8)
        let tokenFile = pki.dir + "/token"
        // A token for another identity is refused.
        try "wrong".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ProxyFixture(appPort: app.port, files: [:], concurrency: 1) { s in
            s.certsDirectory = certs; s.caAddress = caAddr; s.caTokenFile = tokenFile
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders")
        })
        try "t0ken\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        let server = try ProxyFixture(appPort: app.port, files: [:], concurrency: 1) { s in
            s.certsDirectory = certs; s.caAddress = caAddr; s.caTokenFile = tokenFile
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders")
        }
        defer { server.stop() }
        let first = server.server.currentTLS!
        XCTAssertEqual(first.identity.uri, "spiffe://cluster.local/ns/production/sa/orders")
        XCTAssertLessThanOrEqual(first.notAfter.timeIntervalSince(first.notBefore), 5, "the CA's max TTL (4 s) applies")
        // Renewal at half the lifetime, authenticated by the current certificate.
        var renewed = false
        for _ in 0..<80 { if server.server.currentTLS !== first { renewed = true; break }; usleep(100_000) }
        XCTAssertTrue(renewed)
        XCTAssertEqual(try tlsRequest(port: server.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM).get().status, 200)
    }
}

/// A flag set once, read from several threads.
final class ManagedAtomicFlag: @unchecked Sendable {
    private let lock = NIOLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
}

/// Log lines a proxy or the CA wrote, for tests that check what is logged.
final class CapturedLog: @unchecked Sendable {
    private let lock = NIOLock()
    private var lines: [String] = []
    var all: [String] { lock.withLock { lines } }
    func append(_ s: String) { lock.withLock { lines.append(s) } }
    /// Whether a line holds `s`, waiting up to a second for it (the server may log a
    /// refusal just after the client saw it).
    func contains(_ s: String) -> Bool {
        for _ in 0..<20 {
            if all.contains(where: { $0.contains(s) }) { return true }
            usleep(50_000)
        }
        return false
    }
    var logger: Logger {
        var l = Logger(label: "captured") { _ in Handler(log: self) }
        l.logLevel = .info
        return l
    }
    struct Handler: LogHandler {
        let log: CapturedLog
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info
        subscript(metadataKey key: String) -> Logger.Metadata.Value? { get { metadata[key] } set { metadata[key] = newValue } }
        func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
            log.append("\(message)")
        }
    }
}

/// Issue 24 (identity hardening) and issue 16 item 15 (auto mTLS by the tlsMode label).
extension MTLSTests {
    /// Writes a bundle for `id` signed by `ca`, trusting `roots`, with extra URI SANs after the id.
    func bundle(_ name: String, ca: MeshCA, id: SpiffeID, extraURIs: [String] = [], roots: String? = nil) throws -> String {
        var b = try ca.issue(id, ttl: 3600, extraURIs: extraURIs)
        b.rootCertPEM = roots ?? pki.ca.rootCertPEM
        let d = pki.dir + "/" + name
        try b.write(to: d)
        return d
    }

    func strictSidecar(certs: String, logger: Logger? = nil, tweak: @escaping (inout ProxySettings) -> Void = { _ in }) throws -> ProxyFixture {
        try ProxyFixture(appPort: app.port, files: ["pa.yaml": peerAuthentication("s", namespace: "production", mode: "STRICT"),
                                                    "echo.lua": principalEcho, "echo.yaml": ProxyFixture.plugin("echo")],
                         concurrency: 1, logger: logger) { s in
            s.certsDirectory = certs
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
            tweak(&s)
        }
    }

    func test_inbound_acceptsOnlyTheMeshTrustDomainAndItsAliases_eachFromTheRootsTheMeshConfigNamesForIt() throws {
        // root-cert.pem holds the mesh root and a partner's root, whose subject claims the
        // mesh's trust domain (O=cluster.local); the mesh config names it for partner.local.
        let partner = try MeshCA.create(trustDomain: "partner.local", organization: "cluster.local")
        let both = pki.ca.rootCertPEM + partner.rootCertPEM
        let certs = try bundle("orders", ca: pki.ca, id: try pki.ca.identity(namespace: "production", serviceAccount: "orders"), roots: both)
        let partnerAdmin = try bundle("padmin", ca: partner, id: SpiffeID(trustDomain: "partner.local", namespace: "istio-system", serviceAccount: "admin")!)
        let meshAdminByPartner = try bundle("madmin", ca: partner, id: SpiffeID(trustDomain: "cluster.local", namespace: "istio-system", serviceAccount: "admin")!)
        let viaIntermediate = try bundle("inter", ca: try partner.intermediate(organization: "cluster.local"),
                                         id: SpiffeID(trustDomain: "cluster.local", namespace: "istio-system", serviceAccount: "admin")!)
        let evil = try bundle("evil", ca: pki.ca, id: SpiffeID(trustDomain: "evil.local", namespace: "istio-system", serviceAccount: "admin")!)
        let forgedAlias = try bundle("forged", ca: pki.ca, id: SpiffeID(trustDomain: "partner.local", namespace: "istio-system", serviceAccount: "admin")!)
        let log = CapturedLog()
        let server = try strictSidecar(certs: certs, logger: log.logger) {
            $0.meshTLS.trustDomainAliases = ["partner.local"]
            $0.meshTLS.caCertificates = [.init(pem: partner.rootCertPEM, trustDomains: ["partner.local"], source: "mesh.yaml: caCertificates[0].pem")]
        }
        defer { server.stop() }
        XCTAssertEqual(try tlsRequest(port: server.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM).get().status, 200)
        let r = try tlsRequest(port: server.inbound, certDir: partnerAdmin, rootPEM: pki.ca.rootCertPEM).get()
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.headers.first(name: "x-peer"), "partner.local/ns/istio-system/sa/admin")
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: meshAdminByPartner, rootPEM: pki.ca.rootCertPEM).get(), "the partner root signs no mesh identity")
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: viaIntermediate, rootPEM: pki.ca.rootCertPEM).get(), "nor through an intermediate")
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: forgedAlias, rootPEM: pki.ca.rootCertPEM).get(), "the mesh root does not sign partner identities")
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: evil, rootPEM: pki.ca.rootCertPEM).get(), "another trust domain signed by the mesh root")
        XCTAssertEqual(app.seen.count, 2)
        XCTAssertTrue(log.contains("certificate of spiffe://cluster.local/ns/istio-system/sa/admin does not chain to a root trusted for its trust domain cluster.local"), "\(log.all)")
        XCTAssertTrue(log.contains("trust domain of spiffe://evil.local/ns/istio-system/sa/admin is not the mesh's (cluster.local) nor one of its aliases (partner.local)"), "\(log.all)")
        // A partner root without any O= is no different.
        let anonymous = try MeshCA.create(trustDomain: "partner.local", organization: "")
        let anonCerts = try bundle("orders2", ca: pki.ca, id: try pki.ca.identity(namespace: "production", serviceAccount: "orders"), roots: pki.ca.rootCertPEM + anonymous.rootCertPEM)
        let anonServer = try strictSidecar(certs: anonCerts) {
            $0.meshTLS.trustDomainAliases = ["partner.local"]
            $0.meshTLS.caCertificates = [.init(pem: anonymous.rootCertPEM, trustDomains: ["partner.local"], source: "mesh.yaml: caCertificates[0].pem")]
        }
        defer { anonServer.stop() }
        let anonAdmin = try bundle("aadmin", ca: anonymous, id: SpiffeID(trustDomain: "cluster.local", namespace: "istio-system", serviceAccount: "admin")!)
        XCTAssertThrowsError(try tlsRequest(port: anonServer.inbound, certDir: anonAdmin, rootPEM: pki.ca.rootCertPEM).get())
        XCTAssertEqual(app.seen.count, 2)
    }

    func test_rootSwitchToAPlugInRootWithAnotherSubject_servesChainsThroughAnIntermediate_fromBothRoots() throws {
        // Istio's self-signed root (O=cluster.local) and a plug-in root (O=Istio) whose
        // intermediate issues the new certificates; root-cert.pem holds both, no mapping.
        let plugIn = try MeshCA.create(trustDomain: "cluster.local", organization: "Istio").intermediate(organization: "Istio")
        let both = pki.ca.rootCertPEM + plugIn.rootCertPEM
        let serverCerts = try bundle("orders", ca: plugIn, id: try pki.ca.identity(namespace: "production", serviceAccount: "orders"), roots: both)
        let server = try strictSidecar(certs: serverCerts)
        defer { server.stop() }
        let oldClient = try bundle("old", ca: pki.ca, id: try pki.ca.identity(namespace: "default", serviceAccount: "frontend"), roots: both)
        let newClient = try bundle("new", ca: plugIn, id: try pki.ca.identity(namespace: "default", serviceAccount: "frontend"), roots: both)
        for c in [oldClient, newClient] {
            let r = try tlsRequest(port: server.inbound, certDir: c, rootPEM: both, expectedServer: ["spiffe://cluster.local/ns/production/sa/orders"]).get()
            XCTAssertEqual(r.status, 200)
            XCTAssertEqual(r.headers.first(name: "x-peer"), "cluster.local/ns/default/sa/frontend")
        }
    }

    func test_aClientCertificateWithTwoURISANs_isRefused_byTheSidecarAndByTheCA() throws {
        let real = try pki.ca.identity(namespace: "default", serviceAccount: "frontend")
        let two = try bundle("two", ca: pki.ca, id: try pki.ca.identity(namespace: "istio-system", serviceAccount: "admin"), extraURIs: [real.uri])
        let server = try strictSidecar(certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: two, rootPEM: pki.ca.rootCertPEM).get())
        XCTAssertEqual(app.seen.count, 0)
        // Renewal at the CA with that certificate (and no token) is refused too.
        let caGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? caGroup.syncShutdownGracefully() }
        let ca = try CAService(ca: pki.ca, tokens: [:]).bind(group: caGroup, host: "127.0.0.1", port: 0)
        defer { try? ca.close().wait() }
        XCTAssertThrowsError(try CAClient.requestBundle(caAddress: "127.0.0.1:\(ca.localAddress!.port!)", rootCertPath: two + "/root-cert.pem",
                                                        identity: try pki.ca.identity(namespace: "istio-system", serviceAccount: "admin"),
                                                        token: nil, currentCertDir: two, group: caGroup)) { e in
            XCTAssertTrue("\(e)".contains("401") && "\(e)".contains("carries 2 URI SANs"), "\(e)")
        }
    }

    func test_inbound_refusesTLS12CBCSuites_andFollowsTheMeshMTLSPolicy() throws {
        let client = try pki.issue("default", "frontend")
        let server = try strictSidecar(certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        for cbc in ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA"] {
            XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: client, rootPEM: pki.ca.rootCertPEM, maxVersion: .tlsv12, ciphers: cbc).get(), cbc)
        }
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: client, rootPEM: pki.ca.rootCertPEM, maxVersion: .tlsv11).get(), "TLS 1.1")
        for gcm in ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"] {
            XCTAssertEqual(try tlsRequest(port: server.inbound, certDir: client, rootPEM: pki.ca.rootCertPEM, maxVersion: .tlsv12, ciphers: gcm).get().status, 200, gcm)
        }
        // meshMTLS.minProtocolVersion: TLSV1_3 refuses a TLS 1.2 client.
        let tls13 = try strictSidecar(certs: try pki.issue("production", "orders", name: "o13")) { $0.meshTLS.minProtocolVersion = .tls13 }
        defer { tls13.stop() }
        XCTAssertThrowsError(try tlsRequest(port: tls13.inbound, certDir: client, rootPEM: pki.ca.rootCertPEM, maxVersion: .tlsv12).get())
        XCTAssertEqual(try tlsRequest(port: tls13.inbound, certDir: client, rootPEM: pki.ca.rootCertPEM).get().status, 200)
    }

    func test_upstreamTLSRefusal_isLoggedWithPeerAndExpectedIdentity_andTheReplySaysWhatFailedInWords() throws {
        let log = CapturedLog()
        let server = try strictSidecar(certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        // An upstream whose certificate expired.
        let expiredDir = try pki.issue("production", "orders", name: "expired", ttl: 60, now: Date().addingTimeInterval(-3600))
        let expiredUp = try tlsUpstream(expiredDir)
        defer { expiredUp.stop() }
        let files = ["se.yaml": Self.ordersEntry(port: server.inbound, serviceAccount: "payments"),
                     "old.yaml": Self.ordersEntry(port: expiredUp.port, serviceAccount: "orders")
                        .replacingOccurrences(of: "orders.production", with: "old.production").replacingOccurrences(of: "name: orders", with: "name: old")]
        let client = try ProxyFixture(appPort: 1, files: files, concurrency: 1, logger: log.logger) { s in
            s.certsDirectory = try? self.pki.issue("default", "frontend")
        }
        defer { client.stop() }
        func call(_ host: String) -> RawClient.Response? {
            guard let c = try? RawClient(port: client.outbound) else { return nil }
            c.send("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n")
            return c.read()
        }
        let wrong = call("orders.production.svc.cluster.local")
        XCTAssertEqual(wrong?.status, 503)
        XCTAssertTrue(wrong?.body.contains("TLS handshake failed: server identity spiffe://cluster.local/ns/production/sa/orders does not match the expected spiffe://cluster.local/ns/production/sa/payments") == true, wrong?.body ?? "")
        let expired = call("old.production.svc.cluster.local")
        XCTAssertEqual(expired?.status, 503)
        XCTAssertTrue(expired?.body.contains("TLS handshake failed: certificate of spiffe://cluster.local/ns/production/sa/orders expired at") == true, expired?.body ?? "")
        for body in [wrong?.body ?? "", expired?.body ?? ""] {
            XCTAssertFalse(body.contains("OPENSSL") || body.contains("error:") || body.contains("sslError"), "no library dump: \(body)")
            XCTAssertFalse(body.contains(pki.dir), "no file system path: \(body)")
        }
        XCTAssertTrue(log.contains("upstream TLS with 127.0.0.1:\(server.inbound) refused: TLS handshake failed: server identity"), "\(log.all)")
        XCTAssertTrue(log.contains("(expected spiffe://cluster.local/ns/production/sa/orders)") && log.contains("expired at"), "\(log.all)")
        XCTAssertEqual(app.seen.count, 0)
    }

    func test_autoMTLS_sendsPlaintextToAnEndpointWithAServiceAccountButNoTlsModeLabel() throws {
        // The gray-release layout: endpoints with a service account, no sidecar, no label.
        let se = Self.ordersEntry(port: app.port, serviceAccount: "orders").replacingOccurrences(of: ", labels: {security.istio.io/tlsMode: istio}", with: "")
        let client = try ProxyFixture(appPort: 1, files: ["se.yaml": se], concurrency: 1) { s in
            s.certsDirectory = try? self.pki.issue("default", "frontend")
        }
        defer { client.stop() }
        let c = try RawClient(port: client.outbound)
        c.send("GET /plain HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
        let r = c.read()
        XCTAssertEqual(r?.status, 200, r?.body ?? "")
        XCTAssertEqual(app.seen.map(\.uri), ["/plain"])
    }

    // MARK: the CA service

    func startCA(tokens: [String: SpiffeID] = [:], limits: CAService.Limits = CAService.Limits(), log: CapturedLog? = nil,
                 on group: EventLoopGroup) throws -> (Channel, Int) {
        let service = CAService(ca: pki.ca, tokens: tokens, maxTTL: 3600, limits: limits) { line in log?.append(line) }
        let ch = try service.bind(group: group, host: "127.0.0.1", port: 0)
        return (ch, ch.localAddress!.port!)
    }

    func rootOnlyDir(_ name: String) throws -> String {
        let d = pki.dir + "/" + name
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        try pki.ca.rootCertPEM.write(toFile: d + "/root-cert.pem", atomically: true, encoding: .utf8)
        return d
    }

    func test_caClient_sendsItsTokenOnlyToAServerPresentingTheCAsIdentity_andAnEmptyListOfIdentitiesIsRefused() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let orders = try pki.ca.identity(namespace: "production", serviceAccount: "orders")
        // A fake CA serving with a workload's mesh certificate.
        let fake = try tlsUpstream(try pki.issue("default", "thief"))
        defer { fake.stop() }
        let dir = try rootOnlyDir("ca-client")
        XCTAssertThrowsError(try CAClient.requestBundle(caAddress: "127.0.0.1:\(fake.port)", rootCertPath: dir + "/root-cert.pem", identity: orders,
                                                        token: "s3cret", currentCertDir: nil, group: group, timeout: .seconds(5))) { e in
            XCTAssertTrue("\(e)".contains("CA identity not verified") && "\(e)".contains("spiffe://cluster.local/ns/istio-system/sa/moonlet-ca"), "\(e)")
        }
        // An empty list of CA identities does not switch the check off.
        for empty in [[String](), [""]] {
            XCTAssertThrowsError(try CAClient.requestBundle(caAddress: "127.0.0.1:\(fake.port)", rootCertPath: dir + "/root-cert.pem", identity: orders,
                                                            token: "s3cret", currentCertDir: nil, caIdentity: empty, group: group, timeout: .seconds(2))) { e in
                XCTAssertTrue("\(e)".contains("--ca-identity: is empty"), "\(e)")
            }
        }
        usleep(200_000)
        XCTAssertEqual(fake.seen.count, 0, "the token never reached the fake CA")
        // The real CA: by its SPIFFE id at an IP address, by its DNS name at localhost.
        let (ch, port) = try startCA(tokens: ["s3cret": orders], on: group)
        defer { try? ch.close().wait() }
        for addr in ["127.0.0.1:\(port)", "localhost:\(port)"] {
            let b = try CAClient.requestBundle(caAddress: addr, rootCertPath: dir + "/root-cert.pem", identity: orders, token: "s3cret", currentCertDir: nil, group: group)
            XCTAssertTrue(b.certChainPEM.contains("BEGIN CERTIFICATE"), addr)
        }
        // An explicit identity the CA does not have is refused.
        XCTAssertThrowsError(try CAClient.requestBundle(caAddress: "127.0.0.1:\(port)", rootCertPath: dir + "/root-cert.pem", identity: orders, token: "s3cret",
                                                        currentCertDir: nil, caIdentity: ["istiod.istio-system.svc.cluster.local"], group: group))
    }

    func test_caService_capsConnections_closesStalledHandshakes_logsRefusals_andKeepsServing() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let log = CapturedLog()
        let orders = try pki.ca.identity(namespace: "production", serviceAccount: "orders")
        let (ch, port) = try startCA(tokens: ["t": orders], limits: .init(maxConnections: 4, handshakeTimeout: .milliseconds(500), idleTimeout: .seconds(2)),
                                     log: log, on: group)
        defer { try? ch.close().wait() }
        // Four idle TCP connections fill the cap; a fifth is closed at once and logged.
        let idle = try (0..<4).map { _ in try RawClient(port: port, timeoutSeconds: 5) }
        usleep(100_000)
        let extra = try RawClient(port: port, timeoutSeconds: 2)
        XCTAssertTrue(extra.isClosed(), "a connection past the cap is closed")
        XCTAssertTrue(log.contains("refused: 4 connections open"), "\(log.all)")
        // The stalled handshakes are closed after 500 ms, and the CA serves again.
        for c in idle { XCTAssertTrue(c.isClosed(), "a stalled handshake is closed") }
        XCTAssertTrue(log.contains("did not finish within 500 ms"), "\(log.all)")
        let dir = try rootOnlyDir("capped")
        XCTAssertNoThrow(try CAClient.requestBundle(caAddress: "127.0.0.1:\(port)", rootCertPath: dir + "/root-cert.pem", identity: orders, token: "t",
                                                    currentCertDir: nil, group: group))
    }

    func test_caLogsEveryDecisionWithTheCallersAddress_andFailedHandshakes() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let log = CapturedLog()
        let orders = try pki.ca.identity(namespace: "production", serviceAccount: "orders")
        let (ch, port) = try startCA(tokens: ["t": orders], log: log, on: group)
        defer { try? ch.close().wait() }
        let dir = try rootOnlyDir("audit")
        _ = try CAClient.requestBundle(caAddress: "127.0.0.1:\(port)", rootCertPath: dir + "/root-cert.pem", identity: orders, token: "t", currentCertDir: nil, group: group)
        XCTAssertThrowsError(try CAClient.requestBundle(caAddress: "127.0.0.1:\(port)", rootCertPath: dir + "/root-cert.pem",
                                                        identity: try pki.ca.identity(namespace: "production", serviceAccount: "admin"), token: "t", currentCertDir: nil, group: group))
        let plain = try RawClient(port: port)
        plain.send("GET / HTTP/1.1\r\nHost: ca\r\n\r\n")
        XCTAssertTrue(plain.isClosed())
        // A client certificate from another root.
        XCTAssertThrowsError(try CAClient.requestBundle(caAddress: "127.0.0.1:\(port)", rootCertPath: dir + "/root-cert.pem", identity: orders, token: nil,
                                                        currentCertDir: try pki.issue("production", "orders", name: "foreign", by: pki.foreign), group: group))
        usleep(200_000)
        let lines = log.all
        XCTAssertTrue(lines.contains { $0.hasPrefix("ca: 127.0.0.1:") && $0.contains("issued spiffe://cluster.local/ns/production/sa/orders for 3600s (by bootstrap token)") }, "\(lines)")
        XCTAssertTrue(lines.contains { $0.contains("127.0.0.1:") && $0.contains("refused /v1/sign: caller spiffe://cluster.local/ns/production/sa/orders (by bootstrap token) may not get a certificate for spiffe://cluster.local/ns/production/sa/admin") }, "\(lines)")
        XCTAssertTrue(lines.contains { $0.contains("TLS handshake with 127.0.0.1:") && $0.contains("not TLS (plaintext on an mTLS port)") }, "\(lines)")
        XCTAssertTrue(lines.contains { $0.contains("TLS handshake with") && $0.contains("does not chain to the mesh root") }, "\(lines)")
    }

    func test_sidecarWithAnExpiredCertificate_getsANewOneWithItsToken_beforeOpeningItsListeners() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let (ch, port) = try startCA(tokens: ["t0ken": try pki.ca.identity(namespace: "production", serviceAccount: "orders")], on: group)
        defer { try? ch.close().wait() }
        let certs = try pki.issue("production", "orders", name: "stale", ttl: 60, now: Date().addingTimeInterval(-7200))
        let tokenFile = pki.dir + "/token"
        try "t0ken\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        let server = try ProxyFixture(appPort: app.port, files: [:], concurrency: 1) { s in
            s.certsDirectory = certs; s.caAddress = "127.0.0.1:\(port)"; s.caTokenFile = tokenFile
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders")
        }
        defer { server.stop() }
        let m = try XCTUnwrap(server.server.currentTLS)
        XCTAssertGreaterThan(m.notAfter, Date().addingTimeInterval(1800), "a fresh certificate was installed before serving")
        XCTAssertEqual(try tlsRequest(port: server.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM).get().status, 200)
    }

    func test_inAMeshWhoseTrustDomainIsNotClusterLocal_aSidecarGetsItsFirstCertificate_andRecoversFromAnExpiredOne_fromTheCADialledByIP() throws {
        let shop = try MeshCA.create(trustDomain: "shop.example")
        let id = try shop.identity(namespace: "production", serviceAccount: "orders")
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let ch = try CAService(ca: shop, tokens: ["t0ken": id], maxTTL: 3600).bind(group: group, host: "127.0.0.1", port: 0)
        defer { try? ch.close().wait() }
        let tokenFile = pki.dir + "/token"
        try "t0ken\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        // First certificate: only root-cert.pem; the trust domain comes from the mesh config.
        let first = pki.dir + "/first"
        try FileManager.default.createDirectory(atPath: first, withIntermediateDirectories: true)
        try shop.rootCertPEM.write(toFile: first + "/root-cert.pem", atomically: true, encoding: .utf8)
        // Recovery: an expired certificate of the mesh, no mesh config; its URI SAN names the trust domain.
        var stale = try shop.issue(id, ttl: 60, now: Date().addingTimeInterval(-7200))
        stale.rootCertPEM = shop.rootCertPEM
        try stale.write(to: pki.dir + "/stale")
        for (dir, trustDomain) in [(first, Optional("shop.example")), (pki.dir + "/stale", nil)] {
            let server = try ProxyFixture(appPort: app.port, files: [:], concurrency: 1) { s in
                s.certsDirectory = dir; s.caAddress = "127.0.0.1:\(ch.localAddress!.port!)"; s.caTokenFile = tokenFile
                s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders")
                s.meshTLS.trustDomain = trustDomain
            }
            defer { server.stop() }
            let m = try XCTUnwrap(server.server.currentTLS)
            XCTAssertEqual(m.identity.uri, "spiffe://shop.example/ns/production/sa/orders")
            XCTAssertGreaterThan(m.notAfter, Date().addingTimeInterval(1800))
        }
    }

    func test_caClient_retriesWithItsTokenOnlyWhenTheCARefusedItsCertificate_notWhenTheCADoesNotAnswer() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        // A server that accepts connections and never says anything.
        let accepted = NIOLockedValueBox(0)
        let silent = try ServerBootstrap(group: group)
            .childChannelInitializer { ch in accepted.withLockedValue { $0 += 1 }; return ch.eventLoop.makeSucceededVoidFuture() }
            .bind(host: "127.0.0.1", port: 0).wait()
        defer { try? silent.close().wait() }
        let certs = try pki.issue("production", "orders")
        let started = Date()
        XCTAssertThrowsError(try CAClient.requestBundle(caAddress: "127.0.0.1:\(silent.localAddress!.port!)", rootCertPath: certs + "/root-cert.pem",
                                                        identity: try pki.ca.identity(namespace: "production", serviceAccount: "orders"),
                                                        token: "t0ken", currentCertDir: certs, group: group, timeout: .milliseconds(500))) { e in
            XCTAssertTrue("\(e)".contains("no answer within"), "\(e)")
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 0.9)
        XCTAssertEqual(accepted.withLockedValue { $0 }, 1)
        // A certificate the CA refuses (from another root) still falls back to the token.
        let orders = try pki.ca.identity(namespace: "production", serviceAccount: "orders")
        let (ch, port) = try startCA(tokens: ["t0ken": orders], on: group)
        defer { try? ch.close().wait() }
        let foreign = try pki.issue("production", "orders", name: "foreign", by: pki.foreign)
        let b = try CAClient.requestBundle(caAddress: "127.0.0.1:\(port)", rootCertPath: certs + "/root-cert.pem", identity: orders, token: "t0ken",
                                           currentCertDir: foreign, group: group)
        XCTAssertTrue(b.certChainPEM.contains("BEGIN CERTIFICATE"))
    }

    /// A TLS connection to the CA (trusting the mesh root), its handshake finished.
    func caConnection(port: Int, group: EventLoopGroup) throws -> (Channel, HandshakeWatch) {
        var cfg = TLSConfiguration.makeClientConfiguration()
        cfg.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(pki.ca.rootCertPEM.utf8)))
        cfg.certificateVerification = .noHostnameVerification
        let ctx = try NIOSSLContext(configuration: cfg)
        let watch = HandshakeWatch(group.next().makePromise(of: Void.self))
        let ch = try ClientBootstrap(group: group).channelInitializer { ch in
            ch.eventLoop.makeCompletedFuture {
                try ch.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: ctx, serverHostname: nil))
                try ch.pipeline.syncOperations.addHandler(watch)
            }
        }.connect(host: "127.0.0.1", port: port).wait()
        try watch.promise.futureResult.wait()
        return (ch, watch)
    }

    final class HandshakeWatch: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let promise: EventLoopPromise<Void>
        var received = ""
        init(_ p: EventLoopPromise<Void>) { promise = p }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case TLSUserEvent.handshakeCompleted = event { promise.succeed(()) }
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) { received += String(buffer: unwrapInboundIn(data)) }
        func errorCaught(context: ChannelHandlerContext, error: Error) { promise.fail(error); context.close(promise: nil) }
    }

    func test_caService_closesAConnectionThatTricklesBytesAfterTheHandshake_atTheRequestDeadline_andClosesAfterOneResponse() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let log = CapturedLog()
        let (ca, port) = try startCA(limits: .init(handshakeTimeout: .seconds(2), requestTimeout: .milliseconds(600), idleTimeout: .seconds(5)), log: log, on: group)
        defer { try? ca.close().wait() }
        // One byte every 100 ms: each would restart an idle timer.
        let (ch, _) = try caConnection(port: port, group: group)
        let started = Date()
        for b in "POST /v1/sign HTTP/1.1\r\nhost: ca\r\n".utf8 where ch.isActive && Date().timeIntervalSince(started) < 3 {
            ch.writeAndFlush(ByteBuffer(bytes: [b]), promise: nil)
            usleep(100_000)
        }
        XCTAssertFalse(ch.isActive)
        XCTAssertLessThan(Date().timeIntervalSince(started), 1.5, "closed at the request deadline")
        XCTAssertTrue(log.contains("request from 127.0.0.1:") && log.contains("did not finish within 600 ms"), "\(log.all)")
        // A keep-alive request gets one response, then the connection closes.
        let (ka, watch) = try caConnection(port: port, group: group)
        let sent = Date()
        try ka.writeAndFlush(ByteBuffer(string: "GET /nope HTTP/1.1\r\nhost: ca\r\n\r\n")).wait()
        XCTAssertNoThrow(try ka.closeFuture.wait())
        XCTAssertLessThan(Date().timeIntervalSince(sent), 1, "closed by the CA after its response, not by a timeout")
        let got = try ka.eventLoop.submit { watch.received }.wait()
        XCTAssertTrue(got.hasPrefix("HTTP/1.1 404") && got.lowercased().contains("connection: close"), got)
    }

    func test_caService_capsConnectionsPerSourceAddress_andKeepsItsCapUnderTheOpenFileLimit_loggingBoth() throws {
        XCTAssertEqual(CAService.connectionCap(requested: 1024, fileLimit: 1024), 960)
        XCTAssertEqual(CAService.connectionCap(requested: 100, fileLimit: 1024), 100)
        XCTAssertEqual(CAService.connectionCap(requested: 100, fileLimit: nil), 100)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let log = CapturedLog()
        // Per address: two from 127.0.0.1, the third is refused.
        let service = CAService(ca: pki.ca, tokens: [:], limits: .init(maxConnections: 100, maxConnectionsPerAddress: 2, handshakeTimeout: .seconds(5))) { log.append($0) }
        let ch = try service.bind(group: group, host: "127.0.0.1", port: 0)
        defer { try? ch.close().wait() }
        let two = try (0..<2).map { _ in try RawClient(port: ch.localAddress!.port!, timeoutSeconds: 5) }
        // The two stay open while the third is tried (an optimized build would close them
        // as soon as they are no longer used).
        try withExtendedLifetime(two) {
            usleep(100_000)
            XCTAssertTrue(try RawClient(port: ch.localAddress!.port!, timeoutSeconds: 2).isClosed())
            XCTAssertTrue(log.contains("refused: 2 connections open from 127.0.0.1 (the --max-connections-per-address cap)"), "\(log.all)")
        }
        // Under an open file limit of 67, 3 connections at most (64 kept for the CA).
        let small = CAService(ca: pki.ca, tokens: [:], limits: .init(maxConnections: 1024, handshakeTimeout: .seconds(5))) { log.append($0) }
        let sch = try small.bind(group: group, host: "127.0.0.1", port: 0, fileLimit: 67)
        defer { try? sch.close().wait() }
        XCTAssertTrue(log.contains("ca: connection cap lowered from 1024 to 3: the open file limit is 67"), "\(log.all)")
        let three = try (0..<3).map { _ in try RawClient(port: sch.localAddress!.port!, timeoutSeconds: 5) }
        try withExtendedLifetime(three) {
            usleep(100_000)
            XCTAssertTrue(try RawClient(port: sch.localAddress!.port!, timeoutSeconds: 2).isClosed())
            XCTAssertTrue(log.contains("refused: 3 connections open (the --max-connections cap)"), "\(log.all)")
        }
    }

    func test_strictSidecar_logsAServerAuthOnlyClientCertificate_asLackingClientAuth_fromBoringSSLsOwnRefusal() throws {
        let log = CapturedLog()
        let server = try strictSidecar(certs: try pki.issue("production", "orders"), logger: log.logger)
        defer { server.stop() }
        // From the mesh root: the usage is the reason; from a foreign root: the chain is.
        for (ca, why) in [(pki.ca, "certificate of spiffe://cluster.local/ns/default/sa/web lacks the extended key usage clientAuth (TLS client)"),
                          (pki.foreign, "certificate of spiffe://cluster.local/ns/default/sa/web (issuer O=cluster.local) does not chain to the mesh root")] {
            var b = try ca.issue(try ca.identity(namespace: "default", serviceAccount: "web"), usages: [.serverAuth])
            b.rootCertPEM = pki.ca.rootCertPEM
            try b.write(to: pki.dir + "/server-only")
            XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: pki.dir + "/server-only", rootPEM: pki.ca.rootCertPEM).get())
            usleep(100_000)
            XCTAssertTrue(log.contains(why), "\(log.all)")
        }
        XCTAssertEqual(app.seen.count, 0)
    }

    func inode(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_ino) : 0
    }

    func test_sidecarRenewal_writesKeyAndChainOnly_keyOwnerOnly_andLeavesRootCertAsTheOperatorHasIt() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let (ch, port) = try startCA(tokens: ["t0ken": try pki.ca.identity(namespace: "production", serviceAccount: "orders")], on: group)
        defer { try? ch.close().wait() }
        let certs = try pki.issue("production", "orders", name: "renew", ttl: 60, now: Date().addingTimeInterval(-7200))
        // The operator's root-cert.pem: both roots of a root switch, read-only.
        let roots = pki.ca.rootCertPEM + pki.foreign.rootCertPEM
        try roots.write(toFile: certs + "/root-cert.pem", atomically: true, encoding: .utf8)
        chmod(certs + "/root-cert.pem", 0o444)
        let rootInode = inode(certs + "/root-cert.pem")
        try "t0ken\n".write(toFile: pki.dir + "/token", atomically: true, encoding: .utf8)
        let old = umask(0)
        defer { umask(old) }
        var server: ProxyFixture!
        let created = try FileCreations.record {
            server = try ProxyFixture(appPort: app.port, files: [:], concurrency: 1) { s in
                s.certsDirectory = certs; s.caAddress = "127.0.0.1:\(port)"; s.caTokenFile = self.pki.dir + "/token"
                s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders")
            }
        }
        defer { server.stop() }
        // The renewal created a key and a chain, the key owner-only from its creation.
        XCTAssertEqual(created.map { String(($0.path as NSString).lastPathComponent.prefix(while: { $0 != "." })) + ".pem " + String($0.mode, radix: 8) },
                       ["key.pem 600", "cert-chain.pem 644"])
        XCTAssertGreaterThan(try XCTUnwrap(server.server.currentTLS).notAfter, Date().addingTimeInterval(1800))
        XCTAssertEqual(inode(certs + "/root-cert.pem"), rootInode, "root-cert.pem was not rewritten")
        XCTAssertEqual(try String(contentsOfFile: certs + "/root-cert.pem", encoding: .utf8), roots)
        var st = stat()
        XCTAssertEqual(stat(certs + "/key.pem", &st), 0)
        XCTAssertEqual(String(st.st_mode & 0o777, radix: 8), "600", "the renewed key under umask 0")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: certs).sorted(), ["cert-chain.pem", "key.pem", "root-cert.pem"])
    }

    func test_meshMTLSPolicy_appliesToTheCAsListenerAndToTheSidecarsConnectionToTheCA() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let log = CapturedLog()
        let tls13 = MeshTLSSettings(minProtocolVersion: .tls13)
        let service = CAService(ca: pki.ca, tokens: [:], policy: tls13) { log.append($0) }
        let ch = try service.bind(group: group, host: "127.0.0.1", port: 0)
        defer { try? ch.close().wait() }
        XCTAssertThrowsError(try tlsRequest(port: ch.localAddress!.port!, certDir: nil, rootPEM: pki.ca.rootCertPEM, maxVersion: .tlsv12).get())
        usleep(100_000)
        XCTAssertTrue(log.contains("no TLS version or cipher suite in common"), "\(log.all)")
        // The client side: a TLS 1.2-only server is refused before anything is sent.
        let w = try pki.issue("istio-system", "moonlet-ca", name: "ca12")
        let old = try tlsUpstream(w, maxVersion: .tlsv12)
        defer { old.stop() }
        XCTAssertThrowsError(try CAClient.requestBundle(caAddress: "127.0.0.1:\(old.port)", rootCertPath: w + "/root-cert.pem",
                                                        identity: try pki.ca.identity(namespace: "production", serviceAccount: "orders"),
                                                        token: "t", currentCertDir: nil, policy: tls13, group: group, timeout: .seconds(2))) { e in
            XCTAssertTrue("\(e)".contains("TLS with the CA failed"), "\(e)")
        }
        XCTAssertEqual(old.seen.count, 0)
    }

    /// A TLS server presenting the bundle in `dir` (it asks for no client certificate),
    /// speaking at most `maxVersion`.
    func tlsUpstream(_ dir: String, maxVersion: TLSVersion? = nil) throws -> TestUpstream {
        var sc = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(dir + "/cert-chain.pem").map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: dir + "/key.pem", format: .pem)))
        sc.certificateVerification = .none
        if let maxVersion { sc.maximumTLSVersion = maxVersion }
        return try TestUpstream(tls: try NIOSSLContext(configuration: sc))
    }

    func test_outbound_refusesAClientAuthOnlyServer_andAServerWhoseChainEndsAtARootOfAnotherTrustDomain_sayingWhy() throws {
        let id = try pki.ca.identity(namespace: "production", serviceAccount: "orders")
        var clientOnly = try pki.ca.issue(id, usages: [.clientAuth])
        clientOnly.rootCertPEM = pki.ca.rootCertPEM
        try clientOnly.write(to: pki.dir + "/client-only")
        // A partner root (named for partner.local in the mesh config, its O= the mesh's) signing a mesh identity.
        let partner = try MeshCA.create(trustDomain: "partner.local", organization: "cluster.local")
        let forged = try bundle("forged", ca: partner, id: id)
        for (dir, why) in [(pki.dir + "/client-only", "certificate of spiffe://cluster.local/ns/production/sa/orders lacks the extended key usage serverAuth (TLS server)"),
                           (forged, "certificate of spiffe://cluster.local/ns/production/sa/orders does not chain to a root trusted for its trust domain cluster.local")] {
            let up = try tlsUpstream(dir)
            defer { up.stop() }
            let certs = try bundle("frontend", ca: pki.ca, id: try pki.ca.identity(namespace: "default", serviceAccount: "frontend"),
                                   roots: pki.ca.rootCertPEM + partner.rootCertPEM)
            let client = try ProxyFixture(appPort: 1, files: ["se.yaml": Self.ordersEntry(port: up.port, serviceAccount: "orders")], concurrency: 1) { s in
                s.certsDirectory = certs
                s.meshTLS.caCertificates = [.init(pem: partner.rootCertPEM, trustDomains: ["partner.local"], source: "mesh.yaml: caCertificates[0].pem")]
            }
            defer { client.stop() }
            let c = try RawClient(port: client.outbound)
            c.send("GET / HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
            let r = c.read()
            XCTAssertEqual(r?.status, 503)
            XCTAssertTrue(r?.body.contains("TLS handshake failed: " + why) == true, r?.body ?? "")
            XCTAssertEqual(up.seen.count, 0)
        }
    }

    /// One request with openssl s_client (which can resume a TLS session): its output.
    func opensslRequest(port: Int, certDir: String, session: String, resume: Bool) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        p.arguments = ["s_client", "-connect", "127.0.0.1:\(port)", "-cert", certDir + "/cert-chain.pem", "-key", certDir + "/key.pem",
                       "-CAfile", pki.rootCertPEMPath, "-ign_eof", resume ? "-sess_in" : "-sess_out", session]
        let input = Pipe(), out = Pipe()
        p.standardInput = input; p.standardOutput = out; p.standardError = out
        try p.run()
        input.fileHandleForWriting.write(Data("GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".utf8))
        let killer = DispatchWorkItem { if p.isRunning { p.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 5, execute: killer)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        killer.cancel()
        try? input.fileHandleForWriting.close()
        return String(decoding: data, as: UTF8.self)
    }

    func test_aResumedTLSSession_carriesThePeersIdentity_likeTheFullHandshakeDid() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { throw XCTSkip("openssl not installed") }
        let server = try strictSidecar(certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        let client = try pki.issue("default", "frontend")
        let session = pki.dir + "/session.pem"
        let first = try opensslRequest(port: server.inbound, certDir: client, session: session, resume: false)
        XCTAssertTrue(first.lowercased().contains("x-peer: cluster.local/ns/default/sa/frontend"), first)
        let second = try opensslRequest(port: server.inbound, certDir: client, session: session, resume: true)
        XCTAssertTrue(second.contains("Reused"), second)
        XCTAssertTrue(second.lowercased().contains("x-peer: cluster.local/ns/default/sa/frontend"), second)
    }
}

/// An HTTP/1.1 server's handler answering "METHOD URI BODY-BYTES TRANSFER-ENCODING" (or "-").
final class HTTP1RequestEcho: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    var head: HTTPRequestHead?
    var bytes = 0
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h; bytes = 0
        case .body(let b): bytes += b.readableBytes
        case .end:
            guard let h = head else { return }
            let body = "\(h.method) \(h.uri) \(bytes) \(h.headers["transfer-encoding"].first ?? "-")"
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: ["content-length": "\(body.utf8.count)"]))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}
