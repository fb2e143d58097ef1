import XCTest
import MoonletCore
@testable import MoonletConfig

/// Cluster names as a filter writes them (`s.route.cluster`), resolved against a snapshot.
final class ClusterNameTests: XCTestCase {
    static let other = """
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: far, namespace: shop}
    spec:
      hosts: [far]
      resolution: STATIC
      ports: [{number: 80, name: http}]
      endpoints: [{address: 10.0.1.1}]
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: ext, namespace: default}
    spec:
      hosts: [api.example.com]
      resolution: STATIC
      ports: [{number: 443, name: https}]
      endpoints: [{address: 10.0.2.1}]
    """

    func cluster(_ t: RouteTable, _ name: String) -> NamedCluster? {
        if case .cluster(let c)? = t.resolveCluster(name) { return c }
        return nil
    }

    func test_clusterName_resolvesTheFQDN_andEveryFormOfTheHostInTheWorkloadsNamespace() throws {
        let t = try RoutingTests.load(Self.other)
        for host in ["svc.default.svc.cluster.local", "svc.default.svc", "svc.default", "svc", "SVC.Default"] {
            let c = try XCTUnwrap(cluster(t, "outbound|8080|v2|\(host)"), host)
            XCTAssertEqual(c.cluster.name, "outbound|8080|v2|svc.default.svc.cluster.local")
            XCTAssertEqual(c.host, "svc.default.svc.cluster.local")
            XCTAssertEqual(c.subset, "v2")
            XCTAssertEqual(c.port, 8080)
            XCTAssertEqual(c.cluster.endpointCount, 1)
            XCTAssertEqual(c.cluster.endpoint(0).address, "10.0.0.2")
        }
        let all = try XCTUnwrap(cluster(t, "outbound|8080||svc"))
        XCTAssertEqual(all.subset, "")
        XCTAssertEqual(all.cluster.endpointCount, 2)
        XCTAssertNotNil(cluster(t, "outbound|443||api.example.com"))
        // Another namespace's service: qualified forms only.
        XCTAssertNotNil(cluster(t, "outbound|80||far.shop"))
        XCTAssertNil(cluster(t, "outbound|80||far"))
    }

    func test_clusterName_unknownPortSubsetHostOrForm_isNil_andPassthroughIsKnown() throws {
        let t = try RoutingTests.load(Self.other)
        for name in ["outbound|9999|v2|svc", "outbound|8080|v3|svc", "outbound|8080|v2|nowhere", "inbound|8080||svc",
                     "outbound|8080|v2", "svc", "", "outbound|x|v2|svc", "outbound|8080|v2|svc|extra"] {
            XCTAssertNil(t.resolveCluster(name), name)
        }
        guard case .passthrough? = t.resolveCluster("PassthroughCluster") else { return XCTFail("PassthroughCluster") }
        XCTAssertNil(RouteTable.splitClusterName("outbound|0||svc"))
        XCTAssertEqual(RouteTable.splitClusterName("outbound|80||svc").map { "\($0.port) \($0.subset) \($0.host)" }, "80  svc")
    }

    func test_retryOn_rendersCanonically_andParsesBackToTheSamePolicy() {
        XCTAssertEqual(RetrySpec.istioDefault.retryOn, "connect-failure,refused-stream,cancelled,unavailable,503")
        let s = RetrySpec(attempts: 3, perTryTimeoutMs: 100, retryOn: " reset , 5xx,retriable-4xx,504, gateway-error,refused-stream,connect-failure")
        XCTAssertEqual(s.retryOn, "5xx,gateway-error,reset,connect-failure,refused-stream,retriable-4xx,504")
        for spec in [s, RetrySpec.istioDefault, RetrySpec(attempts: 1, perTryTimeoutMs: 0, retryOn: ""),
                     RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: "retriable-status-codes"),
                     RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: "409,500"),
                     RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: "internal,deadline-exceeded,resource-exhausted")] {
            XCTAssertEqual(RetrySpec(attempts: spec.attempts, perTryTimeoutMs: spec.perTryTimeoutMs, retryOn: spec.retryOn), spec, spec.retryOn)
        }
    }

    func test_unknownRetryOnToken_namesTheFirstUnknownCondition() {
        XCTAssertNil(RetrySpec.unknownRetryOnToken("5xx,gateway-error,reset,connect-failure,refused-stream,retriable-4xx,retriable-status-codes,503,unavailable,cancelled"))
        XCTAssertNil(RetrySpec.unknownRetryOnToken(""))
        XCTAssertEqual(RetrySpec.unknownRetryOnToken("5xx,5xxx,reset"), "5xxx")
        XCTAssertEqual(RetrySpec.unknownRetryOnToken("5xx,99"), "99")
        XCTAssertEqual(RetrySpec.unknownRetryOnToken("600"), "600")
    }
}
