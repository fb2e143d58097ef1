import XCTest
import NIOCore
@testable import MoonletProxy
import MoonletConfig
import MoonletCore
import MoonletTLS
import Logging

/// `--mesh-config`: a running proxy re-reads Istio's MeshConfig when the file changes
/// and applies it without a restart; a broken file keeps the last good one.
final class MeshConfigReloadTests: XCTestCase {
    var pki: FixturePKI!
    var app: TestUpstream!
    var meshPath = ""

    override func setUp() async throws {
        pki = try FixturePKI()
        app = try TestUpstream()
        meshPath = NSTemporaryDirectory() + "moonlet-mesh-\(UUID().uuidString).yaml"
    }
    override func tearDown() async throws { app.stop(); pki.cleanup(); try? FileManager.default.removeItem(atPath: meshPath) }

    func writeMesh(_ text: String) throws { try text.write(toFile: meshPath, atomically: true, encoding: .utf8) }

    /// The mesh config of the last reload applied on every loop (`currentMeshConfig` shows
    /// a reload still under way, before the loops have its filters).
    func applied(_ f: ProxyFixture) -> MeshConfigFile? { f.server.lock.withLock { f.server.meshState.applied } }

    /// Waits up to 5 s for `condition`.
    func eventually(_ condition: () -> Bool) -> Bool {
        for _ in 0..<100 {
            if condition() { return true }
            usleep(50_000)
        }
        return false
    }

