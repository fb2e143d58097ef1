/// Load-balancing algorithms of DestinationRule `loadBalancer.simple`.
public enum LBPolicy: String, Sendable {
    case roundRobin = "ROUND_ROBIN"
    /// Istio's default: power of two choices by active requests.
    case leastRequest = "LEAST_REQUEST"
    case random = "RANDOM"
    /// Connect to the address the request was sent to (not for routed streams).
    case passthrough = "PASSTHROUGH"
    /// consistentHash (ring hash; maglev is served by the same ring).
    case consistentHash = "CONSISTENT_HASH"
    /// UNSPECIFIED means Istio's default.
    public init?(istio: String) {
        if istio == "UNSPECIFIED" || istio == "LEAST_CONN" { self = .leastRequest; return }
        if istio == "CONSISTENT_HASH" { return nil }
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
    /// "address:port" of endpoint `i`, made at config load: the key of its connection pool.
    func poolKey(_ i: Int) -> String
    /// Outlier detection, when the DestinationRule enables it.
    var outlierPolicy: OutlierPolicy? { get }
    /// A name stable across config reloads (ejection state is kept by it).
    var stableName: String { get }
    /// connectionPool.tcp.maxConnections across the whole sidecar (Istio's default
    /// `CircuitBreakerDefaults.unlimited`).
    var maxConnections: Int { get }
    /// connectionPool.http.http1MaxPendingRequests: streams that may wait for a
    /// connection once maxConnections is reached (Istio's default
    /// `CircuitBreakerDefaults.unlimited`); beyond: 503 UO.
    var maxPendingRequests: Int { get }
    /// consistentHash: the endpoint owning `hash` on the ring, walking past endpoints
    /// for which `skip` is true (ejected ones). nil when the cluster has no ring.
    func hashPick(_ hash: UInt64, skip: (Int) -> Bool) -> Int?
    /// connectionPool.tcp.connectTimeout in ms (0: the listener default).
    var connectTimeoutMs: Int { get }
    /// connectionPool.http.maxRetries: concurrent retries across the sidecar (Istio's
    /// default `CircuitBreakerDefaults.unlimited`).
    var maxRetries: Int { get }
    /// connectionPool.http.http2MaxRequests: active requests across the sidecar (Istio's
    /// default `CircuitBreakerDefaults.unlimited`).
    var maxRequests: Int { get }
    /// connectionPool.http.idleTimeout: a pooled connection idle longer is closed (0: listener default).
    var idleTimeoutMs: Int { get }
    /// connectionPool.tcp.maxConnectionDuration: a connection older is not reused (0: none).
    var maxConnectionDurationMs: Int { get }
    /// connectionPool.tcp.tcpKeepalive: probes, time, interval in seconds (nil: off).
    var tcpKeepalive: (probes: Int, timeSeconds: Int, intervalSeconds: Int)? { get }
    /// How connections to endpoint `i` are secured (nil: plaintext). Decided at config
    /// load from the DestinationRule's tls settings or, without them, Istio's auto mTLS.
    func tls(_ i: Int) -> UpstreamTLS?
    /// Which HTTP version a mesh (ISTIO_MUTUAL) connection to the peer sidecar asks
    /// for by ALPN; decided at config load.
    var upstreamProtocol: UpstreamProtocol { get }
}

extension UpstreamCluster {
    public func tls(_ i: Int) -> UpstreamTLS? { nil }
    public var upstreamProtocol: UpstreamProtocol { .http1 }
}

/// The HTTP version toward a peer sidecar, by Istio's rule: a port declared HTTP/2 or
/// gRPC speaks h2; `h2UpgradePolicy: UPGRADE` upgrades HTTP/1.1 to h2; a port declared
/// HTTP stays HTTP/1.1; `useClientProtocol` or an undeclared port (protocol sniffing)
/// uses what the downstream spoke. h2 is offered by ALPN, and used only when the peer
/// chooses it.
public enum UpstreamProtocol: Sendable {
    case http1
    case http2
    case likeDownstream
}

/// DestinationRule `trafficPolicy.tls` for one endpoint, as the upstream side applies it.
/// Built once at config load; the proxy attaches the TLS context for SIMPLE/MUTUAL before
/// the snapshot is published, so a request only reads it.
public final class UpstreamTLS: @unchecked Sendable {
    public enum Mode: String, Sendable {
        case disable = "DISABLE"
        case simple = "SIMPLE"
        case mutual = "MUTUAL"
        case istioMutual = "ISTIO_MUTUAL"
    }
    public let mode: Mode
    /// Chosen by auto mTLS (no DestinationRule tls): falls back to plaintext when this
    /// sidecar has no workload certificate, as a workload without a sidecar would be reached.
    public let automatic: Bool
    public let clientCertificate: String?
    public let privateKey: String?
    public let caCertificates: String?
    /// SANs the server must present (URI or DNS, exact). For ISTIO_MUTUAL without
    /// subjectAltNames: the SPIFFE ids of the endpoints' service accounts.
    public let subjectAltNames: [String]
    /// `subjectAltNames` were formed from service accounts in the default trust domain
    /// (not written in the DestinationRule): the proxy checks them in the trust domain
    /// of its own workload certificate, which is the mesh's.
    public let fromServiceAccounts: Bool
    /// SNI sent; for ISTIO_MUTUAL Istio's "outbound_.PORT_.SUBSET_.HOST" form.
    public let sni: String?
    /// Whether SIMPLE/MUTUAL verify the server name against `sni` (insecureSkipVerify off).
    public let verifyHostname: Bool
    /// Appended to the pool key: connections with different TLS settings never mix.
    public let poolTag: String
    /// The client TLS context for SIMPLE/MUTUAL (an NIOSSLContext), set by the proxy at load.
    public var context: AnyObject?
    /// Why `context` could not be built (bad file), reported as the connect failure.
    public var contextError: String?

