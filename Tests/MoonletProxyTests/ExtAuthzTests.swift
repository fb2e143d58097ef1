import XCTest
import NIOCore
import NIOHTTP1
@testable import MoonletProxy
import MoonletConfig

/// AuthorizationPolicy CUSTOM with the mesh config's envoyExtAuthzHttp provider: the
/// builtin istio-authz checks matching requests with a real authorization service over
/// moonlet.http.call, as Envoy's ext_authz HTTP filter does.
final class ExtAuthzTests: XCTestCase {
    var app: TestUpstream!
    var authz: TestUpstream!

    override func setUpWithError() throws {
        app = try TestUpstream()
        // Allows x-user alice (telling the upstream who she is), denies everyone else.
        authz = try TestUpstream { r in
            var reply = TestUpstream.Reply()
            if r.headers["x-user"] == ["alice"] {
                reply.headers = [("x-authz-user", "alice@example"), ("x-not-forwarded", "1"), ("x-trace", "t1")]
                reply.body = ""
            } else {
                reply.status = .unauthorized
                reply.headers = [("x-reason", "unknown user"), ("x-hidden", "1"), ("www-authenticate", "Bearer")]
                reply.body = "denied by authz"
            }
            return reply
        }
    }
    override func tearDown() { app?.stop(); authz?.stop() }

    static let policy = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ext}
    spec:
      action: CUSTOM
      provider: {name: my-authz}
      rules:
      - to:
        - operation: {paths: ["/secure/*"]}
    """

    func provider(service: String, port: Int, extra: String = "") -> String {
        """
        extensionProviders:
        - name: my-authz
          envoyExtAuthzHttp:
            service: \(service)
            port: \(port)
            pathPrefix: /check
            timeout: 2s
            includeRequestHeadersInCheck: [x-user]
            includeAdditionalHeadersInCheck: {x-ext-authz: moonlet}
            headersToUpstreamOnAllow: [x-authz-user]
            headersToDownstreamOnDeny: [x-reason]
            headersToDownstreamOnAllow: [x-trace]
        \(extra)
        """
    }

    func sidecar(mesh: String, files extra: [String: String] = [:]) throws -> ProxyFixture {
        let meshPath = NSTemporaryDirectory() + "moonlet-mesh-\(UUID().uuidString).yaml"
        try mesh.write(toFile: meshPath, atomically: true, encoding: .utf8)
        var files = extra
        files["authz.yaml"] = Self.policy
        return try ProxyFixture(appPort: app.port, files: files, concurrency: 1) { s in s.meshConfigPath = meshPath }
    }

    func test_allowedByTheAuthorizationService_reachesTheApp_withTheCheckResponsesHeader() throws {
        let px = try sidecar(mesh: provider(service: "authz.foo.svc.cluster.local", port: 80),
                             files: ["svc.yaml": meshService("authz.foo.svc.cluster.local", ports: [authz.port])])
        defer { px.stop() }
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound), "/secure/a?x=1", headers: "x-user: alice\r\nx-other: no\r\n"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("x-trace"), "t1", "headersToDownstreamOnAllow")
        let check = try XCTUnwrap(authz.seen.first)
        XCTAssertEqual(check.method, "GET")
        XCTAssertEqual(check.uri, "/check/secure/a?x=1")
        XCTAssertEqual(check.headers["host"], ["app"])
        XCTAssertEqual(check.headers["x-user"], ["alice"])
        XCTAssertEqual(check.headers["x-ext-authz"], ["moonlet"])
        XCTAssertEqual(check.headers["content-length"], ["0"])
        XCTAssertFalse(check.headers.contains(name: "x-other"), "a header not in includeRequestHeadersInCheck went to the check")
        let up = try XCTUnwrap(app.seen.first)
        XCTAssertEqual(up.headers["x-authz-user"], ["alice@example"])
        XCTAssertFalse(up.headers.contains(name: "x-not-forwarded"))
    }

    func test_deniedByTheAuthorizationService_getsItsStatusBodyAndListedHeaders() throws {
        let px = try sidecar(mesh: provider(service: "127.0.0.1", port: authz.port))
        defer { px.stop() }
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound), "/secure/a", headers: "x-user: bob\r\n"))
        XCTAssertEqual(r.status, 401)
        XCTAssertEqual(r.body, "denied by authz")
        XCTAssertEqual(r.header("x-reason"), "unknown user")
        XCTAssertEqual(r.header("www-authenticate"), "Bearer")
        XCTAssertNil(r.header("x-hidden"))
        XCTAssertEqual(app.seen.count, 0)
        let metrics = adminGet(px.admin, "/stats/prometheus")?.body ?? ""
        XCTAssertTrue(metrics.contains("response_flags=\"UAEX\""), metrics)
    }

    func test_aRequestNoCustomRuleMatches_neverCallsTheAuthorizationService() throws {
        let px = try sidecar(mesh: provider(service: "127.0.0.1", port: authz.port))
        defer { px.stop() }
        XCTAssertEqual(get(try RawClient(port: px.inbound), "/public", headers: "x-user: bob\r\n")?.status, 200)
        XCTAssertEqual(authz.seen.count, 0)
        XCTAssertEqual(app.seen.count, 1)
    }

    func test_anAuthorizationServiceThatIsDown_deniesWithStatusOnError_orAllowsWhenFailOpen() throws {
        let down = try RefusingPort()
        for (extra, expected) in [("", 403), ("    statusOnError: \"503\"", 503), ("    failOpen: true", 200)] {
            let px = try sidecar(mesh: provider(service: "127.0.0.1", port: down.port, extra: extra))
            defer { px.stop() }
            let before = app.seen.count
            let r = try XCTUnwrap(get(try RawClient(port: px.inbound), "/secure/a", headers: "x-user: alice\r\n"))
            XCTAssertEqual(r.status, expected, extra)
            XCTAssertEqual(app.seen.count, before + (expected == 200 ? 1 : 0), extra)
            if expected != 200 { XCTAssertEqual(r.body, "", extra) }
        }
    }

    func test_aProviderMissingFromTheMeshConfig_failsClosed_forEveryRequest() throws {
        let px = try sidecar(mesh: "rootNamespace: istio-system\n")
        defer { px.stop() }
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound), "/public"))
        XCTAssertEqual(r.status, 403)
        XCTAssertEqual(r.body, "RBAC: access denied")
        XCTAssertEqual(app.seen.count, 0)
        XCTAssertEqual(authz.seen.count, 0)
    }
}
