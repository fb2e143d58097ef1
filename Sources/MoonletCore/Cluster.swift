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
    /// Outlier detection, when the DestinationRule enables it.
    var outlierPolicy: OutlierPolicy? { get }
    /// A name stable across config reloads (ejection state is kept by it).
    var stableName: String { get }
}

/// DestinationRule `outlierDetection`, as the balancer applies it.
public struct OutlierPolicy: Sendable, Equatable {
    /// Consecutive 5xx (including locally generated 502/503/504) before ejection; 0 = off.
    public var consecutive5xxErrors = 0
    /// Consecutive 502/503/504 (and connect failures) before ejection; 0 = off.
    public var consecutiveGatewayErrors = 0
    /// Consecutive connect failures / resets before ejection; 0 = off.
    public var consecutiveLocalOriginFailures = 0
    public var intervalMs = 10_000
    public var baseEjectionTimeMs = 30_000
    public var maxEjectionPercent = 10
    /// Below this share of healthy hosts, balance over all of them (panic); 0 = never.
    public var minHealthPercent = 0
    public init() {}
    public var enabled: Bool { consecutive5xxErrors > 0 || consecutiveGatewayErrors > 0 || consecutiveLocalOriginFailures > 0 }
}

extension UpstreamCluster {
    public var outlierPolicy: OutlierPolicy? { nil }
    /// A name stable across config reloads (ejections survive them).
    public var stableName: String { "cluster-\(id)" }
}
