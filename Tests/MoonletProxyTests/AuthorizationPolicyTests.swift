import XCTest
import NIOHTTP1
@testable import MoonletProxy
import MoonletConfig
import MoonletCore

/// The seed AuthorizationPolicy (policies/authorization/) enforced end to end: a STRICT
/// sidecar of production/order-service, callers holding workload certificates of the
/// test PKI, a real upstream app.
final class AuthorizationPolicyTests: XCTestCase {
    var pki: FixturePKI!
    var app: TestUpstream!

    override func setUp() async throws {
        pki = try FixturePKI()
        app = try TestUpstream()
    }
    override func tearDown() async throws { app.stop(); pki.cleanup() }

    var seedPolicy: String {
        get throws {
            try String(contentsOf: GrayReleaseTests.repo.appendingPathComponent("policies/authorization/order-service-policy.yaml"), encoding: .utf8)
        }
    }

    func orderService(_ files: [String: String]) throws -> ProxyFixture {
        var all = files
        all["pa.yaml"] = peerAuthentication("strict", namespace: "production", mode: "STRICT")
        let certs = try pki.issue("production", "order-service")
        return try ProxyFixture(appPort: app.port, files: all, concurrency: 1) { s in
            s.certsDirectory = certs
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "order-service", labels: ["app": "order-service"])
        }
    }

    func call(_ server: ProxyFixture, _ certs: String, _ method: HTTPMethod, _ path: String) throws -> (status: Int, headers: HTTPHeaders, body: String) {
        try tlsRequest(port: server.inbound, certDir: certs, rootPEM: pki.ca.rootCertPEM, path: path, method: method).get()
    }

    func test_seedPolicy_behindStrictMTLS_allowsOnlyFrontendsGetAndPostOnOrders() throws {
        let server = try orderService(["authz.yaml": try seedPolicy])
        defer { server.stop() }
        let frontend = try pki.issue("production", "frontend")
        let other = try pki.issue("production", "reporting")
        XCTAssertEqual(try call(server, frontend, .GET, "/api/order/1").status, 200)
        XCTAssertEqual(try call(server, frontend, .POST, "/api/order/1").status, 200)
        XCTAssertEqual(app.seen.count, 2)
        for (certs, method, path) in [(frontend, HTTPMethod.DELETE, "/api/order/1"), (frontend, .GET, "/admin"), (other, .GET, "/api/order/1")] {
            let r = try call(server, certs, method, path)
            XCTAssertEqual(r.status, 403, "\(method) \(path)")
            XCTAssertEqual(r.body, "RBAC: access denied")
            XCTAssertEqual(r.headers.first(name: "content-type"), "text/plain")
        }
        XCTAssertEqual(app.seen.count, 2, "a denied request reached the app")
        let metrics = adminGet(server.admin, "/stats/prometheus")?.body ?? ""
        XCTAssertTrue(metrics.contains("response_flags=\"RBAC\""), metrics)
        XCTAssertTrue(metrics.contains("envoy_http_rbac_denied 3"), metrics)
        XCTAssertTrue(metrics.contains("envoy_http_rbac_allowed 2"), metrics)
    }

    func test_seedPolicy_overHTTP2_deniesAndAllowsTheSame() throws {
        let server = try orderService(["authz.yaml": try seedPolicy])
        defer { server.stop() }
        let frontend = try pki.issue("production", "frontend")
        try pki.ca.rootCertPEM.write(toFile: pki.dir + "/root.pem", atomically: true, encoding: .utf8)
        func h2(_ method: String, _ path: String) throws -> String {
            try runTool("curl", ["-s", "--max-time", "10", "--http2", "-X", method, "--cacert", pki.dir + "/root.pem", "-k", "--cert", frontend + "/cert-chain.pem",
                                 "--key", frontend + "/key.pem", "-w", " proto=%{http_version} status=%{http_code}", "https://127.0.0.1:\(server.inbound)\(path)"])
        }
        let ok = try h2("GET", "/api/order/7")
        XCTAssertTrue(ok.contains("proto=2 status=200"), ok)
        let denied = try h2("DELETE", "/api/order/7")
        XCTAssertTrue(denied.contains("RBAC: access denied proto=2 status=403"), denied)
        XCTAssertEqual(app.seen.count, 1)
    }

    func test_dryRunDenyPolicy_onlyCounts() throws {
        let dryRun = """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: no-delete
          namespace: production
          annotations: {istio.io/dry-run: "true"}
        spec:
          selector: {matchLabels: {app: order-service}}
          action: DENY
          rules: [{to: [{operation: {methods: ["DELETE"]}}]}]
        """
        let server = try orderService(["dry.yaml": dryRun])
        defer { server.stop() }
        let frontend = try pki.issue("production", "frontend")
        XCTAssertEqual(try call(server, frontend, .DELETE, "/api/order/1").status, 200)
        XCTAssertEqual(try call(server, frontend, .GET, "/api/order/1").status, 200)
        XCTAssertEqual(app.seen.count, 2)
        let metrics = adminGet(server.admin, "/stats/prometheus")?.body ?? ""
        XCTAssertTrue(metrics.contains("envoy_http_rbac_istio_dry_run_deny_shadow_denied 1"), metrics)
        XCTAssertTrue(metrics.contains("envoy_http_rbac_istio_dry_run_deny_shadow_allowed 1"), metrics)
        XCTAssertFalse(metrics.contains("envoy_http_rbac_denied"), metrics)
    }

    func test_aChangedPolicy_appliesWithoutRestart_andRemovingItRemovesTheFilter() throws {
        let server = try orderService(["authz.yaml": try seedPolicy])
        defer { server.stop() }
        let frontend = try pki.issue("production", "frontend")
        XCTAssertEqual(try call(server, frontend, .DELETE, "/api/order/1").status, 403)
        func eventually(_ want: Int, _ method: HTTPMethod, _ path: String) throws -> Bool {
            for _ in 0..<50 {
                if try call(server, frontend, method, path).status == want { return true }
                usleep(100_000)
            }
            return false
        }
        // An explicit DENY of /admin on top of an allow-all.
        try server.write("authz.yaml", """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-all, namespace: production}
        spec: {rules: [{}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: no-admin, namespace: production}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: ["/admin"]}}]}]
        """)
        XCTAssertTrue(try eventually(200, .DELETE, "/api/order/1"), "the new policies were not applied")
        XCTAssertEqual(try call(server, frontend, .GET, "/admin").status, 403)
        try FileManager.default.removeItem(atPath: server.dir + "/authz.yaml")
        XCTAssertTrue(try eventually(200, .GET, "/admin"), "the filter stayed after its policies went")
    }

    func test_customActionWithAProviderMissingFromTheMeshConfig_deniesEveryRequest() throws {
        let custom = try seedPolicy.replacingOccurrences(of: "action: ALLOW", with: "action: CUSTOM\n  provider: {name: ext-authz}")
        let server = try orderService(["authz.yaml": custom])
        defer { server.stop() }
        let frontend = try pki.issue("production", "frontend")
        let r = try call(server, frontend, .GET, "/api/order/1")
        XCTAssertEqual(r.status, 403)
        XCTAssertEqual(r.body, "RBAC: access denied")
        XCTAssertEqual(try call(server, frontend, .GET, "/other").status, 403, "fail closed denies every request, not only the matching ones")
        XCTAssertEqual(app.seen.count, 0)
    }
}
