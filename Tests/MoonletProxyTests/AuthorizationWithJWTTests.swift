import XCTest
import NIOHTTP1
@testable import MoonletProxy
import MoonletConfig
import MoonletCore
import MoonletTLS

/// RequestAuthentication and AuthorizationPolicy together, as Istio's "Authorization
/// with JWT" task uses them: a STRICT sidecar of production/order-service, callers with
/// workload certificates of the test PKI, tokens signed with keys made by the test and
/// given inline as jwks, a real upstream app.
final class AuthorizationWithJWTTests: XCTestCase {
    static let signer = try! JWTSigner(.rs256, kid: "k1")
    static let other = try! JWTSigner(.es256, kid: "o1")
    let issuer = "https://issuer.example"
    let issuer2 = "https://other.example"
    var pki: FixturePKI!
    var app: TestUpstream!

    override func setUp() async throws {
        pki = try FixturePKI()
        app = try TestUpstream()
    }
    override func tearDown() async throws { app.stop(); pki.cleanup() }

    func token(_ s: JWTSigner = signer, iss: String? = nil, sub: String = "alice", aud: String = "orders", more: String = "") throws -> String {
        let exp = Int(Date().timeIntervalSince1970 + 3600)
        let subject = sub.isEmpty ? "" : "\"sub\":\"\(sub)\","
        return try s.sign(claims: "{\"iss\":\"\(iss ?? issuer)\",\(subject)\"aud\":\"\(aud)\",\"exp\":\(exp)\(more)}")
    }

