import XCTest
import NIOCore
@testable import MoonletProxy
@testable import MoonletLua

/// A/B policy experiments: LuaPlugin variants, stickyBy, shadow, per-variant metrics,
/// /experiments verdicts and the guardrail, through real sockets.
final class ExperimentTests: XCTestCase {
    var up: TestUpstream!
    override func setUpWithError() throws { up = try TestUpstream() }
    override func tearDown() { up?.stop() }

    /// An arm that tags the response with the arm moonlet.variant() reports.
    static let tagging = "return { on_response = function(s) s.response.headers:set('x-arm', tostring(moonlet.variant())) end }"

    static func experiment(_ name: String = "exp", variants: [(String, Int)], extra: String = "") -> String {
        """
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata:
          name: \(name)
        spec:
          variants:
        \(variants.map { "  - {name: \($0.0), url: \"file://$DIR/\($0.0).lua\", weight: \($0.1)}" }.joined(separator: "\n"))
        \(extra)
        """
    }

    func json(_ port: Int, _ path: String) throws -> [String: Any] {
        let body = try XCTUnwrap(adminGet(port, path)).body
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any], body)
    }

    func variants(_ port: Int, plugin: String = "exp") throws -> [[String: Any]] {
        let all = try XCTUnwrap(try json(port, "/experiments")["experiments"] as? [[String: Any]])
        let e = try XCTUnwrap(all.first { $0["plugin"] as? String == plugin }, "\(all)")
        return try XCTUnwrap(e["variants"] as? [[String: Any]])
    }

    /// Polls until every stream so far has been logged (on_log runs after the last byte).
    func waitForRequests(_ port: Int, _ n: Int, plugin: String = "exp") throws {
        for _ in 0..<100 {
            let total = try variants(port, plugin: plugin).reduce(0) { $0 + ($1["requests"] as? Int ?? 0) }
            if total >= n { return }
            usleep(20_000)
        }
    }

    func testRandomStickyVariantsSplitStreamsByWeightOver1000Requests() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "control.lua": Self.tagging, "candidate.lua": Self.tagging,
            "exp.yaml": Self.experiment(variants: [("control", 70), ("candidate", 30)]),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        var counts: [String: Int] = [:]
        for _ in 0..<1000 {
            let r = try XCTUnwrap(get(c))
            XCTAssertEqual(r.status, 200)
            counts[r.header("x-arm") ?? "none", default: 0] += 1
        }
        XCTAssertEqual(Set(counts.keys), ["control", "candidate"])
        // 300 expected; a binomial(1000, 0.3) is within 240...360 with overwhelming probability.
        XCTAssertTrue((240...360).contains(counts["candidate"] ?? 0), "\(counts)")
        try waitForRequests(px.admin, 1000)
        let v = try variants(px.admin)
        XCTAssertEqual(v.map { $0["requests"] as? Int ?? 0 }, [counts["control"]!, counts["candidate"]!])
    }

    func testHeaderStickyAssignmentIsStableAndEqualAcrossTwoProxies() throws {
        let files = [
            "a.lua": Self.tagging, "b.lua": Self.tagging,
            "exp.yaml": Self.experiment(variants: [("a", 50), ("b", 50)], extra: "  stickyBy: header:x-user"),
        ]
        let p1 = try ProxyFixture(appPort: up.port, files: files)
        defer { p1.stop() }
        let p2 = try ProxyFixture(appPort: up.port, files: files)
        defer { p2.stop() }
        let c1 = try RawClient(port: p1.inbound), c2 = try RawClient(port: p2.inbound)
        var seen = Set<String>()
        for u in 0..<60 {
            let h = "x-user: user-\(u)\r\n"
            let first = try XCTUnwrap(get(c1, headers: h)?.header("x-arm"))
            XCTAssertEqual(get(c1, headers: h)?.header("x-arm"), first, "user-\(u) changed arm on the same sidecar")
            XCTAssertEqual(get(c2, headers: h)?.header("x-arm"), first, "user-\(u) got another arm on another sidecar")
            // The documented assignment: FNV-1a of plugin name, NUL, key; mod 100 against cumulative weights.
            XCTAssertEqual(first, ExperimentStatistics.bucket(plugin: "exp", key: "user-\(u)") < 50 ? "a" : "b")
            seen.insert(first)
        }
        XCTAssertEqual(seen, ["a", "b"])
    }

    func testVariantReturnsTheArmNameAndNilForAPluginWithoutVariants() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "only.lua": "return { on_request = function(s) s.request.headers:set('x-req-arm', tostring(moonlet.variant())) end, on_log = function(s) moonlet.shared('log'):set('exp-variant-log', tostring(moonlet.variant())) end }",
            "plain.lua": "return { on_response = function(s) s.response.headers:set('x-plain', tostring(moonlet.variant())) end }",
            "exp.yaml": Self.experiment(variants: [("only", 100)]),
            "plain.yaml": ProxyFixture.plugin("plain"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c))
        XCTAssertEqual(up.seen.first?.headers["x-req-arm"], ["only"])
        XCTAssertEqual(r.header("x-plain"), "nil")
        var logged: String?
        for _ in 0..<100 { logged = MoonletLuaShared.get("log", "exp-variant-log"); if logged != nil { break }; usleep(10_000) }
        XCTAssertEqual(logged, "only", "moonlet.variant() in on_log")
    }

    func testShadowNeverChangesTheResponseAndCountsDivergencesByKind() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "enforced.lua": "return { on_request = function(s) s.request.headers:set('x-enforced', '1') end }",
            "candidate.lua": """
            return { on_request = function(s)
              s.request.headers:set('x-enforced', '1')
              moonlet.shared('log'):set('exp-shadow-arm', tostring(moonlet.variant()))
              local p = s.request.path
              if p == '/deny' then return s:respond(403, 'denied by shadow') end
              if p == '/header' then s.request.headers:set('x-candidate', 'yes') end
              if p == '/route' then s.route.subset = 'v2' end
            end }
            """,
            "exp.yaml": """
            apiVersion: moonlet.io/v1alpha1
            kind: LuaPlugin
            metadata:
              name: exp
            spec:
              url: file://$DIR/enforced.lua
              shadow: {url: "file://$DIR/candidate.lua"}
            """,
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for (path, n) in [("/same", 3), ("/deny", 4), ("/header", 2), ("/route", 1)] {
            for _ in 0..<n {
                let r = try XCTUnwrap(get(c, path))
                XCTAssertEqual(r.status, 200, path)
                XCTAssertEqual(r.body, "hello")
            }
        }
        XCTAssertEqual(up.seen.count, 10)
        for s in up.seen {
            XCTAssertEqual(s.headers["x-enforced"], ["1"])
            XCTAssertFalse(s.headers.contains(name: "x-candidate"))
        }
        try waitForRequests(px.admin, 10)
        let all = try XCTUnwrap(try json(px.admin, "/experiments")["experiments"] as? [[String: Any]])
        let shadow = try XCTUnwrap(all.first?["shadow"] as? [String: Any])
        XCTAssertEqual(shadow["runs"] as? Int, 10)
        XCTAssertEqual(shadow["divergences"] as? [String: Int], ["respond": 4, "request_header": 2, "route": 1, "total": 7])
        XCTAssertEqual(MoonletLuaShared.get("log", "exp-shadow-arm"), "shadow", "moonlet.variant() in a shadow run")
        let prom = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(prom.contains("moonlet_experiment_shadow_divergences_total{plugin=\"exp\",variant=\"shadow\",kind=\"respond\"} 4"), prom)
    }

    func testPerVariantMetricsAreOnPrometheusWithPluginAndVariantLabels() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "a.lua": "return { on_request = function(s) if s.request.path == '/deny' then return s:respond(403, 'no') end end }",
            "b.lua": "return { on_request = function(s) error('boom') end }",
            "exp.yaml": Self.experiment(variants: [("a", 50), ("b", 50)], extra: "  stickyBy: header:x-user\n  failStrategy: FAIL_OPEN"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        // Users whose bucket falls in a and in b.
        let ua = (0..<100).first { ExperimentStatistics.bucket(plugin: "exp", key: "u\($0)") < 50 }!
        let ub = (0..<100).first { ExperimentStatistics.bucket(plugin: "exp", key: "u\($0)") >= 50 }!
        XCTAssertEqual(get(c, "/deny", headers: "x-user: u\(ua)\r\n")?.status, 403)
        XCTAssertEqual(get(c, "/", headers: "x-user: u\(ua)\r\n")?.status, 200)
        XCTAssertEqual(get(c, "/", headers: "x-user: u\(ub)\r\n")?.status, 200)
        try waitForRequests(px.admin, 3)
        let prom = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        for line in [
            "moonlet_experiment_requests_total{plugin=\"exp\",variant=\"a\"} 2",
            "moonlet_experiment_requests_total{plugin=\"exp\",variant=\"b\"} 1",
            "moonlet_experiment_responses_total{plugin=\"exp\",variant=\"a\",response_code_class=\"4xx\"} 1",
            "moonlet_experiment_responses_total{plugin=\"exp\",variant=\"a\",response_code_class=\"2xx\"} 1",
            "moonlet_experiment_local_replies_total{plugin=\"exp\",variant=\"a\"} 1",
            "moonlet_experiment_lua_errors_total{plugin=\"exp\",variant=\"b\"} 1",
            "moonlet_experiment_lua_errors_total{plugin=\"exp\",variant=\"a\"} 0",
            "moonlet_experiment_request_duration_milliseconds_count{plugin=\"exp\",variant=\"a\"} 2",
            "moonlet_experiment_request_duration_milliseconds_bucket{plugin=\"exp\",variant=\"b\",le=\"+Inf\"} 1",
            "moonlet_experiment_weight{plugin=\"exp\",variant=\"b\"} 50",
        ] {
            XCTAssertTrue(prom.contains(line), "missing \(line) in\n\(prom.split(separator: "\n").filter { $0.contains("experiment") }.joined(separator: "\n"))")
        }
        XCTAssertTrue(prom.contains("moonlet_experiment_lua_cpu_seconds_total{plugin=\"exp\",variant=\"a\"}"))
    }

    /// A candidate that answers 500 to one request in five (as a broken policy would).
    static let failing20 = """
    local n = 0
    return {
      on_request = function(s) n = n + 1; if n % 5 == 0 then return s:respond(500, 'candidate failed') end end,
      on_response = function(s) s.response.headers:set('x-arm', tostring(moonlet.variant())) end,
    }
    """

    func testExperimentsReportsAWorseErrorRateVerdictForACandidateFailing20Percent() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "control.lua": Self.tagging, "candidate.lua": Self.failing20,
            "exp.yaml": Self.experiment(variants: [("control", 50), ("candidate", 50)]),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for _ in 0..<600 { XCTAssertNotNil(get(c)) }
        try waitForRequests(px.admin, 600)
        let v = try variants(px.admin)
        XCTAssertEqual(v.map { $0["name"] as? String }, ["control", "candidate"])
        XCTAssertEqual(v[0]["error_rate"] as? Double, 0)
        let rate = try XCTUnwrap(v[1]["error_rate"] as? Double)
        XCTAssertEqual(rate, 0.2, accuracy: 0.01)
        let verdicts = try XCTUnwrap(v[1]["verdicts"] as? [String: String])
        XCTAssertEqual(verdicts["error_rate"], "worse")
        XCTAssertNotNil(verdicts["latency"])
        let latency = try XCTUnwrap(v[0]["latency_ms"] as? [String: Any])
        XCTAssertNotNil(latency["p50"] as? Double)
        XCTAssertNotNil(latency["p99"] as? Double)
        XCTAssertTrue(v[0]["verdicts"] is NSNull, "the control has no verdict")
    }

    func testGuardrailRollsBackAWorseCandidateToWeightZeroUntilTheConfigChanges() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "control.lua": Self.tagging, "candidate.lua": Self.failing20,
            "exp.yaml": Self.experiment(variants: [("control", 50), ("candidate", 50)],
                                        extra: "  guardrail: {metric: error_rate, maxIncrease: 0.01, minRequests: 100, action: rollback}"),
        ], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        var rolled: [String: Any] = [:]
        for _ in 0..<40 {
            for _ in 0..<50 { XCTAssertNotNil(get(c)) }
            let v = try variants(px.admin)
            if !(v[1]["rolled_back"] is NSNull) { rolled = v[1]; break }
        }
        XCTAssertEqual(rolled["weight"] as? Int, 0, "rolled back: \(rolled)")
        XCTAssertEqual(rolled["configured_weight"] as? Int, 50)
        XCTAssertTrue((rolled["rolled_back"] as? String ?? "").contains("error rate"))
        // Every loop applies it at its next publication; afterwards the control serves all.
        for _ in 0..<(2 * ExperimentFilter.publishEvery) { _ = get(c) }
        for _ in 0..<100 { XCTAssertEqual(get(c)?.header("x-arm"), "control") }
        let prom = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(prom.contains("moonlet_experiment_weight{plugin=\"exp\",variant=\"candidate\"} 0"))
        // A reload with the same config keeps the rollback; a changed config starts over.
        XCTAssertEqual(adminGet(px.admin, "/plugins/reload", method: "POST")?.status, 200)
        XCTAssertEqual(try variants(px.admin)[1]["weight"] as? Int, 0)
        try px.write("exp.yaml", Self.experiment(variants: [("control", 60), ("candidate", 40)]))
        XCTAssertEqual(adminGet(px.admin, "/plugins/reload", method: "POST")?.status, 200)
        let after = try variants(px.admin)
        XCTAssertEqual(after[1]["weight"] as? Int, 40)
        XCTAssertTrue(after[1]["rolled_back"] is NSNull)
    }

    func testAForkedIstioAuthzAsShadowCountsWhatANewRuleWouldDenyWithoutDenyingIt() throws {
        let original = try XCTUnwrap(BuiltinPlugins.source("istio-authz"))
        let px = try ProxyFixture(appPort: up.port, files: [
            "policy.yaml": """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: deny-admin, namespace: default}
            spec:
              action: DENY
              rules:
              - to: [{operation: {paths: ["/admin"]}}]
            """,
            // The builtin, exported, is the enforced filter; the fork adds a rule.
            "istio-authz.lua": original,
            "istio-authz-next.lua": """
            local base = require("istio-authz")
            local M = {}
            for k, v in pairs(base) do M[k] = v end
            function M.on_request(s, conf)
              if s.request.path == "/reports" then return s:respond(403, "RBAC: access denied") end
              return base.on_request(s, conf)
            end
            return M
            """,
            "authz.yaml": """
            apiVersion: moonlet.io/v1alpha1
            kind: LuaPlugin
            metadata:
              name: istio-authz
            spec:
              phase: AUTHZ
              url: file://$DIR/istio-authz.lua
              shadow: {url: "file://$DIR/istio-authz-next.lua"}
            """,
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for (path, n, status) in [("/admin", 2, 403), ("/reports", 3, 200), ("/ok", 4, 200)] {
            for _ in 0..<n { XCTAssertEqual(get(c, path)?.status, status, path) }
        }
        XCTAssertEqual(up.seen.filter { $0.uri == "/reports" }.count, 3, "the shadow denied nothing for real")
        try waitForRequests(px.admin, 9, plugin: "istio-authz")
        let all = try XCTUnwrap(try json(px.admin, "/experiments")["experiments"] as? [[String: Any]])
        let shadow = try XCTUnwrap(all.first { $0["plugin"] as? String == "istio-authz" }?["shadow"] as? [String: Any])
        XCTAssertEqual(shadow["runs"] as? Int, 9)
        XCTAssertEqual((shadow["divergences"] as? [String: Int])?["respond"], 3, "\(shadow)")
        XCTAssertEqual((shadow["divergences"] as? [String: Int])?["total"], 3, "\(shadow)")
    }

    func testAnArmThatWaitsOnMoonletHTTPCallKeepsItsArmAfterTheCallAndInLaterPhases() throws {
        let callee = try TestUpstream { _ in TestUpstream.Reply(status: .ok, body: "checked") }
        defer { callee.stop() }
        let arm = """
        return {
          on_request = function(s)
            local res, err = moonlet.http.call("http://127.0.0.1:\(callee.port)/check", { timeout_ms = 2000 })
            s.request.headers:set("x-after-call", tostring(moonlet.variant()) .. ":" .. (res and res.body or tostring(err)))
          end,
          on_response = function(s) s.response.headers:set("x-arm", tostring(moonlet.variant())) end,
        }
        """
        let px = try ProxyFixture(appPort: up.port, files: [
            "a.lua": arm, "b.lua": arm,
            "exp.yaml": Self.experiment(variants: [("a", 50), ("b", 50)], extra: "  stickyBy: header:x-user"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for u in 0..<10 {
            let expected = ExperimentStatistics.bucket(plugin: "exp", key: "w\(u)") < 50 ? "a" : "b"
            let r = try XCTUnwrap(get(c, headers: "x-user: w\(u)\r\n"))
            XCTAssertEqual(r.status, 200)
            XCTAssertEqual(r.header("x-arm"), expected)
            XCTAssertEqual(up.seen.last?.headers["x-after-call"], ["\(expected):checked"])
        }
    }

    func testConfigDumpShowsTheExperimentWithEachArmsSecretsRedacted() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "a.lua": Self.tagging, "b.lua": Self.tagging, "c.lua": Self.tagging,
            "exp.yaml": """
            apiVersion: moonlet.io/v1alpha1
            kind: LuaPlugin
            metadata:
              name: exp
            spec:
              variants:
              - {name: a, url: "file://$DIR/a.lua", weight: 80, pluginConfig: {apiKey: s3cret-a, mode: strict}}
              - {name: b, url: "file://$DIR/b.lua", weight: 20, pluginConfig: {apiKey: s3cret-b}}
              stickyBy: cookie:uid
              shadow: {url: "file://$DIR/c.lua", pluginConfig: {token: s3cret-c}}
            """,
        ])
        defer { px.stop() }
        let body = try XCTUnwrap(adminGet(px.admin, "/config_dump")).body
        XCTAssertFalse(body.contains("s3cret"), body)
        let dump = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any])
        let plugin = try XCTUnwrap((dump["lua_plugins"] as? [[String: Any]])?.first)
        let variants = try XCTUnwrap(plugin["variants"] as? [[String: Any]])
        XCTAssertEqual(variants.map { $0["name"] as? String }, ["a", "b"])
        XCTAssertEqual(variants.map { $0["weight"] as? Int }, [80, 20])
        XCTAssertEqual((variants[0]["pluginConfig"] as? [String: String])?["mode"], "strict")
        XCTAssertEqual(plugin["stickyBy"] as? String, "cookie:uid")
        XCTAssertNotNil(plugin["shadow"] as? [String: Any])
        // The cookie is the sticky key.
        let c = try RawClient(port: px.inbound)
        let key = (0..<100).first { ExperimentStatistics.bucket(plugin: "exp", key: "k\($0)") >= 80 }!
        for _ in 0..<3 { XCTAssertEqual(get(c, headers: "cookie: theme=dark; uid=k\(key)\r\n")?.header("x-arm"), "b") }
    }
}
