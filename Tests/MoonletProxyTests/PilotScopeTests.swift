import XCTest
import NIOCore
import NIOConcurrencyHelpers
@testable import MoonletPilot
@testable import MoonletProxy
import MoonletConfig

/// `moonlet pilot` scopes each sidecar's push with the Sidecar resource that selects its
/// workload: it gets what the egress imports (and what its own workload needs), and a
/// change outside that scope is not pushed to it.
final class PilotScopeTests: XCTestCase {
    static func se(_ name: String, _ ns: String, port: Int = 80) -> String {
        """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: \(name), namespace: \(ns)}
        spec:
          hosts: [\(name).\(ns).svc.cluster.local]
          resolution: STATIC
          ports: [{number: \(port), name: http}]
          endpoints: [{address: 10.1.0.1}]

        """
    }

    static let files: [String: String] = [
        "services.yaml": se("ratings", "shop") + "---\n" + se("payments", "billing") + "---\n" + se("ledger", "billing"),
        "routes.yaml": """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: ledger, namespace: billing}
        spec:
          hosts: [ledger.billing.svc.cluster.local]
          http: [{route: [{destination: {host: ledger.billing.svc.cluster.local}}]}]

        """,
        "sidecars.yaml": """
        apiVersion: networking.istio.io/v1beta1
        kind: Sidecar
        metadata: {name: reviews, namespace: shop}
        spec:
          workloadSelector: {labels: {app: reviews}}
          egress: [{hosts: ["./*"]}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: Sidecar
        metadata: {name: checkout, namespace: shop}
        spec:
          workloadSelector: {labels: {app: checkout}}
          egress: [{hosts: ["./*", "billing/*"]}]

        """,
        "policy.yaml": """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: billing-only, namespace: billing}
        spec:
          action: ALLOW
          rules: [{from: [{source: {namespaces: [shop]}}]}]

        """,
    ]

    /// One poll of node `node` (workload shop/`app`): the status and the set, if any.
    func poll(_ pilot: PilotFixture, app: String, version: Int? = nil, hash: String? = nil, timeout: Int = 0) throws -> (Int, PilotConfigSet?) {
        var q = "node=\(app)-1.shop&namespace=shop&service_account=\(app)&labels=app=\(app)&timeout=\(timeout)"
        if let version, let hash { q += "&version=\(version)&hash=\(hash)" }
        let r = try XCTUnwrap(adminGet(pilot.port, "/v1/config?" + q), "no answer")
        guard r.status == 200 else { return (r.status, nil) }
        return (200, try JSONDecoder().decode(PilotConfigSet.self, from: Data(r.body.utf8)))
    }

    func names(_ set: PilotConfigSet?) -> [String] {
        (set?.files ?? []).flatMap { f in f.content.components(separatedBy: "\n").filter { $0.hasPrefix("metadata:") } }.sorted()
    }

    func testTwoSidecarsWithDifferentSidecarResourcesReceiveDifferentSets_andAChangeOutsideOnesScopeDoesNotBumpItsVersion() throws {
        let pilot = try PilotFixture(files: Self.files)
        defer { pilot.stop() }
        XCTAssertTrue(eventually { pilot.server.current != nil }, pilot.lines.withLockedValue { $0 }.joined(separator: "\n"))

        let (s1, reviews) = try poll(pilot, app: "reviews")
        let (s2, checkout) = try poll(pilot, app: "checkout")
        XCTAssertEqual(s1, 200); XCTAssertEqual(s2, 200)
        // reviews imports only its namespace: no billing service, route or policy; its own Sidecar only.
        XCTAssertEqual(names(reviews), ["metadata: {name: ratings, namespace: shop}", "metadata: {name: reviews, namespace: shop}"])
        // checkout imports billing too (the policy of billing does not apply to it).
        XCTAssertEqual(names(checkout), ["metadata: {name: checkout, namespace: shop}", "metadata: {name: ledger, namespace: billing}",
                                         "metadata: {name: ledger, namespace: billing}", "metadata: {name: payments, namespace: billing}",
                                         "metadata: {name: ratings, namespace: shop}"])
        XCTAssertNotEqual(reviews?.hash, checkout?.hash)
        // Each scoped set is valid on its own: a sidecar loads it.
        for set in [reviews, checkout] {
            let dir = NSTemporaryDirectory() + "moonlet-scope-\(UUID().uuidString)"
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try XCTUnwrap(set).write(to: dir)
            if case .failure(let e) = ConfigLoader().load(paths: [dir], namespace: "shop") { XCTFail("\(e)") }
        }
        let r = try XCTUnwrap(reviews), c = try XCTUnwrap(checkout)

        // A change in billing: pushed to checkout, not to reviews (its poll is held, then 304).
        try pilot.write("routes.yaml", Self.files["routes.yaml"]!.replacingOccurrences(of: "http: [{route", with: "http: [{timeout: 3s, route"))
        XCTAssertTrue(eventually { (pilot.server.current?.version ?? 0) == 2 })
        let (held, none) = try poll(pilot, app: "reviews", version: r.version, hash: r.hash, timeout: 1)
        XCTAssertEqual(held, 304, "reviews got \(names(none))")
        let (pushed, next) = try poll(pilot, app: "checkout", version: c.version, hash: c.hash, timeout: 1)
        XCTAssertEqual(pushed, 200)
        XCTAssertEqual(next?.version, 2)
        XCTAssertTrue(next?.files.contains { $0.content.contains("timeout: 3s") } ?? false)
        // Asked afresh, reviews still gets its set at the version it had.
        XCTAssertEqual(try poll(pilot, app: "reviews").1?.version, r.version)

        // A change in shop reaches both.
        try pilot.write("services.yaml", Self.files["services.yaml"]!.replacingOccurrences(of: "10.1.0.1}]\n---", with: "10.1.0.2}]\n---"))
        XCTAssertTrue(eventually { (pilot.server.current?.version ?? 0) == 3 })
        XCTAssertEqual(try poll(pilot, app: "reviews", version: r.version, hash: r.hash, timeout: 1).1?.version, 3)
        XCTAssertEqual(try poll(pilot, app: "checkout", version: 2, hash: next?.hash, timeout: 1).1?.version, 3)

        // A workload no Sidecar selects gets everything.
        let (_, all) = try poll(pilot, app: "frontend")
        XCTAssertEqual(all?.hash, pilot.server.current?.hash)
    }

