import XCTest
import NIOCore
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// `s.route` written by a filter (cluster, endpoint, retry, timeout) and the
/// `on_upstream_failure` phase, without sockets.
extension LuaFilterTests {
    static let steeringConfig = """
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: svc, namespace: default}
    spec:
      hosts: [svc]
      resolution: STATIC
      ports: [{number: 8080, name: http}]
      workloadSelector: {labels: {app: svc}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {name: svc-v1, namespace: default}
    spec: {address: 10.0.0.1, ports: {http: 9001}, labels: {app: svc, version: v1}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {name: svc-v2, namespace: default}
    spec: {address: "fd00::2", ports: {http: 9002}, labels: {app: svc, version: v2}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {name: svc, namespace: default}
    spec:
      host: svc
      trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
      subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """

    func steeringSnapshot() throws -> ConfigSnapshot {
        let d = dir! + "/config"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        try Self.steeringConfig.write(toFile: d + "/svc.yaml", atomically: true, encoding: .utf8)
        return try ConfigLoader().load(paths: [d], namespace: "default", labels: [:]).get()
    }

    /// Runs `on_request` code of a fail-open plugin on a stream that started with the
    /// steering snapshot; returns the stream and the plugin's last error.
    func steer(_ code: String, headers: String = "", line: UInt = #line) throws -> (ProxyStream, String?) {
        let name = "steer\(line)_\(nextID)"
        let c = try chain([spec(name, "return { on_request = function(s) \(code) end }", fail: .failOpen)])
        let s = stream("GET /p HTTP/1.1\r\nHost: svc\r\n\(headers)\r\n")
        s.config = try steeringSnapshot()
        XCTAssertEqual(c.runRequest(s), .continue, line: line)
        let err = host.statuses().first { $0.name == name }?.lastError
        finish(s, c)
        return (s, err)
    }

    func test_routeCluster_setsTheWholeUpstreamSide_fromAnyFormOfTheName() throws {
        for name in ["outbound|8080|v1|svc.default.svc.cluster.local", "outbound|8080|v1|svc", "outbound|8080|v1|svc.default"] {
            let (s, err) = try steer("""
            s.route.endpoint = nil
            s.route.cluster = "\(name)"
            s.request.headers:set("x-read", s.route.cluster .. " " .. s.route.host .. " " .. s.route.subset .. " " .. s.route.port .. " " .. s.destination.service)
            """, headers: "x-user: alice\r\n")
            XCTAssertNil(err, name)
            XCTAssertEqual(s.request.first("x-read"), "outbound|8080|v1|svc.default.svc.cluster.local svc.default.svc.cluster.local v1 8080 svc.default.svc.cluster.local")
            let c = try XCTUnwrap(s.route.upstreamCluster as? ClusterInfo)
            XCTAssertEqual(c.name, "outbound|8080|v1|svc.default.svc.cluster.local")
            XCTAssertEqual(s.route.endpointIndex, -1)
            XCTAssertEqual(s.route.hashKey, HashRing.hash("alice"), "the DestinationRule's consistent-hash key is computed for the new cluster")
        }
    }

