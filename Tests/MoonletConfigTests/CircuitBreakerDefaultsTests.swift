import XCTest
@testable import MoonletConfig

/// Istio's circuit-breaker thresholds where a DestinationRule leaves them unset.
final class CircuitBreakerDefaultsTests: XCTestCase {
    func test_unsetOrZeroThresholds_areIstios2To32Minus1_setOnesApply() {
        let unset = ClusterPolicy.from(nil, subset: nil)
        let max = 4_294_967_295
        XCTAssertEqual([unset.maxConnections, unset.maxPendingRequests, unset.maxRequests, unset.maxRetries], [max, max, max, max])
        let zero = ClusterPolicy.from(.map([("connectionPool", .map([("http", .map([("maxRetries", .int(0)), ("http2MaxRequests", .int(0))]))]))]), subset: nil)
        XCTAssertEqual(zero.maxRetries, max, "0 is unset, as Istio reads it")
        XCTAssertEqual(zero.maxRequests, max)
        let set = ClusterPolicy.from(.map([("connectionPool", .map([
            ("tcp", .map([("maxConnections", .int(100))])),
            ("http", .map([("maxRetries", .int(5)), ("http1MaxPendingRequests", .int(50)), ("http2MaxRequests", .int(7))])),
        ]))]), subset: nil)
        XCTAssertEqual([set.maxConnections, set.maxPendingRequests, set.maxRequests, set.maxRetries], [100, 50, 7, 5])
    }
}
