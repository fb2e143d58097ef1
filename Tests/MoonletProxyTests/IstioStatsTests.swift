import XCTest
import NIOCore
import NIOHTTP1
import MoonletConfig
import MoonletCore
import MoonletTelemetry
@testable import MoonletProxy

/// Istio's request metrics as the istio-stats filter records them, with the peer
/// workloads learned through the metadata exchange between two sidecars over mTLS.
final class IstioStatsTests: XCTestCase {
    var pki: FixturePKI!
    var app: TestUpstream!

    override func setUp() async throws {
        pki = try FixturePKI()
        // The app answers with forged exchange headers: the inbound sidecar must drop them.
        app = try TestUpstream { _ in
            TestUpstream.Reply(headers: [("x-envoy-peer-metadata", "Zm9yZ2Vk"), ("x-envoy-peer-metadata-id", "forged")], body: "ok")
        }
    }
    override func tearDown() async throws { app.stop(); pki.cleanup() }

    /// frontend (default, app=frontend, version=v1) -> orders (production, workload
    /// orders-v2, app=orders, version=v2) over auto mTLS.
    func twoSidecars(serverFiles: [String: String] = [:], clientFiles: [String: String] = [:]) throws -> (client: ProxyFixture, server: ProxyFixture) {
        var sf = serverFiles
        sf["pa.yaml"] = peerAuthentication("ns", namespace: "production", mode: "STRICT")
        let serverCerts = try pki.issue("production", "orders")
        let server = try ProxyFixture(appPort: app.port, files: sf, concurrency: 1) { s in
            s.certsDirectory = serverCerts
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders", "version": "v2"])
            s.identity.workloadName = "orders-v2"
            s.identity.clusterID = "east"
        }
        var cf = clientFiles
        cf["se.yaml"] = MTLSTests.ordersEntry(port: server.inbound, serviceAccount: "orders")
        let clientCerts = try pki.issue("default", "frontend")
        let client = try ProxyFixture(appPort: 1, files: cf, concurrency: 1) { s in
            s.certsDirectory = clientCerts
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend", "version": "v1"])
        }
        return (client, server)
    }

    /// The Prometheus text of a sidecar once it holds `needle` (bounded wait: on_log runs
    /// right after the last byte is written).
    func stats(_ f: ProxyFixture, containing needle: String) -> String {
        var text = ""
        for _ in 0..<50 {
            text = adminGet(f.admin, "/stats/prometheus")?.body ?? ""
            if text.contains(needle) { break }
            usleep(20_000)
        }
        return text
    }

    /// The line of `family` whose labels hold every one of `labels`.
    func line(_ text: String, _ family: String, _ labels: [String]) -> String? {
        text.split(separator: "\n").map(String.init).first { l in l.hasPrefix(family + "{") && labels.allSatisfy { l.contains($0) } }
    }

