import XCTest
import MoonletCore
@testable import MoonletConfig

final class RoutingTests: XCTestCase {
    static let endpoints = """
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: svc, namespace: default}
    spec:
      hosts: [svc]
      resolution: STATIC
      ports: [{number: 8080, name: http}]
      workloadSelector: {labels: {app: svc}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {name: svc-v1, namespace: default}
    spec: {address: 10.0.0.1, ports: {http: 9001}, labels: {app: svc, version: v1}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {name: svc-v2, namespace: default}
    spec: {address: 10.0.0.2, ports: {http: 9002}, labels: {app: svc, version: v2}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {name: svc, namespace: default}
    spec:
      host: svc
      subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """

    /// The route table of `endpoints` plus `extra` YAML, for a workload with `labels`.
    static func load(_ extra: String, labels: [String: String] = [:]) throws -> RouteTable {
        let dir = NSTemporaryDirectory() + "moonlet-route-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try (endpoints + "\n---\n" + extra).write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        return try ConfigLoader().load(paths: [dir], namespace: "default", labels: labels).get().routes
    }

    func table(_ vs: String, file: StaticString = #filePath, line: UInt = #line) -> RouteTable? {
        do { return try Self.load(vs) } catch { XCTFail("\(error)", file: file, line: line); return nil }
    }

