import XCTest
import NIOCore
import NIOHTTP1
import NIOConcurrencyHelpers
import NIOSSL
@testable import MoonletProxy
import MoonletTLS
import MoonletLua

/// RequestAuthentication through the proxy: the builtin istio-authn filter on the
/// inbound listener, with keys made by the test, inline or served by a jwksUri.
final class RequestAuthenticationTests: XCTestCase {
    static let signer = try! JWTSigner(.rs256, kid: "k1")
    static let stranger = try! JWTSigner(.rs256, kid: "k1")
    static let ec = try! JWTSigner(.es256, kid: "e1")
    let issuer = "https://issuer.example"
    var up: TestUpstream!
    override func setUpWithError() throws { up = try TestUpstream() }
    override func tearDown() { up?.stop() }

    func token(_ s: JWTSigner = signer, aud: String = "orders", expIn: Double = 3600, extra: String = "") throws -> String {
        let now = Date().timeIntervalSince1970
        return try s.sign(claims: "{\"iss\":\"\(issuer)\",\"sub\":\"alice\",\"aud\":\"\(aud)\",\"exp\":\(Int(now + expIn)),\"groups\":[\"a\",\"b\"]\(extra)}")
    }

    func policy(keys: String, extra: String = "") -> String {
        """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt, namespace: istio-system}
        spec:
          jwtRules:
          - issuer: \(issuer)
            audiences: [orders]
            \(keys)
            outputClaimToHeaders:
            - {header: x-jwt-sub, claim: sub}
            - {header: x-jwt-groups, claim: groups}
        \(extra)
        """
    }

    func inline(_ signers: [JWTSigner]) -> String { "jwks: '\(JWTSigner.jwks(signers))'" }

    func bearer(_ t: String) -> String { "Authorization: Bearer \(t)\r\n" }

