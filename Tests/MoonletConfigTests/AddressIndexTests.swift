import XCTest
import MoonletCore
@testable import MoonletConfig

/// Original destinations of intercepted connections: ServiceEntry VIPs, endpoint
/// addresses, declared protocols (AddressIndex), and TCP authorization rules.
final class AddressIndexTests: XCTestCase {
    static let entry = """
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: db, namespace: default}
    spec:
      hosts: [db.default.svc.cluster.local]
      addresses: [10.96.0.7, "2001:db8::7"]
      resolution: STATIC
      ports:
      - {number: 3306, name: mysql}
      - {number: 80, name: web, targetPort: 8080}
      endpoints:
      - {address: 10.1.0.5, labels: {app: db}}
    """

    func testVIPsAndEndpointAddressesLeadToTheirServicePort_andAHostThatIsAVIPNamesTheService() throws {
        let t = try RoutingTests.load(Self.entry)
        let vip = try XCTUnwrap(t.addressIndex.lookup(ip: "10.96.0.7", port: 3306))
        XCTAssertEqual(vip.service.fqdn, "db.default.svc.cluster.local")
        XCTAssertEqual(vip.endpointIndex, -1)
        XCTAssertEqual(vip.protocolKind, .tcp)
        XCTAssertEqual(t.addressIndex.lookup(ip: "2001:db8:0::7", port: 80)?.port.number, 80, "IPv6 spellings are one address")
        let ep = try XCTUnwrap(t.addressIndex.lookup(ip: "10.1.0.5", port: 8080), "the endpoint at its target port")
        XCTAssertEqual(ep.endpointIndex, 0)
        XCTAssertEqual(ep.protocolKind, .sniff)
        XCTAssertNil(t.addressIndex.lookup(ip: "10.96.0.7", port: 9999))
        XCTAssertEqual(t.lookup("10.96.0.7:3306")?.fqdn, "db.default.svc.cluster.local", "Istio's VIP domains")
    }

    func testTheInboundSideKnowsTheDeclaredProtocolsOfTheServicesTheWorkloadServes() throws {
        let dir = NSTemporaryDirectory() + "moonlet-addr-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.entry.write(toFile: dir + "/se.yaml", atomically: true, encoding: .utf8)
        let mine = try ConfigLoader().load(paths: [dir], namespace: "default", labels: ["app": "db", "version": "v1"]).get().routes
        XCTAssertEqual(mine.addressIndex.localPorts, [3306: .tcp])
        let other = try ConfigLoader().load(paths: [dir], namespace: "default", labels: ["app": "web"]).get().routes
        XCTAssertEqual(other.addressIndex.localPorts, [:])
    }

    func testTCPAuthorization_httpOnlyFieldsMakeAnAllowRuleNeverMatch_andAreIgnoredInADenyRule() {
        func matcher(_ s: String) -> ConfigValue { .map([("t", .string("exact")), ("s", .string(s))]) }
        func check(_ k: String, _ m: [ConfigValue], neg: Bool = false) -> ConfigValue { .map([("k", .string(k)), ("neg", .bool(neg)), ("m", .array(m))]) }
        func policy(_ id: String, _ checks: [ConfigValue]) -> ConfigValue {
            .map([("id", .string(id)), ("dry_run", .bool(false)), ("rules", .array([.map([("id", .string(id + "-rule[0]")), ("checks", .array(checks))])]))])
        }
        let frontend = TCPAuthorization.Connection(principal: "cluster.local/ns/default/sa/frontend", namespace: "default", sourceIP: "10.0.0.9",
                                                   destinationIP: "10.0.0.2", destinationPort: 5432)
        let plain = TCPAuthorization.Connection(principal: "", namespace: "", sourceIP: "192.168.1.1", destinationIP: "10.0.0.2", destinationPort: 5432)
        let allowPrincipal = TCPAuthorization(.map([("deny", .array([])), ("allow", .array([policy("a", [check("principal", [matcher("cluster.local/ns/default/sa/frontend")])])])), ("audit", .array([]))]))!
        XCTAssertEqual(allowPrincipal.evaluate(frontend), .allowed)
        XCTAssertEqual(allowPrincipal.evaluate(plain), .denied("none"))
        let allowHTTP = TCPAuthorization(.map([("deny", .array([])), ("allow", .array([policy("a", [check("principal", [matcher("cluster.local/ns/default/sa/frontend")]),
                                                                                                 check("method", [matcher("GET")])])])), ("audit", .array([]))]))!
        XCTAssertEqual(allowHTTP.evaluate(frontend), .denied("none"), "an ALLOW rule with methods never matches TCP")
        let denyHTTP = TCPAuthorization(.map([("deny", .array([policy("d", [check("namespace", [matcher("default")]), check("path", [matcher("/admin")])])])),
                                              ("allow", .array([])), ("audit", .array([]))]))!
        XCTAssertEqual(denyHTTP.evaluate(frontend), .denied("d-rule[0]"), "a DENY rule ignores its paths for TCP")
        XCTAssertEqual(denyHTTP.evaluate(plain), .allowed)
        let cidrPort = TCPAuthorization(.map([("deny", .array([policy("d", [check("source_ip", [.string("192.168.0.0/16")]), check("destination_port", [.int(5432)])])])),
                                              ("allow", .array([])), ("audit", .array([]))]))!
        XCTAssertEqual(cidrPort.evaluate(plain), .denied("d-rule[0]"))
        XCTAssertEqual(cidrPort.evaluate(frontend), .allowed)
    }
}
