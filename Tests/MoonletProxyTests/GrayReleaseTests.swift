import XCTest
import NIOConcurrencyHelpers
import NIOHTTP1
@testable import MoonletProxy
@testable import MoonletLua

/// The seed scenario through the outbound listener, with real backends for v1 and v2.
final class GrayReleaseTests: XCTestCase {
    static var repo: URL { URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent() }

    var v1: TestUpstream!
    var v2: TestUpstream!
    var px: ProxyFixture!

    override func setUpWithError() throws {
        v1 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v1")], body: "v1") }
        v2 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v2")], body: "v2") }
        let policy = try String(contentsOf: Self.repo.appendingPathComponent("policies/gray-release/order-service.yaml"), encoding: .utf8)
        let endpoints = try String(contentsOf: Self.repo.appendingPathComponent("policies/gray-release/order-service-endpoints.yaml"), encoding: .utf8)
            .replacingOccurrences(of: "http: 9081", with: "http: \(v1.port)").replacingOccurrences(of: "http: 9082", with: "http: \(v2.port)")
        px = try ProxyFixture(appPort: 1, files: ["order-service.yaml": policy, "endpoints.yaml": endpoints])
    }
    override func tearDown() { px?.stop(); v1?.stop(); v2?.stop() }

    /// The seed's files (policies/gray-release) with the endpoints on these ports.
    static func seed(_ p1: Int, _ p2: Int) -> [String: String] {
        let policy = try! String(contentsOf: repo.appendingPathComponent("policies/gray-release/order-service.yaml"), encoding: .utf8)
        let endpoints = try! String(contentsOf: repo.appendingPathComponent("policies/gray-release/order-service-endpoints.yaml"), encoding: .utf8)
            .replacingOccurrences(of: "http: 9081", with: "http: \(p1)").replacingOccurrences(of: "http: 9082", with: "http: \(p2)")
        return ["order-service.yaml": policy, "endpoints.yaml": endpoints]
    }

    func send(_ c: RawClient, gray: Bool) -> String? {
        c.send("GET /orders/1 HTTP/1.1\r\nHost: order-service\r\n" + (gray ? "X-Gray: true\r\n" : "") + "\r\n")
        return c.read()?.header("x-version")
    }

    func test_grayHeader_alwaysReachesV2() throws {
        let c = try RawClient(port: px.outbound)
        for _ in 0..<200 { XCTAssertEqual(send(c, gray: true), "v2") }
    }

    func test_withoutGrayHeader_2000RequestsSplit90To10() throws {
        let c = try RawClient(port: px.outbound)
        var counts: [String: Int] = [:]
        for _ in 0..<2000 { counts[send(c, gray: false) ?? "failed", default: 0] += 1 }
        XCTAssertEqual(counts["failed"], nil)
        XCTAssertEqual(Double(counts["v2"] ?? 0) / 2000, 0.10, accuracy: 0.03, "\(counts)")
        XCTAssertEqual((counts["v1"] ?? 0) + (counts["v2"] ?? 0), 2000)
    }

    func test_upstreamSeesTheRouteAndMetricsNameTheService() throws {
        let c = try RawClient(port: px.outbound)
        XCTAssertEqual(send(c, gray: true), "v2")
        XCTAssertEqual(v2.seen.first?.headers["host"], ["order-service"])
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        let line = stats.split(separator: "\n").first { $0.hasPrefix("istio_requests_total{") && $0.contains("destination_service=\"order-service.default.svc.cluster.local\"") }
        XCTAssertTrue(line?.contains("response_code=\"200\"") ?? false, stats)
        XCTAssertTrue(line?.contains("destination_service_name=\"order-service\",destination_service_namespace=\"default\"") ?? false, stats)
    }

