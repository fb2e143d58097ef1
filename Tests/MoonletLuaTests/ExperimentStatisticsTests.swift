import XCTest
@testable import MoonletLua

/// The stable hash of sticky keys and the tests behind /experiments verdicts.
final class ExperimentStatisticsTests: XCTestCase {
    func testStickyBucketIsStableAndSpreadsKeysEvenly() {
        XCTAssertEqual(ExperimentStatistics.bucket(plugin: "p", key: "alice"), ExperimentStatistics.bucket(plugin: "p", key: "alice"))
        var counts = [Int](repeating: 0, count: 100)
        for i in 0..<20_000 { counts[ExperimentStatistics.bucket(plugin: "authz", key: "user-\(i)")] += 1 }
        XCTAssertTrue(counts.allSatisfy { (120...280).contains($0) }, "\(counts)")
        // The plugin name is part of the hash: two experiments split users independently.
        let same = (0..<1000).filter { ExperimentStatistics.bucket(plugin: "a", key: "u\($0)") < 50 && ExperimentStatistics.bucket(plugin: "b", key: "u\($0)") < 50 }.count
        XCTAssertTrue((180...320).contains(same), "\(same)")
    }

    func testErrorRateVerdictIsWorseForTwentyPercentFailuresAndInconclusiveForNoise() {
        XCTAssertEqual(ExperimentStatistics.rateVerdict(control: (0, 300), candidate: (60, 300)), .worse)
        XCTAssertEqual(ExperimentStatistics.rateVerdict(control: (60, 300), candidate: (0, 300)), .better)
        XCTAssertEqual(ExperimentStatistics.rateVerdict(control: (3, 100), candidate: (4, 100)), .inconclusive)
        XCTAssertEqual(ExperimentStatistics.rateVerdict(control: (0, 0), candidate: (4, 100)), .inconclusive)
        XCTAssertEqual(ExperimentStatistics.rateVerdict(control: (0, 100), candidate: (0, 100)), .inconclusive)
    }

    func testLatencyVerdictFindsAShiftedDistributionAndNotTheSameOne() {
        let control = (0..<200).map { Double($0 % 100) }
        XCTAssertEqual(ExperimentStatistics.latencyVerdict(control: control, candidate: control.map { $0 + 30 }), .worse)
        XCTAssertEqual(ExperimentStatistics.latencyVerdict(control: control, candidate: control.map { $0 - 30 }), .better)
        XCTAssertEqual(ExperimentStatistics.latencyVerdict(control: control, candidate: control.reversed()), .inconclusive)
        XCTAssertEqual(ExperimentStatistics.latencyVerdict(control: [1, 2], candidate: [100, 200]), .inconclusive, "too few samples")
        XCTAssertEqual(ExperimentStatistics.quantile((1...100).map(Double.init), 0.5), 51)
        XCTAssertEqual(ExperimentStatistics.quantile((1...100).map(Double.init), 0.99), 99)
    }
}