    public init(mode: Mode, automatic: Bool = false, clientCertificate: String? = nil, privateKey: String? = nil, caCertificates: String? = nil,
                subjectAltNames: [String] = [], fromServiceAccounts: Bool = false, sni: String? = nil, verifyHostname: Bool = true) {
        self.fromServiceAccounts = fromServiceAccounts
        self.mode = mode; self.automatic = automatic; self.clientCertificate = clientCertificate; self.privateKey = privateKey
        self.caCertificates = caCertificates; self.subjectAltNames = subjectAltNames; self.sni = sni; self.verifyHostname = verifyHostname
        var tag = "|tls:\(mode.rawValue)"
        if let sni { tag += ":" + sni }
        if !subjectAltNames.isEmpty { tag += ":" + subjectAltNames.joined(separator: ",") }
        if let c = clientCertificate { tag += ":" + c }
        poolTag = tag
    }
}

/// Circuit-breaker thresholds where a DestinationRule leaves them unset. Istio sets
/// maxConnections, http1MaxPendingRequests, http2MaxRequests and maxRetries to 2^32-1
/// itself, because Envoy's own defaults (1024, and 3 concurrent retries) refused
/// retries and queued requests during pod churn (503s while endpoints came and went).
public enum CircuitBreakerDefaults {
    public static let unlimited = Int(UInt32.max)
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
    public var maxConnections: Int { CircuitBreakerDefaults.unlimited }
    public var maxPendingRequests: Int { CircuitBreakerDefaults.unlimited }
    public func hashPick(_ hash: UInt64, skip: (Int) -> Bool) -> Int? { nil }
    public var connectTimeoutMs: Int { 0 }
    public var maxRetries: Int { CircuitBreakerDefaults.unlimited }
    public var maxRequests: Int { CircuitBreakerDefaults.unlimited }
    public var idleTimeoutMs: Int { 0 }
    public var maxConnectionDurationMs: Int { 0 }
    public var tcpKeepalive: (probes: Int, timeSeconds: Int, intervalSeconds: Int)? { nil }
}

/// A consistent-hash ring: each endpoint owns a fixed number of points
/// (minimumRingSize / 8, at least 16 — so the ring reaches minimumRingSize from 8
/// endpoints up). Point counts do not depend on how many endpoints there are, so
/// adding an endpoint moves about 1/N of the keys, all to it, and removing one moves
/// only its own keys.
public struct HashRing: Sendable {
    public let points: [UInt64]
    public let owners: [Int32]