    func test_unknownHost_is404NR() throws {
        let c = try RawClient(port: px.outbound)
        c.send("GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 404)
    }

    func test_editingWeights_shiftsTraffic_withZeroFailedRequests() throws {
        let failures = NIOLockedValueBox(0)
        let counts = NIOLockedValueBox([String: Int]())
        let stop = NIOLockedValueBox(false)
        let group = DispatchGroup()
        for _ in 0..<3 {
            DispatchQueue.global().async(group: group) {
                guard let c = try? RawClient(port: self.px.outbound) else { failures.withLockedValue { $0 += 1 }; return }
                while !stop.withLockedValue({ $0 }) {
                    if let v = self.send(c, gray: false) { counts.withLockedValue { $0[v, default: 0] += 1 } } else { failures.withLockedValue { $0 += 1 } }
                }
            }
        }
        usleep(300_000)
        var policy = try String(contentsOf: Self.repo.appendingPathComponent("policies/gray-release/order-service.yaml"), encoding: .utf8)
        policy = policy.replacingOccurrences(of: "weight: 90", with: "weight: 0").replacingOccurrences(of: "weight: 10", with: "weight: 100")
        try px.write("order-service.yaml", policy)
        // The watcher applies it within a second; from then on everything goes to v2.
        usleep(1_200_000)
        counts.withLockedValue { $0 = [:] }
        usleep(500_000)
        stop.withLockedValue { $0 = true }
        group.wait()
        XCTAssertEqual(failures.withLockedValue { $0 }, 0)
        let after = counts.withLockedValue { $0 }
        XCTAssertEqual(after["v1"], nil, "\(after)")
        XCTAssertGreaterThan(after["v2"] ?? 0, 10)
    }
}

final class BuiltinPluginTests: XCTestCase {
    func test_embeddedBuiltins_areThePluginsFiles() throws {
        XCTAssertTrue(BuiltinPlugins.names.contains("istio-router"), "\(BuiltinPlugins.names)")
        for name in BuiltinPlugins.names {
            let file = GrayReleaseTests.repo.appendingPathComponent("plugins/\(name).lua")
            XCTAssertEqual(try String(contentsOf: file, encoding: .utf8), BuiltinPlugins.source(name), name)
        }
    }

    func test_seedGrayRelease_isRoutedByIstioRouterLua() throws {
        let v1 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v1")], body: "v1") }
        let v2 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v2")], body: "v2") }
        defer { v1.stop(); v2.stop() }
        let px = try ProxyFixture(appPort: 1, files: GrayReleaseTests.seed(v1.port, v2.port))
        defer { px.stop() }
        let plugins = try XCTUnwrap(adminGet(px.admin, "/plugins")).body
        XCTAssertTrue(plugins.contains("istio-router") && plugins.contains("builtin://istio-router"), plugins)
        let c = try RawClient(port: px.outbound)
        var counts: [String: Int] = [:]
        for i in 0..<1000 {
            c.send("GET /orders/\(i) HTTP/1.1\r\nHost: order-service\r\n" + (i % 2 == 0 ? "X-Gray: true\r\n" : "") + "\r\n")
            let r = c.read()
            counts[(i % 2 == 0 ? "gray-" : "") + (r?.header("x-version") ?? "failed"), default: 0] += 1
        }
        XCTAssertEqual(counts["gray-v2"], 500, "\(counts)")
        XCTAssertEqual(Double(counts["v2"] ?? 0) / 500, 0.10, accuracy: 0.05, "\(counts)")
        XCTAssertEqual((counts["v1"] ?? 0) + (counts["v2"] ?? 0), 500, "\(counts)")
    }

