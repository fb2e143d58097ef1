import XCTest
import MoonletCore
@testable import MoonletConfig

/// VirtualService `tcp` and `tls` routes: decoded with Istio's validation, compiled for
/// the proxy (source fields decided once), matched per connection.
final class L4RouteTests: XCTestCase {
    static let services = """
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: db, namespace: default}
    spec:
      hosts: [db.example.internal]
      addresses: [240.0.0.10]
      resolution: STATIC
      ports: [{number: 9000, name: tcp}, {number: 9001, name: tcp-admin}, {number: 443, name: tls, protocol: TLS}]
      endpoints:
      - {address: 10.0.0.1, labels: {version: v1}}
      - {address: 10.0.0.2, labels: {version: v2}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {name: db, namespace: default}
    spec:
      host: db.example.internal
      subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """

    /// The table, or the errors (one a line, the directory left out).
    func load(_ vs: String, labels: [String: String] = [:]) -> (table: RouteTable?, errors: String) {
        let dir = NSTemporaryDirectory() + "moonlet-l4-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try! (Self.services + "\n---\n" + vs).write(toFile: dir + "/c.yaml", atomically: true, encoding: .utf8)
        switch ConfigLoader().load(paths: [dir], namespace: "default", labels: labels) {
        case .success(let s): return (s.routes, "")
        case .failure(let e): return (nil, e.errors.map { $0.description.replacingOccurrences(of: dir + "/", with: "") }.joined(separator: "\n"))
        }
    }

    func table(_ vs: String, labels: [String: String] = [:], file: StaticString = #filePath, line: UInt = #line) throws -> RouteTable {
        let (t, e) = load(vs, labels: labels)
        if let t { return t }
        XCTFail(e, file: file, line: line)
        throw XCTSkip("config refused")
    }

    func errors(_ vs: String) -> String {
        load(vs).errors
    }

    static let head = """
    apiVersion: networking.istio.io/v1beta1
    kind: VirtualService
    metadata: {name: db, namespace: default}
    spec:
      hosts: [db.example.internal]

    """

    func testTCPRulesMatchByPortAndDestinationSubnet_inOrder_andSplitByWeight() throws {
        let t = try table(Self.head + """
          tcp:
          - match: [{port: 9001}]
            route: [{destination: {host: db.example.internal, subset: v2}}]
          - match: [{destinationSubnets: [240.0.0.0/28]}]
            route:
            - {destination: {host: db.example.internal, subset: v1}, weight: 25}
            - {destination: {host: db.example.internal, subset: v2}, weight: 75}
        """)
        let vh = try XCTUnwrap(t.hosts["db.example.internal"])
        XCTAssertEqual(vh.tcpCompiled.count, 2)
        let admin = try XCTUnwrap(vh.l4Route(ip: "240.0.0.10", port: 9001, sni: nil))
        XCTAssertEqual(admin.target(random: 0, port: 9001).cluster?.name, "outbound|9001|v2|db.example.internal")
        let split = try XCTUnwrap(vh.l4Route(ip: "240.0.0.10", port: 9000, sni: nil))
        XCTAssertEqual(split.target(random: 24, port: 9000).cluster?.name, "outbound|9000|v1|db.example.internal")
        XCTAssertEqual(split.target(random: 25, port: 9000).cluster?.name, "outbound|9000|v2|db.example.internal")
        XCTAssertEqual(split.target(random: 99, port: 9000).cluster?.name, "outbound|9000|v2|db.example.internal")
        XCTAssertNil(vh.l4Route(ip: "240.0.1.10", port: 9000, sni: nil), "outside the subnet: no rule, the service's own cluster")
    }

    func testAVirtualServiceWithOnlyTCPRulesLeavesHTTPToTheServicesDefaultRoute() throws {
        let t = try table(Self.head + """
          tcp:
          - route: [{destination: {host: db.example.internal, subset: v1}}]
        """)
        let vh = try XCTUnwrap(t.hosts["db.example.internal"])
        XCTAssertNil(vh.routes, "no http rules: HTTP takes the default route")
        XCTAssertNotNil(vh.defaultTarget)
        XCTAssertEqual(vh.tcpCompiled.count, 1)
        let both = try XCTUnwrap(try table(Self.head + """
          http: [{route: [{destination: {host: db.example.internal, subset: v2}}]}]
          tcp:
          - route: [{destination: {host: db.example.internal, subset: v1}}]
        """).hosts["db.example.internal"])
        XCTAssertEqual(both.routes?.count, 1)
        XCTAssertEqual(both.tcpCompiled.count, 1)
    }