    /// A RequestAuthentication of the namespace: `issuer` (RS256 key) and `issuer2` (ES256
    /// key), `extra` and `extra2` added to their rules.
    func requestAuthentication(_ extra: String = "", _ extra2: String = "") -> String {
        """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt, namespace: production}
        spec:
          jwtRules:
          - issuer: \(issuer)
            audiences: [orders, billing]
            jwks: '\(JWTSigner.jwks([Self.signer]))'
            outputClaimToHeaders:
            - {header: x-jwt-sub, claim: sub}
        \(extra)
          - issuer: \(issuer2)
            jwks: '\(JWTSigner.jwks([Self.other]))'
        \(extra2)
        """
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

    func call(_ server: ProxyFixture, _ certs: String, _ method: HTTPMethod = .GET, _ path: String, token: String? = nil,
              headers: [(String, String)] = []) throws -> (status: Int, headers: HTTPHeaders, body: String) {
        let h = (token.map { [("authorization", "Bearer \($0)")] } ?? []) + headers
        return try tlsRequest(port: server.inbound, certDir: certs, rootPEM: pki.ca.rootCertPEM, path: path, method: method, extraHeaders: h).get()
    }

    func policy(_ name: String, action: String = "ALLOW", annotations: String = "", _ rules: String) -> String {
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: \(name)
          namespace: production
        \(annotations)
        spec:
          selector: {matchLabels: {app: order-service}}
          action: \(action)
          rules:
        \(rules)
        """
    }

    /// One ALLOW policy, a rule per path, each reading one request.auth attribute.
    var jwtRules: String {
        """
          - to: [{operation: {paths: ["/any"]}}]
            from: [{source: {requestPrincipals: ["*"]}}]
          - to: [{operation: {paths: ["/exact"]}}]
            from: [{source: {requestPrincipals: ["\(issuer)/alice"]}}]
          - to: [{operation: {paths: ["/issuer"]}}]
            from: [{source: {requestPrincipals: ["\(issuer)/*"]}}]
          - to: [{operation: {paths: ["/not-bob"]}}]
            from: [{source: {notRequestPrincipals: ["\(issuer)/bob"]}}]
          - to: [{operation: {paths: ["/middle"]}}]
            from: [{source: {requestPrincipals: ["\(issuer)/*/admin"]}}]
          - to: [{operation: {paths: ["/groups"]}}]
            when: [{key: "request.auth.claims[groups]", values: ["admins"]}]
          - to: [{operation: {paths: ["/nested"]}}]
            when: [{key: "request.auth.claims[nested][role]", values: ["editor"]}]
          - to: [{operation: {paths: ["/audience"]}}]
            when: [{key: request.auth.audiences, values: ["billing"]}]
          - to: [{operation: {paths: ["/presenter"]}}]
            when: [{key: request.auth.presenter, values: ["web-app"]}]
          - to: [{operation: {paths: ["/principal"]}}]
            when: [{key: request.auth.principal, values: ["\(issuer)/alice"]}]
          - to: [{operation: {paths: ["/level"]}}]
            when: [{key: "request.auth.claims[level]", values: ["3"]}]
          - to: [{operation: {paths: ["/claim-header"]}}]
            when: [{key: "request.headers[x-jwt-sub]", values: ["alice"]}]
        """
    }

    func test_requestPrincipalsAndAuthConditions_behindStrictMTLS_followIstioSemantics() throws {
        let server = try orderService(["ra.yaml": requestAuthentication(), "authz.yaml": policy("jwt", jwtRules)])
        defer { server.stop() }
        let frontend = try pki.issue("production", "frontend")
        let alice = try token(), bob = try token(sub: "bob")
        func expect(_ want: Int, _ path: String, _ t: String?, _ why: String, headers: [(String, String)] = [], line: UInt = #line) throws {
            let r = try call(server, frontend, .GET, path, token: t, headers: headers)
            XCTAssertEqual(r.status, want, "\(path): \(why) (\(r.body))", line: line)
        }
        // Istio's "require JWT": RequestAuthentication + ALLOW requestPrincipals ["*"].
        try expect(200, "/any", alice, "any verified token")
        try expect(403, "/any", nil, "no token: no request principal")
        try expect(401, "/any", "not-a-jwt", "an invalid token is answered by authn before authz")
        try expect(401, "/any", try token(Self.other), "a token signed by another issuer's key")
        try expect(403, "/any", try token(sub: ""), "a verified token without sub has no request principal (Istio)")
        try expect(403, "/principal", try token(sub: ""), "request.auth.principal is absent without sub")
        try expect(200, "/audience", try token(sub: "", aud: "billing"), "the other request.auth attributes are there")
        // requestPrincipals: exact, issuer/*, notRequestPrincipals.
        try expect(200, "/exact", alice, "the principal")
        try expect(403, "/exact", bob, "another subject")
        try expect(403, "/exact", nil, "no token")
        try expect(403, "/exact", try token(Self.other, iss: issuer2), "the same subject of another issuer")
        try expect(403, "/exact", try token(sub: "alice/admin"), "a subject with a slash is not a prefix match")
        try expect(200, "/issuer", bob, "any subject of the issuer")
        try expect(403, "/issuer", try token(Self.other, iss: issuer2), "another issuer")
        try expect(403, "/issuer", nil, "no token")
        try expect(200, "/not-bob", alice, "not bob")
        try expect(403, "/not-bob", bob, "bob")
        try expect(200, "/not-bob", nil, "no principal is not bob (Envoy's not_id over absent metadata)")
        // A '*' inside a value is no wildcard (Istio: exact unless leading or trailing).
        try expect(403, "/middle", try token(sub: "x/admin"), "'*' in the middle is literal")
        try expect(200, "/middle", try token(sub: "*/admin"), "'*' in the middle is literal")
        // when: request.auth.*
        try expect(200, "/groups", try token(more: ",\"groups\":[\"dev\",\"admins\"]"), "one element of a list claim")
        try expect(200, "/groups", try token(more: ",\"groups\":\"admins\""), "a string claim")
        try expect(403, "/groups", try token(more: ",\"groups\":[\"dev\"]"), "no element matches")
        try expect(403, "/groups", try token(more: ",\"groups\":[[\"admins\"]]"), "a nested list is not an element")
        try expect(403, "/groups", nil, "no token")
        try expect(200, "/nested", try token(more: ",\"nested\":{\"role\":\"editor\"}"), "nested claim")
        try expect(403, "/nested", try token(more: ",\"nested\":{\"role\":\"viewer\"}"), "nested claim, other value")
        try expect(403, "/nested", try token(more: ",\"nested\":\"editor\""), "not an object")
        try expect(200, "/audience", try token(aud: "billing"), "audience")
        try expect(403, "/audience", alice, "other audience")
        try expect(200, "/presenter", try token(more: ",\"azp\":\"web-app\""), "azp")
        try expect(403, "/presenter", try token(more: ",\"azp\":\"cli\""), "other azp")
        try expect(200, "/principal", alice, "request.auth.principal")
        try expect(403, "/principal", bob, "request.auth.principal, other")
        // Non-string claims never match a string value (Envoy's string matcher).
        try expect(403, "/level", try token(more: ",\"level\":3"), "a number claim")
        try expect(403, "/level", try token(more: ",\"level\":true"), "a boolean claim")
        try expect(200, "/level", try token(more: ",\"level\":\"3\""), "a string claim")
        // Headers authn writes cannot be supplied by the client.
        try expect(403, "/claim-header", nil, "forged claim header", headers: [("x-jwt-sub", "alice")])
        try expect(200, "/claim-header", alice, "claim header written by authn")
        try expect(403, "/claim-header", bob, "claim header of bob, forged alice dropped", headers: [("x-jwt-sub", "alice")])
    }

    /// The seed policy (frontend may GET/POST /api/order/*) with Istio's doc example of a
    /// path that needs a token: DENY notRequestPrincipals ["*"]; an AUDIT and a dry-run
    /// DENY on the principal; authn's 401 happens before authz counts anything.
    func test_seedPolicy_withADenyForTokenlessRequestsOnOnePath_auditAndDryRun() throws {
        let seed = try String(contentsOf: GrayReleaseTests.repo.appendingPathComponent("policies/authorization/order-service-policy.yaml"), encoding: .utf8)
        let server = try orderService([
            "ra.yaml": requestAuthentication(),
            "authz.yaml": seed,
            "deny.yaml": policy("require-jwt-for-writes", action: "DENY", """
              - to: [{operation: {paths: ["/api/order/*"], methods: ["POST"]}}]
                from: [{source: {notRequestPrincipals: ["*"]}}]
            """),
            "audit.yaml": policy("audit-alice", action: "AUDIT", """
              - from: [{source: {requestPrincipals: ["\(issuer)/alice"]}}]
            """),
            "dry.yaml": policy("no-bob", action: "DENY", annotations: "  annotations: {istio.io/dry-run: \"true\"}", """
              - from: [{source: {requestPrincipals: ["\(issuer)/bob"]}}]
            """),
            "vars.lua": """
            return { on_request = function(s)
              s.request.headers:set("x-audit", s.vars.istio_authz_audit_policy or "-")
              s.request.headers:set("x-dry", s.vars.istio_dry_run_deny_shadow_engine_result or "-")
            end }
            """,
            "vars.yaml": ProxyFixture.plugin("vars", "  phase: STATS\n"),
        ])
        defer { server.stop() }
        let frontend = try pki.issue("production", "frontend"), reporting = try pki.issue("production", "reporting")
        let alice = try token(), bob = try token(sub: "bob")
        XCTAssertEqual(try call(server, frontend, .GET, "/api/order/1").status, 200, "GET needs no token")
        XCTAssertEqual(app.seen.last?.headers["x-audit"], ["-"])
        XCTAssertEqual(try call(server, frontend, .POST, "/api/order/1").status, 403, "POST without a token")
        XCTAssertEqual(try call(server, frontend, .POST, "/api/order/1", token: alice).status, 200)
        XCTAssertEqual(app.seen.last?.headers["x-audit"], ["ns[production]-policy[audit-alice]-rule[0]"])
        XCTAssertEqual(app.seen.last?.headers["x-dry"], ["allowed"])
        XCTAssertEqual(try call(server, frontend, .POST, "/api/order/1", token: bob).status, 200, "dry-run only counts")
        XCTAssertEqual(app.seen.last?.headers["x-dry"], ["denied"])
        XCTAssertEqual(try call(server, reporting, .POST, "/api/order/1", token: alice).status, 403, "the seed still wants frontend")
        XCTAssertEqual(try call(server, frontend, .DELETE, "/api/order/1", token: alice).status, 403, "the seed still wants GET/POST")
        XCTAssertEqual(try call(server, frontend, .POST, "/api/order/1", token: "a.b.c").status, 401, "authn answers first")
        XCTAssertEqual(app.seen.count, 3)
        let metrics = adminGet(server.admin, "/stats/prometheus")?.body ?? ""
        XCTAssertTrue(metrics.contains("envoy_http_rbac_allowed 3"), metrics)
        XCTAssertTrue(metrics.contains("envoy_http_rbac_denied 3"), "the 401 is not an RBAC denial: " + metrics)
        XCTAssertTrue(metrics.contains("envoy_http_rbac_istio_dry_run_deny_shadow_denied 1"), metrics)
        XCTAssertTrue(metrics.contains("envoy_http_rbac_istio_dry_run_deny_shadow_allowed 5"), metrics)
        XCTAssertTrue(metrics.contains("moonlet_lua_jwt_authn_allowed 4"), metrics)
        XCTAssertTrue(metrics.contains("moonlet_lua_jwt_authn_denied 1"), metrics)
    }

    /// A hostile client against "require JWT" (ALLOW requestPrincipals ["*"]) with a
    /// RequestAuthentication reading one header only.
    func test_hostileClient_cannotGetAPrincipalWithoutAVerifiedTokenAtTheRuleLocation() throws {
        let fromHeader = """
            fromHeaders: [{name: authorization, prefix: "Bearer "}]
        """
        let ra = requestAuthentication(fromHeader + "\n    fromParams: [token]", fromHeader)
        let server = try orderService([
            "ra.yaml": ra,
            "authz.yaml": policy("require-jwt", """
              - from: [{source: {requestPrincipals: ["*"]}}]
                to: [{operation: {notPaths: ["/admins"]}}]
              - to: [{operation: {paths: ["/admins"]}}]
                when: [{key: "request.auth.claims[groups]", values: ["admins"]}]
            """),
        ])
        defer { server.stop() }
        let frontend = try pki.issue("production", "frontend")
        let alice = try token()
        func status(_ path: String, _ headers: [(String, String)]) throws -> Int {
            try call(server, frontend, .GET, path, headers: headers).status
        }
        func status(_ headers: [(String, String)]) throws -> Int { try status("/", headers) }
        XCTAssertEqual(try status([("authorization", "Bearer \(alice)")]), 200)
        XCTAssertEqual(try status([("authorization", "bearer \(alice)")]), 200, "the scheme ignores case (RFC 7235)")
        // Headers that look like the verified identity are only headers.
        XCTAssertEqual(try status([("x-auth-principal", "\(issuer)/alice"), ("x-jwt-sub", "alice"), ("x-forwarded-user", "alice")]), 403)
        // A token where no rule looks for it is no token.
        XCTAssertEqual(try status("/?access_token=\(alice)", []), 403, "the rule reads a header only")
        // Two Authorization headers: refused, whichever comes first.
        XCTAssertEqual(try status([("authorization", "Bearer \(alice)"), ("authorization", "Bearer forged")]), 401)
        XCTAssertEqual(try status([("authorization", "Bearer forged"), ("authorization", "Bearer \(alice)")]), 401)
        XCTAssertEqual(try status([("authorization", "Bearer \(alice)"), ("authorization", "Bearer \(try token(sub: "bob"))")]), 401)
        // The same for a query parameter given twice (a rule reading access_token).
        XCTAssertEqual(try status("/?token=\(alice)", []), 200)
        XCTAssertEqual(try status("/?token=\(alice)&token=forged", []), 401)
        XCTAssertEqual(try status("/?token=forged&token=\(alice)", []), 401)
        // A token of the other issuer's rule verifies with that issuer's key only.
        XCTAssertEqual(try status([("authorization", "Bearer \(try token(Self.other, iss: issuer2))")]), 200)
        XCTAssertEqual(try status([("authorization", "Bearer \(try token(Self.signer, iss: issuer2))")]), 401)
        // A large list claim: the matching element is found at the end.
        let many = (0..<500).map { "\"g\($0)\"" }.joined(separator: ",")
        XCTAssertEqual(try status("/admins", [("authorization", "Bearer \(try token(more: ",\"groups\":[\(many),\"admins\"]"))")]), 200)
        XCTAssertEqual(try status("/admins", [("authorization", "Bearer \(try token(more: ",\"groups\":[\(many)]"))")]), 403)
        XCTAssertEqual(app.seen.count, 5)
        XCTAssertFalse(app.seen.contains { $0.headers.contains(name: "authorization") }, "the token is not forwarded")
    }
}