    func testBothReportersCarryThePeersWorkloadAppAndVersion_andTheExchangeHeadersNeverReachTheAppOrTheClient() throws {
        let (client, server) = try twoSidecars()
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound)
        for _ in 0..<2 {
            // The client app forges the headers too: its sidecar replaces them with its own.
            c.send("GET /orders HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\nx-envoy-peer-metadata: Zm9yZ2Vk\r\nx-envoy-peer-metadata-id: forged\r\n\r\n")
            let r = try XCTUnwrap(c.read())
            XCTAssertEqual(r.status, 200, r.body)
            XCTAssertNil(r.header("x-envoy-peer-metadata"), "the exchange header reached the client")
            XCTAssertNil(r.header("x-envoy-peer-metadata-id"), "the exchange id header reached the client")
        }
        XCTAssertEqual(app.seen.count, 2)
        for seen in app.seen {
            XCTAssertFalse(seen.headers.contains(name: "x-envoy-peer-metadata"), "the exchange header reached the app")
            XCTAssertFalse(seen.headers.contains(name: "x-envoy-peer-metadata-id"), "the exchange id header reached the app")
        }
        let inbound = stats(server, containing: "reporter=\"destination\"")
        let d = line(inbound, "istio_requests_total", ["reporter=\"destination\""])
        XCTAssertNotNil(d, inbound)
        for want in ["source_workload=\"frontend\"", "source_app=\"frontend\"", "source_version=\"v1\"", "source_workload_namespace=\"default\"",
                     "source_principal=\"spiffe://cluster.local/ns/default/sa/frontend\"", "source_cluster=\"Kubernetes\"",
                     "destination_workload=\"orders-v2\"", "destination_app=\"orders\"", "destination_version=\"v2\"",
                     "destination_workload_namespace=\"production\"", "destination_cluster=\"east\"", "destination_canonical_service=\"orders\"",
                     "destination_principal=\"spiffe://cluster.local/ns/production/sa/orders\"", "connection_security_policy=\"mutual_tls\"",
                     "request_protocol=\"http\"", "response_code=\"200\"", "response_flags=\"-\""] {
            XCTAssertTrue(d?.contains(want) ?? false, "inbound series lacks \(want): \(d ?? inbound)")
        }
        XCTAssertTrue(d?.hasSuffix(" 2") ?? false, d ?? "")
        let outbound = stats(client, containing: "reporter=\"source\"")
        let o = line(outbound, "istio_requests_total", ["reporter=\"source\""])
        XCTAssertNotNil(o, outbound)
        for want in ["source_workload=\"frontend\"", "source_app=\"frontend\"", "source_version=\"v1\"",
                     "destination_workload=\"orders-v2\"", "destination_app=\"orders\"", "destination_version=\"v2\"",
                     "destination_workload_namespace=\"production\"", "destination_cluster=\"east\"",
                     "destination_service=\"orders.production.svc.cluster.local\"", "destination_service_name=\"orders\"",
                     "destination_service_namespace=\"production\"", "connection_security_policy=\"unknown\"", "response_code=\"200\""] {
            XCTAssertTrue(o?.contains(want) ?? false, "outbound series lacks \(want): \(o ?? outbound)")
        }
        XCTAssertNotNil(line(outbound, "istio_request_duration_milliseconds_count", ["reporter=\"source\"", "destination_workload=\"orders-v2\""]), outbound)
        XCTAssertNotNil(line(outbound, "istio_response_bytes_sum", ["reporter=\"source\""]), outbound)
    }

    func testANonMeshUpstreamNeverReceivesTheExchangeHeaders_andItsWorkloadIsUnknown() throws {
        let clientCerts = try pki.issue("default", "frontend")
        let client = try ProxyFixture(appPort: 1, files: ["se.yaml": meshService("plain", ports: [app.port])], concurrency: 1) { s in
            s.certsDirectory = clientCerts
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend"])
        }
        defer { client.stop() }
        let c = try RawClient(port: client.outbound)
        c.send("GET / HTTP/1.1\r\nHost: plain\r\nx-envoy-peer-metadata: Zm9yZ2Vk\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200, r.body)
        XCTAssertNil(r.header("x-envoy-peer-metadata"), "a plaintext upstream's header is not the mesh's: it is removed")
        XCTAssertEqual(app.seen.count, 1)
        XCTAssertFalse(app.seen[0].headers.contains(name: "x-envoy-peer-metadata"))
        XCTAssertFalse(app.seen[0].headers.contains(name: "x-envoy-peer-metadata-id"))
        let text = stats(client, containing: "reporter=\"source\"")
        let o = line(text, "istio_requests_total", ["reporter=\"source\""])
        XCTAssertTrue(o?.contains("destination_workload=\"unknown\"") ?? false, o ?? text)
        XCTAssertTrue(o?.contains("connection_security_policy=\"unknown\"") ?? false, "a source cannot know it, as Istio says: \(o ?? text)")
        XCTAssertTrue(o?.contains("destination_service=\"plain.default.svc.cluster.local\"") ?? false, o ?? text)
    }

    func testAUserDefinedCounterGaugeAndHistogramAppearOnStatsPrometheus() throws {
        let plugin = """
        local requests = moonlet.metrics.counter("shop_requests_total", {kind = "all"})
        local inflight = moonlet.metrics.gauge("shop_last_status")
        return {
          on_log = function(s)
            requests:inc()
            moonlet.metrics.counter("shop_by_method_total", {method = s.request.method}):inc(2)
            inflight:set(s.response.status)
            moonlet.metrics.histogram("shop_body_bytes", {}, {10, 100}):observe(5)
          end
        }
        """
        let f = try ProxyFixture(appPort: app.port, files: ["m.lua": plugin, "m.yaml": ProxyFixture.plugin("m")], concurrency: 2)
        defer { f.stop() }
        let c = try RawClient(port: f.inbound)
        for _ in 0..<3 { XCTAssertEqual(get(c)?.status, 200) }
        let text = stats(f, containing: "shop_requests_total{kind=\"all\"} 3")
        XCTAssertTrue(text.contains("# TYPE shop_requests_total counter\nshop_requests_total{kind=\"all\"} 3\n"), text)
        XCTAssertTrue(text.contains("shop_by_method_total{method=\"GET\"} 6\n"), text)
        XCTAssertTrue(text.contains("# TYPE shop_last_status gauge\nshop_last_status 200\n"), text)
        XCTAssertTrue(text.contains("shop_body_bytes_bucket{le=\"10\"} 3\n"), text)
        XCTAssertTrue(text.contains("shop_body_bytes_count 3\n"), text)
    }

    /// The first request of a label set builds it in Lua; the next ones go through
    /// `moonlet.stats.log`'s cached path (one native call): every request is counted once,
    /// in the same series, with its duration and sizes.
    func testRepeatedRequestsAreEachCountedOnceThroughTheCachedLabelSet() throws {
        let f = try ProxyFixture(appPort: app.port, files: [:], concurrency: 1)
        defer { f.stop() }
        let c = try RawClient(port: f.inbound)
        for _ in 0..<6 { XCTAssertEqual(get(c)?.status, 200) }
        var text = "", total: String?
        for _ in 0..<50 {   // on_log runs right after the last byte: wait for the sixth
            text = stats(f, containing: "istio_requests_total{")
            total = line(text, "istio_requests_total", ["reporter=\"destination\"", "response_code=\"200\""])
            if total?.hasSuffix("} 6") ?? false { break }
            usleep(20_000)
        }
        XCTAssertTrue(total?.hasSuffix("} 6") ?? false, text)
        XCTAssertTrue(line(text, "istio_request_duration_milliseconds_count", ["response_code=\"200\""])?.hasSuffix("} 6") ?? false, text)
        XCTAssertTrue(line(text, "istio_response_bytes_count", ["response_code=\"200\""])?.hasSuffix("} 6") ?? false, text)
    }

    func testReplacingIstioStatsByName_changesWhatIsRecorded_andTheBuiltinNoLongerCounts() throws {
        let fork = """
        local base = require("istio-stats")   -- the builtin, as a starting point
        local S = moonlet.stats
        local cache = {}
        return {
          on_log = function(s)
            local k1, k2 = S.key(s)
            local h = cache[k2]
            if h == nil then
              local l = base.labels(S.info(s))
              h = S.series({ reporter = l.reporter, response_code = l.response_code, team = "shop" })
              cache[k2] = h
            end
            S.record(h, s)
          end
        }
        """
        // The file has a name of its own: require("istio-stats") then finds the builtin.
        let spec = """
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata: {name: istio-stats}
        spec: {url: "file://$DIR/my-stats.lua", phase: STATS}
        """
        let f = try ProxyFixture(appPort: app.port, files: ["my-stats.lua": fork, "p.yaml": spec], concurrency: 1)
        defer { f.stop() }
        let c = try RawClient(port: f.inbound)
        for _ in 0..<2 { XCTAssertEqual(get(c)?.status, 200) }
        let text = stats(f, containing: "team=\"shop\"")
        XCTAssertTrue(text.contains("istio_requests_total{reporter=\"destination\",response_code=\"200\",team=\"shop\"} 2\n"), text)
        XCTAssertNil(line(text, "istio_requests_total", ["source_workload="]), "the builtin recorded as well: \(text)")
    }

    func testIstiosOwnSidecarMetadataIsReadOverMTLS_andIgnoredFromAPlaintextClient() throws {
        // The value an Istio sidecar (bookinfo details-v1) sends.
        let istio = "Ch4KDElOU1RBTkNFX0lQUxIOGgwxNzIuMTYuMC4yMDYK1QEKBkxBQkVMUxLKASrHAQoQCgNhcHASCRoHZGV0YWlscwohChFwb2QtdGVtcGxhdGUtaGFzaBIMGgo3NWQ5NGM0OGY1CiQKGXNlY3VyaXR5LmlzdGlvLmlvL3Rsc01vZGUSBxoFaXN0aW8KLAofc2VydmljZS5pc3Rpby5pby9jYW5vbmljYWwtbmFtZRIJGgdkZXRhaWxzCisKI3NlcnZpY2UuaXN0aW8uaW8vY2Fub25pY2FsLXJldmlzaW9uEgQaAnYxCg8KB3ZlcnNpb24SBBoCdjEKGgoHTUVTSF9JRBIPGg1jbHVzdGVyLmxvY2FsCiUKBE5BTUUSHRobZGV0YWlscy12MS03NWQ5NGM0OGY1LTdibHhtChYKCU5BTUVTUEFDRRIJGgdkZWZhdWx0Ck4KBU9XTkVSEkUaQ2t1YmVybmV0ZXM6Ly9hcGlzL2FwcHMvdjEvbmFtZXNwYWNlcy9kZWZhdWx0L2RlcGxveW1lbnRzL2RldGFpbHMtdjEKJQoPU0VSVklDRV9BQ0NPVU5UEhIaEGJvb2tpbmZvLWRldGFpbHMKHQoNV09SS0xPQURfTkFNRRIMGgpkZXRhaWxzLXYx"
        let certs = try pki.issue("production", "orders")
        let server = try ProxyFixture(appPort: app.port, files: ["pa.yaml": peerAuthentication("ns", namespace: "production", mode: "PERMISSIVE")], concurrency: 1) { s in
            s.certsDirectory = certs
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
        }
        defer { server.stop() }
        // Plaintext (PERMISSIVE lets it in): the header is dropped, not believed.
        let c = try RawClient(port: server.inbound)
        XCTAssertEqual(get(c, headers: "x-envoy-peer-metadata: \(istio)\r\n")?.status, 200)
        var text = stats(server, containing: "reporter=\"destination\"")
        XCTAssertNotNil(line(text, "istio_requests_total", ["source_workload=\"unknown\"", "connection_security_policy=\"none\""]), text)
        XCTAssertNil(line(text, "istio_requests_total", ["details-v1"]), text)
        // Over mTLS (a client certificate of bookinfo's details): read, and this sidecar answers with its own.
        let detailsCerts = try pki.issue("default", "bookinfo-details")
        let r = try tlsRequest(port: server.inbound, certDir: detailsCerts, rootPEM: pki.ca.rootCertPEM,
                               extraHeaders: [("x-envoy-peer-metadata", istio), ("x-envoy-peer-metadata-id", "sidecar~172.16.0.206~details~default.svc.cluster.local")]).get()
        XCTAssertEqual(r.status, 200)
        let back = try XCTUnwrap(r.headers.first(name: "x-envoy-peer-metadata"), "an mTLS caller gets this sidecar's metadata back")
        XCTAssertEqual(PeerMetadata.decode(back)?.workloadName, "orders")
        XCTAssertEqual(PeerMetadata.decode(back)?.namespace, "production")
        XCTAssertTrue(r.headers.first(name: "x-envoy-peer-metadata-id")?.hasPrefix("sidecar~") ?? false)
        for seen in app.seen { XCTAssertFalse(seen.headers.contains(name: "x-envoy-peer-metadata")) }
        text = stats(server, containing: "details-v1")
        let d = line(text, "istio_requests_total", ["source_workload=\"details-v1\""])
        for want in ["source_app=\"details\"", "source_version=\"v1\"", "source_workload_namespace=\"default\"", "source_canonical_service=\"details\"",
                     "source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-details\"", "connection_security_policy=\"mutual_tls\""] {
            XCTAssertTrue(d?.contains(want) ?? false, "lacks \(want): \(d ?? text)")
        }
    }

    func testTheTCPFamiliesAreExposedWithIstiosLabels() {
        let shard = MetricsShard()
        let own = MeshWorkload(workload: "orders", namespace: "production", labels: ["app": "orders"], cluster: "Kubernetes", serviceAccount: "orders", serial: 0)
        let peer = MeshWorkload(workload: "frontend", namespace: "default", labels: ["app": "frontend", "version": "v1"], cluster: "Kubernetes", serviceAccount: "frontend", serial: 1)
        let labels = IstioLabels.tcpLabels(inbound: true, own: own, peer: peer, ownPrincipal: "spiffe://cluster.local/ns/production/sa/orders",
                                           peerPrincipal: "spiffe://cluster.local/ns/default/sa/frontend", destinationService: "orders.production.svc.cluster.local", mtls: true)
        let t = try! XCTUnwrap(shard.tcpSeries(labels))
        t.opened(); t.sent(100); t.received(40); t.closed()
        let text = PrometheusExposition.render(shard.snapshot())
        for family in ["istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total", "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"] {
            XCTAssertTrue(text.contains("# TYPE \(family) counter\n"), text)
            XCTAssertNotNil(line(text, family, ["reporter=\"destination\"", "source_workload=\"frontend\"", "destination_service_name=\"orders\""]), text)
        }
        XCTAssertNotNil(line(text, "istio_tcp_sent_bytes_total", ["} 100"]), text)
        XCTAssertEqual(Set(labels.text.split(separator: ",").map { String($0.split(separator: "=")[0]) }), Set(IstioLabels.tcp))
    }
}