    /// A sidecar of workload shop/`app` subscribed to `pilot` (its identity, as the
    /// injector gives it, selects its Sidecar both at pilot and locally).
    func subscribe(_ pilot: PilotFixture, app: String) throws -> (ProxyFixture, PilotClient, String) {
        let proxy = try ProxyFixture(appPort: 1, concurrency: 1) { s in
            s.identity = WorkloadIdentity(namespace: "shop", serviceAccount: app, labels: ["app": app])
        }
        proxy.server.expectPushedConfig()
        let cache = NSTemporaryDirectory() + "moonlet-scope-cache-\(UUID().uuidString)"
        var st = PilotClient.Settings(address: pilot.address, node: PilotNode(id: "\(app)-1.shop", namespace: "shop", serviceAccount: app, labels: ["app": app]),
                                      cacheDirectory: cache, certsDirectory: nil)
        st.backoffBase = 0.05; st.backoffMax = 0.4
        st.pollSeconds = 5
        let server = proxy.server!
        let client = try PilotClient(settings: st, apply: { dir, set in
            switch server.applyPushedConfig(directory: dir, reason: "pilot version \(set.version)") {
            case .success: return nil
            case .failure(let e): return e.message
            }
        }, log: { _ in })
        client.start()
        return (proxy, client, cache)
    }

    func testSubscribedSidecarsApplyOnlyTheirScope_andOneOutsideAChangeKeepsItsAppliedVersion() throws {
        let pilot = try PilotFixture(files: Self.files)
        defer { pilot.stop() }
        let (reviews, rc, c1) = try subscribe(pilot, app: "reviews")
        let (checkout, cc, c2) = try subscribe(pilot, app: "checkout")
        defer {
            rc.stop(); cc.stop(); reviews.stop(); checkout.stop()
            try? FileManager.default.removeItem(atPath: c1); try? FileManager.default.removeItem(atPath: c2)
        }
        XCTAssertTrue(eventually { rc.status.appliedVersion == 1 && cc.status.appliedVersion == 1 }, "\(rc.status) \(cc.status)")
        let ledger = "ledger.billing.svc.cluster.local"
        XCTAssertNil(reviews.server.currentSnapshot.routes.services[ledger], "reviews does not import billing")
        XCTAssertNotNil(checkout.server.currentSnapshot.routes.services[ledger])
        XCTAssertNotNil(reviews.server.currentSnapshot.routes.services["ratings.shop.svc.cluster.local"])

        try pilot.write("routes.yaml", Self.files["routes.yaml"]!.replacingOccurrences(of: "http: [{route", with: "http: [{timeout: 3s, route"))
        XCTAssertTrue(eventually { cc.status.appliedVersion == 2 }, "\(cc.status)")
        XCTAssertEqual(checkout.server.currentSnapshot.routes.lookup(ledger)?.routes?.first?.timeoutMs, 3000)
        // reviews was not pushed anything: still version 1, and pilot's /status has it in sync.
        usleep(300_000)
        XCTAssertEqual(rc.status.appliedVersion, 1)
        let st = try XCTUnwrap(try pilot.sidecar("reviews-1.shop"))
        XCTAssertEqual(st["applied_version"] as? Int, 1)
        XCTAssertEqual(st["in_sync"] as? Bool, true)
        XCTAssertTrue(try eventually { try pilot.sidecar("checkout-1.shop")?["in_sync"] as? Bool == true })
    }
}
