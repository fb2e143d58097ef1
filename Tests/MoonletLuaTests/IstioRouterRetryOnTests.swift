import XCTest
import NIOCore
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// istio-router decides Istio's retryOn in `on_upstream_failure`: for every condition
/// set and every failure, its verdict is what the native RetrySpec would decide.
final class IstioRouterRetryOnTests: RouterHarness {
    func verdict(_ retryOn: String?, _ kind: UpstreamFailureKind, status: Int, grpcStatus: Int = -1) throws -> RetryVerdict {
        let raw = "GET / HTTP/1.1\r\nHost: svc\r\n\r\n"
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: raw)) else { fatalError() }
        nextID += 1
        let s = ProxyStream(id: nextID, request: h, source: PeerInfo(address: "10.1.2.3:4567"), filterCount: 0, startNanos: 0)
        s.config = snap
        s.route.retry = retryOn.map { RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: $0) }
        defer { chain.runLog(s); runtime.endStream(s) }
        return chain.runUpstreamFailure(s, UpstreamFailureInfo(kind: kind, status: status, attempt: 0, endpoint: "10.0.0.1:9001", grpcStatus: grpcStatus))
    }

    func test_theRoutersRetryOnVerdicts_matchTheNativePolicy_forEveryConditionAndFailure() throws {
        try configure(vs: Self.vs("  - route: [{destination: {host: svc}}]\n"))
        XCTAssertTrue(chain.wantsUpstreamFailure, "istio-router has the phase")
        let policies = ["5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx", "503", "500,502",
                        "retriable-status-codes", "5xx,connect-failure", "gateway-error,reset", "connect-failure,refused-stream,503", ""]
        let outcomes: [(UpstreamFailureKind, Int)] = [(.connectFailure, 0), (.reset, 0), (.refusedStream, 0), (.timeout, 0),
                                                       (.gatewayError, 502), (.gatewayError, 503), (.gatewayError, 504),
                                                       (.status5xx, 500), (.status5xx, 501), (.status5xx, 599)]
        var checked = 0
        for retryOn in policies {
            let spec = RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: retryOn)
            for (kind, status) in outcomes {
                let native: Bool
                switch kind {
                case .connectFailure: native = spec.retries(connectFailure: true)
                case .reset: native = spec.retries(connectFailure: false)
                case .refusedStream: native = spec.refusedStream || spec.retries(connectFailure: false)
                case .timeout: native = spec.retries(status: 504)
                default: native = spec.retries(status: status)
                }
                let got = try verdict(retryOn, kind, status: status)
                XCTAssertEqual(got, native ? .retry : .noRetry, "retryOn \"\(retryOn)\", \(kind.rawValue) \(status)")
                checked += 1
            }
        }
        XCTAssertEqual(checked, policies.count * outcomes.count)
        XCTAssertEqual(try verdict(nil, .gatewayError, status: 503), .noRetry, "no retry policy: no retry")
    }

    func test_theRoutersGRPCVerdicts_matchTheNativePolicy_forEveryGRPCStatus() throws {
        try configure(vs: Self.vs("  - route: [{destination: {host: svc}}]\n"))
        for retryOn in ["unavailable", "cancelled,deadline-exceeded", "internal,resource-exhausted,5xx", "5xx,connect-failure",
                        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"] {
            let spec = RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: retryOn)
            for code in 1...16 {
                let got = try verdict(retryOn, .grpcStatus, status: 200, grpcStatus: code)
                XCTAssertEqual(got, spec.retries(grpcStatus: code) ? .retry : .noRetry, "retryOn \"\(retryOn)\", grpc-status \(code)")
            }
        }
    }
}
