import XCTest
import MoonletCore
@testable import MoonletConfig

/// Every security kind Moonlet reads is enforced: AuthorizationPolicies (istio-authz,
/// CUSTOM through the mesh config's envoyExtAuthzHttp provider) and
/// RequestAuthentications (istio-authn) load. A CUSTOM policy whose provider Moonlet
/// cannot use fails closed in the compiled configuration (deny all), with an error
/// naming its place.
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

    func test_customAuthorizationPolicySelectingTheWorkload_loads_nowThatItIsEnforcedThroughItsProvider() throws {
        let snap = try load(customPolicy, namespace: "production", labels: ["app": "order-service"]).get()
        XCTAssertEqual(snap.istio.map(\.kind), ["AuthorizationPolicy"])
        XCTAssertNoThrow(try load(customPolicy, namespace: "default", labels: [:], scope: .anyWorkload).get())
    }

    func test_customPolicyWithAProviderMissingFromTheMeshConfig_deniesEverything_withAnErrorNamingItsPlace() throws {
        let snap = try load(customPolicy, namespace: "production", labels: ["app": "order-service"]).get()
        let workload = WorkloadIdentity(namespace: "production", serviceAccount: "order-service", labels: ["app": "order-service"])
        let c = AuthorizationCompiler.compile(snap.istio, workload: workload)
        XCTAssertEqual(c.config?["custom_deny_all"]?.stringValue, "provider ext-authz not found")
        XCTAssertEqual(c.errors.count, 1)
        XCTAssertTrue(c.errors[0].contains("p.yaml:1: AuthorizationPolicy production/order-service-policy: CUSTOM provider \"ext-authz\" is not an extensionProvider of the mesh config"), c.errors[0])
        // A gRPC provider is refused the same way.
        let grpc = MeshExtensionProvider(name: "ext-authz", kind: .envoyExtAuthzGrpc(service: "authz.foo", port: 9000))
        let g = AuthorizationCompiler.compile(snap.istio, workload: workload, providers: [grpc])
        XCTAssertEqual(g.config?["custom_deny_all"]?.stringValue, "provider ext-authz not supported")
        XCTAssertTrue(g.errors.first?.contains("is envoyExtAuthzGrpc, which Moonlet does not support") ?? false, "\(g.errors)")
        // With the provider: its settings, no deny-all.
        var a = MeshExtensionProvider.ExtAuthzHTTP()
        a.service = "foo/authz.foo.svc.cluster.local"; a.port = 8000; a.pathPrefix = "/check"; a.timeoutMs = 900_000
        a.includeRequestHeadersInCheck = ["X-User", "x-id-*"]
        let ok = AuthorizationCompiler.compile(snap.istio, workload: workload, providers: [MeshExtensionProvider(name: "ext-authz", kind: .envoyExtAuthzHttp(a))])
        XCTAssertNil(ok.config?["custom_deny_all"])
        XCTAssertTrue(ok.errors.isEmpty)
        XCTAssertEqual(ok.config?["provider"]?["target"]?.stringValue, "http://authz.foo.svc.cluster.local:8000")
        XCTAssertEqual(ok.config?["provider"]?["timeout_ms"], .int(60_000))
        XCTAssertEqual(ok.config?["provider"]?["path_prefix"]?.stringValue, "/check")
        guard case .array(let custom)? = ok.config?["custom"] else { return XCTFail("no custom policies") }
        XCTAssertEqual(custom.count, 1)
    }

    func test_customPolicyForAnotherWorkloadOrNamespace_isNotCompiledForThisOne() throws {
        let snap = try load(customPolicy, namespace: "production", labels: ["app": "frontend"]).get()
        XCTAssertNil(AuthorizationCompiler.compile(snap.istio, workload: WorkloadIdentity(namespace: "production", serviceAccount: "frontend", labels: ["app": "frontend"])).config)
        XCTAssertNil(AuthorizationCompiler.compile(snap.istio, workload: WorkloadIdentity(namespace: "staging", serviceAccount: "x", labels: ["app": "order-service"])).config)
    }

    func test_meshWideRequestAuthentication_isEnforcedNow_soItLoads_forTheSidecarAndForValidate() throws {
        let snap = try load(jwt, namespace: "anything", labels: [:]).get()
        XCTAssertEqual(snap.istio.map(\.kind), ["RequestAuthentication"])
        XCTAssertNoThrow(try load(jwt, namespace: "anything", labels: [:], scope: .anyWorkload).get())
    }

    func test_policyWithoutNamespace_istakenAsTheWorkloadsOwn() throws {
        let noNamespace = customPolicy.replacingOccurrences(of: ", namespace: production", with: "")
        let snap = try load(noNamespace, namespace: "orders", labels: ["app": "order-service"]).get()
        let c = AuthorizationCompiler.compile(snap.istio, workload: WorkloadIdentity(namespace: "orders", serviceAccount: "o", labels: ["app": "order-service"]))
        XCTAssertNotNil(c.config?["custom_deny_all"], "a policy with no namespace was not applied to the workload's namespace")
    }
}
