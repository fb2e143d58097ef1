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

    func test_random_coversEveryEndpoint_andEmptyClusterPicksNothing() {
        let b = BalancerState(seed: 3)
        let c = FakeCluster(policy: .random, count: 4)
        var seen = Set<Int>()
        for _ in 0..<200 { seen.insert(b.pick(c)!) }
        XCTAssertEqual(seen, [0, 1, 2, 3])
        XCTAssertNil(b.pick(FakeCluster(id: 1, policy: .roundRobin, count: 0)))
    }
}
