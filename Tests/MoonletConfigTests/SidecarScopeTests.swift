import XCTest
import MoonletCore
@testable import MoonletConfig

/// Istio's Sidecar resource: which one a workload gets, and what its egress imports.
final class SidecarScopeTests: XCTestCase {
    static func service(_ name: String, _ ns: String = "default") -> String {
        """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: \(name), namespace: \(ns)}
        spec:
          hosts: [\(name)]
          resolution: STATIC
          ports: [{number: 80, name: http}]
          endpoints: [{address: 127.0.0.1, ports: {http: 9000}}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: \(name), namespace: \(ns)}
        spec:
          hosts: [\(name)]
          http: [{route: [{destination: {host: \(name)}}]}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: \(name), namespace: \(ns)}
        spec: {host: \(name)}
        """
    }

    static func sidecar(_ name: String, _ ns: String = "default", selector: String? = nil, hosts: [String]?, mode: String? = nil, extra: String = "") -> String {
        var y = "apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata: {name: \(name), namespace: \(ns)}\nspec:\n"
        if let selector { y += "  workloadSelector: {labels: {\(selector)}}\n" }
        if let hosts { y += "  egress:\n  - hosts: [\(hosts.map { "\"\($0)\"" }.joined(separator: ", "))]\n" }
        if let mode { y += "  outboundTrafficPolicy: {mode: \(mode)}\n" }
        if !extra.isEmpty { y += extra }
        if selector == nil && hosts == nil && mode == nil && extra.isEmpty { y += "  {}\n" }
        return y
    }

    /// The mesh: a and b in default, c in other, d.example.com in default.
    static let mesh = [service("a"), service("b"), service("c", "other"), service("d.example.com")].joined(separator: "\n---\n")

    func load(_ docs: [String], namespace: String = "default", labels: [String: String] = [:],
              scope: ConfigLoader.SecurityScope = .workload) throws -> ConfigSnapshot {
        let dir = NSTemporaryDirectory() + "moonlet-sidecar-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try ([Self.mesh] + docs).joined(separator: "\n---\n").write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        switch ConfigLoader().load(paths: [dir], namespace: namespace, labels: labels, securityScope: scope) {
        case .success(let s): return s
        case .failure(let e): throw e
        }
    }

    func services(_ s: ConfigSnapshot) -> [String] { s.routes.services.keys.sorted() }

    func testWithoutASidecarEveryServiceIsLoaded() throws {
        let s = try load([])
        XCTAssertEqual(services(s), ["a.default.svc.cluster.local", "b.default.svc.cluster.local", "c.other.svc.cluster.local", "d.example.com"])
        XCTAssertEqual(s.routes.scope.outboundTrafficPolicy, .allowAny)
        XCTAssertEqual(s.routes.scope.sidecar, "")
    }

    func testEgressHostsImportOnlyTheNamedServicesAndTheirRoutes() throws {
        let s = try load([Self.sidecar("default", hosts: ["./a", "other/*"])])
        XCTAssertEqual(services(s), ["a.default.svc.cluster.local", "c.other.svc.cluster.local"])
        XCTAssertNotNil(s.routes.lookup("a")?.routes)
        XCTAssertNil(s.routes.lookup("b"), "b is outside the Sidecar's egress")
        XCTAssertNil(s.routes.lookup("b.default.svc.cluster.local"))
        XCTAssertNotNil(s.routes.lookup("c.other"))
        XCTAssertEqual(s.routes.scope.sidecar, "default/default")
    }

    func testEgressHostForms() throws {
        XCTAssertEqual(services(try load([Self.sidecar("default", hosts: ["*/*"])])).count, 4)
        XCTAssertEqual(services(try load([Self.sidecar("default", hosts: ["~/*"])])), [])
        XCTAssertEqual(services(try load([Self.sidecar("default", hosts: ["*/*.example.com"])])), ["d.example.com"])
        XCTAssertEqual(services(try load([Self.sidecar("default", hosts: ["default/b.default.svc.cluster.local"])])), ["b.default.svc.cluster.local"])
        XCTAssertEqual(services(try load([Self.sidecar("default", hosts: ["other/a"])])), [], "a is in default, not other")
        XCTAssertEqual(services(try load([Self.sidecar("default", hosts: ["./*"])])),
                       ["a.default.svc.cluster.local", "b.default.svc.cluster.local", "d.example.com"])
    }

    func testSelectorSidecarWinsOverTheNamespaceDefaultWhichWinsOverTheRootDefault() throws {
        let docs = [Self.sidecar("mesh", "istio-system", hosts: ["other/*"]),
                    Self.sidecar("ns-default", hosts: ["./a"]),
                    Self.sidecar("web", selector: "app: web", hosts: ["./b"])]
        let web = try load(docs, labels: ["app": "web"])
        XCTAssertEqual(web.routes.scope.sidecar, "default/web")
        XCTAssertEqual(services(web), ["b.default.svc.cluster.local"])
        let other = try load(docs, labels: ["app": "api"])
        XCTAssertEqual(other.routes.scope.sidecar, "default/ns-default")
        XCTAssertEqual(services(other), ["a.default.svc.cluster.local"])
        let elsewhere = try load(docs, namespace: "shop")
        XCTAssertEqual(elsewhere.routes.scope.sidecar, "istio-system/mesh")
        XCTAssertEqual(services(elsewhere), ["c.other.svc.cluster.local"])
    }

    func testTwoSidecarsForOneWorkloadTheFirstReadAppliesWithANote() throws {
        let s = try load([Self.sidecar("first", hosts: ["./a"]), Self.sidecar("second", hosts: ["./b"])])
        XCTAssertEqual(s.routes.scope.sidecar, "default/first")
        XCTAssertTrue(s.skipped.contains { $0.contains("2 Sidecars") && $0.contains("Sidecar default/second ignored") }, "\(s.skipped)")
    }

    func testOutboundTrafficPolicyIsRecordedInTheSnapshot() throws {
        XCTAssertEqual(try load([Self.sidecar("default", hosts: nil, mode: "REGISTRY_ONLY")]).routes.scope.outboundTrafficPolicy, .registryOnly)
        XCTAssertEqual(try load([Self.sidecar("default", hosts: nil, mode: "ALLOW_ANY")]).routes.scope.outboundTrafficPolicy, .allowAny)
        // Without egress the Sidecar imports everything (Istio's default).
        XCTAssertEqual(services(try load([Self.sidecar("default", hosts: nil, mode: "REGISTRY_ONLY")])).count, 4)
    }

    func testValidateChecksSidecarsAndLoadsEveryService() throws {
        let s = try load([Self.sidecar("default", hosts: ["./a"])], scope: .anyWorkload)
        XCTAssertEqual(services(s).count, 4)
        XCTAssertEqual(s.istio.filter { $0.kind == "Sidecar" }.count, 1)
    }

    func testBadSidecarFieldsAreErrorsNamingTheLine() throws {
        XCTAssertThrowsError(try load([Self.sidecar("default", hosts: ["a"])])) { e in
            let d = "\(e)"
            XCTAssertTrue(d.contains("spec.egress[0].hosts[0]") && d.contains("namespace/dnsName"), d)
        }
        XCTAssertThrowsError(try load([Self.sidecar("default", hosts: nil, mode: "BLOCK")])) { e in
            XCTAssertTrue("\(e)".contains("spec.outboundTrafficPolicy.mode"), "\(e)")
        }
        XCTAssertThrowsError(try load([Self.sidecar("default", hosts: nil, extra: "  egressPolicy: {}\n")])) { e in
            XCTAssertTrue("\(e)".contains("spec.egressPolicy") && "\(e)".contains("unknown field"), "\(e)")
        }
    }

    func testFieldsMoonletDoesNotApplyAreNotes() throws {
        let extra = """
          inboundConnectionPool: {http: {http1MaxPendingRequests: 10}}
          ingress:
          - port: {number: 9080, protocol: HTTP, name: http}
            defaultEndpoint: 127.0.0.1:8080
            captureMode: NONE

        """
        let s = try load([Self.sidecar("default", hosts: nil, extra: """
          egress:
          - port: {number: 80, protocol: HTTP, name: http}
            hosts: ["./a"]

        """ + extra)])
        XCTAssertTrue(s.skipped.contains { $0.contains("spec.egress[0].port") }, "\(s.skipped)")
        XCTAssertTrue(s.skipped.contains { $0.contains("spec.inboundConnectionPool") }, "\(s.skipped)")
        XCTAssertTrue(s.skipped.contains { $0.contains("spec.ingress[0].captureMode") }, "\(s.skipped)")
        XCTAssertEqual(s.routes.scope.ingressProblems(appPort: 8080), [])
        let problems = s.routes.scope.ingressProblems(appPort: 9999)
        XCTAssertEqual(problems.count, 1)
        XCTAssertTrue(problems[0].contains("ingress listener on port 9080") && problems[0].contains("127.0.0.1:9999"), problems[0])
    }
}