    public init(keys: [String], minimumRingSize: Int) {
        var pts: [(UInt64, Int32)] = []
        guard !keys.isEmpty else { points = []; owners = []; return }
        let per = max(16, minimumRingSize / 8)
        pts.reserveCapacity(per * keys.count)
        for (i, k) in keys.enumerated() {
            for v in 0..<per { pts.append((HashRing.hash("\(k)_\(v)"), Int32(i))) }
        }
        pts.sort { $0.0 < $1.0 }
        points = pts.map(\.0)
        owners = pts.map(\.1)
    }

    /// FNV-1a 64 with a final avalanche (stable across runs and machines).
    public static func hash(_ s: String) -> UInt64 {
        var h: UInt64 = 0xcbf29ce484222325
        for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100000001b3 }
        h ^= h >> 33; h = h &* 0xff51afd7ed558ccd; h ^= h >> 33; h = h &* 0xc4ceb9fe1a85ec53; h ^= h >> 33
        return h
    }

    public func lookup(_ hash: UInt64, skip: (Int) -> Bool) -> Int? {
        guard !points.isEmpty else { return nil }
        var lo = 0, hi = points.count
        while lo < hi { let mid = (lo + hi) / 2; if points[mid] < hash { lo = mid + 1 } else { hi = mid } }
        for k in 0..<points.count {
            let o = Int(owners[(lo + k) % points.count])
            if !skip(o) { return o }
        }
        return nil
    }
}

/// VirtualService `retries`, compiled: which outcomes are retried and how often.
public struct RetrySpec: Sendable, Equatable {
    public var attempts = 2
    /// 0 = the stream timeout only.
    public var perTryTimeoutMs = 0
    public var on5xx = false
    public var gatewayError = false
    public var reset = false
    public var connectFailure = true
    public var refusedStream = true
    public var retriable4xx = false
    /// Statuses retried under `retriable-status-codes` (Istio adds 503 by default).
    public var retriableStatusCodes: [Int] = [503]
    /// gRPC codes retried when a response head carries them as `grpc-status` (a
    /// trailers-only gRPC response), one bit per code: retryOn `cancelled` (1),
    /// `deadline-exceeded` (4), `resource-exhausted` (8), `internal` (13),
    /// `unavailable` (14). Istio's default has cancelled and unavailable.
    public var grpcCodes: UInt32 = 1 << 1 | 1 << 14
    public init() {}

    /// Istio's default policy when a route sets none: 2 attempts on connect-failure,
    /// refused-stream, unavailable, cancelled, retriable-status-codes (503).
    public static let istioDefault = RetrySpec()

    /// The gRPC retryOn conditions and their codes, in canonical order.
    public static let grpcConditions: [(name: String, code: Int)] = [
        ("cancelled", 1), ("deadline-exceeded", 4), ("resource-exhausted", 8), ("internal", 13), ("unavailable", 14),
    ]

    /// Parses Envoy/Istio retryOn ("5xx,gateway-error,503,...").
    public init(attempts: Int, perTryTimeoutMs: Int, retryOn: String) {
        self.attempts = attempts
        self.perTryTimeoutMs = perTryTimeoutMs
        connectFailure = false; refusedStream = false; retriableStatusCodes = []; grpcCodes = 0
        for t in retryOn.split(separator: ",").map({ String($0.filter { $0 != " " && $0 != "\t" }) }) {
            switch t {
            case "5xx": on5xx = true
            case "gateway-error": gatewayError = true
            case "reset": reset = true
            case "connect-failure": connectFailure = true
            case "refused-stream": refusedStream = true
            case "retriable-4xx": retriable4xx = true
            case "retriable-status-codes": break
            case "cancelled": grpcCodes |= 1 << 1
            case "deadline-exceeded": grpcCodes |= 1 << 4
            case "resource-exhausted": grpcCodes |= 1 << 8
            case "internal": grpcCodes |= 1 << 13
            case "unavailable": grpcCodes |= 1 << 14
            default: if let c = Int(t) { retriableStatusCodes.append(c) }
            }
        }
        if retryOn.contains("retriable-status-codes") && retriableStatusCodes.isEmpty { retriableStatusCodes = [503] }
    }