    func test_validToken_passes_upstreamSeesClaimHeaders_andNotTheToken() throws {
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: inline([Self.signer]))])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/api?x=1", headers: bearer(try token()) + "x-jwt-sub: mallory\r\n"))
        XCTAssertEqual(r.status, 200, r.body)
        let seen = try XCTUnwrap(up.seen.last)
        XCTAssertEqual(seen.headers["x-jwt-sub"], ["alice"], "claim header from the token, never the client's")
        XCTAssertEqual(seen.headers["x-jwt-groups"], ["a,b"])
        XCTAssertFalse(seen.headers.contains(name: "authorization"), "forwardOriginalToken is false by default")
    }

    func test_noToken_passesWithoutAPrincipal_andClientClaimHeadersAreDropped() throws {
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: inline([Self.signer]))])
        defer { px.stop() }
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound), headers: "x-jwt-sub: mallory\r\n"))
        XCTAssertEqual(r.status, 200)
        XCTAssertFalse(up.seen.last?.headers.contains(name: "x-jwt-sub") ?? true)
    }

    func test_invalidTokens_get401or403_withEnvoysTextAndChallenge() throws {
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: inline([Self.signer]))])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let expired = try XCTUnwrap(get(c, "/p?q=1", headers: bearer(try token(expIn: -600))))
        XCTAssertEqual(expired.status, 401)
        XCTAssertEqual(expired.body, "Jwt is expired")
        XCTAssertEqual(expired.header("www-authenticate"), "Bearer realm=\"http://app/p\", error=\"invalid_token\"")
        let forged = try XCTUnwrap(get(c, headers: bearer(try token(Self.stranger))))
        XCTAssertEqual(forged.status, 401)
        XCTAssertEqual(forged.body, "Jwt verification fails")
        let audience = try XCTUnwrap(get(c, headers: bearer(try token(aud: "billing"))))
        XCTAssertEqual(audience.status, 403)
        XCTAssertEqual(audience.body, "Audiences in Jwt are not allowed")
        let garbage = try XCTUnwrap(get(c, headers: bearer("not-a-jwt")))
        XCTAssertEqual(garbage.status, 401)
        let param = try XCTUnwrap(get(c, "/?access_token=\(try token(expIn: -600))"))
        XCTAssertEqual(param.status, 401, "the access_token query parameter is a default location")
        XCTAssertEqual(up.seen.count, 0)
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_lua_jwt_authn_denied 5"), stats)
    }

    func test_laterFilters_readSAuth_andCannotForgeIt() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "ra.yaml": policy(keys: inline([Self.signer])),
            "who.lua": """
            return { on_request = function(s)
              local a = s.auth
              if not a then s.request.headers:set("x-who", "anonymous"); return end
              local ok = pcall(function() a.principal = "forged" end)
              local ok2 = pcall(function() s.auth = { principal = "forged" } end)
              s.request.headers:set("x-who", a.principal .. "|" .. a.claims.groups[2] .. "|" .. #a.audiences .. "|" .. tostring(ok) .. tostring(ok2))
            end }
            """,
            "who.yaml": ProxyFixture.plugin("who", "  phase: AUTHZ\n"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(try XCTUnwrap(get(c, headers: bearer(try token()))).status, 200)
        XCTAssertEqual(up.seen.last?.headers["x-who"], ["https://issuer.example/alice|b|1|falsefalse"])
        XCTAssertEqual(try XCTUnwrap(get(c)).status, 200)
        XCTAssertEqual(up.seen.last?.headers["x-who"], ["anonymous"])
    }

    func test_jwksUri_isFetched_andAFailingRefreshKeepsTheLastGoodKeys() throws {
        let failing = NIOLockedValueBox(false)
        let jwks = try TestUpstream { _ in
            failing.withLockedValue { $0 } ? TestUpstream.Reply(status: .internalServerError, body: "down")
                : TestUpstream.Reply(headers: [("content-type", "application/json")], body: JWTSigner.jwks([Self.ec]))
        }
        defer { jwks.stop() }
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: "jwksUri: http://127.0.0.1:\(jwks.port)/jwks.json")])
        defer { px.stop() }
        XCTAssertEqual(jwks.seen.first?.uri, "/jwks.json")
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(try XCTUnwrap(get(c, headers: bearer(try token(Self.ec)))).status, 200, "keys fetched at config load")
        XCTAssertEqual(try XCTUnwrap(get(c, headers: bearer(try token(Self.signer)))).status, 401)
        failing.withLockedValue { $0 = true }
        px.server.jwks.refreshAll()
        for _ in 0..<100 where jwks.seen.count < 2 { usleep(20_000) }
        XCTAssertEqual(jwks.seen.count, 2)
        usleep(50_000)
        XCTAssertEqual(try XCTUnwrap(get(c, headers: bearer(try token(Self.ec)))).status, 200, "the last good keys stay after a failed refresh")
    }

    func test_jwksUriThatNeverAnswers_refusesTokensOfItsIssuer_butNotRequestsWithoutOne() throws {
        let refusing = try RefusingPort()
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: "jwksUri: http://127.0.0.1:\(refusing.port)/jwks\n    timeout: 1s")])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, headers: bearer(try token(Self.ec))))
        XCTAssertEqual(r.status, 401)
        XCTAssertEqual(r.body, "Jwks remote fetch is failed")
        XCTAssertEqual(try XCTUnwrap(get(c)).status, 200)
    }

    func test_httpsJwksUri_isFetchedOverVerifiedTLS_soAnUntrustedServerGivesNoKeys() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let d = try pki.issue("external", "jwks")
        var sc = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(d + "/cert-chain.pem").map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: d + "/key.pem", format: .pem)))
        sc.certificateVerification = .none
        let jwks = try TestUpstream(tls: try NIOSSLContext(configuration: sc)) { _ in TestUpstream.Reply(body: JWTSigner.jwks([Self.ec])) }
        defer { jwks.stop() }
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: "jwksUri: https://127.0.0.1:\(jwks.port)/jwks\n    timeout: 2s")])
        defer { px.stop() }
        XCTAssertGreaterThan(jwks.connections, 0, "the fetch went to the https server")
        XCTAssertEqual(jwks.seen.count, 0, "no request is sent to a server whose certificate does not verify")
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound), headers: bearer(try token(Self.ec))))
        XCTAssertEqual(r.status, 401)
        XCTAssertEqual(r.body, "Jwks remote fetch is failed")
    }

    func test_customLocations_forwarding_payloadHeader_andRequiredPresence() throws {
        let ra = """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: custom, namespace: default}
        spec:
          jwtRules:
          - issuer: \(issuer)
            \(inline([Self.signer]))
            fromHeaders: [{name: x-token, prefix: "Token "}]
            fromCookies: [session]
            forwardOriginalToken: true
            outputPayloadToHeader: x-jwt-payload
            presence: REQUIRED
        """
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": ra])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let t = try token()
        XCTAssertEqual(try XCTUnwrap(get(c, headers: "x-token: Token \(t)\r\n")).status, 200)
        XCTAssertEqual(up.seen.last?.headers["x-token"], ["Token \(t)"], "forwardOriginalToken keeps the token")
        XCTAssertEqual(up.seen.last?.headers["x-jwt-payload"], [String(t.split(separator: ".")[1])], "the payload, base64url")
        XCTAssertEqual(try XCTUnwrap(get(c, headers: "cookie: a=b; session=\(t)\r\n")).status, 200)
        let missing = try XCTUnwrap(get(c, headers: bearer(t)))
        XCTAssertEqual(missing.status, 401, "Authorization is not a location of this rule, and presence is REQUIRED")
        XCTAssertEqual(missing.body, "Jwt is missing")
        XCTAssertEqual(missing.header("www-authenticate"), "Bearer realm=\"http://app/\"")
    }

    func test_tokenOfAnIssuerNoRuleNames_isRefused_andTheRightRuleOfSeveralVerifies() throws {
        let ra = policy(keys: inline([Self.signer])) + """

        ---
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: second, namespace: default}
        spec:
          jwtRules:
          - issuer: https://second.example
            \(inline([Self.ec]))
        """
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": ra])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(try XCTUnwrap(get(c, headers: bearer(try token()))).status, 200)
        let now = Int(Date().timeIntervalSince1970)
        XCTAssertEqual(try XCTUnwrap(get(c, headers: bearer(try Self.ec.sign(claims: "{\"iss\":\"https://second.example\",\"sub\":\"bob\",\"exp\":\(now + 60)}")))).status, 200)
        let stranger = try XCTUnwrap(get(c, headers: bearer(try Self.ec.sign(claims: "{\"iss\":\"https://third.example\",\"exp\":\(now + 60)}"))))
        XCTAssertEqual(stranger.status, 401)
        XCTAssertEqual(stranger.body, "Jwt issuer is not configured")
    }

    func test_reloadThatKeepsAJwksUri_keepsItsKeys_withoutFetchingAgain() throws {
        let jwks = try TestUpstream { _ in TestUpstream.Reply(body: JWTSigner.jwks([Self.ec])) }
        defer { jwks.stop() }
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: "jwksUri: http://127.0.0.1:\(jwks.port)/k")])
        defer { px.stop() }
        try px.write("ra.yaml", policy(keys: "jwksUri: http://127.0.0.1:\(jwks.port)/k").replacingOccurrences(of: "x-jwt-sub", with: "x-jwt-user"))
        XCTAssertNoThrow(try px.server.reload(reason: "test").get())
        XCTAssertEqual(jwks.seen.count, 1)
        XCTAssertEqual(try XCTUnwrap(get(try RawClient(port: px.inbound), headers: bearer(try token(Self.ec)))).status, 200)
        XCTAssertEqual(up.seen.last?.headers["x-jwt-user"], ["alice"])
    }

    func test_rejectedReload_leavesTheTrustedKeysAsTheyWere() throws {
        let b = try JWTSigner(.rs256, kid: "k1")
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: inline([Self.signer]))])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(try XCTUnwrap(get(c, headers: bearer(try token()))).status, 200)
        XCTAssertEqual(try XCTUnwrap(get(c, headers: bearer(try token(b)))).status, 401)
        // The broken plugin first, so that no reload ever sees the new keys without it.
        try px.write("broken.lua", "local f = {}\nfunction f.on_request(s) return end end\nreturn f\n")
        try px.write("broken.yaml", ProxyFixture.plugin("broken"))
        try px.write("ra.yaml", policy(keys: inline([b])))
        guard case .failure = px.server.reload(reason: "test") else { return XCTFail("a plugin with a syntax error must reject the reload") }
        let c2 = try RawClient(port: px.inbound)
        XCTAssertEqual(try XCTUnwrap(get(c2, headers: bearer(try token()))).status, 200, "the last good keys still verify")
        XCTAssertEqual(try XCTUnwrap(get(c2, headers: bearer(try token(b)))).status, 401, "the rejected configuration's key is not trusted")
        // Once the configuration is fixed, the new key is the trusted one.
        try FileManager.default.removeItem(atPath: px.dir + "/broken.yaml")
        XCTAssertNoThrow(try px.server.reload(reason: "test").get())
        let c3 = try RawClient(port: px.inbound)
        XCTAssertEqual(try XCTUnwrap(get(c3, headers: bearer(try token(b)))).status, 200)
        XCTAssertEqual(try XCTUnwrap(get(c3, headers: bearer(try token()))).status, 401)
    }

    func test_rejectedReloadThatChangesTheJwksUri_keepsRefreshingTheAcceptedOne() throws {
        let jwks = try TestUpstream { _ in TestUpstream.Reply(body: JWTSigner.jwks([Self.ec])) }
        defer { jwks.stop() }
        let other = try TestUpstream { _ in TestUpstream.Reply(body: JWTSigner.jwks([Self.signer])) }
        defer { other.stop() }
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: "jwksUri: http://127.0.0.1:\(jwks.port)/k")])
        defer { px.stop() }
        XCTAssertEqual(jwks.seen.count, 1)
        try px.write("broken.lua", "local f = {}\nfunction f.on_request(s) return end end\nreturn f\n")
        try px.write("broken.yaml", ProxyFixture.plugin("broken"))
        try px.write("ra.yaml", policy(keys: "jwksUri: http://127.0.0.1:\(other.port)/k"))
        guard case .failure = px.server.reload(reason: "test") else { return XCTFail("a plugin with a syntax error must reject the reload") }
        let before = jwks.seen.count
        px.server.jwks.refreshAll()
        let deadline = Date().addingTimeInterval(3)
        while jwks.seen.count == before && Date() < deadline { usleep(20_000) }
        XCTAssertGreaterThan(jwks.seen.count, before, "the accepted configuration's jwksUri is still refreshed")
        XCTAssertEqual(try XCTUnwrap(get(try RawClient(port: px.inbound), headers: bearer(try token(Self.ec)))).status, 200)
    }

    func test_tokenCookieSentTwice_isRefused_asAHeaderSentTwiceIs() throws {
        let ra = """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: custom, namespace: default}
        spec:
          jwtRules:
          - issuer: \(issuer)
            \(inline([Self.signer]))
            fromCookies: [session]
        """
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": ra])
        defer { px.stop() }
        let t = try token()
        XCTAssertEqual(try XCTUnwrap(get(try RawClient(port: px.inbound), headers: "cookie: a=b; session=\(t)\r\n")).status, 200)
        for h in ["cookie: session=\(t); session=\(t)\r\n", "cookie: session=\(t)\r\ncookie: a=b; session=garbage\r\n"] {
            let r = try XCTUnwrap(get(try RawClient(port: px.inbound), headers: h))
            XCTAssertEqual(r.status, 401, h)
            XCTAssertEqual(r.body, "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")
        }
        XCTAssertEqual(try XCTUnwrap(get(try RawClient(port: px.inbound), headers: "cookie: session=; session=\(t)\r\n")).status, 200,
                       "an empty value is no token (as for a parameter)")
    }

    func test_inlineJwksWithoutAUsableKey_rejectsTheConfiguration() {
        XCTAssertThrowsError(try ProxyFixture(appPort: up.port, files: ["ra.yaml": policy(keys: "jwks: '{\"keys\":[{\"kty\":\"RSA\",\"n\":\"AQAB\",\"e\":\"AQAB\"}]}'")])) { e in
            XCTAssertTrue("\(e)".contains("spec.jwtRules[0].jwks: Jwks doesn't have any valid public key"), "\(e)")
        }
    }

    func test_policyForAnotherNamespace_addsNoFilter() throws {
        let other = policy(keys: inline([Self.signer])).replacingOccurrences(of: "namespace: istio-system", with: "namespace: billing")
        let px = try ProxyFixture(appPort: up.port, files: ["ra.yaml": other])
        defer { px.stop() }
        XCTAssertEqual(try XCTUnwrap(get(try RawClient(port: px.inbound), headers: bearer("garbage"))).status, 200)
    }
}

final class BuiltinAuthnPluginTests: XCTestCase {
    func test_embeddedIstioAuthn_isThePluginsFile() throws {
        let file = GrayReleaseTests.repo.appendingPathComponent("plugins/istio-authn.lua")
        XCTAssertEqual(try String(contentsOf: file, encoding: .utf8), BuiltinPlugins.istioAuthn)
    }
}
