import XCTest
import MoonletCore
@testable import MoonletBalancer

final class FakeCluster: UpstreamCluster, @unchecked Sendable {
    let id: Int
    let policy: LBPolicy
    let maxRequestsPerConnection = 0
    let endpointCount: Int
    init(id: Int = 0, policy: LBPolicy, count: Int) { self.id = id; self.policy = policy; self.endpointCount = count }
    func endpoint(_ i: Int) -> (address: String, port: Int) { ("10.0.0.\(i)", 80) }
    func poolKey(_ i: Int) -> String { "10.0.0.\(i):80" }
}

final class BalancerTests: XCTestCase {
    func test_roundRobin_spreadsEvenly() {
        let b = BalancerState(seed: 1)
        let c = FakeCluster(policy: .roundRobin, count: 3)
        var counts = [0, 0, 0]
        for _ in 0..<300 { let i = b.pick(c)!; counts[i] += 1; b.done(c, i) }
        XCTAssertEqual(counts, [100, 100, 100])
    }

    func test_leastRequest_favoursTheLessLoadedOfTwo() {
        let b = BalancerState(seed: 2)
        let c = FakeCluster(policy: .leastRequest, count: 2)
        // Endpoint 0 is slow: its requests stay active.
        var picks = [0, 0]
        for _ in 0..<200 {
            let i = b.pick(c)!
            picks[i] += 1
            if i == 1 { b.done(c, i) }   // endpoint 1 answers at once
        }
        XCTAssertLessThanOrEqual(picks[0], 2, "the slow endpoint gets at most its first requests: \(picks)")
        XCTAssertEqual(b.activeRequests(c, 1), 0)
    }

    func test_endpointChosenWithoutAPick_countsActiveUntilDone_soLeastRequestSeesIt() {
        let b = BalancerState(seed: 3)
        let c = FakeCluster(policy: .leastRequest, count: 2)
        b.use(c, 0)
        b.use(c, 0)
        b.use(c, 5)   // not an endpoint: ignored
        XCTAssertEqual(b.activeRequests(c, 0), 2)
        for _ in 0..<20 { let i = b.pick(c)!; XCTAssertEqual(i, 1); b.done(c, i) }
        b.done(c, 0); b.done(c, 0)
        XCTAssertEqual(b.activeRequests(c, 0), 0)
    }

    func test_random_coversEveryEndpoint_andEmptyClusterPicksNothing() {
        let b = BalancerState(seed: 3)
        let c = FakeCluster(policy: .random, count: 4)
        var seen = Set<Int>()
        for _ in 0..<200 { seen.insert(b.pick(c)!) }
        XCTAssertEqual(seen, [0, 1, 2, 3])
        XCTAssertNil(b.pick(FakeCluster(id: 1, policy: .roundRobin, count: 0)))
    }
}

final class OutlierCluster: UpstreamCluster, @unchecked Sendable {
    let id: Int
    let policy: LBPolicy = .roundRobin
    let maxRequestsPerConnection = 0
    let endpointCount: Int
    let outlierPolicy: OutlierPolicy?
    let stableName: String
    init(id: Int, count: Int, policy: OutlierPolicy) {
        self.id = id; self.endpointCount = count; self.outlierPolicy = policy; self.stableName = "test-\(UUID().uuidString)"
    }
    func endpoint(_ i: Int) -> (address: String, port: Int) { ("10.0.0.\(i)", 80) }
    func poolKey(_ i: Int) -> String { "10.0.0.\(i):80" }
}

final class OutlierTests: XCTestCase {
    func policy(_ base: Int = 1000) -> OutlierPolicy {
        var p = OutlierPolicy()
        p.consecutive5xxErrors = 5; p.baseEjectionTimeMs = base; p.maxEjectionPercent = 50; p.intervalMs = 10
        return p
    }

    func test_fiveConsecutive5xx_ejectTheHost_andItGetsNoTraffic() {
        let b = BalancerState(seed: 4)
        let c = OutlierCluster(id: 0, count: 2, policy: policy())
        for _ in 0..<4 { b.report(c, 0, status: 500) }
        b.report(c, 0, status: 200)            // a success resets the count
        for _ in 0..<4 { b.report(c, 0, status: 503) }
        XCTAssertEqual(b.outlier(c)!.ejectedCount(now: monotonicNanos()), 0)
        b.report(c, 0, status: 500)
        XCTAssertTrue(b.outlier(c)!.isEjected(0, now: monotonicNanos()))
        for _ in 0..<50 { let i = b.pick(c)!; XCTAssertEqual(i, 1); b.done(c, i) }
    }

    func test_maxEjectionPercent_neverEjectsMoreThanHalf() {
        let b = BalancerState(seed: 5)
        let c = OutlierCluster(id: 0, count: 2, policy: policy())
        for _ in 0..<10 { b.report(c, 0, status: 500); b.report(c, 1, status: 500) }
        XCTAssertEqual(b.outlier(c)!.ejectedCount(now: monotonicNanos()), 1)
    }

