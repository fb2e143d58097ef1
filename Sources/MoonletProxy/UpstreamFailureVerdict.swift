import MoonletCore

/// The filters' say on retrying a failed upstream attempt (`Filter.onUpstreamFailure`,
/// Lua's `on_upstream_failure`), kept apart from the handler's retry mechanics.
extension DownstreamHandler {
    /// The failure an attempt's outcome is, or nil when it is none (a response below
    /// 500): filters are asked about failures only.
    static func failureKind(status: Int?, connectFailure: Bool, timedOut: Bool) -> UpstreamFailureKind? {
        if timedOut { return .timeout }
        guard let st = status else { return connectFailure ? .connectFailure : .reset }
        if st == 502 || st == 503 || st == 504 { return .gatewayError }
        if st >= 500 && st <= 599 { return .status5xx }
        return nil
    }

    /// "ip:port" ("[ipv6]:port") of the endpoint the current attempt went to; "" when
    /// none was chosen.
    static func attemptEndpoint(_ s: ProxyStream) -> String {
        let host = s.route.endpoint.isEmpty ? s.route.host : s.route.endpoint
        let port = s.route.endpoint.isEmpty ? s.route.port : s.route.endpointPort
        guard !host.isEmpty, port > 0 else { return "" }
        return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// Asks the stream's chain about a failed attempt; `.routePolicy` when the outcome
    /// is not a failure or no filter has the phase.
    func upstreamFailureVerdict(_ s: ProxyStream, status: Int?, connectFailure: Bool, timedOut: Bool) -> RetryVerdict {
        guard chain.wantsUpstreamFailure, let kind = Self.failureKind(status: status, connectFailure: connectFailure, timedOut: timedOut) else { return .routePolicy }
        let info = UpstreamFailureInfo(kind: kind, status: timedOut ? 0 : (status ?? 0), attempt: attempt, endpoint: Self.attemptEndpoint(s))
        return chain.runUpstreamFailure(s, info)
    }

    /// The retry policy that bounds a retry under `verdict`, or nil when the attempt's
    /// outcome stands: `.noRetry` never retries; `.retry` retries within the route's
    /// attempts, or Istio's default (2) when the route has no policy; `.routePolicy`
    /// retries what the route's policy retries.
    static func retryPolicy(_ verdict: RetryVerdict, route: RetrySpec?, status: Int?, connectFailure: Bool) -> RetrySpec? {
        switch verdict {
        case .noRetry: return nil
        case .retry: return route ?? .istioDefault
        case .routePolicy:
            guard let spec = route else { return nil }
            let allowed = status.map { spec.retries(status: $0) } ?? spec.retries(connectFailure: connectFailure)
            return allowed ? spec : nil
        }
    }
}