    let denyBlockedInMeshRoot = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: deny-blocked
      namespace: mesh-root
    spec:
      action: DENY
      rules:
      - to:
        - operation:
            paths: ["/blocked"]
    """

    func sidecar(_ files: [String: String], certs: String? = nil, logger: Logger? = nil) throws -> ProxyFixture {
        let path = meshPath
        return try ProxyFixture(appPort: app.port, files: files, concurrency: 1, logger: logger) { s in
            s.meshConfigPath = path
            s.certsDirectory = certs
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
        }
    }

    func test_aNewRootNamespace_inTheChangedMeshConfig_makesAPolicyThereApplyMeshWide_withoutDroppingConnections() throws {
        try writeMesh("trustDomain: cluster.local\n")
        let server = try sidecar(["authz.yaml": denyBlockedInMeshRoot])
        defer { server.stop() }
        let c = try RawClient(port: server.inbound)
        XCTAssertEqual(get(c, "/blocked")?.status, 200, "mesh-root is not the root namespace yet")
        try writeMesh("trustDomain: cluster.local\nrootNamespace: mesh-root\n")
        XCTAssertTrue(eventually { applied(server)?.rootNamespace == "mesh-root" })
        XCTAssertEqual(get(c, "/blocked")?.status, 403, "the connection opened before the change is still served, under the new policy")
        XCTAssertEqual(get(try RawClient(port: server.inbound), "/blocked")?.status, 403)
        XCTAssertEqual(get(try RawClient(port: server.inbound), "/open")?.status, 200)
        // And back: the policy no longer applies.
        try writeMesh("trustDomain: cluster.local\n")
        XCTAssertTrue(eventually { applied(server)?.rootNamespace == "istio-system" })
        XCTAssertEqual(get(try RawClient(port: server.inbound), "/blocked")?.status, 200)
    }

    func test_aBrokenMeshConfig_keepsTheLastGoodOne_andReportsFileAndLine_inTheLogAndTheAdminAPI() throws {
        try writeMesh("rootNamespace: mesh-root\n")
        let log = CapturedLog()
        let server = try sidecar(["authz.yaml": denyBlockedInMeshRoot], logger: log.logger)
        defer { server.stop() }
        XCTAssertEqual(get(try RawClient(port: server.inbound), "/blocked")?.status, 403)
        try writeMesh("rootNamespace: mesh-root\ntrustDomainAliases: [ok.local]\nmeshMTLS:\n  minProtocolVersion: TLSV1_1\n")
        let expected = "\(meshPath):4:23: meshMTLS.minProtocolVersion: TLSV1_1 is not allowed for mesh mTLS"
        XCTAssertTrue(log.contains(expected), "\(log.all)")
        XCTAssertTrue(log.contains("mesh config rejected (file change); keeping the last good mesh config and snapshot"), "\(log.all)")
        XCTAssertTrue(adminGet(server.admin, "/plugins")?.body.contains(expected) ?? false)
        let r = adminGet(server.admin, "/reload", method: "POST")
        XCTAssertEqual(r?.status, 400)
        XCTAssertTrue(r?.body.contains(expected) ?? false, r?.body ?? "")
        XCTAssertEqual(server.server.currentMeshConfig.rootNamespace, "mesh-root")
        XCTAssertEqual(server.server.currentMeshConfig.tls.trustDomainAliases, [])
        XCTAssertEqual(get(try RawClient(port: server.inbound), "/blocked")?.status, 403, "the last good mesh config still applies")
        // Fixed: applied, and the error is gone.
        try writeMesh("rootNamespace: mesh-root\ntrustDomainAliases: [ok.local]\nenableAutoMtls: true\n")
        XCTAssertTrue(eventually { server.server.currentMeshConfig.tls.trustDomainAliases == ["ok.local"] })
        XCTAssertTrue(eventually { server.server.lastError == nil })
        XCTAssertTrue(log.contains("mesh config: not applied by Moonlet: enableAutoMtls"), "\(log.all)")
    }

    func test_aTrustDomainAliasAddedToTheMeshConfig_isAcceptedByTheInboundPeerCheck_onNewHandshakes() throws {
        try writeMesh("trustDomain: cluster.local\n")
        let certs = try pki.issue("production", "orders")
        // An identity of the old trust domain, signed by the mesh root.
        var b = try pki.ca.issue(SpiffeID(trustDomain: "old.local", namespace: "default", serviceAccount: "frontend")!, ttl: 3600)
        b.rootCertPEM = pki.ca.rootCertPEM
        let old = pki.dir + "/old"
        try b.write(to: old)
        let log = CapturedLog()
        let server = try sidecar(["pa.yaml": peerAuthentication("s", namespace: "production", mode: "STRICT")], certs: certs, logger: log.logger)
        defer { server.stop() }
        XCTAssertEqual(try tlsRequest(port: server.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM).get().status, 200)
        XCTAssertThrowsError(try tlsRequest(port: server.inbound, certDir: old, rootPEM: pki.ca.rootCertPEM).get(), "old.local is not an alias yet")
        XCTAssertTrue(log.contains("trust domain of spiffe://old.local/ns/default/sa/frontend is not the mesh's (cluster.local)"), "\(log.all)")
        try writeMesh("trustDomain: cluster.local\ntrustDomainAliases: [old.local]\n")
        XCTAssertTrue(eventually { server.server.currentMeshConfig.tls.trustDomainAliases == ["old.local"] })
        XCTAssertTrue(log.contains("workload certificate loaded (mesh config changed (file change))"), "\(log.all)")
        XCTAssertEqual(try tlsRequest(port: server.inbound, certDir: old, rootPEM: pki.ca.rootCertPEM).get().status, 200)
        XCTAssertEqual(app.seen.count, 2)
    }

    func test_postReload_reReadsTheMeshConfig_andItsPathNormalizationReachesTheSnapshotOfEveryLoop() throws {
        try writeMesh("pathNormalization: {normalization: BASE}\n")
        let server = try sidecar([:])
        defer { server.stop() }
        XCTAssertEqual(server.server.currentSnapshot.pathNormalization, .base)
        server.server.watchTimer?.cancel()
        try writeMesh("pathNormalization: {normalization: MERGE_SLASHES}\n")
        XCTAssertEqual(adminGet(server.admin, "/reload", method: "POST")?.status, 200)
        XCTAssertEqual(server.server.currentSnapshot.pathNormalization, .mergeSlashes)
        let ctx = server.server.contexts[0]
        XCTAssertEqual(try ctx.loop.submit { ctx.snapshot.pathNormalization }.wait(), .mergeSlashes)
    }

    func test_aTrustDomainChange_keepsTheEstablishedMTLSConnectionBetweenSidecars_whileNewHandshakesUseTheNewSettings() throws {
        try writeMesh("trustDomain: cluster.local\n")
        let server = try sidecar(["pa.yaml": peerAuthentication("s", namespace: "production", mode: "STRICT")], certs: try pki.issue("production", "orders"))
        defer { server.stop() }
        let clientCerts = try pki.issue("default", "frontend")
        let client = try ProxyFixture(appPort: 1, files: ["se.yaml": MTLSTests.ordersEntry(port: server.inbound, serviceAccount: "orders")], concurrency: 1) { s in
            s.certsDirectory = clientCerts
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend"])
        }
        defer { client.stop() }
        let c = try RawClient(port: client.outbound)
        func call() -> Int? {
            c.send("GET / HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
            return c.read()?.status
        }
        let ctx = client.server.contexts[0]
        func pooled() throws -> [ObjectIdentifier] { try ctx.loop.submit { ctx.pool.idle.values.flatMap { $0.items.map(ObjectIdentifier.init) } }.wait() }
        XCTAssertEqual(call(), 200)
        let before = try pooled()
        XCTAssertEqual(before.count, 1)
        // The server moves to another trust domain, keeping cluster.local as an alias.
        try writeMesh("trustDomain: shop.example\ntrustDomainAliases: [cluster.local]\n")
        XCTAssertTrue(eventually { server.server.currentMeshConfig.tls.trustDomain == "shop.example" })
        XCTAssertTrue(eventually { server.server.currentTLS?.trustDomains.mesh == "shop.example" })
        XCTAssertEqual(call(), 200)
        XCTAssertEqual(try pooled(), before, "the mTLS connection made before the change still serves")
        // A new handshake is checked with the new settings: cluster.local is accepted as an alias.
        XCTAssertEqual(try tlsRequest(port: server.inbound, certDir: try pki.issue("default", "reporting"), rootPEM: pki.ca.rootCertPEM).get().status, 200)
        XCTAssertEqual(app.seen.count, 3)
    }
}