    func test_aForkedRouter_replacesTheBuiltinByName_andRoutesAsTheOriginal() throws {
        let v1 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v1")], body: "v1") }
        let v2 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v2")], body: "v2") }
        defer { v1.stop(); v2.stop() }
        // The user's way: export the builtins, then fork one next to the exported copy.
        let exported = NSTemporaryDirectory() + "moonlet-export-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: exported) }
        try BuiltinPlugins.export(to: exported)
        var files = GrayReleaseTests.seed(v1.port, v2.port)
        files["istio-router.lua"] = try String(contentsOfFile: exported + "/istio-router.lua", encoding: .utf8)
        files["my-router.lua"] = """
        local base = require("istio-router")
        local fork = {}
        function fork.on_request(s, conf)
          local answered = base.on_request(s, conf)
          s.vars.forked = "yes"
          return answered
        end
        function fork.on_response(s, conf)
          s.response.headers:set("x-forked", s.vars.forked or "no")
        end
        return fork
        """
        files["fork.yaml"] = """
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata: {name: istio-router}
        spec:
          url: file://my-router.lua
          priority: 1000
        """
        let px = try ProxyFixture(appPort: 1, files: files)
        defer { px.stop() }
        let plugins = try XCTUnwrap(adminGet(px.admin, "/plugins")).body
        XCTAssertTrue(plugins.contains("my-router.lua") && !plugins.contains("builtin://istio-router"), plugins)
        let c = try RawClient(port: px.outbound)
        var counts: [String: Int] = [:]
        for _ in 0..<500 {
            c.send("GET / HTTP/1.1\r\nHost: order-service\r\n\r\n")
            let r = c.read()
            XCTAssertEqual(r?.header("x-forked"), "yes")
            counts[r?.header("x-version") ?? "failed", default: 0] += 1
        }
        XCTAssertEqual(Double(counts["v2"] ?? 0) / 500, 0.10, accuracy: 0.05, "\(counts)")
        XCTAssertEqual((counts["v1"] ?? 0) + (counts["v2"] ?? 0), 500, "\(counts)")
        c.send("GET / HTTP/1.1\r\nHost: order-service\r\nX-Gray: true\r\n\r\n")
        XCTAssertEqual(c.read()?.header("x-version"), "v2")
        c.send("GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 404)
    }

    func test_pluginsExport_writesEveryBuiltin_andRefusesToOverwriteADifferentFileUnlessForced() throws {
        let dir = NSTemporaryDirectory() + "moonlet-export-\(UUID().uuidString)/nested"
        defer { try? FileManager.default.removeItem(atPath: (dir as NSString).deletingLastPathComponent) }
        let written = try BuiltinPlugins.export(to: dir)
        XCTAssertEqual(written, BuiltinPlugins.names.map { dir + "/\($0).lua" })
        XCTAssertEqual(try String(contentsOfFile: dir + "/istio-router.lua", encoding: .utf8), BuiltinPlugins.source("istio-router"))
        XCTAssertNoThrow(try BuiltinPlugins.export(to: dir), "an identical file is not a conflict")
        try "-- mine\n".write(toFile: dir + "/istio-router.lua", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try BuiltinPlugins.export(to: dir)) { e in
            XCTAssertTrue("\(e)".contains("--force"), "\(e)")
        }
        XCTAssertEqual(try String(contentsOfFile: dir + "/istio-router.lua", encoding: .utf8), "-- mine\n")
        try BuiltinPlugins.export(to: dir, force: true)
        XCTAssertEqual(try String(contentsOfFile: dir + "/istio-router.lua", encoding: .utf8), BuiltinPlugins.source("istio-router"))
    }
}

/// The seed DestinationRule's ROUND_ROBIN and maxRequestsPerConnection, on real sockets.
final class DestinationRulePolicyTests: XCTestCase {
    func test_roundRobinAcrossEndpoints_andAtMost10RequestsPerUpstreamConnection() throws {
        let a = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-ep", "a")]) }
        let b = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-ep", "b")]) }
        defer { a.stop(); b.stop() }
        let yaml = meshService("pool", ports: [a.port, b.port], trafficPolicy: "{loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {http: {maxRequestsPerConnection: 10}}}")
        let px = try ProxyFixture(appPort: 1, files: ["pool.yaml": yaml], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        var counts: [String: Int] = [:]
        for _ in 0..<100 {
            c.send("GET / HTTP/1.1\r\nHost: pool\r\n\r\n")
            counts[c.read()?.header("x-ep") ?? "failed", default: 0] += 1
        }
        XCTAssertEqual(counts, ["a": 50, "b": 50])
        // 50 requests per endpoint, at most 10 per connection: at least 5 connections each.
        XCTAssertGreaterThanOrEqual(a.connections, 5)
        XCTAssertGreaterThanOrEqual(b.connections, 5)
        XCTAssertLessThanOrEqual(a.connections, 6)
    }
}

final class OutlierDetectionTests: XCTestCase {
    func test_backendAnswering500_isEjectedAfter5_thenReturnsAfterEjectionTime() throws {
        let failing = NIOLockedValueBox(true)
        let bad = try TestUpstream { _ in failing.withLockedValue { $0 } ? TestUpstream.Reply(status: .internalServerError, headers: [("x-ep", "bad")]) : TestUpstream.Reply(headers: [("x-ep", "bad")]) }
        let good = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-ep", "good")]) }
        defer { bad.stop(); good.stop() }
        let yaml = meshService("od", ports: [bad.port, good.port], trafficPolicy: "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 5, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 50}}")
        let px = try ProxyFixture(appPort: 1, files: ["od.yaml": yaml], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        func send() -> String { c.send("GET / HTTP/1.1\r\nHost: od\r\n\r\n"); let r = c.read(); return "\(r?.header("x-ep") ?? "?"):\(r?.status ?? 0)" }
        var badHits = 0
        for _ in 0..<10 { if send().hasPrefix("bad") { badHits += 1 } }
        XCTAssertEqual(badHits, 5, "round robin reaches the bad host until its 5th consecutive 5xx")
        for _ in 0..<20 { XCTAssertEqual(send(), "good:200", "ejected host gets no traffic") }
        let text = try XCTUnwrap(adminGet(px.admin, "/clusters")).body
        XCTAssertTrue(text.contains("outbound|80||od.default.svc.cluster.local::127.0.0.1:\(bad.port)::health_flags::/failed_outlier_check"), text)
        XCTAssertTrue(text.contains("::lb_policy::ROUND_ROBIN"), text)
        XCTAssertTrue(text.contains("127.0.0.1:\(good.port)::success_rate::100.0"), text)
        let prom = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(prom.contains("moonlet_outlier_ejections_total{cluster=\"outbound|80||od.default.svc.cluster.local\"} 1"), prom)
        let json = try XCTUnwrap(adminGet(px.admin, "/clusters?format=json")).body
        XCTAssertTrue(json.contains("\"address\":\"127.0.0.1:\(bad.port)\",\"labels\":\"\",\"rq_active\":0,\"rq_total\":5,\"rq_error\":5,\"success_rate\":0.0,\"ejected\":true"), json)
        failing.withLockedValue { $0 = false }
        // Back on the first 1 s sweep after its 1 s ejection time: between 1 and 2 s.
        let ejectedAt = Date()
        var back = 0
        while back == 0 && Date().timeIntervalSince(ejectedAt) < 3 {
            for _ in 0..<4 { if send() == "bad:200" { back += 1 } }
            if back == 0 { usleep(100_000) }
        }
        XCTAssertGreaterThan(back, 0, "the host returns after its ejection time")
        XCTAssertGreaterThan(Date().timeIntervalSince(ejectedAt), 0.5, "not before its ejection time")
    }
}

final class OutlierDefaultsTests: XCTestCase {
    /// Three hosts at maxEjectionPercent 50: two failing hosts are both ejected (1/3 is
    /// below 50%), so all traffic reaches the third.
    func test_threeHostsFiftyPercent_twoFailingHostsAreEjected_theThirdTakesAllTraffic() throws {
        let failing = try (0..<2).map { i in try TestUpstream { _ in TestUpstream.Reply(status: .internalServerError, headers: [("x-ep", "bad\(i)")]) } }
        let good = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-ep", "good")]) }
        defer { failing.forEach { $0.stop() }; good.stop() }
        let yaml = meshService("three", ports: failing.map(\.port) + [good.port],
                               trafficPolicy: "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}}")
        let px = try ProxyFixture(appPort: 1, files: ["three.yaml": yaml], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        func send() -> String { c.send("GET / HTTP/1.1\r\nHost: three\r\n\r\n"); let r = c.read(); return "\(r?.header("x-ep") ?? "?"):\(r?.status ?? 0)" }
        for _ in 0..<6 { _ = send() }   // round robin: each failing host answers 500 twice
        let after = (0..<30).map { _ in send() }
        XCTAssertEqual(Set(after), ["good:200"], "\(after)")
    }

    /// Istio's minHealthPercent default (0) means no panic mode: with the only host
    /// ejected the proxy answers 503 UH instead of sending traffic to it.
    func test_everyHostEjected_minHealthPercentUnset_answers503NoHealthyUpstream() throws {
        let bad = try TestUpstream { _ in TestUpstream.Reply(status: .internalServerError) }
        defer { bad.stop() }
        let yaml = meshService("alone", ports: [bad.port],
                               trafficPolicy: "{outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}")
        let px = try ProxyFixture(appPort: 1, files: ["alone.yaml": yaml], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        var statuses: [Int] = []
        for _ in 0..<4 { c.send("GET / HTTP/1.1\r\nHost: alone\r\n\r\n"); statuses.append(c.read()?.status ?? 0) }
        XCTAssertEqual(statuses, [500, 500, 503, 503])
        XCTAssertEqual(bad.seen.count, 2, "nothing reaches the ejected host")
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("response_code=\"503\",response_flags=\"UH\""), stats)
    }
}

final class RetryTests: XCTestCase {
    func serviceYAML(_ ports: [Int], retries: String = "") -> String {
        meshService("rt", ports: ports, trafficPolicy: "{loadBalancer: {simple: ROUND_ROBIN}}",
                    extra: "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: rt}\nspec:\n  hosts: [rt]\n  http:\n  - route: [{destination: {host: rt}}]\n\(retries)\n")
    }

