import XCTest
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import MoonletConfig
@testable import MoonletProxy

/// A real Prometheus (Debian's package; scripts/install-deps installs it) scrapes two
/// sidecars; PromQL over its HTTP API sees both reporters with the peer labels, and
/// every query of deploy/grafana's dashboard answers.
final class PrometheusGrafanaTests: XCTestCase {
    var pki: FixturePKI!
    var app: TestUpstream!
    var prometheus: Process?
    var promDir = ""
    var promPort = 0

    override func setUp() async throws {
        pki = try FixturePKI()
        app = try TestUpstream()
    }
    override func tearDown() async throws {
        if let p = prometheus, p.isRunning { p.terminate(); p.waitUntilExit() }
        if !promDir.isEmpty { try? FileManager.default.removeItem(atPath: promDir) }
        app.stop(); pki.cleanup()
    }

    static var prometheusBinary: String? {
        ["/usr/bin/prometheus", "/usr/local/bin/prometheus"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// A free port on 127.0.0.1 (bound, read, released).
    func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        a.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: a.sin_port))
    }

    /// Starts Prometheus scraping `targets` (admin ports) every second.
    func startPrometheus(_ targets: [Int]) throws {
        guard let bin = Self.prometheusBinary else { throw XCTSkip("prometheus not installed (scripts/install-deps installs Debian's package)") }
        promDir = NSTemporaryDirectory() + "moonlet-prom-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: promDir, withIntermediateDirectories: true)
        let config = """
        global: {scrape_interval: 1s, evaluation_interval: 1s}
        scrape_configs:
        - job_name: moonlet
          metrics_path: /stats/prometheus
          static_configs:
          - targets: [\(targets.map { "'127.0.0.1:\($0)'" }.joined(separator: ", "))]

        """
        try config.write(toFile: promDir + "/prometheus.yml", atomically: true, encoding: .utf8)
        promPort = try freePort()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: bin)
        p.arguments = ["--config.file=\(promDir)/prometheus.yml", "--storage.tsdb.path=\(promDir)/data",
                       "--web.listen-address=127.0.0.1:\(promPort)", "--log.level=warn"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try p.run()
        prometheus = p
    }

    /// GET on Prometheus's HTTP API; the decoded JSON, nil when it did not answer.
    func api(_ path: String, _ query: [String: String]) -> [String: Any]? {
        var c = URLComponents(string: "http://127.0.0.1:\(promPort)\(path)")!
        c.queryItems = query.map { URLQueryItem(name: $0.key, value: $0.value) }
        // '+' in a query is a space to Prometheus's form parser.
        c.percentEncodedQuery = c.percentEncodedQuery?.replacingOccurrences(of: "+", with: "%2B")
        final class Box: @unchecked Sendable { var data: Data? }
        let done = DispatchSemaphore(value: 0)
        let box = Box()
        var req = URLRequest(url: c.url!)
        req.timeoutInterval = 5
        URLSession.shared.dataTask(with: req) { data, _, _ in
            box.data = data
            done.signal()
        }.resume()
        guard done.wait(timeout: .now() + 6) == .success, let data = box.data else { return nil }
        return (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
    }

    /// The series a PromQL instant query returns, waiting up to `seconds` for at least one.
    func series(_ q: String, seconds: Double = 30) -> [[String: String]] {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let r = api("/api/v1/query", ["query": q]), r["status"] as? String == "success",
               let data = r["data"] as? [String: Any], let result = data["result"] as? [[String: Any]], !result.isEmpty {
                return result.compactMap { $0["metric"] as? [String: String] }
            }
            usleep(250_000)
        }
        return []
    }

    func sidecarsWithTraffic() throws -> (ProxyFixture, ProxyFixture) {
        let serverCerts = try pki.issue("production", "orders")
        let server = try ProxyFixture(appPort: app.port, files: ["pa.yaml": peerAuthentication("ns", namespace: "production", mode: "STRICT")], concurrency: 1) { s in
            s.certsDirectory = serverCerts
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders", "version": "v2"])
        }
        let clientCerts = try pki.issue("default", "frontend")
        let client = try ProxyFixture(appPort: 1, files: ["se.yaml": MTLSTests.ordersEntry(port: server.inbound, serviceAccount: "orders")], concurrency: 1) { s in
            s.certsDirectory = clientCerts
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend", "version": "v1"])
        }
        let c = try RawClient(port: client.outbound)
        for _ in 0..<5 {
            c.send("GET /orders HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
            XCTAssertEqual(c.read()?.status, 200)
        }
        return (client, server)
    }

    func testPrometheusScrapesTwoSidecars_andPromQLSeesBothReportersWithThePeersWorkloadAndVersion() throws {
        guard Self.prometheusBinary != nil else { throw XCTSkip("prometheus not installed (scripts/install-deps installs Debian's package)") }
        let (client, server) = try sidecarsWithTraffic()
        defer { client.stop(); server.stop() }
        try startPrometheus([client.admin, server.admin])
        let inbound = series(#"sum by (source_workload, source_version, destination_workload) (istio_requests_total{reporter="destination",source_app="frontend"})"#)
        XCTAssertEqual(inbound.count, 1, "\(inbound)")
        XCTAssertEqual(inbound.first?["source_workload"], "frontend")
        XCTAssertEqual(inbound.first?["source_version"], "v1")
        XCTAssertEqual(inbound.first?["destination_workload"], "orders")
        let outbound = series(#"sum by (destination_workload, destination_version, destination_service) (rate(istio_requests_total{reporter="source"}[1m]) >= 0)"#)
        XCTAssertEqual(outbound.first?["destination_workload"], "orders", "\(outbound)")
        XCTAssertEqual(outbound.first?["destination_version"], "v2")
        XCTAssertEqual(outbound.first?["destination_service"], "orders.production.svc.cluster.local")
        let p99 = series(#"histogram_quantile(0.99, sum by (le) (rate(istio_request_duration_milliseconds_bucket{reporter="source"}[1m])))"#)
        XCTAssertEqual(p99.count, 1)
    }

    func testEveryQueryOfTheGrafanaDashboard_answersFromPrometheusWithoutError() throws {
        guard Self.prometheusBinary != nil else { throw XCTSkip("prometheus not installed (scripts/install-deps installs Debian's package)") }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let data = try Data(contentsOf: root.appendingPathComponent("deploy/grafana/moonlet-service-dashboard.json"))
        let dash = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        var queries: [String] = []
        func walk(_ v: Any) {
            if let d = v as? [String: Any] {
                if let e = d["expr"] as? String { queries.append(e) }
                for x in d.values { walk(x) }
            } else if let a = v as? [Any] { for x in a { walk(x) } }
        }
        walk(dash["panels"] ?? [])
        XCTAssertGreaterThanOrEqual(queries.count, 20)
        let (client, server) = try sidecarsWithTraffic()
        defer { client.stop(); server.stop() }
        try startPrometheus([client.admin, server.admin])
        XCTAssertFalse(series("istio_requests_total").isEmpty, "Prometheus scraped nothing")
        // Grafana's variables, as the dashboard's defaults would set them.
        let variables = ["$__rate_interval": "1m", "$service": ".*"]
        // Every HTTP and Lua panel has data from this traffic (irate needs two scrapes
        // after it: `series` waits). The TCP panels answer, empty here: this fixture's
        // sidecars carry HTTP only (the TCP families are checked in InterceptionTests).
        var empty: [String] = []
        for q in queries {
            var promql = q
            for (k, v) in variables { promql = promql.replacingOccurrences(of: k, with: v) }
            let r = api("/api/v1/query", ["query": promql])
            XCTAssertEqual(r?["status"] as? String, "success", "\(q): \(r ?? [:])")
            if !q.contains("istio_tcp_") && series(promql, seconds: 10).isEmpty { empty.append(q) }
        }
        XCTAssertEqual(empty, [], "panels without data")
        // The variable's own query (label_values) is a series lookup.
        let labels = api("/api/v1/label/destination_service/values", [:])
        XCTAssertTrue(((labels?["data"] as? [String]) ?? []).contains("orders.production.svc.cluster.local"), "\(labels ?? [:])")
    }
}