extension IstioStatsTests {
    /// Istio's metadata exchange adds its headers to every response it encodes: an mTLS
    /// caller denied by the server sidecar's RBAC still learns who answered.
    func testALocalReplyToAnMTLSCaller_carriesThisSidecarsPeerMetadata_andAPlaintextOneDoesNot() throws {
        let certs = try pki.issue("production", "orders")
        let deny = """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: no-admin, namespace: production}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: [/admin]}}]}]
        """
        let server = try ProxyFixture(appPort: app.port, files: ["pa.yaml": peerAuthentication("ns", namespace: "production", mode: "PERMISSIVE"), "deny.yaml": deny],
                                      concurrency: 1) { s in
            s.certsDirectory = certs
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
        }
        defer { server.stop() }
        let callerCerts = try pki.issue("default", "frontend")
        let r = try tlsRequest(port: server.inbound, certDir: callerCerts, rootPEM: pki.ca.rootCertPEM, path: "/admin").get()
        XCTAssertEqual(r.status, 403)
        let back = try XCTUnwrap(r.headers.first(name: "x-envoy-peer-metadata"), "the RBAC denial carries the metadata")
        XCTAssertEqual(PeerMetadata.decode(back)?.workloadName, "orders")
        XCTAssertEqual(r.headers[canonicalForm: "x-envoy-peer-metadata"].count, 1)
        let c = try RawClient(port: server.inbound)
        let plain = try XCTUnwrap(get(c, "/admin"))
        XCTAssertEqual(plain.status, 403)
        XCTAssertNil(plain.header("x-envoy-peer-metadata"), "no metadata to a plaintext caller")
    }
}
