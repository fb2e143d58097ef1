import XCTest
import NIOConcurrencyHelpers
import NIOHTTP1
@testable import MoonletProxy

/// A Lua filter steering the route (s.route.cluster / endpoint / retry) and deciding
/// retries (on_upstream_failure), through the outbound listener with real upstreams.
final class RouteSteeringIntegrationTests: XCTestCase {
    static let fqdn = "order-service.default.svc.cluster.local"

    var v1: TestUpstream!
    var v2: TestUpstream!

    override func setUpWithError() throws {
        v1 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v1")], body: "v1") }
        v2 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v2")], body: "v2") }
    }
    override func tearDown() { v1?.stop(); v2?.stop() }

    /// The gray-release seed (VirtualService 90/10 over v1/v2 on port 8080) with the
    /// filter `code` as LuaPlugin "steer" (`extra`: more spec lines).
    func grayProxy(_ code: String, extra: String = "") throws -> ProxyFixture {
        let repo = GrayReleaseTests.repo
        let policy = try String(contentsOf: repo.appendingPathComponent("policies/gray-release/order-service.yaml"), encoding: .utf8)
        let endpoints = try String(contentsOf: repo.appendingPathComponent("policies/gray-release/order-service-endpoints.yaml"), encoding: .utf8)
            .replacingOccurrences(of: "http: 9081", with: "http: \(v1.port)").replacingOccurrences(of: "http: 9082", with: "http: \(v2.port)")
        return try ProxyFixture(appPort: 1, files: ["order-service.yaml": policy, "endpoints.yaml": endpoints,
                                                    "steer.lua": code, "steer.yaml": ProxyFixture.plugin("steer", extra)])
    }

    func versions(_ px: ProxyFixture, _ n: Int, host: String = "order-service") throws -> [String: Int] {
        let c = try RawClient(port: px.outbound)
        var counts: [String: Int] = [:]
        for _ in 0..<n {
            c.send("GET /orders/1 HTTP/1.1\r\nHost: \(host)\r\n\r\n")
            let r = c.read()
            counts[r?.header("x-version") ?? "status \(r?.status ?? 0)", default: 0] += 1
        }
        return counts
    }

    static func clusterFilter(_ name: String) -> String {
        "return { on_request = function(s) s.route.cluster = \"\(name)\" end }"
    }

    func test_filterSettingTheCluster_sendsAll50RequestsToV2_despiteA90To10VirtualService() throws {
        let px = try grayProxy(Self.clusterFilter("outbound|8080|v2|\(Self.fqdn)"))
        defer { px.stop() }
        XCTAssertEqual(try versions(px, 50), ["v2": 50])
        XCTAssertEqual(v1.seen.count, 0)
        XCTAssertEqual(v2.seen.count, 50)
    }

    func test_filterSettingTheClusterByItsShortName_resolvesTheSameCluster() throws {
        let px = try grayProxy(Self.clusterFilter("outbound|8080|v2|order-service"))
        defer { px.stop() }
        XCTAssertEqual(try versions(px, 20), ["v2": 20])
    }

