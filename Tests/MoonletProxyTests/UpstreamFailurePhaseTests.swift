import XCTest
import NIOCore
import NIOConcurrencyHelpers
import NIOHTTP1
import MoonletCore
@testable import MoonletProxy

/// A native filter that answers on_upstream_failure with a fixed verdict and records
/// what it was told (called on the proxy's loop; read by the test after the reply).
final class FailureRecorder: Filter {
    let name = "failure-recorder"
    let verdict: RetryVerdict
    let seen = NIOLockedValueBox<[UpstreamFailureInfo]>([])
    init(_ verdict: RetryVerdict) { self.verdict = verdict }
    var wantsUpstreamFailure: Bool { true }
    func onUpstreamFailure(_ stream: ProxyStream, _ failure: UpstreamFailureInfo) -> RetryVerdict {
        seen.withLockedValue { $0.append(failure) }
        return verdict
    }
}

final class UpstreamFailurePhaseTests: XCTestCase {
    // MARK: decision (no sockets)

    func test_outcomes_mapToFailureKinds_andNonFailuresHaveNone() {
        XCTAssertEqual(AttemptOutcome.response(status: 502).failureKind, .gatewayError)
        XCTAssertEqual(AttemptOutcome.response(status: 503).failureKind, .gatewayError)
        XCTAssertEqual(AttemptOutcome.response(status: 504).failureKind, .gatewayError)
        XCTAssertEqual(AttemptOutcome.response(status: 500).failureKind, .status5xx)
        XCTAssertEqual(AttemptOutcome.response(status: 500).failureStatus, 500)
        XCTAssertNil(AttemptOutcome.response(status: 404).failureKind)
        XCTAssertNil(AttemptOutcome.response(status: 200).failureKind)
        XCTAssertEqual(AttemptOutcome.perTryTimeout.failureKind, .timeout)
        XCTAssertEqual(AttemptOutcome.perTryTimeout.failureStatus, 0)
        XCTAssertEqual(AttemptOutcome.failed(.connectFailed("x")).failureKind, .connectFailure)
        XCTAssertEqual(AttemptOutcome.failed(.reset).failureKind, .reset)
        XCTAssertEqual(AttemptOutcome.failed(.refusedStream).failureKind, .refusedStream)
        XCTAssertEqual(AttemptOutcome.failed(.protocolError("x")).failureKind, .reset)
    }

    func test_verdicts_overrideTheRoutePolicy_andRetryWithoutPolicyUsesIstiosDefault() {
        let on5xx = RetrySpec(attempts: 3, perTryTimeoutMs: 0, retryOn: "5xx")
        let r500 = AttemptOutcome.response(status: 500)
        XCTAssertEqual(RetryDecision.attempts(verdict: .routePolicy, outcome: r500, policy: on5xx), 3)
        XCTAssertEqual(RetryDecision.attempts(verdict: .noRetry, outcome: r500, policy: on5xx), 0)
        XCTAssertEqual(RetryDecision.attempts(verdict: .routePolicy, outcome: r500, policy: .istioDefault), 0, "Istio's default does not retry 500")
        XCTAssertEqual(RetryDecision.attempts(verdict: .retry, outcome: r500, policy: .istioDefault), RetrySpec.istioDefault.attempts)
        XCTAssertEqual(RetryDecision.attempts(verdict: .retry, outcome: r500, policy: nil), RetrySpec.istioDefault.attempts)
        XCTAssertEqual(RetryDecision.attempts(verdict: .routePolicy, outcome: r500, policy: nil), 0)
        XCTAssertEqual(RetryDecision.attempts(verdict: .routePolicy, outcome: .failed(.refusedStream), policy: .istioDefault), 2)
    }

    // MARK: through the proxy

    func serviceYAML(_ ports: [Int], retries: String = "") -> String {
        meshService("uf", ports: ports, trafficPolicy: "{loadBalancer: {simple: ROUND_ROBIN}}",
                    extra: "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: uf}\nspec:\n  hosts: [uf]\n  http:\n  - route: [{destination: {host: uf}}]\n\(retries)\n")
    }

    /// Adds `f` to the chain of every loop (after the config's filters).
    func install(_ f: Filter, _ px: ProxyFixture) throws {
        for ctx in px.server.contexts {
            try ctx.loop.submit { ctx.chain = FilterChain(ctx.chain.filters + [f]) }.wait()
        }
    }

