import XCTest
import MoonletCore
@testable import MoonletConfig

/// AuthorizationPolicy decoding, scope and compilation (the tables the istio-authz filter reads).
final class AuthorizationTests: XCTestCase {
    func load(_ yaml: String) -> ConfigLoader.TextResult { ConfigLoader().loadText(yaml, file: "a.yaml", baseDir: "/") }

    func policy(_ name: String, ns: String, _ spec: String) -> String {
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: \(name), namespace: \(ns)}\nspec:\n\(spec)\n"
    }

    func test_scope_isRootNamespaceOrOwnNamespace_narrowedBySelector_andTargetRefIsANoteOnly() {
        let r = load([
            policy("mesh", ns: "istio-system", "  action: DENY\n  rules: [{}]"),
            policy("ns", ns: "shop", "  rules: [{}]"),
            policy("other-ns", ns: "bank", "  rules: [{}]"),
            policy("sel", ns: "shop", "  selector: {matchLabels: {app: cart}}\n  rules: [{}]"),
            policy("other-sel", ns: "shop", "  selector: {matchLabels: {app: web}}\n  rules: [{}]"),
            policy("gw", ns: "shop", "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n  rules: [{}]"),
        ].joined(separator: "---\n"))
        XCTAssertEqual(r.errors.map(\.description), [])
        let c = AuthorizationCompiler.compile(r.istio, workload: WorkloadIdentity(namespace: "shop", labels: ["app": "cart"]))
        XCTAssertEqual(c.policies, ["istio-system/mesh", "shop/ns", "shop/sel"])
        guard case .array(let deny)? = c.config?["deny"] else { return XCTFail("no deny list") }
        XCTAssertEqual(deny.count, 1)
        XCTAssertTrue(c.notes.contains { $0.contains("AuthorizationPolicy shop/gw: targetRef") }, "\(c.notes)")
        let root = AuthorizationCompiler.compile(r.istio, workload: WorkloadIdentity(namespace: "shop", labels: ["app": "cart"], rootNamespace: "mesh-root"))
        XCTAssertEqual(root.policies, ["shop/ns", "shop/sel"])
        XCTAssertNil(AuthorizationCompiler.compile(r.istio, workload: WorkloadIdentity(namespace: "elsewhere", rootNamespace: "none")).config)
    }

    func test_dryRunAnnotation_isCarriedToTheCompiledPolicy() {
        let r = load("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: d\n  namespace: shop\n  annotations: {istio.io/dry-run: \"true\"}\nspec: {action: DENY, rules: [{}]}\n")
        let c = AuthorizationCompiler.compile(r.istio, workload: WorkloadIdentity(namespace: "shop"))
        XCTAssertEqual(c.policies, ["shop/d (dry-run)"])
        guard case .array(let deny)? = c.config?["deny"] else { return XCTFail() }
        XCTAssertEqual(deny.first?["dry_run"], .bool(true))
    }

    func test_trustDomainAliases_expandPrincipals_asIstiosBundle() {
        let e = AuthorizationCompiler.expandTrustDomains(
            ["cluster.local/ns/a/sa/b", "td1/ns/a/sa/c", "*/ns/a/sa/d", "*-td/ns/a/sa/e", "foreign/ns/a/sa/f", "plain"],
            bundle: ["new-td", "old-td", "some-trustdomain"])
        XCTAssertEqual(e, [
            "new-td/ns/a/sa/b", "old-td/ns/a/sa/b", "some-trustdomain/ns/a/sa/b",
            "td1/ns/a/sa/c", "*/ns/a/sa/d", "*-td/ns/a/sa/e", "some-trustdomain/ns/a/sa/e", "foreign/ns/a/sa/f", "plain",
        ])
        XCTAssertEqual(AuthorizationCompiler.expandTrustDomains(["cluster.local/ns/a/sa/b"], bundle: ["cluster.local"]), ["cluster.local/ns/a/sa/b"])
        // cluster.local in a policy stands for the local trust domain.
        XCTAssertEqual(AuthorizationCompiler.expandTrustDomains(["cluster.local/ns/a/sa/b"], bundle: ["shop.example"]), ["shop.example/ns/a/sa/b"])
    }

    func test_invalidPolicies_areRefusedWithFileLineAndIstiosMessage() {
        let cases: [(String, String)] = [
            ("  rules:\n  - from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]", "AuthorizationPolicy ns/p: spec.rules[0].from[0].source.ipBlocks: \"10.0.0.0/33\" is not a valid CIDR block"),
            ("  rules:\n  - to: [{operation: {ports: [\"http\"]}}]", "spec.rules[0].to[0].operation.ports: invalid port http"),
            ("  rules:\n  - when: [{key: request.bogus, values: [x]}]", "spec.rules[0].when[0].key: unknown attribute: request.bogus"),
            ("  rules:\n  - when: [{key: source.ip}]", "at least one of values or notValues must be set for key source.ip"),
            ("  rules:\n  - from: [{source: {}}]", "`from.source` must not be empty, found at rule 0"),
            ("  rules:\n  - to: []", "`to` must not be empty, found at rule 0"),
            ("  action: CUSTOM\n  rules: [{}]", "must specify provider when using CUSTOM action"),
            ("  action: DENY\n  provider: {name: x}", "provider must not be set for DENY action"),
            ("  action: ALLOWED", "spec.action: Unsupported value: \"ALLOWED\""),
        ]
        for (spec, want) in cases {
            let text = load(policy("p", ns: "ns", spec)).errors.map(\.description).joined(separator: "\n")
            XCTAssertTrue(text.contains(want), "want \(want)\ngot \(text)")
            XCTAssertTrue(text.hasPrefix("a.yaml:"), text)
        }
    }

    func test_meshConfig_rootNamespace_isRead() throws {
        XCTAssertEqual(try MeshConfigFile.parse("rootNamespace: mesh-root\n", file: "m.yaml").rootNamespace, "mesh-root")
        XCTAssertEqual(try MeshConfigFile.parse("enableTracing: true\n", file: "m.yaml").rootNamespace, "istio-system")
        XCTAssertThrowsError(try MeshConfigFile.parse("rootNamespace: Not_A_Namespace\n", file: "m.yaml"))
    }
}