    /// A VirtualService for host svc with `http` as its route list (indented two spaces).
    static func vs(_ http: String) -> String {
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: svc, namespace: default}\nspec:\n  hosts: [svc]\n  http:\n" + http
    }
    func vs(_ http: String) -> String { Self.vs(http) }

    // Routing decisions (matches, weights, actions) go through istio-router.lua: see
    // Tests/MoonletLuaTests/IstioRouterTests.swift.

    func test_destinationRulePolicy_subsetOverridesTopLevel() throws {
        let dir = NSTemporaryDirectory() + "moonlet-route-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let base = RoutingTests.endpoints.components(separatedBy: "\n---\n").dropLast().joined(separator: "\n---\n")
        let text = base + """

        ---
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: svc, namespace: default}
        spec:
          host: svc
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {http: {maxRequestsPerConnection: 10}}}
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
        """
        try text.write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        let t = try ConfigLoader().load(paths: [dir]).get().routes
        let svc = try XCTUnwrap(t.services["svc.default.svc.cluster.local"])
        XCTAssertEqual(svc.clusters["v1|8080"]?.policy, .roundRobin)
        XCTAssertEqual(svc.clusters["v2|8080"]?.policy, .random)
        XCTAssertEqual(svc.clusters["v2|8080"]?.maxRequestsPerConnection, 10)
        XCTAssertEqual(svc.clusters["|8080"]?.policy, .roundRobin)
    }

    func test_upstreamProtocol_followsIstio_portProtocolThenH2UpgradePolicyThenDownstream() {
        func choice(_ name: String, _ proto: String = "", _ http: (String, ConfigValue)? = nil) -> UpstreamProtocol {
            let v = http.map { ConfigValue.map([("connectionPool", .map([("http", .map([$0]))]))]) }
            return ClusterInfo.upstreamProtocol(ClusterPolicy.from(v, subset: nil), port: ServicePort(number: 80, name: name, protocolName: proto, targetPort: nil))
        }
        XCTAssertEqual(choice("http"), .http1)
        XCTAssertEqual(choice("http-web"), .http1)
        XCTAssertEqual(choice("grpc-api"), .http2)
        XCTAssertEqual(choice("http2"), .http2)
        XCTAssertEqual(choice("web", "GRPC"), .http2, "the protocol field wins over the name")
        XCTAssertEqual(choice("web"), .likeDownstream, "an undeclared port speaks what the client spoke")
        XCTAssertEqual(choice("http", "", ("h2UpgradePolicy", .string("UPGRADE"))), .http2)
        XCTAssertEqual(choice("web", "", ("h2UpgradePolicy", .string("DO_NOT_UPGRADE"))), .http1)
        XCTAssertEqual(choice("http", "", ("useClientProtocol", .bool(true))), .likeDownstream)
        XCTAssertEqual(choice("grpc", "", ("h2UpgradePolicy", .string("DO_NOT_UPGRADE"))), .http2, "a gRPC port is HTTP/2 whatever the policy")
        let bad = ConfigLoader().loadText("""
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: svc, namespace: default}
        spec:
          host: svc
          trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: SOMETIMES}}}
        """, file: "dr.yaml", baseDir: "/")
        XCTAssertTrue(bad.errors.contains { $0.description.contains("spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: unsupported value \"SOMETIMES\"") },
                      "\(bad.errors.map(\.description))")
    }

    func test_validation_reportsEveryErrorWithPlace() {
        let text = """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: bad, namespace: default}
        spec:
          hosts: [svc]
          http:
          - match: [{uri: {regex: "("}}]
            route:
            - {destination: {host: svc, subset: v1}, weight: 60}
            - {destination: {host: svc, subset: v2}, weight: 30}
            timeout: 10 seconds
            bogus: 1
        """
        let r = ConfigLoader().loadText(text, file: "vs.yaml", baseDir: "/")
        let all = r.errors.map(\.description)
        XCTAssertTrue(all.contains { $0.hasPrefix("vs.yaml:7:") && $0.contains("VirtualService default/bad: spec.http[0].match[0].uri.regex: bad regex") }, "\(all)")
        XCTAssertTrue(all.contains { $0.contains("spec.http[0].route: total destination weight 90 != 100") }, "\(all)")
        XCTAssertTrue(all.contains { $0.hasPrefix("vs.yaml:11:") && $0.contains("spec.http[0].timeout: invalid duration") }, "\(all)")
        XCTAssertTrue(all.contains { $0.hasPrefix("vs.yaml:12:5:") && $0.contains("spec.http[0].bogus: unknown field") }, "\(all)")
    }

    func test_undefinedSubset_isAnErrorWhenTheHostHasADestinationRule() {
        let dir = NSTemporaryDirectory() + "moonlet-route-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try! (Self.endpoints + "\n---\n" + vs("  - route: [{destination: {host: svc, subset: v3}}]\n")).write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        guard case .failure(let e) = ConfigLoader().load(paths: [dir]) else { return XCTFail("accepted undefined subset") }
        XCTAssertTrue(e.description.contains("subset \"v3\" is not defined by DestinationRule default/svc"), e.description)
    }

    func test_durations_parseAsIstioWritesThem() {
        XCTAssertEqual(TrafficDecoder.parseDuration("30s"), 30_000)
        XCTAssertEqual(TrafficDecoder.parseDuration("1.5s"), 1_500)
        XCTAssertEqual(TrafficDecoder.parseDuration("100ms"), 100)
        XCTAssertEqual(TrafficDecoder.parseDuration("2m"), 120_000)
        XCTAssertNil(TrafficDecoder.parseDuration("10"))
        XCTAssertNil(TrafficDecoder.parseDuration("-1s"))
    }

    /// A duration of hundreds of digits overflowed the Int conversion and trapped the loader.
    func test_anAbsurdlyLongDuration_isRefused_insteadOfTrappingTheLoader() throws {
        XCTAssertNil(TrafficDecoder.parseDuration(String(repeating: "9", count: 400) + "h"))
        XCTAssertNil(TrafficDecoder.parseDuration("99999999999999999999s"))
        let dir = NSTemporaryDirectory() + "moonlet-dur-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: svc, namespace: default}
        spec:
          hosts: [svc]
          http:
          - timeout: \(String(repeating: "9", count: 400))s
            route: [{destination: {host: svc}}]
        """.write(toFile: dir + "/vs.yaml", atomically: true, encoding: .utf8)
        guard case .failure(let e) = ConfigLoader().load(paths: [dir]) else { return XCTFail("an absurd timeout was accepted") }
        XCTAssertTrue(e.description.contains("timeout"), e.description)
    }
}