    func testTLSRulesMatchBySNIWithWildcards_andOnlyForTLS() throws {
        let t = try table("""
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: db, namespace: default}
        spec:
          hosts: [db.example.internal, "*.db.example.internal"]
          tls:
          - match: [{sniHosts: ["*.db.example.internal"], port: 443}]
            route: [{destination: {host: db.example.internal, subset: v2}}]
          - match: [{sniHosts: [db.example.internal]}]
            route: [{destination: {host: db.example.internal, subset: v1}}]
        """)
        let vh = try XCTUnwrap(t.hosts["db.example.internal"])
        XCTAssertEqual(vh.l4Route(ip: "240.0.0.10", port: 443, sni: "eu.db.example.internal")?.target(random: 0, port: 443).subset, "v2")
        XCTAssertEqual(vh.l4Route(ip: "240.0.0.10", port: 443, sni: "DB.example.internal")?.target(random: 0, port: 443).subset, "v1")
        XCTAssertNil(vh.l4Route(ip: "240.0.0.10", port: 443, sni: "other.example.internal"))
        XCTAssertNil(vh.l4Route(ip: "240.0.0.10", port: 443, sni: nil), "plain TCP never takes a tls rule")
    }

    func testSourceLabelsSourceNamespaceAndGatewaysAreDecidedForThisSidecarAtLoad() throws {
        let vs = Self.head + """
          tcp:
          - match: [{sourceLabels: {app: reviews}}]
            route: [{destination: {host: db.example.internal, subset: v2}}]
          - match: [{sourceNamespace: other}]
            route: [{destination: {host: db.example.internal, subset: v2}}]
          - match: [{gateways: [edge-gateway]}]
            route: [{destination: {host: db.example.internal, subset: v2}}]
          - route: [{destination: {host: db.example.internal, subset: v1}}]
        """
        let reviews = try XCTUnwrap(try table(vs, labels: ["app": "reviews"]).hosts["db.example.internal"])
        XCTAssertEqual(reviews.tcpCompiled.count, 2)
        XCTAssertEqual(reviews.l4Route(ip: "240.0.0.10", port: 9000, sni: nil)?.target(random: 0, port: 9000).subset, "v2")
        let other = try XCTUnwrap(try table(vs, labels: ["app": "ratings"]).hosts["db.example.internal"])
        XCTAssertEqual(other.tcpCompiled.count, 1, "the source rules and the gateway-only rule do not apply to this sidecar")
        XCTAssertEqual(other.l4Route(ip: "240.0.0.10", port: 9000, sni: nil)?.target(random: 0, port: 9000).subset, "v1")
    }

    func testBadTCPAndTLSRoutesAreErrorsNamingFileLineAndField() {
        XCTAssertEqual(errors(Self.head + """
          tcp:
          - match: [{sourceSubnet: 10.0.0.0/8}]
            route: [{destination: {host: db.example.internal}}]
        """), "c.yaml:26:28: VirtualService default/db: spec.tcp[0].match[0].sourceSubnet: not supported by moonlet (deprecated by Istio); use an AuthorizationPolicy ipBlocks rule")
        XCTAssertTrue(errors(Self.head + """
          tcp:
          - match: [{sniHosts: [db.example.internal]}]
            route: [{destination: {host: db.example.internal}}]
        """).contains("c.yaml:26:14: VirtualService default/db: spec.tcp[0].match[0].sniHosts: unknown field"))
        XCTAssertTrue(errors(Self.head + """
          tls:
          - route: [{destination: {host: db.example.internal}}]
        """).contains("spec.tls[0].match: Required value: a TLS route needs at least one match (with sniHosts)"))
        XCTAssertTrue(errors(Self.head + """
          tls:
          - match: [{port: 443}]
            route: [{destination: {host: db.example.internal}}]
        """).contains("spec.tls[0].match[0].sniHosts: Required value: a TLS match needs at least one SNI host"))
        XCTAssertTrue(errors(Self.head + """
          tls:
          - match: [{sniHosts: [api.other.internal]}]
            route: [{destination: {host: db.example.internal}}]
        """).contains("spec.tls[0].match[0].sniHosts[0]: the SNI host \"api.other.internal\" is not a match or subset of any of the virtual service hosts"))
        XCTAssertTrue(errors(Self.head + """
          tcp:
          - route:
            - {destination: {host: db.example.internal, subset: v1}, weight: 60}
            - {destination: {host: db.example.internal, subset: v2}, weight: 60}
        """).contains("spec.tcp[0].route: total destination weight 120 != 100"))
        XCTAssertTrue(errors(Self.head + """
          tcp:
          - match: [{destinationSubnets: [10.0.0.0/33]}]
            route: [{destination: {host: db.example.internal, subset: v9}}]
        """).contains("spec.tcp[0].match[0].destinationSubnets[0]: invalid IP address or CIDR \"10.0.0.0/33\""))
        XCTAssertTrue(errors(Self.head + """
          tcp:
          - route: [{destination: {host: db.example.internal, subset: v9}}]
        """).contains("spec.tcp[0].route[0].destination.subset: subset \"v9\" is not defined by DestinationRule default/db for host db.example.internal"))
        XCTAssertTrue(errors(Self.head + """
          tcp:
          - match: [{port: 9000}]
        """).contains("spec.tcp[0].route: Required value: at least one destination"))
    }
}

