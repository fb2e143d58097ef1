/// Load-balancing algorithms of DestinationRule `loadBalancer.simple`.
public enum LBPolicy: String, Sendable {
    case roundRobin = "ROUND_ROBIN"
    /// Istio's default: power of two choices by active requests.
    case leastRequest = "LEAST_REQUEST"
    case random = "RANDOM"
    /// Connect to the address the request was sent to (not for routed streams).
    case passthrough = "PASSTHROUGH"
    /// UNSPECIFIED means Istio's default.
    public init?(istio: String) {
        if istio == "UNSPECIFIED" || istio == "LEAST_CONN" { self = .leastRequest; return }
        self.init(rawValue: istio)
    }
}

/// A set of endpoints the balancer picks from (one service subset), built at config
/// load and shared read-only by every event loop.
public protocol UpstreamCluster: AnyObject, Sendable {
    /// Dense id, unique within a snapshot: index of the per-loop balancer counters.
    var id: Int { get }
    var policy: LBPolicy { get }
    /// 0 = unlimited.
    var maxRequestsPerConnection: Int { get }
    var endpointCount: Int { get }
    /// Address and port of endpoint `i` for the cluster's service port.
    func endpoint(_ i: Int) -> (address: String, port: Int)
}