    func test_deadBackend_connectFailuresAreRetriedOnTheOtherHost() throws {
        let dead = try RefusingPort(); let deadPort = dead.port
        defer { withExtendedLifetime(dead) {} }
        let live = try TestUpstream()
        defer { live.stop() }
        let px = try ProxyFixture(appPort: 1, files: ["rt.yaml": serviceYAML([deadPort, live.port])], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        var ok = 0
        for _ in 0..<40 { c.send("GET / HTTP/1.1\r\nHost: rt\r\n\r\n"); if c.read()?.status == 200 { ok += 1 } }
        XCTAssertEqual(ok, 40, "Istio's default policy retries connect failures")
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_upstream_retries_total"), stats)
    }

    func test_retriable5xx_isRetried_andTheBodyReplayed_untilAttemptsRunOut() throws {
        let calls = NIOLockedValueBox(0)
        let up = try TestUpstream { r in
            let n = calls.withLockedValue { $0 += 1; return $0 }
            if r.uri == "/always" || n == 1 { return TestUpstream.Reply(status: .serviceUnavailable, body: "busy") }
            return TestUpstream.Reply(body: "got \(r.body)")
        }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: 1, files: ["rt.yaml": serviceYAML([up.port], retries: "    retries: {attempts: 2, retryOn: 5xx}")], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        c.send("POST /once HTTP/1.1\r\nHost: rt\r\nContent-Length: 5\r\n\r\nhello")
        XCTAssertEqual(c.read()?.body, "got hello")
        XCTAssertEqual(calls.withLockedValue { $0 }, 2)
        c.send("GET /always HTTP/1.1\r\nHost: rt\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 503)
        XCTAssertEqual(calls.withLockedValue { $0 }, 5, "first try + 2 retries")
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("response_code=\"503\",response_flags=\"URX\""), stats)
    }
}

final class CircuitBreakerTests: XCTestCase {
    /// The seed's DestinationRule limits: maxConnections 100, http1MaxPendingRequests 50.
    func test_200ConcurrentSlowRequests_atMost100Connections_50Wait_restGet503UOAtOnce() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(body: "slow", delayMs: 1000) }
        defer { up.stop() }
        let yaml = meshService("cb", ports: [up.port], trafficPolicy: "{connectionPool: {tcp: {maxConnections: 100}, http: {http1MaxPendingRequests: 50, maxRequestsPerConnection: 10}}}")
        let px = try ProxyFixture(appPort: 1, files: ["cb.yaml": yaml], concurrency: 2)
        defer { px.stop() }
        let results = NIOLockedValueBox([(Int, Double)]())
        let start = Date()
        var threads: [Thread] = []
        for _ in 0..<200 {
            let t = Thread {
                guard let c = try? RawClient(port: px.outbound, timeoutSeconds: 20) else { results.withLockedValue { $0.append((0, 0)) }; return }
                c.send("GET / HTTP/1.1\r\nHost: cb\r\n\r\n")
                let r = c.read()
                results.withLockedValue { $0.append((r?.status ?? 0, Date().timeIntervalSince(start))) }
            }
            t.stackSize = 256 * 1024
            threads.append(t)
        }
        threads.forEach { $0.start() }
        let deadline = Date().addingTimeInterval(30)
        while results.withLockedValue({ $0.count }) < 200 && Date() < deadline { usleep(20_000) }
        let all = results.withLockedValue { $0 }
        XCTAssertEqual(all.count, 200)
        let ok = all.filter { $0.0 == 200 }
        let overflow = all.filter { $0.0 == 503 }
        XCTAssertEqual(ok.count, 150, "100 on connections + 50 waiting: \(Dictionary(grouping: all, by: { $0.0 }).mapValues(\.count))")
        XCTAssertEqual(overflow.count, 50)
        XCTAssertTrue(overflow.allSatisfy { $0.1 < 0.9 }, "overflow is answered at once, not after the slow ones")
        XCTAssertLessThanOrEqual(up.peakOpenConnections, 100)
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("response_code=\"503\",response_flags=\"UO\""), stats)
        XCTAssertTrue(stats.contains("moonlet_upstream_rq_pending_overflow_total{cluster=\"outbound|80||cb.default.svc.cluster.local\"} 50"), stats)
    }
}

final class ConsistentHashTests: XCTestCase {
    func test_headerAndCookieHashing_keepAUserOnOneEndpoint() throws {
        let ups = try (0..<3).map { i in try TestUpstream { _ in TestUpstream.Reply(headers: [("x-ep", "\(i)")]) } }
        defer { ups.forEach { $0.stop() } }
        func yaml(_ lb: String) -> String { meshService("ch", ports: ups.map(\.port), trafficPolicy: "{loadBalancer: {consistentHash: \(lb)}}") }
        let px = try ProxyFixture(appPort: 1, files: ["ch.yaml": yaml("{httpHeaderName: x-user}")], concurrency: 2)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        var byUser: [String: Set<String>] = [:]
        for i in 0..<60 {
            let user = "u\(i % 20)" // 20 users: all on one of 3 hosts by chance is ~1e-9
            c.send("GET / HTTP/1.1\r\nHost: ch\r\nx-user: \(user)\r\n\r\n")
            byUser[user, default: []].insert(c.read()?.header("x-ep") ?? "?")
        }
        XCTAssertTrue(byUser.values.allSatisfy { $0.count == 1 }, "\(byUser)")
        XCTAssertGreaterThan(Set(byUser.values.map { $0.first! }).count, 1, "users spread over endpoints")

        try px.write("ch.yaml", yaml("{httpCookie: {name: sticky, ttl: 60s}}"))
        XCTAssertEqual(adminGet(px.admin, "/plugins/reload", method: "POST")?.status, 200)
        c.send("GET / HTTP/1.1\r\nHost: ch\r\n\r\n")
        let first = try XCTUnwrap(c.read())
        let cookie = try XCTUnwrap(first.header("set-cookie"))
        XCTAssertTrue(cookie.hasPrefix("sticky=") && cookie.contains("Max-Age=60"), cookie)
        let value = String(cookie.split(separator: ";")[0])
        var eps = Set<String>()
        for _ in 0..<20 {
            c.send("GET / HTTP/1.1\r\nHost: ch\r\nCookie: other=1; \(value)\r\n\r\n")
            let r = c.read()
            eps.insert(r?.header("x-ep") ?? "?")
            XCTAssertNil(r?.header("set-cookie"))
        }
        XCTAssertEqual(eps, [first.header("x-ep")!])
    }
}

final class KilledBackendTests: XCTestCase {
    /// A backend killed under load: retries and ejection move traffic to the others
    /// (fewer than 1% of requests fail); back again, it gets traffic after its ejection time.
    func test_backendKilledUnderLoad_failsUnder1Percent_andReturnsAfterEjection() throws {
        let tagged = { (i: Int) -> @Sendable (SeenRequest) -> TestUpstream.Reply in { _ in TestUpstream.Reply(headers: [("x-ep", "\(i)")]) } }
        var ups = try (0..<3).map { try TestUpstream(respond: tagged($0)) }
        let victimPort = ups[0].port
        defer { ups.forEach { $0.stop() } }
        let vs = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: kb}\nspec:\n  hosts: [kb]\n  http:\n  - route: [{destination: {host: kb}}]\n    retries: {attempts: 3, retryOn: \"connect-failure,reset,5xx\"}\n"
        let px = try ProxyFixture(appPort: 1, files: ["kb.yaml": meshService("kb", ports: ups.map(\.port),
            trafficPolicy: "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutiveGatewayErrors: 1, consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 1s, maxEjectionPercent: 50}}", extra: vs)])
        defer { px.stop() }
        let total = NIOLockedValueBox(0), failed = NIOLockedValueBox(0)
        let seen = NIOLockedValueBox([String: Int]())
        let stop = NIOLockedValueBox(false)
        let group = DispatchGroup()
        for _ in 0..<4 {
            DispatchQueue.global().async(group: group) {
                var c = try? RawClient(port: px.outbound)
                while !stop.withLockedValue({ $0 }) {
                    c?.send("GET / HTTP/1.1\r\nHost: kb\r\n\r\n")
                    let r = c?.read()
                    total.withLockedValue { $0 += 1 }
                    if r?.status == 200 { seen.withLockedValue { $0[r?.header("x-ep") ?? "?", default: 0] += 1 } }
                    else { failed.withLockedValue { $0 += 1 }; c = try? RawClient(port: px.outbound) }
                }
            }
        }
        usleep(700_000)
        ups[0].stop()                                   // killed under load
        usleep(800_000)
        seen.withLockedValue { $0 = [:] }
        usleep(300_000)
        XCTAssertNil(seen.withLockedValue { $0["0"] }, "the dead backend gets no traffic")
        ups[0] = try TestUpstream(port: victimPort, respond: tagged(0))   // back again
        // Each ejection lasts baseEjectionTime x times ejected (it may have been ejected
        // again just before it came back), so wait up to a few seconds.
        seen.withLockedValue { $0 = [:] }
        let until = Date().addingTimeInterval(6)
        while Date() < until && (seen.withLockedValue { $0["0"] ?? 0 }) == 0 { usleep(100_000) }
        stop.withLockedValue { $0 = true }
        group.wait()
        let t = total.withLockedValue { $0 }, f = failed.withLockedValue { $0 }
        XCTAssertGreaterThan(t, 200)
        XCTAssertLessThan(Double(f) / Double(t), 0.01, "\(f) of \(t) failed")
        XCTAssertGreaterThan(seen.withLockedValue { $0["0"] ?? 0 }, 0, "it gets traffic again after its ejection time")
    }
}

/// Istio's circuit-breaker defaults (2^32-1) when a DestinationRule leaves them unset.
final class CircuitBreakerDefaultsTests: XCTestCase {
    /// Three hosts behind ROUND_ROBIN, one already ejected for 5xx, a healthy one
    /// killed under 8-connection load. The dead host stays in rotation (a second
    /// ejection would pass maxEjectionPercent's default 10%), so about every other
    /// request is a connect failure that Istio's default retry policy moves to the live
    /// host: with Envoy's old limit of 3 concurrent retries those retries were refused
    /// (a quarter of the requests failed); with Istio's default none is.
    func test_hostKilledUnder8Connections_withOneAlreadyEjected_losesUnder1Percent() throws {
        let tagged = { (name: String, status: HTTPResponseStatus) -> @Sendable (SeenRequest) -> TestUpstream.Reply in
            { _ in TestUpstream.Reply(status: status, headers: [("x-ep", name)]) }
        }
        let bad = try TestUpstream(respond: tagged("bad", .internalServerError))
        let victim = try TestUpstream(respond: tagged("victim", .ok))
        let live = try TestUpstream(respond: tagged("live", .ok))
        var victimRunning = true
        defer { bad.stop(); live.stop(); if victimRunning { victim.stop() } }
        // No connectionPool settings: the circuit breakers are Istio's defaults.
        let yaml = meshService("churn", ports: [bad.port, victim.port, live.port],
                               trafficPolicy: "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 60s}}")
        let px = try ProxyFixture(appPort: 1, files: ["churn.yaml": yaml])
        defer { px.stop() }

        // The bad host answers 500 until its third in a row ejects it.
        let warm = try RawClient(port: px.outbound)
        var fives = 0
        for _ in 0..<60 where fives < 3 {
            warm.send("GET / HTTP/1.1\r\nHost: churn\r\n\r\n")
            if warm.read()?.status == 500 { fives += 1 }
        }
        XCTAssertEqual(fives, 3)
        let clusters = try XCTUnwrap(adminGet(px.admin, "/clusters")).body
        XCTAssertTrue(clusters.contains("::127.0.0.1:\(bad.port)::health_flags::/failed_outlier_check"), clusters)

        let total = NIOLockedValueBox(0), failed = NIOLockedValueBox([Int: Int]())
        let perConnection = 125
        let deadline = Date().addingTimeInterval(20)
        // Threads, not a dispatch queue: all 8 connections are busy at once.
        let finished = NIOLockedValueBox(0)
        let clients = (0..<8).map { _ in
            Thread {
                var c = try? RawClient(port: px.outbound)
                for _ in 0..<perConnection where Date() < deadline {
                    c?.send("GET / HTTP/1.1\r\nHost: churn\r\n\r\n")
                    let status = c?.read()?.status ?? 0
                    total.withLockedValue { $0 += 1 }
                    if status != 200 {
                        failed.withLockedValue { $0[status, default: 0] += 1 }
                        c = try? RawClient(port: px.outbound)
                    }
                }
                finished.withLockedValue { $0 += 1 }
            }
        }
        clients.forEach { $0.start() }
        // Killed once a fifth of the load has gone through.
        while total.withLockedValue({ $0 }) < 8 * perConnection / 5 && Date() < deadline { usleep(2_000) }
        let servedBeforeKill = victim.seen.count
        victim.stop()
        victimRunning = false
        while finished.withLockedValue({ $0 }) < 8 && Date() < deadline.addingTimeInterval(10) { usleep(10_000) }
        XCTAssertEqual(finished.withLockedValue { $0 }, 8)
        let t = total.withLockedValue { $0 }, f = failed.withLockedValue { $0 }
        let lost = f.values.reduce(0, +)
        XCTAssertGreaterThan(servedBeforeKill, 0, "the victim was serving when it was killed")
        XCTAssertEqual(t, 8 * perConnection, "every request was sent within the time bound")
        XCTAssertLessThan(Double(lost) / Double(max(t, 1)), 0.01, "\(lost) of \(t) failed, by status: \(f)")
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_upstream_retries_total"), "connect failures to the dead host were retried")
        XCTAssertFalse(stats.contains("moonlet_upstream_retry_overflow_total"), "no retry was refused by maxRetries")
    }
}

final class MirrorTests: XCTestCase {
    func test_mirror_sendsACopyWithShadowAuthority_andIgnoresItsResponse() throws {
        let primary = try TestUpstream { r in TestUpstream.Reply(body: "primary \(r.body)") }
        let shadow = try TestUpstream { _ in TestUpstream.Reply(status: .internalServerError, body: "shadow") }
        defer { primary.stop(); shadow.stop() }
        let vs = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: mr}\nspec:\n  hosts: [mr]\n  http:\n  - route: [{destination: {host: mr}}]\n    mirror: {host: mr-shadow}\n    mirrorPercentage: {value: 100}\n"
        let yaml = meshService("mr", ports: [primary.port], extra: meshService("mr-shadow", ports: [shadow.port]) + "---\n" + vs)
        let px = try ProxyFixture(appPort: 1, files: ["mr.yaml": yaml], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        c.send("POST /m HTTP/1.1\r\nHost: mr\r\nContent-Length: 4\r\n\r\ndata")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.body, "primary data")
        for _ in 0..<100 where shadow.seen.isEmpty { usleep(20_000) }
        let copy = try XCTUnwrap(shadow.seen.first)
        XCTAssertEqual(copy.headers["host"], ["mr-shadow"])
        XCTAssertEqual(copy.body, "data")
        XCTAssertEqual(copy.uri, "/m")
    }