/// IPv6 addresses as Host values and as a service's VIP.
final class IPv6HostTests: XCTestCase {
    func testABareIPv6AddressKeepsItsColons_andABracketedOneLosesOnlyItsPort() {
        XCTAssertEqual(HostName.normalize("fd00:96::50"), "fd00:96::50")
        XCTAssertEqual(HostName.normalize("[FD00:96::50]:80"), "[fd00:96::50]")
        XCTAssertEqual(HostName.normalize("web.default:8080"), "web.default")
    }

    func testAnIPv6VIPNamesItsServiceBareAndBracketed() throws {
        let dir = NSTemporaryDirectory() + "moonlet-v6-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web.default.svc.cluster.local]
          addresses: ["fd00:96::50"]
          resolution: STATIC
          ports: [{number: 80, name: http}]
          endpoints: [{address: "fd00:99::2"}]
        """.write(toFile: dir + "/se.yaml", atomically: true, encoding: .utf8)
        let t = try ConfigLoader().load(paths: [dir]).get().routes
        XCTAssertEqual(t.lookup("fd00:96::50")?.fqdn, "web.default.svc.cluster.local")
        XCTAssertEqual(t.lookup("[fd00:96::50]:80")?.fqdn, "web.default.svc.cluster.local")
        XCTAssertEqual(t.addressIndex.lookup(ip: "fd00:96:0::50", port: 80)?.service.fqdn, "web.default.svc.cluster.local")
    }
}

/// HTTP routes and `gateways`: what applies to a sidecar, as Istio builds its routes.
final class GatewayBindingTests: XCTestCase {
    func test_aVirtualServiceBoundOnlyToAGateway_doesNotRouteTheSidecar_evenWithHostsStar() throws {
        let t = try RoutingTests.load("""
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: bookinfo, namespace: default}
        spec:
          hosts: ["*"]
          gateways: [bookinfo-gateway]
          http:
          - match: [{uri: {exact: /productpage}}]
            route: [{destination: {host: svc, port: {number: 8080}}}]
          - directResponse: {status: 418}
        """)
        XCTAssertNil(t.lookup("other.example"), "no wildcard host for the sidecar")
        XCTAssertNil(t.lookup("svc")?.routes, "svc keeps its default route")
        XCTAssertTrue(t.wildcards.isEmpty)
    }

    func test_matchesBoundToAGatewayAreDropped_andARuleLeftWithoutMatchesGoesWithThem() throws {
        let t = try RoutingTests.load(RoutingTests.vs("""
          - match: [{uri: {prefix: /gw}, gateways: [ingress]}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{uri: {prefix: /both}, gateways: [ingress]}, {uri: {prefix: /mesh}, gateways: [mesh]}]
            route: [{destination: {host: svc, subset: v2}}]
          - route: [{destination: {host: svc, subset: v1}}]
        """) + "\n")
        let routes = try XCTUnwrap(t.lookup("svc")?.routes)
        XCTAssertEqual(routes.count, 2, "the gateway-only rule is gone, not turned into a catch-all")
        XCTAssertEqual(routes[0].matches.count, 1)
        XCTAssertEqual(routes[0].matches.first?.gateways, ["mesh"])
        XCTAssertTrue(routes[1].matches.isEmpty)
        let mixed = try RoutingTests.load(RoutingTests.vs("""
          - route: [{destination: {host: svc, subset: v1}}]
        """).replacingOccurrences(of: "spec:\n", with: "spec:\n  gateways: [mesh, ingress]\n") + "\n")
        XCTAssertNotNil(mixed.lookup("svc")?.routes, "a VirtualService for mesh and a gateway routes the sidecar")
    }
}

/// `exportTo` of VirtualService, DestinationRule and ServiceEntry, applied per sidecar.
final class ExportToTests: XCTestCase {
    static func entry(_ name: String, ns: String, exportTo: String) -> String {
        """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: \(name), namespace: \(ns)}
        spec:
          hosts: [\(name).example.com]
          exportTo: \(exportTo)
          resolution: STATIC
          ports: [{number: 80, name: http}]
          endpoints: [{address: 10.9.0.1}]
        """
    }

    func test_resourcesAreSeenOnlyByTheNamespacesTheyAreExportedTo() throws {
        let t = try RoutingTests.load([
            Self.entry("mine", ns: "default", exportTo: "[.]"),
            Self.entry("theirs", ns: "other", exportTo: "[.]"),
            Self.entry("named", ns: "other", exportTo: "[default]"),
            Self.entry("all", ns: "other", exportTo: "[\"*\"]"),
            Self.entry("none", ns: "default", exportTo: "[\"~\"]"),
            """
            apiVersion: networking.istio.io/v1beta1
            kind: VirtualService
            metadata: {name: hidden, namespace: other}
            spec:
              hosts: [svc.default.svc.cluster.local]
              exportTo: [.]
              http: [{directResponse: {status: 418}}]
            """,
        ].joined(separator: "\n---\n"))
        XCTAssertNotNil(t.services["mine.example.com"], "its own namespace with .")
        XCTAssertNil(t.services["theirs.example.com"], "another namespace's . is not ours")
        XCTAssertNotNil(t.services["named.example.com"], "exported to default by name")
        XCTAssertNotNil(t.services["all.example.com"])
        XCTAssertNil(t.services["none.example.com"], "~ hides it from everyone")
        XCTAssertNil(t.lookup("svc")?.routes, "the other namespace's private VirtualService does not route us")
    }

    func test_badExportToEntriesAreRefusedAsIstioRefusesThem() throws {
        let r = Result { try RoutingTests.load(Self.entry("bad", ns: "default", exportTo: "[\"~\", ., Not_A_Namespace, .]")) }
        guard case .failure(let e as ConfigErrors) = r else { return XCTFail("accepted: \(r)") }
        for want in ["spec.exportTo[0]: cannot have both ~ and other entries", "spec.exportTo[2]: Not_A_Namespace is not a valid namespace name",
                     "spec.exportTo[3]: duplicate entries in exportTo: ."] {
            XCTAssertTrue(e.description.contains(want), "missing \(want) in:\n\(e)")
        }
    }
}

/// Valid Istio fields Moonlet does not apply are noted at load, never dropped silently.
final class UnappliedRouteFieldTests: XCTestCase {
    func test_retryCorsAndFaultFieldsMoonletDoesNotApply_areNotedWithTheirPath() throws {
        let dir = NSTemporaryDirectory() + "moonlet-notes-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try (RoutingTests.endpoints + "\n---\n" + RoutingTests.vs("""
          - retries: {attempts: 2, retryIgnorePreviousHosts: false, retryRemoteLocalities: true}
            corsPolicy: {allowOrigins: [{exact: "https://a.example"}], unmatchedPreflights: IGNORE}
            fault: {delay: {fixedDelay: 1ms, exponentialDelay: 2ms, percentage: {value: 0}}}
            route: [{destination: {host: svc}}]
        """) + "\n").write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        let snap = try ConfigLoader().load(paths: [dir]).get()
        for field in ["spec.http[0].retries.retryIgnorePreviousHosts", "spec.http[0].retries.retryRemoteLocalities",
                      "spec.http[0].corsPolicy.unmatchedPreflights", "spec.http[0].fault.delay.exponentialDelay"] {
            XCTAssertTrue(snap.skipped.contains { $0.contains("VirtualService default/svc: \(field):") }, "\(field) noted: \(snap.skipped)")
        }
    }
}