    func test_ejectedHostReturns_afterEjectionTime_thatGrowsWithEachEjection() {
        let t0 = monotonicNanos()
        let o = OutlierState(policy: policy(100), count: 4, epoch: t0)
        for _ in 0..<5 { o.record(0, status: 500, now: t0) }
        XCTAssertTrue(o.isEjected(0, now: t0 + 50_000_000))
        XCTAssertFalse(o.isEjected(0, now: t0 + 150_000_000))
        // Failing again as soon as it is back: no healthy interval to decay the multiplier.
        let t1 = t0 + 100_000_000
        for _ in 0..<5 { o.record(0, status: 500, now: t1) }
        XCTAssertTrue(o.isEjected(0, now: t1 + 150_000_000), "second ejection lasts 2 x base")
        XCTAssertFalse(o.isEjected(0, now: t1 + 250_000_000))
    }

    func test_ejectedHostReturnsOnTheFirstSweepAfterItsEjectionTime_andItsMultiplierDecaysWhileHealthy() {
        var p = policy(250); p.intervalMs = 100
        let t0: UInt64 = 1_000_000_000_000
        let o = OutlierState(policy: p, count: 4, epoch: t0)
        let ms: UInt64 = 1_000_000
        for _ in 0..<5 { o.record(0, status: 500, now: t0 + 10 * ms) }
        // Due at 260 ms; the sweep at 300 ms returns it.
        XCTAssertTrue(o.isEjected(0, now: t0 + 290 * ms))
        XCTAssertFalse(o.isEjected(0, now: t0 + 300 * ms))
        // Healthy for five sweeps: the multiplier is back to zero, so the next
        // ejection lasts one base time again (not two).
        for _ in 0..<5 { o.record(0, status: 500, now: t0 + 800 * ms) }
        XCTAssertTrue(o.isEjected(0, now: t0 + 1_050 * ms))
        XCTAssertFalse(o.isEjected(0, now: t0 + 1_100 * ms))
        // Ejected again right away: the multiplier grows (2 x 250 ms from 1100 -> 1600).
        for _ in 0..<5 { o.record(0, status: 500, now: t0 + 1_100 * ms) }
        XCTAssertTrue(o.isEjected(0, now: t0 + 1_550 * ms))
        XCTAssertFalse(o.isEjected(0, now: t0 + 1_600 * ms))
        XCTAssertEqual(o.totalEjections, 3)
    }

    func test_ejectionTime_isCappedAtEnvoysMaxEjectionTime() {
        var p = policy(200_000); p.intervalMs = 1000
        let t0: UInt64 = 1_000_000_000_000
        let o = OutlierState(policy: p, count: 4, epoch: t0)
        let s: UInt64 = 1_000_000_000
        for _ in 0..<5 { o.record(1, status: 500, now: t0) }
        for _ in 0..<5 { o.record(1, status: 500, now: t0 + 200 * s) } // returned at 200 s, ejected again: 2 x 200 s
        XCTAssertTrue(o.isEjected(1, now: t0 + 499 * s))
        XCTAssertFalse(o.isEjected(1, now: t0 + 500 * s), "capped at 300 s")
    }

    func test_connectFailures_countAsGatewayAndLocalOriginErrors() {
        var p = OutlierPolicy(); p.consecutiveGatewayErrors = 2; p.maxEjectionPercent = 100
        let b = BalancerState(seed: 7)
        let c = OutlierCluster(id: 0, count: 3, policy: p)
        b.report(c, 2, status: nil)
        b.report(c, 2, status: 502)
        XCTAssertTrue(b.outlier(c)!.isEjected(2, now: monotonicNanos()))
    }

    func test_allHostsEjected_withMinHealthPercentSet_isPanic_andTrafficStillFlows() {
        var p = policy(); p.maxEjectionPercent = 100; p.minHealthPercent = 50
        let b = BalancerState(seed: 8)
        let c = OutlierCluster(id: 0, count: 1, policy: p)
        for _ in 0..<5 { b.report(c, 0, status: 500) }
        XCTAssertTrue(b.outlier(c)!.panic(now: monotonicNanos()))
        XCTAssertEqual(b.pick(c), 0)
    }

    /// Istio's minHealthPercent default is 0: no panic mode, so with every host
    /// ejected nothing is picked (the proxy answers 503 UH), as Envoy with a 0% panic
    /// threshold does.
    func test_allHostsEjected_minHealthPercentUnset_noPanic_picksNothing() {
        var p = policy(); p.maxEjectionPercent = 100
        XCTAssertEqual(OutlierPolicy().minHealthPercent, 0)
        let b = BalancerState(seed: 8)
        let c = OutlierCluster(id: 0, count: 2, policy: p)
        for _ in 0..<5 { b.report(c, 0, status: 500); b.report(c, 1, status: 500) }
        XCTAssertEqual(b.outlier(c)!.ejectedCount(now: monotonicNanos()), 2)
        XCTAssertFalse(b.outlier(c)!.panic(now: monotonicNanos()))
        XCTAssertNil(b.pick(c))
    }

