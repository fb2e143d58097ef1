import XCTest
import MoonletCore
@testable import MoonletConfig

/// RequestAuthentication: decoding, Istio's validation and Istio's scope.
final class RequestAuthenticationTests: XCTestCase {
    func resources(_ yaml: String) -> ConfigLoader.TextResult { ConfigLoader().loadText(yaml, file: "ra.yaml", baseDir: "/") }

    let full = """
    apiVersion: security.istio.io/v1beta1
    kind: RequestAuthentication
    metadata: {name: jwt, namespace: orders}
    spec:
      selector: {matchLabels: {app: order-service}}
      jwtRules:
      - issuer: https://issuer.example
        audiences: [orders]
        jwksUri: https://issuer.example/jwks.json
        fromHeaders: [{name: X-Token, prefix: "Bearer "}]
        fromParams: [tok]
        fromCookies: [session]
        forwardOriginalToken: true
        outputPayloadToHeader: X-Payload
        outputClaimToHeaders: [{header: x-sub, claim: sub}]
        timeout: 2s
      - issuer: other
        jwks: '{"keys":[]}'
    """

    func test_fullPolicy_decodesEveryField_andDefaultLocationsAreIstios() throws {
        let r = resources(full)
        XCTAssertEqual(r.errors.map(\.description), [])
        let spec = RequestAuthenticationSpec.decode(try XCTUnwrap(r.istio.first))
        XCTAssertEqual(spec.selector, ["app": "order-service"])
        let a = spec.rules[0]
        XCTAssertEqual(a.issuer, "https://issuer.example")
        XCTAssertEqual(a.audiences, ["orders"])
        XCTAssertEqual(a.locations, [.header(name: "x-token", prefix: "Bearer "), .param("tok"), .cookie("session")])
        XCTAssertTrue(a.forwardOriginalToken)
        XCTAssertEqual(a.outputPayloadToHeader, "x-payload")
        XCTAssertEqual(a.outputClaimToHeaders.map(\.header), ["x-sub"])
        XCTAssertEqual(a.timeoutMs, 2000)
        XCTAssertEqual(spec.rules[1].locations, JWTRuleSpec.defaultLocations)
        XCTAssertFalse(spec.rules[1].forwardOriginalToken)
    }

    func test_scope_isIstios_rootNamespace_ownNamespace_selector_andNotTargetRef() throws {
        func spec(_ ns: String, _ selector: String = "", target: Bool = false) throws -> RequestAuthenticationSpec {
            let y = """
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: p, namespace: \(ns)}
            spec:
            \(selector.isEmpty ? "" : "  selector: {matchLabels: {\(selector)}}\n")\(target ? "  targetRef: {kind: Service, name: orders}\n" : "")  jwtRules: [{issuer: i, jwks: '{"keys":[]}'}]
            """
            let r = resources(y)
            XCTAssertEqual(r.errors.map(\.description), [], y)
            return RequestAuthenticationSpec.decode(try XCTUnwrap(r.istio.first))
        }
        let w = WorkloadIdentity(namespace: "orders", labels: ["app": "order-service"])
        XCTAssertTrue(try spec("istio-system").selects(w))
        XCTAssertTrue(try spec("orders").selects(w))
        XCTAssertFalse(try spec("billing").selects(w))
        XCTAssertTrue(try spec("orders", "app: order-service").selects(w))
        XCTAssertFalse(try spec("orders", "app: frontend").selects(w))
        XCTAssertFalse(try spec("orders", target: true).selects(w), "a targetRef selects a gateway or waypoint, not a sidecar")
    }

    func test_invalidFields_areRefused_withTheirPlace() {
        let r = resources("""
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: bad}
        spec:
          jwtRules:
          - issuer: ""
            jwks: "{not json"
            unknownField: 1
        """)
        let text = r.errors.map(\.description).joined(separator: "\n")
        XCTAssertTrue(text.contains("ra.yaml:6:13: RequestAuthentication bad: spec.jwtRules[0].issuer: issuer must be set"), text)
        XCTAssertTrue(text.contains("spec.jwtRules[0].jwks: Jwks is an invalid JSON"), text)
        XCTAssertTrue(text.contains("spec.jwtRules[0].unknownField: unknown field"), text)
    }
}
