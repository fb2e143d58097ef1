import MoonletCore

/// How one upstream attempt ended, as the retry decision sees it.
enum AttemptOutcome {
    /// The upstream answered with this status (the head arrived); `grpcStatus`: the
    /// head's grpc-status (a trailers-only gRPC response), -1 when it has none.
    case response(status: Int, grpcStatus: Int = -1)
    /// The attempt failed before a response head.
    case failed(UpstreamFailure)
    /// The route's per-try timeout passed without a response head.
    case perTryTimeout

    /// The kind `on_upstream_failure` is told; nil when the outcome is not a failure (a
    /// response below 500), for which the phase never runs.
    var failureKind: UpstreamFailureKind? {
        switch self {
        case .response(let status, let grpcStatus):
            if status == 502 || status == 503 || status == 504 { return .gatewayError }
            if status >= 500 && status < 600 { return .status5xx }
            return grpcStatus > 0 ? .grpcStatus : nil
        case .perTryTimeout: return .timeout
        case .failed(let f):
            switch f {
            case .connectFailed: return .connectFailure
            case .refusedStream: return .refusedStream
            // A response that does not parse, or a connection closed before one, is a reset.
            case .reset, .protocolError: return .reset
            }
        }
    }

    /// The upstream's status for 5xx / gateway-error / grpc-status; 0 otherwise.
    var failureStatus: Int {
        if case .response(let status, let grpcStatus) = self, (status >= 500 && status < 600) || grpcStatus > 0 { return status }
        return 0
    }

    /// The response head's grpc-status, -1 when none.
    var grpcStatus: Int {
        if case .response(_, let g) = self { return g }
        return -1
    }

    /// The grpc-status (0-16) of a trailers-only gRPC response head, -1 otherwise. Only a
    /// head without a body (status 200, no body framing or content-length 0) is looked
    /// into, so other responses cost a comparison: Envoy's gRPC retryOn conditions read
    /// the response headers, which have grpc-status only in that form.
    @inline(__always)
    static func grpcStatus(of head: HTTPHead) -> Int {
        guard head.status == 200 else { return -1 }
        switch head.framing {
        case .none, .contentLength(0): break
        default: return -1
        }
        guard let i = head.firstIndex(lowercased: "grpc-status"), let code = GRPC.code(head.value(at: i)) else { return -1 }
        return code.rawValue
    }

    /// Whether a route's retry policy retries this outcome (the decision without filters).
    func isRetried(by spec: RetrySpec) -> Bool {
        switch self {
        case .response(let status, let grpcStatus): return spec.retries(status: status) || spec.retries(grpcStatus: grpcStatus)
        case .perTryTimeout: return spec.retries(status: 504)
        case .failed(.connectFailed): return spec.retries(connectFailure: true)
        case .failed(.refusedStream): return spec.refusedStream || spec.retries(connectFailure: false)
        case .failed(.reset), .failed(.protocolError): return spec.retries(connectFailure: false)
        }
    }
}

/// The retry decision of one failed attempt, from the filters' verdict
/// (FilterChain.runUpstreamFailure) and the route's policy.
enum RetryDecision {
    /// How many retries the stream may have in all for this outcome (0: none):
    /// - `.noRetry`: none;
    /// - `.retry`: the route's attempts, or Istio's default when the route has no policy;
    /// - `.routePolicy`: the route's attempts when its policy retries the outcome.
    /// The caller retries while its attempt count is below this, and only with a
    /// complete, replayable request and a free cluster retry slot (maxRetries).
    static func attempts(verdict: RetryVerdict, outcome: AttemptOutcome, policy: RetrySpec?) -> Int {
        switch verdict {
        case .noRetry: return 0
        case .retry: return policy?.attempts ?? RetrySpec.istioDefault.attempts
        case .routePolicy:
            guard let p = policy, outcome.isRetried(by: p) else { return 0 }
            return p.attempts
        }
    }

    /// "ip:port" of the endpoint the attempt went to ("" when none was chosen); an IPv6
    /// address in brackets.
    static func endpointAddress(_ s: ProxyStream) -> String {
        let host = s.route.endpoint.isEmpty ? s.route.host : s.route.endpoint
        let port = s.route.endpoint.isEmpty ? s.route.port : s.route.endpointPort
        guard !host.isEmpty, port > 0 else { return "" }
        return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}