    /// The retryOn conditions `init(attempts:perTryTimeoutMs:retryOn:)` reads (besides
    /// status codes 100-599): Envoy's HTTP ones and its gRPC ones (read from a response
    /// head's grpc-status), all applied.
    public static let retryOnConditions: Set<String> = [
        "5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx", "retriable-status-codes",
        "unavailable", "cancelled", "deadline-exceeded", "resource-exhausted", "internal",
    ]

    /// The first token of a retryOn string that is neither a condition of
    /// `retryOnConditions` nor a status code 100-599, or nil when all are known.
    public static func unknownRetryOnToken(_ retryOn: String) -> String? {
        for t in retryOn.split(separator: ",").map({ String($0.filter { $0 != " " && $0 != "\t" }) }) where !t.isEmpty {
            if retryOnConditions.contains(t) { continue }
            if let c = Int(t), (100...599).contains(c) { continue }
            return t
        }
        return nil
    }

    /// The policy's conditions in canonical retryOn form: the conditions in a fixed
    /// order (5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx,
    /// then the gRPC ones: cancelled, deadline-exceeded, resource-exhausted, internal,
    /// unavailable), then the retried status codes in ascending order. Parsing it gives
    /// the same conditions back (Istio's default reads
    /// "connect-failure,refused-stream,cancelled,unavailable,503").
    public var retryOn: String {
        var parts: [String] = []
        if on5xx { parts.append("5xx") }
        if gatewayError { parts.append("gateway-error") }
        if reset { parts.append("reset") }
        if connectFailure { parts.append("connect-failure") }
        if refusedStream { parts.append("refused-stream") }
        if retriable4xx { parts.append("retriable-4xx") }
        for g in Self.grpcConditions where grpcCodes & (1 << UInt32(g.code)) != 0 { parts.append(g.name) }
        for c in Set(retriableStatusCodes).sorted() { parts.append(String(c)) }
        return parts.joined(separator: ",")
    }

    /// Whether a response status is retried.
    public func retries(status: Int) -> Bool {
        if on5xx && status >= 500 { return true }
        if gatewayError && (status == 502 || status == 503 || status == 504) { return true }
        if retriable4xx && status == 409 { return true }
        return retriableStatusCodes.contains(status)
    }

    /// Whether a response head's `grpc-status` (0-16) is retried.
    @inline(__always)
    public func retries(grpcStatus: Int) -> Bool {
        grpcStatus > 0 && grpcStatus < 32 && grpcCodes & (1 << UInt32(grpcStatus)) != 0
    }

    /// Whether a failure before any response is retried (connect failure or reset).
    public func retries(connectFailure cf: Bool) -> Bool {
        cf ? (connectFailure || on5xx || gatewayError || reset) : (reset || on5xx || gatewayError)
    }
}

/// Istio's defaults for identities in the mesh.
public enum MeshIdentity {
    /// The default trust domain: SPIFFE ids of service accounts named in the configuration
    /// are formed in it, and a CA made without `--trust-domain` issues in it.
    public static let trustDomain = "cluster.local"
    public static func spiffe(namespace: String, serviceAccount: String) -> String {
        "spiffe://\(trustDomain)/ns/\(namespace)/sa/\(serviceAccount)"
    }

    /// Whether `s` can stand as a trust domain, namespace or service account in a SPIFFE
    /// id: not empty, without "/", white space or control characters (it must round-trip
    /// through `spiffe://td/ns/NS/sa/SA` and never reach a log line as a control byte).
    /// The one rule for the CA, the mesh config, `--trust-domain` and SPIFFE ids.
    public static func isValidPart(_ s: String) -> Bool {
        !s.isEmpty && !s.unicodeScalars.contains { $0 == "/" || $0.properties.isWhitespace || $0.value < 0x20 || $0.value == 0x7f || (0x80...0x9f).contains($0.value) }
    }
}
