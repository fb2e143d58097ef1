import XCTest
import MoonletCore
@testable import MoonletConfig

/// Until Moonlet enforces CUSTOM AuthorizationPolicies (external authorization), a sidecar
/// whose workload one selects refuses the configuration (fail closed), and `moonlet
/// validate` refuses every one of them: "valid" must never mean "protected" when it is not.
/// Other AuthorizationPolicies (istio-authz) and RequestAuthentications (istio-authn) are
/// enforced and accepted.
final class UnenforcedSecurityTests: XCTestCase {
    let seedPolicy = """
    apiVersion: security.istio.io/v1beta1
    kind: AuthorizationPolicy
    metadata: {name: order-service-policy, namespace: production}
    spec:
      selector: {matchLabels: {app: order-service}}
      action: ALLOW
      rules:
      - from:
        - source: {principals: ["cluster.local/ns/production/sa/frontend"]}
        to:
        - operation: {methods: ["GET", "POST"], paths: ["/api/order/*"]}
    """
    let jwt = """
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {name: jwt, namespace: istio-system}
    spec:
      jwtRules:
      - issuer: https://issuer.example
    """

    func load(_ yaml: String, namespace: String, labels: [String: String], scope: ConfigLoader.SecurityScope = .workload) -> Result<ConfigSnapshot, ConfigErrors> {
        let dir = NSTemporaryDirectory() + "moonlet-unenforced-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try! yaml.write(toFile: dir + "/p.yaml", atomically: true, encoding: .utf8)
        return ConfigLoader().load(paths: [dir], namespace: namespace, labels: labels, securityScope: scope)
    }

    var customPolicy: String {
        seedPolicy.replacingOccurrences(of: "action: ALLOW", with: "action: CUSTOM\n  provider: {name: ext-authz}")
    }

    func test_authorizationPolicySelectingTheWorkload_isAccepted_nowThatItIsEnforced() throws {
        let snap = try load(seedPolicy, namespace: "production", labels: ["app": "order-service"]).get()
        XCTAssertEqual(snap.istio.map(\.kind), ["AuthorizationPolicy"])
        XCTAssertNoThrow(try load(seedPolicy, namespace: "default", labels: [:], scope: .anyWorkload).get())
    }

    func test_customAuthorizationPolicySelectingTheWorkload_isRefused_withItsPlace() {
        guard case .failure(let e) = load(customPolicy, namespace: "production", labels: ["app": "order-service"]) else {
            return XCTFail("a CUSTOM AuthorizationPolicy that Moonlet does not enforce was accepted for the workload it selects")
        }
        XCTAssertEqual(e.errors.count, 1)
        let msg = e.errors.first?.description ?? ""
        XCTAssertTrue(msg.contains("p.yaml:1:1: AuthorizationPolicy production/order-service-policy: kind: AuthorizationPolicy with action CUSTOM (external authorization) is not enforced"), msg)
    }

    func test_customAuthorizationPolicyForAnotherWorkloadOrNamespace_doesNotStopTheSidecar() throws {
        XCTAssertNoThrow(try load(customPolicy, namespace: "production", labels: ["app": "frontend"]).get())
        XCTAssertNoThrow(try load(customPolicy, namespace: "staging", labels: ["app": "order-service"]).get())
    }

    func test_meshWideRequestAuthentication_isEnforcedNow_soItLoads_forTheSidecarAndForValidate() throws {
        let snap = try load(jwt, namespace: "anything", labels: [:]).get()
        XCTAssertEqual(snap.istio.map(\.kind), ["RequestAuthentication"])
        XCTAssertNoThrow(try load(jwt, namespace: "anything", labels: [:], scope: .anyWorkload).get())
    }

    func test_validate_refusesEveryUnenforcedSecurityResource_whateverItSelects() {
        guard case .failure(let e) = load(customPolicy, namespace: "default", labels: [:], scope: .anyWorkload) else {
            return XCTFail("moonlet validate called an unenforced CUSTOM AuthorizationPolicy valid")
        }
        XCTAssertTrue(e.errors.first?.description.contains("a sidecar whose workload it selects will not start") == true, e.description)
    }

    func test_policyWithoutNamespace_istakenAsTheWorkloadsOwn_soTheCheckFailsClosed() {
        let noNamespace = customPolicy.replacingOccurrences(of: ", namespace: production", with: "")
        guard case .failure = load(noNamespace, namespace: "orders", labels: ["app": "order-service"]) else {
            return XCTFail("a policy with no namespace was not applied to the workload's namespace")
        }
    }
}