    /// A filter buffers the whole request body (STOP_AND_BUFFER): the upstream gets it with
    /// a content-length, and so does the mirror, whether the client sent a length or chunks.
    func test_mirror_ofABufferedRequest_carriesItsWholeBody_withAContentLength() throws {
        let primary = try TestUpstream { r in TestUpstream.Reply(body: "primary \(r.body)") }
        let shadow = try TestUpstream { _ in TestUpstream.Reply(body: "shadow") }
        defer { primary.stop(); shadow.stop() }
        let vs = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: mr}\nspec:\n  hosts: [mr]\n  http:\n  - route: [{destination: {host: mr}}]\n    mirror: {host: mr-shadow}\n    mirrorPercentage: {value: 100}\n"
        let yaml = meshService("mr", ports: [primary.port], extra: meshService("mr-shadow", ports: [shadow.port]) + "---\n" + vs)
        let buffer = "return { on_request = function(s) return moonlet.STOP_AND_BUFFER end, on_request_body = function(s, conf, chunk, eos) end }"
        let px = try ProxyFixture(appPort: 1, files: ["mr.yaml": yaml, "buf.lua": buffer, "buf.yaml": ProxyFixture.plugin("buf")], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        c.send("POST /len HTTP/1.1\r\nHost: mr\r\nContent-Length: 4\r\n\r\ndata")
        XCTAssertEqual(c.read()?.body, "primary data")
        c.send("POST /chunks HTTP/1.1\r\nHost: mr\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        XCTAssertEqual(c.read()?.body, "primary abcdefg")
        for _ in 0..<100 where shadow.seen.count < 2 { usleep(20_000) }
        let copies = shadow.seen.sorted { $0.uri < $1.uri }
        XCTAssertEqual(copies.map(\.uri), ["/chunks", "/len"])
        XCTAssertEqual(copies.map(\.body), ["abcdefg", "data"])
        XCTAssertEqual(copies.map { $0.headers["transfer-encoding"] }, [[], []])
        XCTAssertEqual(copies.map { $0.headers["content-length"] }, [["7"], ["4"]])
    }
}