    func test_filterSaysRetry_a500IsRetried_whereTheRoutePolicyWouldNot_andSeesKindStatusAttemptEndpoint() throws {
        let calls = NIOLockedValueBox(0)
        let up = try TestUpstream { _ in calls.withLockedValue { $0 += 1 }; return TestUpstream.Reply(status: .internalServerError, body: "boom") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: 1, files: ["uf.yaml": serviceYAML([up.port])], concurrency: 1)
        defer { px.stop() }
        let f = FailureRecorder(.retry)
        try install(f, px)
        let c = try RawClient(port: px.outbound)
        c.send("GET / HTTP/1.1\r\nHost: uf\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 500)
        XCTAssertEqual(calls.withLockedValue { $0 }, 1 + RetrySpec.istioDefault.attempts, "retried up to Istio's default attempts")
        let seen = f.seen.withLockedValue { $0 }
        XCTAssertEqual(seen.map(\.attempt), Array(0...RetrySpec.istioDefault.attempts))
        XCTAssertTrue(seen.allSatisfy { $0.kind == .status5xx && $0.status == 500 && $0.endpoint == "127.0.0.1:\(up.port)" }, "\(seen)")
    }

    func test_filterSaysNoRetry_a503IsNotRetried_thoughTheRoutePolicyWould() throws {
        let calls = NIOLockedValueBox(0)
        let up = try TestUpstream { _ in calls.withLockedValue { $0 += 1 }; return TestUpstream.Reply(status: .serviceUnavailable, body: "busy") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: 1, files: ["uf.yaml": serviceYAML([up.port], retries: "    retries: {attempts: 3, retryOn: 5xx}")], concurrency: 1)
        defer { px.stop() }
        let f = FailureRecorder(.noRetry)
        try install(f, px)
        let c = try RawClient(port: px.outbound)
        c.send("GET / HTTP/1.1\r\nHost: uf\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 503)
        XCTAssertEqual(calls.withLockedValue { $0 }, 1)
        XCTAssertEqual(f.seen.withLockedValue { $0 }.map(\.kind), [.gatewayError])
    }

    func test_routePolicyVerdict_keepsTodaysDecision_andANonFailureNeverRunsThePhase() throws {
        let calls = NIOLockedValueBox(0)
        let up = try TestUpstream { r in
            calls.withLockedValue { $0 += 1 }
            return r.uri == "/missing" ? TestUpstream.Reply(status: .notFound, body: "no") : TestUpstream.Reply(status: .serviceUnavailable, body: "busy")
        }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: 1, files: ["uf.yaml": serviceYAML([up.port], retries: "    retries: {attempts: 1, retryOn: 5xx}")], concurrency: 1)
        defer { px.stop() }
        let f = FailureRecorder(.routePolicy)
        try install(f, px)
        let c = try RawClient(port: px.outbound)
        c.send("GET /missing HTTP/1.1\r\nHost: uf\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 404)
        XCTAssertTrue(f.seen.withLockedValue { $0 }.isEmpty, "a 404 is not a failure")
        c.send("GET / HTTP/1.1\r\nHost: uf\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 503)
        XCTAssertEqual(calls.withLockedValue { $0 }, 1 + 1 + 1, "404 once, 503 once and retried once")
        XCTAssertEqual(f.seen.withLockedValue { $0 }.map(\.attempt), [0, 1])
    }

    func test_connectFailure_isReported_andARetryGoesToTheOtherHost() throws {
        let dead = try RefusingPort(); let deadPort = dead.port
        defer { withExtendedLifetime(dead) {} }
        let live = try TestUpstream()
        defer { live.stop() }
        let px = try ProxyFixture(appPort: 1, files: ["uf.yaml": serviceYAML([deadPort, live.port])], concurrency: 1)
        defer { px.stop() }
        let f = FailureRecorder(.routePolicy)
        try install(f, px)
        let c = try RawClient(port: px.outbound)
        for _ in 0..<4 { c.send("GET / HTTP/1.1\r\nHost: uf\r\n\r\n"); XCTAssertEqual(c.read()?.status, 200) }
        let seen = f.seen.withLockedValue { $0 }
        XCTAssertFalse(seen.isEmpty)
        XCTAssertTrue(seen.allSatisfy { $0.kind == .connectFailure && $0.endpoint == "127.0.0.1:\(deadPort)" && $0.attempt == 0 }, "\(seen)")
    }

    func test_inboundWithoutRetryPolicy_filterSaysRetry_bodylessRequestIsSentAgain() throws {
        let calls = NIOLockedValueBox(0)
        let up = try TestUpstream { _ in
            let n = calls.withLockedValue { $0 += 1; return $0 }
            return n == 1 ? TestUpstream.Reply(status: .badGateway, body: "bad") : TestUpstream.Reply(body: "ok")
        }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, concurrency: 1)
        defer { px.stop() }
        let f = FailureRecorder(.retry)
        try install(f, px)
        let c = try RawClient(port: px.inbound)
        c.send("GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        let r = c.read()
        XCTAssertEqual(r?.status, 200)
        XCTAssertEqual(r?.body, "ok")
        XCTAssertEqual(calls.withLockedValue { $0 }, 2)
        XCTAssertEqual(f.seen.withLockedValue { $0 }.map(\.kind), [.gatewayError])
    }
}