    /// minHealthPercent 50 with 4 hosts: one ejected leaves 75% healthy (ejection
    /// honoured), two ejected leave 50% (still not below), three leave 25% (panic).
    func test_minHealthPercent_panicsOnlyBelowTheHealthyShare() {
        var p = policy(); p.maxEjectionPercent = 100; p.minHealthPercent = 50
        let t0 = monotonicNanos()
        let o = OutlierState(policy: p, count: 4, epoch: t0)
        var panics: [Bool] = []
        for h in 0..<3 {
            for _ in 0..<5 { o.record(h, status: 500, now: t0) }
            panics.append(o.panic(now: t0 + 1))
        }
        XCTAssertEqual(panics, [false, false, true])
    }

    /// Envoy ejects while (ejected / hosts) < maxEjectionPercent: with three hosts and
    /// 50%, 1/3 = 33% is below it, so a second host can go (not max(1, 3*50/100) = 1).
    func test_threeHostsFiftyPercent_ejectsASecondHost_butNotAThird() {
        let t0 = monotonicNanos()
        let o = OutlierState(policy: policy(), count: 3, epoch: t0)
        for h in 0..<3 { for _ in 0..<5 { o.record(h, status: 500, now: t0) } }
        XCTAssertEqual(o.ejectedCount(now: t0 + 1), 2)
        XCTAssertTrue(o.isEjected(0, now: t0 + 1)); XCTAssertTrue(o.isEjected(1, now: t0 + 1))
        XCTAssertFalse(o.isEjected(2, now: t0 + 1), "2/3 = 67% is not below 50%")
    }

    func test_maxEjectionPercent_followsEnvoysShareTest() {
        // (hosts, maxEjectionPercent) -> hosts ejected when all of them fail.
        let cases: [(Int, Int, Int)] = [(3, 10, 1), (3, 34, 2), (3, 33, 1), (10, 10, 1), (10, 25, 3), (4, 100, 4), (5, 0, 0)]
        for (hosts, pct, want) in cases {
            var p = policy(); p.maxEjectionPercent = pct
            let t0 = monotonicNanos()
            let o = OutlierState(policy: p, count: hosts, epoch: t0)
            for h in 0..<hosts { for _ in 0..<5 { o.record(h, status: 500, now: t0) } }
            XCTAssertEqual(o.ejectedCount(now: t0 + 1), want, "\(hosts) hosts at \(pct)%")
        }
    }
}

final class RetrySpecTests: XCTestCase {
    func test_retryOn_parsesEnvoyConditionsAndCodes() {
        let r = RetrySpec(attempts: 3, perTryTimeoutMs: 200, retryOn: "gateway-error, connect-failure,409,retriable-4xx")
        XCTAssertTrue(r.retries(status: 502)); XCTAssertTrue(r.retries(status: 504)); XCTAssertTrue(r.retries(status: 409))
        XCTAssertFalse(r.retries(status: 500))
        XCTAssertTrue(r.retries(connectFailure: true)); XCTAssertTrue(r.retries(connectFailure: false))
        let five = RetrySpec(attempts: 1, perTryTimeoutMs: 0, retryOn: "5xx")
        XCTAssertTrue(five.retries(status: 500)); XCTAssertFalse(five.retries(status: 404))
    }

    func test_istioDefault_retriesConnectFailuresAnd503Only() {
        let d = RetrySpec.istioDefault
        XCTAssertEqual(d.attempts, 2)
        XCTAssertTrue(d.retries(connectFailure: true))
        XCTAssertFalse(d.retries(connectFailure: false))
        XCTAssertTrue(d.retries(status: 503))
        XCTAssertFalse(d.retries(status: 500))
    }
}

final class HashRingTests: XCTestCase {
    func owners(_ ring: HashRing, _ keys: [String]) -> [Int] { keys.map { ring.lookup(HashRing.hash($0), skip: { _ in false })! } }

    func test_addingAHost_movesAboutOneNthOfTheKeys() {
        let keys = (0..<5000).map { "user-\($0)" }
        let four = HashRing(keys: ["a", "b", "c", "d"], minimumRingSize: 1024)
        let five = HashRing(keys: ["a", "b", "c", "d", "e"], minimumRingSize: 1024)
        let before = owners(four, keys), after = owners(five, keys)
        let moved = zip(before, after).filter { $0 != $1 }.count
        XCTAssertEqual(Double(moved) / Double(keys.count), 0.2, accuracy: 0.08)
        XCTAssertTrue(zip(before, after).allSatisfy { $0 == $1 || $1 == 4 }, "keys only move to the new host")
    }

    func test_removingAHost_movesOnlyItsKeys() {
        let keys = (0..<5000).map { "k\($0)" }
        let three = HashRing(keys: ["a", "b", "c"], minimumRingSize: 1024)
        let two = HashRing(keys: ["a", "b"], minimumRingSize: 1024)
        for (b, a) in zip(owners(three, keys), owners(two, keys)) where b != 2 { XCTAssertEqual(a, b) }
    }

    func test_skippedHost_passesItsKeysToTheNextOnTheRing() {
        let ring = HashRing(keys: ["a", "b", "c"], minimumRingSize: 300)
        for k in 0..<200 { XCTAssertNotEqual(ring.lookup(HashRing.hash("x\(k)"), skip: { $0 == 1 }), 1) }
    }
}
