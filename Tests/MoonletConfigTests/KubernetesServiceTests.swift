import XCTest
import MoonletCore
@testable import MoonletConfig

/// Kubernetes Services (core/v1) read as Istio's registry reads them: host, cluster IPs,
/// selector over WorkloadEntries, port protocols from appProtocol or the name.
final class KubernetesServiceTests: XCTestCase {
    static let service = """
    apiVersion: v1
    kind: Service
    metadata: {name: orders, namespace: shop, labels: {app: orders}}
    spec:
      type: ClusterIP
      clusterIP: 10.96.12.7
      selector: {app: orders}
      ports:
      - {name: grpc-api, port: 50051, targetPort: 9000}
      - {name: web, port: 80, targetPort: 8080, appProtocol: http}
      - {name: h2c, port: 81, targetPort: 8081, appProtocol: kubernetes.io/h2c}
      - {name: grpc-web, port: 82, targetPort: 8082}
      - {name: dns, port: 53, protocol: UDP}
      - {name: dns-tcp, port: 53, protocol: TCP}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {name: orders-1, namespace: shop}
    spec: {address: 10.1.0.9, labels: {app: orders, version: v1}}
    """

    func load(_ yaml: String, namespace: String = "shop", labels: [String: String] = [:]) throws -> ConfigSnapshot {
        let dir = NSTemporaryDirectory() + "moonlet-kube-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try yaml.write(toFile: dir + "/svc.yaml", atomically: true, encoding: .utf8)
        return try ConfigLoader().load(paths: [dir], namespace: namespace, labels: labels).get()
    }

    func test_aServiceIsTheRegistryEntryIstioMakesOfIt_hostClusterIPAndTheWorkloadEntriesItSelects() throws {
        let snap = try load(Self.service)
        let svc = try XCTUnwrap(snap.routes.services["orders.shop.svc.cluster.local"])
        XCTAssertEqual(svc.addresses, ["10.96.12.7"])
        XCTAssertEqual(svc.endpoints.map(\.address), ["10.1.0.9"], "the selector picks the WorkloadEntry")
        XCTAssertEqual(svc.ports.map(\.number), [50051, 80, 81, 82, 53], "the UDP port is left out; 53/TCP beside 53/UDP is no duplicate")
        let grpc = try XCTUnwrap(svc.port(50051))
        XCTAssertEqual(svc.endpointPort(svc.endpoints[0], for: grpc), 9000, "targetPort")
        XCTAssertEqual(PortProtocol(grpc), .grpc, "name prefix grpc-")
        XCTAssertEqual(PortProtocol(try XCTUnwrap(svc.port(80))), .http, "appProtocol http")
        XCTAssertEqual(PortProtocol(try XCTUnwrap(svc.port(81))), .http2, "appProtocol kubernetes.io/h2c")
        XCTAssertEqual(PortProtocol(try XCTUnwrap(svc.port(82))), .grpcWeb, "grpc-web is its own protocol, as Istio parses the name")
        XCTAssertFalse(PortProtocol(try XCTUnwrap(svc.port(82))).isHTTP2, "gRPC-Web is HTTP/1.1")
        XCTAssertEqual(snap.routes.addressIndex.lookup(ip: "10.96.12.7", port: 80)?.service.fqdn, "orders.shop.svc.cluster.local", "the cluster IP is the service's VIP")
        XCTAssertTrue(snap.skipped.contains { $0.contains("spec.ports[4]") && $0.contains("UDP") }, "\(snap.skipped)")
    }

    func test_theWorkloadASelectorMatches_speaksH2CToItsGRPCAndH2CPorts_notToItsGRPCWebPort() throws {
        let mine = try load(Self.service, labels: ["app": "orders"]).routes
        XCTAssertEqual(mine.inboundHTTP2Ports, [9000, 8081])
        let other = try load(Self.service, labels: ["app": "web"]).routes
        XCTAssertEqual(other.inboundHTTP2Ports, [])
    }

    func test_externalNameIsDNSResolution_andClusterNetworkingFieldsAreNoted() throws {
        let snap = try load("""
        apiVersion: v1
        kind: Service
        metadata: {name: payments, namespace: shop}
        spec:
          type: ExternalName
          externalName: payments.example.com
          ports: [{name: https, port: 443}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: lb, namespace: shop}
        spec:
          type: LoadBalancer
          externalTrafficPolicy: Local
          selector: {app: lb}
          ports: [{name: http, port: 80, nodePort: 30080, targetPort: web}]
        """)
        let ext = try XCTUnwrap(snap.routes.services["payments.shop.svc.cluster.local"])
        XCTAssertEqual(ext.endpoints.map(\.address), ["payments.example.com"])
        for field in ["spec.type", "spec.externalTrafficPolicy", "spec.ports[0].nodePort", "spec.ports[0].targetPort"] {
            XCTAssertTrue(snap.skipped.contains { $0.contains("Service shop/lb: \(field):") }, "\(field) is noted: \(snap.skipped)")
        }
    }

    func test_badServicesAreRefusedWithFileLineAndField() throws {
        let r = Result { try load("""
        apiVersion: v1
        kind: Service
        metadata: {name: Bad_Name, namespace: shop}
        spec:
          clusterIP: 10.96.999.1
          type: Weird
          selectr: {app: x}
          ports:
          - {name: a, port: 70000}
          - {name: b, port: 80, protocol: QUIC}
        """) }
        guard case .failure(let e as ConfigErrors) = r else { return XCTFail("accepted: \(r)") }
        let text = e.description
        for want in ["svc.yaml:3:18: Service shop/Bad_Name: metadata.name: a Service name must be a DNS-1035 label",
                     "spec.clusterIP: 10.96.999.1 is not a valid IP", "spec.type: Unsupported value: \"Weird\"",
                     "spec.selectr: unknown field", "spec.ports[0].port: must be between 1 and 65535",
                     "spec.ports[1].protocol: Unsupported value: \"QUIC\""] {
            XCTAssertTrue(text.contains(want), "missing \(want) in:\n\(text)")
        }
    }
}