    func test_routeCluster_unknownName_raisesNamingIt_andLeavesTheRouteAlone() throws {
        let (s, err) = try steer(#"s.route.cluster = "outbound|8080|v9|svc""#)
        XCTAssertTrue(err?.contains("unknown cluster 'outbound|8080|v9|svc'") ?? false, err ?? "no error")
        XCTAssertEqual(s.route.cluster, "")
        XCTAssertNil(s.route.upstreamCluster)
        let (_, err2) = try steer(#"s.route.cluster = "svc""#)
        XCTAssertTrue(err2?.contains("outbound|PORT|SUBSET|HOST") ?? false, err2 ?? "no error")
    }

    func test_routeEndpoint_overridesThePick_onlyWithAnEndpointOfTheCluster() throws {
        let (s, err) = try steer("""
        s.route.cluster = "outbound|8080||svc"
        s.route.endpoint = "[FD00::2]:9002"
        s.request.headers:set("x-read", s.route.endpoint)
        """)
        XCTAssertNil(err)
        XCTAssertEqual(s.request.first("x-read"), "[fd00::2]:9002")
        XCTAssertEqual(s.route.endpointIndex, 1)
        XCTAssertEqual(s.route.endpointPort, 9002)
        let (out, err2) = try steer("""
        s.route.cluster = "outbound|8080|v1|svc"
        s.route.endpoint = "[fd00::2]:9002"
        """)
        XCTAssertTrue(err2?.contains("is not an endpoint of cluster 'outbound|8080|v1|svc.default.svc.cluster.local'") ?? false, err2 ?? "no error")
        XCTAssertEqual(out.route.endpoint, "")
        XCTAssertEqual(out.route.endpointIndex, -1)
        let (_, err3) = try steer(#"s.route.endpoint = "10.0.0.1:9001""#)
        XCTAssertTrue(err3?.contains("set route.cluster first") ?? false, err3 ?? "no error")
        for bad in ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:x", "fd00::2:9002", "[fd00::2]9002"] {
            let (_, e) = try steer("s.route.cluster = 'outbound|8080||svc'; s.route.endpoint = '\(bad)'")
            XCTAssertTrue(e?.contains("route.endpoint must be") ?? false, "\(bad): \(e ?? "no error")")
        }
    }

    /// A port NIO's address code would trap on (the whole proxy, not the stream) is refused.
    func test_routePort_outside0To65535_isRefused() throws {
        for bad in ["70000", "-1", "math.maxinteger"] {
            let (_, e) = try steer("s.route.port = \(bad)")
            XCTAssertTrue(e?.contains("route.port must be an integer 0-65535") ?? false, "\(bad): \(e ?? "no error")")
        }
        let (s, e) = try steer("s.route.port = 8443")
        XCTAssertNil(e)
        XCTAssertEqual(s.route.port, 8443)
    }

    func test_passthroughCluster_takesAnyIPEndpoint_andNoName() throws {
        let (s, err) = try steer("""
        s.route.cluster = "PassthroughCluster"
        s.route.endpoint = "192.0.2.7:8443"
        s.request.headers:set("x-read", s.route.cluster .. " " .. s.route.endpoint)
        """)
        XCTAssertNil(err)
        XCTAssertEqual(s.request.first("x-read"), "PassthroughCluster 192.0.2.7:8443")
        XCTAssertNil(s.route.upstreamCluster)
        XCTAssertEqual(s.route.endpoint, "192.0.2.7")
        XCTAssertEqual(s.route.endpointPort, 8443)
        let (_, err2) = try steer("s.route.cluster = 'PassthroughCluster'; s.route.endpoint = 'example.com:80'")
        XCTAssertTrue(err2?.contains("PassthroughCluster needs an IP address") ?? false, err2 ?? "no error")
    }

    func test_routeRetry_readsBackInCanonicalForm_andNilRemovesIt() throws {
        let (s, err) = try steer("""
        s.route.retry = { attempts = 3, per_try_timeout_ms = 250, retry_on = "reset, 5xx,503" }
        local r = s.route.retry
        s.request.headers:set("x-read", r.attempts .. " " .. r.per_try_timeout_ms .. " " .. r.retry_on)
        s.route.retry = { attempts = 1 }
        s.request.headers:set("x-default", s.route.retry.retry_on .. " " .. s.route.retry.per_try_timeout_ms)
        """)
        XCTAssertNil(err)
        XCTAssertEqual(s.request.first("x-read"), "3 250 5xx,reset,503")
        XCTAssertEqual(s.request.first("x-default"), "connect-failure,refused-stream,cancelled,unavailable,503 0")
        XCTAssertEqual(s.route.retry, RetrySpec(attempts: 1, perTryTimeoutMs: 0, retryOn: "connect-failure,refused-stream,cancelled,unavailable,503"))
        let (cleared, err2) = try steer("""
        s.route.retry = { attempts = 2 }
        s.route.retry = nil
        s.request.headers:set("x-read", tostring(s.route.retry))
        """)
        XCTAssertNil(err2)
        XCTAssertNil(cleared.route.retry)
        XCTAssertEqual(cleared.request.first("x-read"), "nil")
    }

    func test_routeRetryAndTimeout_refuseValuesOutOfBounds_andNameUnknownConditionsAndFields() throws {
        let cases: [(String, String)] = [
            ("s.route.retry = { attempts = 11 }", "attempts must be an integer 0-10"),
            ("s.route.retry = { attempts = -1 }", "attempts must be an integer 0-10"),
            ("s.route.retry = { attempts = 1.5 }", "attempts must be an integer 0-10"),
            ("s.route.retry = { per_try_timeout_ms = 10 }", "attempts is required"),
            ("s.route.retry = { attempts = 1, per_try_timeout_ms = 3600001 }", "per_try_timeout_ms must be an integer"),
            ("s.route.retry = { attempts = 1, retry_on = '5xx,sometimes' }", "unknown condition 'sometimes'"),
            ("s.route.retry = { attempts = 1, retries = 2 }", "unknown field 'retries'"),
            ("s.route.retry = { attempts = 1, [1] = 2 }", "field names must be strings"),
            ("s.route.retry = 3", "route.retry must be a table"),
            ("s.route.timeout_ms = -1", "timeout_ms must be an integer 0-86400000"),
            ("s.route.timeout_ms = 86400001", "timeout_ms must be an integer 0-86400000"),
        ]
        for (code, message) in cases {
            let (s, err) = try steer(code)
            XCTAssertTrue(err?.contains(message) ?? false, "\(code): \(err ?? "no error")")
            XCTAssertNil(s.route.retry, code)
            XCTAssertEqual(s.route.timeoutMs, 0, code)
        }
        let (s, err) = try steer("s.route.timeout_ms = 1500")
        XCTAssertNil(err)
        XCTAssertEqual(s.route.timeoutMs, 1500)
    }

    func test_retryConstants_areInTheMoonletModule_andReadOnly() throws {
        let (s, err) = try steer("s.request.headers:set('x-read', tostring(moonlet.RETRY ~= moonlet.NO_RETRY and moonlet.RETRY ~= nil and moonlet.NO_RETRY ~= nil))")
        XCTAssertNil(err)
        XCTAssertEqual(s.request.first("x-read"), "true")
        let (_, err2) = try steer("moonlet.RETRY = 'no_retry'")
        XCTAssertNotNil(err2)
    }

    // MARK: on_upstream_failure

    func failureChain(_ bodies: [String], fail: FailStrategy = .failClose) throws -> (FilterChain, [String]) {
        let names = bodies.indices.map { "fail\(nextID)_\($0)" }
        let c = try chain(zip(names, bodies).map { spec($0, "return { on_upstream_failure = function(s, conf, failure) \($1) end }", fail: fail) })
        return (c, names)
    }

    func test_onUpstreamFailure_verdicts_theFirstInChainOrderWins() throws {
        let info = UpstreamFailureInfo(kind: .gatewayError, status: 503, attempt: 0, endpoint: "10.0.0.1:9001")
        for (bodies, want) in [
            (["return moonlet.RETRY"], RetryVerdict.retry),
            (["return moonlet.NO_RETRY"], .noRetry),
            (["return nil"], .routePolicy),
            (["return 'something else'"], .routePolicy),
            (["return", "return moonlet.NO_RETRY", "return moonlet.RETRY"], .noRetry),
            (["return moonlet.RETRY", "return moonlet.NO_RETRY"], .retry),
        ] as [([String], RetryVerdict)] {
            let (c, _) = try failureChain(bodies)
            XCTAssertTrue(c.wantsUpstreamFailure)
            let s = stream()
            XCTAssertEqual(c.runUpstreamFailure(s, info), want, "\(bodies)")
            finish(s, c)
        }
        // A chain without the phase does not ask for it.
        let plain = try chain([spec("plain\(nextID)", "return { on_request = function(s) end }")])
        XCTAssertFalse(plain.wantsUpstreamFailure)
    }

    func test_onUpstreamFailure_seesKindStatusAttemptAndEndpoint() throws {
        let (c, _) = try failureChain(["""
        s.vars.seen = (s.vars.seen or "") .. failure.kind .. "/" .. failure.status .. "/" .. failure.attempt .. "/" .. failure.endpoint .. ";"
        s.request.headers:set("x-seen", s.vars.seen)
        return moonlet.RETRY
        """])
        let s = stream()
        for info in [UpstreamFailureInfo(kind: .connectFailure, attempt: 0, endpoint: "10.0.0.1:9001"),
                     UpstreamFailureInfo(kind: .status5xx, status: 500, attempt: 1, endpoint: "[fd00::2]:9002"),
                     UpstreamFailureInfo(kind: .timeout, attempt: 2, endpoint: "")] {
            XCTAssertEqual(c.runUpstreamFailure(s, info), .retry)
        }
        XCTAssertEqual(s.request.first("x-seen"), "connect-failure/0/0/10.0.0.1:9001;5xx/500/1/[fd00::2]:9002;timeout/0/2/;")
        finish(s, c)
    }

    func test_onUpstreamFailure_errorIsRecordedAndDefersToTheRoute_evenWhenTheFilterFailsClosed() throws {
        let (c, names) = try failureChain(["error('boom')", "return moonlet.NO_RETRY"], fail: .failClose)
        let s = stream()
        XCTAssertEqual(c.runUpstreamFailure(s, UpstreamFailureInfo(kind: .reset, attempt: 0, endpoint: "")), .noRetry,
                       "the failing filter defers; the next one decides")
        XCTAssertNil(s.localReply, "the phase never fails the stream")
        XCTAssertTrue(host.statuses().first { $0.name == names[0] }?.lastError?.contains("on_upstream_failure") ?? false, "\(host.statuses())")
        let (alone, _) = try failureChain(["while true do end"], fail: .failClose)
        XCTAssertEqual(alone.runUpstreamFailure(s, UpstreamFailureInfo(kind: .reset, attempt: 0, endpoint: "")), .routePolicy)
        XCTAssertNil(s.localReply)
        finish(s, c)
    }

    func test_onUpstreamFailure_cannotChangeTheRouteOrAnswerLocally() throws {
        for body in ["s.route.timeout_ms = 5", "s.route.cluster = 'PassthroughCluster'", "s.route.retry = nil", "s:respond(500, 'x')", "moonlet.router.host(s)", "moonlet.router.reply(s, 503)"] {
            let (c, names) = try failureChain(["\(body); return moonlet.RETRY"], fail: .failClose)
            let s = stream()
            XCTAssertEqual(c.runUpstreamFailure(s, UpstreamFailureInfo(kind: .reset, attempt: 0, endpoint: "")), .routePolicy, body)
            XCTAssertNil(s.localReply, body)
            XCTAssertEqual(s.route.timeoutMs, 0, body)
            XCTAssertEqual(s.route.cluster, "", body)
            XCTAssertTrue(host.statuses().first { $0.name == names[0] }?.lastError?.contains("on_upstream_failure") ?? false, "\(body): \(host.statuses())")
            finish(s, c)
        }
    }
}
