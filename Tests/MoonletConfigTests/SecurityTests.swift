import XCTest
import MoonletCore
@testable import MoonletConfig

final class SecurityConfigTests: XCTestCase {
    func load(_ yaml: String, file: StaticString = #filePath, line: UInt = #line) -> ConfigSnapshot? {
        let dir = NSTemporaryDirectory() + "moonlet-sec-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try! yaml.write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        switch ConfigLoader().load(paths: [dir]) {
        case .success(let s): return s
        case .failure(let e): XCTFail(e.description, file: file, line: line); return nil
        }
    }

    func errors(_ yaml: String) -> String {
        let r = ConfigLoader().loadText(yaml, file: "x.yaml", baseDir: "/")
        return r.errors.map(\.description).joined(separator: "\n")
    }

    func pa(_ name: String, _ ns: String, _ mode: String, selector: String? = nil, ports: String? = nil) -> String {
        var y = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: \(name), namespace: \(ns)}\nspec:\n"
        if let selector { y += "  selector: {matchLabels: {\(selector)}}\n" }
        y += "  mtls: {mode: \(mode)}\n"
        if let ports { y += "  portLevelMtls: {\(ports)}\n" }
        return y + "---\n"
    }

    let orders = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])

    func mode(_ yaml: String, _ w: WorkloadIdentity, port: Int = 8080) -> EffectiveMTLS? {
        guard let s = load(yaml) else { return nil }
        return PeerAuthenticationResolver.resolve(s.istio, workload: w, port: port)
    }

    func test_peerAuthentication_isPermissiveByDefault_andTheMostSpecificPolicyWins() {
        XCTAssertEqual(mode("", orders)?.mode, .permissive)
        let mesh = pa("default", "istio-system", "STRICT")
        XCTAssertEqual(mode(mesh, orders), EffectiveMTLS(mode: .strict, source: "PeerAuthentication istio-system/default"))
        // The seed's namespace policy overrides the mesh one.
        XCTAssertEqual(mode(mesh + pa("ns", "production", "PERMISSIVE"), orders)?.mode, .permissive)
        // A workload policy overrides the namespace one, UNSET inherits.
        XCTAssertEqual(mode(mesh + pa("ns", "production", "PERMISSIVE") + pa("wl", "production", "DISABLE", selector: "app: orders"), orders)?.mode, .disable)
        XCTAssertEqual(mode(pa("ns", "production", "STRICT") + pa("wl", "production", "UNSET", selector: "app: orders"), orders)?.mode, .strict)
        // A selector that does not match, or another namespace, does not apply.
        XCTAssertEqual(mode(pa("wl", "production", "DISABLE", selector: "app: payments"), orders)?.mode, .permissive)
        XCTAssertEqual(mode(pa("ns", "staging", "STRICT"), orders)?.mode, .permissive)
    }

    func test_peerAuthentication_portLevelSettingsOverrideTheWorkloadMode_forThatPortOnly() {
        let y = pa("ns", "production", "STRICT") + pa("wl", "production", "STRICT", selector: "app: orders", ports: "'9090': {mode: DISABLE}, '8080': {mode: UNSET}")
        XCTAssertEqual(mode(y, orders, port: 9090), EffectiveMTLS(mode: .disable, source: "PeerAuthentication production/wl:9090"))
        XCTAssertEqual(mode(y, orders, port: 8080)?.mode, .strict)
        XCTAssertEqual(mode(y, orders, port: 7000)?.mode, .strict)
    }

    static let service = """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: orders, namespace: production}
    spec:
      hosts: [orders.production.svc.cluster.local]
      resolution: STATIC
      ports: [{number: 80, name: http}, {number: 81, name: admin}]
      endpoints:
      - {address: 10.0.0.1, ports: {http: 8080}, serviceAccount: orders, labels: {version: v1, security.istio.io/tlsMode: istio}}
      - {address: 10.0.0.2, ports: {http: 8080}, labels: {version: v2}}
      - {address: 10.0.0.3, ports: {http: 8080}, labels: {version: v3, security.istio.io/tlsMode: istio}}
    ---

    """

    func cluster(_ snap: ConfigSnapshot?, port: Int = 80, subset: String = "") -> ClusterInfo? {
        snap?.routes.services["orders.production.svc.cluster.local"]?.clusters["\(subset)|\(port)"]
    }

    func test_autoMTLS_securesMeshWorkloads_andChecksTheirServiceAccount() {
        let c = cluster(load(Self.service))
        XCTAssertEqual(c?.tls(0)?.mode, .istioMutual)
        XCTAssertEqual(c?.tls(0)?.automatic, true)
        XCTAssertEqual(c?.tls(0)?.subjectAltNames, ["spiffe://cluster.local/ns/production/sa/orders"])
        XCTAssertEqual(c?.tls(0)?.sni, "outbound_.80_._.orders.production.svc.cluster.local")
        XCTAssertNil(c?.tls(1), "no service account, no tlsMode label: plaintext")
        XCTAssertEqual(c?.tls(2)?.mode, .istioMutual)
        XCTAssertEqual(c?.tls(2)?.subjectAltNames, [])
    }

    func test_autoMTLS_isDecidedByTheTlsModeLabel_notByAServiceAccount() {
        // The gray-release endpoints name a service account but run no sidecar: Istio
        // sends them plaintext, because injection (the tlsMode label) is what decides.
        let c = cluster(load(Self.service.replacingOccurrences(of: "serviceAccount: orders, labels: {version: v1, security.istio.io/tlsMode: istio}",
                                                               with: "serviceAccount: orders, labels: {version: v1}")))
        XCTAssertNil(c?.tls(0), "a service account without the tlsMode label: plaintext")
        XCTAssertEqual(c?.tls(2)?.mode, .istioMutual)
    }

    func test_destinationRuleTLS_appliesTopLevelThenPortLevelThenSubset() {
        let dr = """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: orders, namespace: production}
        spec:
          host: orders.production.svc.cluster.local
          trafficPolicy:
            tls: {mode: ISTIO_MUTUAL}
            portLevelSettings:
            - port: {number: 81}
              tls: {mode: DISABLE}
          subsets:
          - name: ext
            labels: {version: v2}
            trafficPolicy:
              tls: {mode: SIMPLE, caCertificates: /etc/ca.pem, sni: orders.example.com, subjectAltNames: [orders.example.com]}
        """
        let s = load(Self.service + dr)
        let top = cluster(s)
        XCTAssertEqual(top?.tls(1)?.mode, .istioMutual, "ISTIO_MUTUAL applies to every endpoint")
        XCTAssertEqual(top?.tls(0)?.automatic, false)
        XCTAssertEqual(top?.tls(0)?.subjectAltNames, ["spiffe://cluster.local/ns/production/sa/orders"])
        XCTAssertNil(cluster(s, port: 81)?.tls(0), "port-level DISABLE")
        let ext = cluster(s, subset: "ext")?.tls(0)
        XCTAssertEqual(ext?.mode, .simple)
        XCTAssertEqual(ext?.caCertificates, "/etc/ca.pem")
        XCTAssertEqual(ext?.sni, "orders.example.com")
        XCTAssertEqual(ext?.subjectAltNames, ["orders.example.com"])
        XCTAssertNotEqual(ext?.poolTag, top?.tls(0)?.poolTag)
    }

    func test_destinationRuleTLS_badSettingsAreRejectedWithTheirField() {
        let head = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: h\n  trafficPolicy:\n"
        XCTAssertTrue(errors(head + "    tls: {mode: MUTUAL}\n").contains("x.yaml:7:10: DestinationRule d: spec.trafficPolicy.tls: MUTUAL requires clientCertificate and privateKey"), errors(head + "    tls: {mode: MUTUAL}\n"))
        XCTAssertTrue(errors(head + "    tls: {mode: TLS13}\n").contains("spec.trafficPolicy.tls.mode: Unsupported value: \"TLS13\""))
        XCTAssertTrue(errors(head + "    tls: {mode: ISTIO_MUTUAL, privateKey: /k}\n").contains("spec.trafficPolicy.tls.privateKey: cannot be set with ISTIO_MUTUAL"))
        XCTAssertTrue(errors(head + "    tls: {mode: SIMPLE, credentialName: c}\n").contains("credentialName: not supported"))
        XCTAssertTrue(errors(head + "    portLevelSettings: [{tls: {mode: SIMPLE}}]\n").contains("spec.trafficPolicy.portLevelSettings[0].port.number: Required value"))
        XCTAssertEqual(errors(head + "    tls: {mode: SIMPLE, sni: a.example, insecureSkipVerify: true}\n"), "")
    }

    func test_destinationRuleTLS_aSubsetsBadSettingsAreRejectedToo() {
        let y = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: h\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy: {tls: {mode: MUTUAL}}\n"
        XCTAssertTrue(errors(y).contains("spec.subsets[0].trafficPolicy.tls: MUTUAL requires clientCertificate and privateKey"), errors(y))
    }

    func test_fieldsMoonletDoesNotApply_caCrlAboveAll_areReportedAtLoad_notDroppedSilently() {
        let y = """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: d, namespace: shop}
        spec:
          host: h
          trafficPolicy:
            loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 10s}}
            tls: {mode: SIMPLE, caCertificates: /ca.pem, caCrl: /crl.pem}
            proxyProtocol: {version: V1}
        """
        let r = ConfigLoader().loadText(y, file: "x.yaml", baseDir: "/")
        XCTAssertEqual(r.errors.map(\.description), [])
        XCTAssertEqual(r.skipped, [
            "x.yaml:9: DestinationRule shop/d: spec.trafficPolicy.proxyProtocol: not applied by moonlet, ignored",
            "x.yaml:7: DestinationRule shop/d: spec.trafficPolicy.loadBalancer.warmup: not applied by moonlet, ignored",
            "x.yaml:8: DestinationRule shop/d: spec.trafficPolicy.tls.caCrl: certificate revocation lists are not checked by moonlet: a revoked certificate is still accepted",
        ])
    }
}
