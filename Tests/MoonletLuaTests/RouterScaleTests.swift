import XCTest
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// Per-request work of the router does not grow with the mesh: a request builds (once)
/// and reads the table of its own host only, found by one probe of the host index.
final class RouterScaleTests: RouterHarness {
    /// `n` services shaped as bench/scale's (a header match, a prefix match, 90/10).
    static func mesh(_ n: Int) -> String {
        (0..<n).map { i in
            let s = "svc-\(i)"
            return """
            apiVersion: networking.istio.io/v1beta1
            kind: ServiceEntry
            metadata: {name: \(s), namespace: default}
            spec: {hosts: [\(s)], resolution: STATIC, ports: [{number: 8080, name: http}], workloadSelector: {labels: {app: \(s)}}}
            ---
            apiVersion: networking.istio.io/v1beta1
            kind: WorkloadEntry
            metadata: {name: \(s)-v2, namespace: default}
            spec: {address: 10.0.0.2, ports: {http: 9002}, labels: {app: \(s), version: v2}}
            ---
            apiVersion: networking.istio.io/v1beta1
            kind: DestinationRule
            metadata: {name: \(s), namespace: default}
            spec: {host: \(s), subsets: [{name: v2, labels: {version: v2}}]}
            ---
            apiVersion: networking.istio.io/v1beta1
            kind: VirtualService
            metadata: {name: \(s), namespace: default}
            spec:
              hosts: [\(s)]
              http:
              - match: [{headers: {x-gray: {exact: "true"}}}]
                route: [{destination: {host: \(s), subset: v2}}]
              - match: [{uri: {prefix: /api/v2}}]
                route: [{destination: {host: \(s), subset: v2}}]
              - route: [{destination: {host: \(s)}, weight: 90}, {destination: {host: \(s), subset: v2}, weight: 10}]
            """
        }.joined(separator: "\n---\n")
    }

    func testARequestTouchesTheSameNumberOfRouterObjectsInAMeshOf1And2000Services() throws {
        try configure(Self.mesh(1))
        let one = route("/api/v2/x", host: "svc-0")
        XCTAssertEqual(one.route.subset, "v2")
        let small = try XCTUnwrap(runtime.vm.routerCache.objectCount(snap))

        try configure(Self.mesh(2000))
        XCTAssertTrue(snap.routes.wildcards.isEmpty, "no wildcard host: a lookup is one probe of the host index")
        let last = route("/api/v2/x", host: "svc-1999")
        XCTAssertEqual(last.route.subset, "v2")
        XCTAssertTrue(last.route.cluster.hasSuffix("svc-1999.default.svc.cluster.local"), last.route.cluster)
        XCTAssertEqual(runtime.vm.routerCache.objectCount(snap), small, "only the request's host table was built")
        // More requests to the same host build nothing more.
        for _ in 0..<50 { route(host: "svc-1999", headers: [("x-gray", "true")]) }
        XCTAssertEqual(runtime.vm.routerCache.objectCount(snap), small)
    }
}
