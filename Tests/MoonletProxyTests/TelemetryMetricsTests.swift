import XCTest
import MoonletConfig
import MoonletCore
@testable import MoonletProxy

/// A Telemetry resource's `metrics` section applied by istio-stats: tagOverrides
/// (REMOVE, UPSERT with a literal or a request attribute), `disabled` per metric and
/// mode, and the clear refusal of what Moonlet cannot evaluate.
final class TelemetryMetricsTests: XCTestCase {
    var app: TestUpstream!
    override func setUp() async throws { app = try TestUpstream() }
    override func tearDown() async throws { app.stop() }

    func telemetry(_ metrics: String) -> String {
        """
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {name: shop-metrics, namespace: default}
        spec:
          metrics:
        \(metrics)
        """
    }

    /// The Prometheus text once it holds `needle` (on_log runs right after the reply).
    func scrape(_ f: ProxyFixture, containing needle: String) -> String {
        var text = ""
        for _ in 0..<50 {
            text = adminGet(f.admin, "/stats/prometheus")?.body ?? ""
            if text.contains(needle) { break }
            usleep(20_000)
        }
        return text
    }

    func lines(_ text: String, _ family: String) -> [String] {
        text.split(separator: "\n").map(String.init).filter { $0.hasPrefix(family + "{") }
    }

    func testARemovedLabelIsAbsent_andAnUpsertedLiteralAndHeaderValueAppear_onStatsPrometheus() throws {
        let t = telemetry("""
          - providers: [{name: prometheus}]
            overrides:
            - match: {metric: ALL_METRICS, mode: CLIENT_AND_SERVER}
              tagOverrides:
                request_protocol: {operation: REMOVE}
                team: {value: "'checkout'"}
            - match: {metric: REQUEST_COUNT}
              tagOverrides:
                tenant: {value: "request.headers['x-tenant']"}
                method: {value: request.method}
        """)
        let f = try ProxyFixture(appPort: app.port, files: ["t.yaml": t], concurrency: 1)
        defer { f.stop() }
        let c = try RawClient(port: f.inbound)
        XCTAssertEqual(get(c, "/", headers: "X-Tenant: acme\r\n")?.status, 200)
        XCTAssertEqual(get(c, "/", headers: "X-Tenant: globex\r\n")?.status, 200)
        let text = scrape(f, containing: "tenant=\"globex\"")
        let counts = lines(text, "istio_requests_total")
        XCTAssertEqual(counts.count, 2, text)
        for l in counts {
            XCTAssertFalse(l.contains("request_protocol="), l)
            XCTAssertTrue(l.contains("team=\"checkout\""), l)
            XCTAssertTrue(l.contains("method=\"GET\""), l)
            XCTAssertTrue(l.contains("reporter=\"destination\""), l)
            XCTAssertTrue(l.hasSuffix(" 1"), l)
        }
        XCTAssertTrue(counts.contains { $0.contains("tenant=\"acme\"") }, text)
        // The per-metric overrides stay on their metric: the duration histogram has the
        // ALL_METRICS ones only, one series for both tenants.
        let durations = lines(text, "istio_request_duration_milliseconds_count")
        XCTAssertEqual(durations.count, 1, text)
        XCTAssertTrue(durations[0].contains("team=\"checkout\"") && !durations[0].contains("tenant=") && !durations[0].contains("request_protocol="), durations[0])
        XCTAssertTrue(durations[0].hasSuffix(" 2"), durations[0])
    }

    func testADisabledMetricIsAbsent_whileTheOthersAreRecorded() throws {
        let t = telemetry("""
          - overrides:
            - match: {metric: REQUEST_DURATION}
              disabled: true
            - match: {metric: REQUEST_SIZE, mode: CLIENT}
              disabled: true
        """)
        let f = try ProxyFixture(appPort: app.port, files: ["t.yaml": t], concurrency: 1)
        defer { f.stop() }
        let c = try RawClient(port: f.inbound)
        XCTAssertEqual(get(c)?.status, 200)
        let text = scrape(f, containing: "istio_requests_total{")
        XCTAssertEqual(lines(text, "istio_requests_total").count, 1, text)
        XCTAssertTrue(lines(text, "istio_request_duration_milliseconds_count").isEmpty, text)
        // REQUEST_SIZE is off for the client side only: this inbound (server) request has it.
        XCTAssertEqual(lines(text, "istio_request_bytes_count").count, 1, text)
        XCTAssertEqual(lines(text, "istio_response_bytes_count").count, 1, text)
    }

    func testAnUnsupportedTagExpression_isAnErrorNamingTheResource() throws {
        let t = telemetry("""
          - overrides:
            - tagOverrides:
                size_class: {value: "request.size > 100 ? 'big' : 'small'"}
        """)
        XCTAssertThrowsError(try ProxyFixture(appPort: app.port, files: ["t.yaml": t], concurrency: 1)) { e in
            XCTAssertTrue("\(e)".contains("shop-metrics"), "\(e)")
            XCTAssertTrue("\(e)".contains("size_class"), "\(e)")
            XCTAssertTrue("\(e)".contains("unsupported"), "\(e)")
        }
    }

    func testAnUnknownMetricName_isAnErrorNamingTheResource() throws {
        let t = telemetry("""
          - overrides:
            - match: {metric: REQUEST_COUNTS}
              disabled: true
        """)
        XCTAssertThrowsError(try ProxyFixture(appPort: app.port, files: ["t.yaml": t], concurrency: 1)) { e in
            XCTAssertTrue("\(e)".contains("shop-metrics"), "\(e)")
            XCTAssertTrue("\(e)".contains("REQUEST_COUNTS"), "\(e)")
        }
    }
}