    func test_unknownClusterName_isALuaError_thatFollowsThePluginsFailStrategy() throws {
        let closed = try grayProxy(Self.clusterFilter("outbound|8080|v3|order-service"))
        defer { closed.stop() }
        let c = try RawClient(port: closed.outbound)
        c.send("GET /orders/1 HTTP/1.1\r\nHost: order-service\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 500)
        XCTAssertEqual(r.body, "filter steer failed\n")
        XCTAssertEqual(v1.seen.count + v2.seen.count, 0)
        let plugins = try XCTUnwrap(adminGet(closed.admin, "/plugins")).body
        XCTAssertTrue(plugins.contains("unknown cluster 'outbound|8080|v3|order-service'"), plugins)

        let open = try grayProxy(Self.clusterFilter("outbound|8080|v3|order-service"), extra: "  failStrategy: FAIL_OPEN\n")
        defer { open.stop() }
        let counts = try versions(open, 10)
        XCTAssertEqual((counts["v1"] ?? 0) + (counts["v2"] ?? 0), 10, "fail-open: the router routes as if the filter were not there: \(counts)")
    }

    func test_endpointOverride_picksThatEndpoint_andOneOutsideTheClusterIsRefused() throws {
        let px = try grayProxy("""
        return { on_request = function(s)
          s.route.cluster = "outbound|8080||order-service"
          s.route.endpoint = "127.0.0.1:\(v1.port)"
          s.request.headers:set("x-endpoint", s.route.endpoint)
        end }
        """)
        defer { px.stop() }
        XCTAssertEqual(try versions(px, 20), ["v1": 20])
        XCTAssertEqual(v1.seen.first?.headers["x-endpoint"], ["127.0.0.1:\(v1.port)"])

        let outside = try grayProxy("""
        return { on_request = function(s)
          s.route.cluster = "outbound|8080|v2|order-service"
          s.route.endpoint = "127.0.0.1:\(v1.port)"
        end }
        """)
        defer { outside.stop() }
        XCTAssertEqual(try versions(outside, 3), ["status 500": 3])
        let plugins = try XCTUnwrap(adminGet(outside.admin, "/plugins")).body
        XCTAssertTrue(plugins.contains("is not an endpoint of cluster"), plugins)
        XCTAssertEqual(v1.seen.count, 20)
    }

    func test_passthroughCluster_goesToTheEndpointTheFilterNames() throws {
        let px = try grayProxy("""
        return { on_request = function(s)
          s.route.cluster = "PassthroughCluster"
          s.route.endpoint = "127.0.0.1:\(v2.port)"
        end }
        """)
        defer { px.stop() }
        XCTAssertEqual(try versions(px, 10, host: "anything.example"), ["v2": 10])
        XCTAssertEqual(v2.seen.first?.headers["host"], ["anything.example"])
    }

    func test_filterAfterTheRouter_adjustsTheRoutesRetry() throws {
        let up = try flakyBackend { $0 % 2 == 1 ? .internalServerError : nil }
        defer { up.stop() }
        // The router decides (no cluster set before it); a STATS filter runs after it
        // and replaces the route's retry policy (Istio's default does not retry a 500).
        let px = try ProxyFixture(appPort: 1, files: [
            "flaky.yaml": meshService("flaky", ports: [up.port]),
            "steer.lua": "return { on_request = function(s) s.route.retry = { attempts = 1, retry_on = '5xx' } end }",
            "steer.yaml": ProxyFixture.plugin("steer", "  phase: STATS\n"),
        ])
        defer { px.stop() }
        XCTAssertEqual(try statuses(px, 10, host: "flaky"), [200: 10])
        XCTAssertEqual(up.seen.count, 20)
    }

    /// A backend answering every other request with 503, behind service "flaky".
    func flakyBackend(_ failing: @escaping @Sendable (Int) -> HTTPResponseStatus?) throws -> TestUpstream {
        let n = NIOLockedValueBox(0)
        return try TestUpstream { _ in
            let i = n.withLockedValue { $0 += 1; return $0 }
            if let st = failing(i) { return TestUpstream.Reply(status: st, body: "failed") }
            return TestUpstream.Reply(body: "ok")
        }
    }

    func statuses(_ px: ProxyFixture, _ n: Int, host: String) throws -> [Int: Int] {
        let c = try RawClient(port: px.outbound)
        var counts: [Int: Int] = [:]
        for _ in 0..<n {
            c.send("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n")
            counts[c.read()?.status ?? 0, default: 0] += 1
        }
        return counts
    }

    func test_filterSetRetry_turnsABackendFailingHalfTheTimeWith503_into40SuccessesOf40() throws {
        let up = try flakyBackend { $0 % 2 == 1 ? .serviceUnavailable : nil }
        defer { up.stop() }
        func proxy(_ retry: String) throws -> ProxyFixture {
            try ProxyFixture(appPort: 1, files: [
                "flaky.yaml": meshService("flaky", ports: [up.port]),
                "steer.lua": "return { on_request = function(s) s.route.cluster = 'outbound|80||flaky'; \(retry) end }",
                "steer.yaml": ProxyFixture.plugin("steer"),
            ])
        }
        let without = try proxy("s.route.retry = nil")
        XCTAssertEqual(try statuses(without, 10, host: "flaky"), [200: 5, 503: 5], "without a retry policy half fail")
        without.stop()
        let before = up.seen.count
        let px = try proxy("s.route.retry = { attempts = 3, retry_on = '5xx' }")
        defer { px.stop() }
        XCTAssertEqual(try statuses(px, 40, host: "flaky"), [200: 40])
        XCTAssertEqual(up.seen.count - before, 80, "every request failed once and succeeded on its retry")
    }

    static let noRetryFilter = "return { on_upstream_failure = function(s, conf, failure) return moonlet.NO_RETRY end }"

    func test_onUpstreamFailureReturningNoRetry_stopsARetryTheRouteWouldMake() throws {
        let up = try flakyBackend { _ in .serviceUnavailable }
        defer { up.stop() }
        // Control: Istio's default policy retries a 503 twice.
        let plain = try ProxyFixture(appPort: 1, files: ["flaky.yaml": meshService("flaky", ports: [up.port])])
        XCTAssertEqual(try statuses(plain, 1, host: "flaky"), [503: 1])
        XCTAssertEqual(up.seen.count, 3)
        plain.stop()
        let px = try ProxyFixture(appPort: 1, files: [
            "flaky.yaml": meshService("flaky", ports: [up.port]),
            "steer.lua": Self.noRetryFilter, "steer.yaml": ProxyFixture.plugin("steer"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        c.send("GET / HTTP/1.1\r\nHost: flaky\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 503)
        XCTAssertEqual(r.body, "failed", "the client sees the upstream's own 503")
        XCTAssertEqual(up.seen.count, 4, "the upstream saw one request")
    }

    func test_onUpstreamFailureReturningRetry_retriesA500ThePolicyWouldNot() throws {
        let up = try flakyBackend { $0 % 2 == 1 ? .internalServerError : nil }
        defer { up.stop() }
        let plain = try ProxyFixture(appPort: 1, files: ["flaky.yaml": meshService("flaky", ports: [up.port])])
        XCTAssertEqual(try statuses(plain, 2, host: "flaky"), [500: 1, 200: 1], "Istio's default policy does not retry a 500")
        plain.stop()
        let px = try ProxyFixture(appPort: 1, files: [
            "flaky.yaml": meshService("flaky", ports: [up.port]),
            "steer.lua": """
            return { on_upstream_failure = function(s, conf, failure)
              if failure.status == 500 then return moonlet.RETRY end
            end }
            """,
            "steer.yaml": ProxyFixture.plugin("steer"),
        ])
        defer { px.stop() }
        let before = up.seen.count
        XCTAssertEqual(try statuses(px, 10, host: "flaky"), [200: 10])
        XCTAssertEqual(up.seen.count - before, 20)
    }

    static let recordingFilter = """
    local f = {}
    function f.on_upstream_failure(s, conf, failure)
      s.vars.seen = (s.vars.seen or "") .. failure.kind .. "/" .. failure.status .. "/" .. failure.attempt .. "/" .. failure.endpoint .. ";"
    end
    function f.on_response(s, conf)
      s.response.headers:set("x-failures", s.vars.seen or "none")
    end
    return f
    """

    func test_failureTable_namesKindStatusAttemptAndEndpoint_andSuccessesOr4xxNeverCallThePhase() throws {
        let up = try TestUpstream { req in
            switch req.uri {
            case "/503": return TestUpstream.Reply(status: .serviceUnavailable)
            case "/500": return TestUpstream.Reply(status: .internalServerError)
            case "/404": return TestUpstream.Reply(status: .notFound)
            case "/slow": return TestUpstream.Reply(delayMs: 400)
            default: return TestUpstream.Reply()
            }
        }
        defer { up.stop() }
        let refusing = try RefusingPort()
        let vs = """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: flaky}
        spec:
          hosts: [flaky]
          http:
          - match: [{uri: {exact: /slow}}]
            route: [{destination: {host: flaky}}]
            retries: {attempts: 1, perTryTimeout: 100ms, retryOn: reset}
          - route: [{destination: {host: flaky}}]
        """
        let px = try ProxyFixture(appPort: 1, files: [
            "flaky.yaml": meshService("flaky", ports: [up.port], extra: vs),
            "gone.yaml": meshService("gone", ports: [refusing.port]),
            "rec.lua": Self.recordingFilter, "rec.yaml": ProxyFixture.plugin("rec"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        func failures(_ path: String, host: String = "flaky") -> (Int, String?) {
            c.send("GET \(path) HTTP/1.1\r\nHost: \(host)\r\n\r\n")
            let r = c.read()
            return (r?.status ?? 0, r?.header("x-failures"))
        }
        let ep = "127.0.0.1:\(up.port)"
        XCTAssertEqual(failures("/").1, "none")
        XCTAssertEqual(failures("/404").1, "none")
        // Istio's default policy retries 503 twice: three attempts, each a failure the filter sees.
        XCTAssertEqual(failures("/503").1, "gateway-error/503/0/\(ep);gateway-error/503/1/\(ep);gateway-error/503/2/\(ep);")
        XCTAssertEqual(failures("/500").1, "5xx/500/0/\(ep);")
        let slow = failures("/slow")
        XCTAssertEqual(slow.0, 504)
        XCTAssertEqual(slow.1, "timeout/0/0/\(ep);")
        let gone = "127.0.0.1:\(refusing.port)"
        XCTAssertEqual(failures("/", host: "gone").1, "connect-failure/0/0/\(gone);connect-failure/0/1/\(gone);connect-failure/0/2/\(gone);")
    }
}
