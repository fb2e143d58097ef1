import NIOCore
@_exported import MoonletHTTP

/// Envoy's response flags (the `%RESPONSE_FLAGS%` of its access log), recorded on a
/// stream by whatever decided its outcome.
public struct ResponseFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// UH: no healthy upstream host.
    public static let noHealthyUpstream = ResponseFlags(rawValue: 1 << 0)
    /// UF: upstream connection failure.
    public static let upstreamConnectionFailure = ResponseFlags(rawValue: 1 << 1)
    /// UO: upstream overflow (circuit breaking).
    public static let upstreamOverflow = ResponseFlags(rawValue: 1 << 2)
    /// NR: no route configured.
    public static let noRouteFound = ResponseFlags(rawValue: 1 << 3)
    /// UT: upstream request timeout.
    public static let upstreamRequestTimeout = ResponseFlags(rawValue: 1 << 4)
    /// URX: retry limit or max connect attempts reached.
    public static let upstreamRetryLimitExceeded = ResponseFlags(rawValue: 1 << 5)
    /// UC: upstream connection termination.
    public static let upstreamConnectionTermination = ResponseFlags(rawValue: 1 << 6)
    /// DC: downstream connection termination.
    public static let downstreamConnectionTermination = ResponseFlags(rawValue: 1 << 7)
    /// LR: connection local reset.
    public static let localReset = ResponseFlags(rawValue: 1 << 8)
    /// DI: request delayed by fault injection.
    public static let delayInjected = ResponseFlags(rawValue: 1 << 9)
    /// FI: request aborted by fault injection.
    public static let faultInjected = ResponseFlags(rawValue: 1 << 10)
    /// UAEX: unauthorized by an external (here: Lua) authorization filter.
    public static let unauthorizedExternalService = ResponseFlags(rawValue: 1 << 11)
    /// DPE: downstream protocol error.
    public static let downstreamProtocolError = ResponseFlags(rawValue: 1 << 12)
    /// UPE: upstream protocol error.
    public static let upstreamProtocolError = ResponseFlags(rawValue: 1 << 13)
    /// SI: stream idle timeout.
    public static let streamIdleTimeout = ResponseFlags(rawValue: 1 << 14)
    /// RBAC: denied by an authorization policy (Envoy's RbacAccessDenied).
    public static let rbacAccessDenied = ResponseFlags(rawValue: 1 << 15)

    static let names: [(ResponseFlags, String)] = [
        (.noHealthyUpstream, "UH"), (.upstreamConnectionFailure, "UF"), (.upstreamOverflow, "UO"),
        (.noRouteFound, "NR"), (.upstreamRequestTimeout, "UT"), (.upstreamRetryLimitExceeded, "URX"),
        (.upstreamConnectionTermination, "UC"), (.downstreamConnectionTermination, "DC"),
        (.localReset, "LR"), (.delayInjected, "DI"), (.faultInjected, "FI"),
        (.unauthorizedExternalService, "UAEX"), (.downstreamProtocolError, "DPE"),
        (.upstreamProtocolError, "UPE"), (.streamIdleTimeout, "SI"), (.rbacAccessDenied, "RBAC"),
    ]

    /// Envoy's text form: comma-separated short names, "-" when none.
    public var envoyString: String {
        if isEmpty { return "-" }
        return Self.names.filter { contains($0.0) }.map(\.1).joined(separator: ",")
    }
}

/// A reply produced by the proxy or a filter instead of the upstream's.
public struct LocalReply: Sendable {
    public var status: Int
    public var body: String
    public var headers: [(name: String, value: String)]
    public init(status: Int, body: String, headers: [(name: String, value: String)] = []) {
        self.status = status; self.body = body; self.headers = headers
    }
}

/// Which listener accepted a connection, and what it does with a stream.
public enum ListenerRole: String, Sendable {
    /// 15006: mesh -> app; every stream goes to 127.0.0.1:appPort.
    case inbound
    /// 15001: app -> mesh; streams go where the route decision says.
    case outbound
}

/// The downstream peer of a stream.
public struct PeerInfo: Sendable {
    /// Remote address as "ip:port".
    public var address: String
    /// Istio principal of an mTLS peer ("cluster.local/ns/NS/sa/SA"), empty without mTLS.
    public var principal: String = ""
    public var namespace: String = ""
    /// The SNI the client sent in its TLS ClientHello (Envoy's requested server name),
    /// empty without TLS or without SNI.
    public var serverName: String = ""
    public init(address: String) { self.address = address }
}

/// Where the stream is going, as the listener and router know it.
public struct DestinationInfo: Sendable {
    public var address: String = ""
    public var port: Int = 0
    /// Outbound, intercepted: the original destination's IP when the request's Host
    /// names no service (the router then looks the service up by this VIP); else empty.
    public var original: String = ""
    public var service: String = ""
    public init() {}
}

/// The route decision: written by the router (native or Lua), read by the upstream side.
public struct RouteDecision: Sendable {
    /// Cluster name in Istio's form: "outbound|PORT|SUBSET|HOST" or "inbound|PORT||".
    public var cluster: String = ""
    /// The `name` of the VirtualService http route that routed the stream ("" when the
    /// rule has none); nil when no VirtualService rule did (Istio's default route).
    public var name: String?
    /// Envoy's route name (%ROUTE_NAME%): the rule's name, else "default" for a routed
    /// stream (Istio's default route), else "".
    public var envoyRouteName: String { name ?? (cluster.isEmpty ? "" : "default") }
    public var host: String = ""
    public var subset: String = ""
    public var port: Int = 0
    /// Per-stream timeout in milliseconds (0 = the listener default).
    public var timeoutMs: Int = 0
    /// The chosen endpoint ("ip" and port). When empty, the proxy picks one from
    /// `upstreamCluster`, or connects to host:port.
    public var endpoint: String = ""
    public var endpointPort: Int = 0
    /// The cluster the router chose; the proxy's balancer picks the endpoint.
    public var upstreamCluster: UpstreamCluster?
    /// Index of the picked endpoint in `upstreamCluster` (-1 = none).
    public var endpointIndex: Int = -1
    /// An endpoint asked for before the route was decided (an Envoy script's
    /// setUpstreamOverrideHost in a filter that runs before the router): "ip" and port (0:
    /// any); the router pins it once it has chosen the cluster, if the cluster has it;
    /// `overrideHostStrict`: otherwise 503 (UH).
    public var overrideHost: String = ""
    public var overrideHostPort: Int = 0
    public var overrideHostStrict = false
    /// Fault injection delay before going upstream (milliseconds, flag DI).
    public var delayMs: Int = 0
    /// Retry policy of the route (nil: no retries, as for the inbound listener).
    public var retry: RetrySpec?
    /// Consistent-hash key of the request (consistentHash clusters).
    public var hashKey: UInt64?
    /// Where a copy of the request goes (VirtualService mirror): cluster and the
    /// authority to send (the host with "-shadow", as Envoy does). Responses are ignored.
    public var mirrors: [(cluster: UpstreamCluster, authority: String)] = []
    /// Response header edits of the matched route, applied before response filters.
    public var responseSet: [(String, String)] = []
    public var responseAdd: [(String, String)] = []
    public var responseRemove: [String] = []
    public init() {}
}

/// The configuration a stream started with, as MoonletCore sees it: an opaque,
/// immutable object that a module to the right (MoonletConfig's ConfigSnapshot) implements
/// and its readers turn back into their type. A class-bound protocol with no requirements:
/// storing and reading it costs what an `AnyObject` did (no dynamic cast; the one reader,
/// `LuaAPI.snapshot(of:)`, knows the only conforming type).
public protocol StreamConfig: AnyObject {}

/// Per-stream state a script host keeps on the stream (MoonletLua's StreamLuaContext).
/// Set and read only by that host.
public protocol StreamScriptState: AnyObject {}

/// One HTTP request/response exchange, from its request head to its log. A stream lives
/// on one event loop; filters get it during their phase call and must not keep it.
public final class ProxyStream {
    public let id: UInt64
    public var request: HTTPHead
    public var response: HTTPHead?
    /// Set by a filter (or the proxy) that answers locally.
    public var localReply: LocalReply?
    /// The request target as the client sent it, when path normalization changed it
    /// (nil otherwise: `request.target` is what arrived).
    public var originalPath: String?
    public var source: PeerInfo
    public var destination = DestinationInfo()
    public var route: RouteDecision
    public var responseFlags: ResponseFlags = []
    /// Set when the proxy itself produced the response (local reply).
    public var responseCode: Int = 0
    /// Request start, monotonic nanoseconds.
    public let startNanos: UInt64
    public var requestBodyBytes: Int64 = 0
    public var responseBodyBytes: Int64 = 0
    /// "ip:port" of the upstream host that served the stream.
    public var upstreamHost: String = ""
    /// Per-stream variables of native filters (Lua keeps its own `s.vars` table).
    public var vars: [String: String] = [:]
    /// One slot per filter of the chain, for filter-private per-stream state.
    public var filterState: [AnyObject?]
    /// The request's trailers (an HTTP/1.1 chunked body's trailer section, or HTTP/2
    /// HEADERS after the DATA), once the request body ended with some; nil otherwise.
    /// Forwarded upstream behind the body when its framing allows (chunked, HTTP/2).
    public var requestTrailers: HTTPTrailers?
    /// The response's trailers: the upstream's, once its body ended with some, and those
    /// a filter set (`s.response.trailers`); nil when there are none. Sent to the client
    /// after the body when its framing allows (HTTP/2; HTTP/1.1 chunked, as Envoy does,
    /// whether or not the client sent `TE: trailers`).
    public var responseTrailers: HTTPTrailers?
    /// The buffered request body, when a filter asked for it (stop-and-buffer). A filter
    /// may replace it in the call with the whole body (`onRequestBody` with
    /// `endOfStream`); the upstream request's content-length follows.
    public var bufferedRequestBody: ByteBuffer?
    /// The buffered response body, when a response filter asked for it (`onResponse`
    /// returned `stopAndBuffer`): collected while the head is held, then handed to every
    /// `onResponseBody` once with `endOfStream`; a filter may replace it there (the
    /// client's content-length follows). nil when the response streams.
    public var bufferedResponseBody: ByteBuffer?
    /// False once on_log has run: wrappers handed to filters check it.
    public private(set) var isActive = true
    /// Whether the downstream is HTTP/2 (affects only logging and metrics).
    public var protocolName: String = "HTTP/1.1"
    /// The configuration snapshot the stream started with (MoonletConfig's
    /// ConfigSnapshot), for filters that route; a reload never changes it under a
    /// running stream. Read it through `LuaAPI.snapshot(of:)`.
    public var config: StreamConfig?
    /// The listener that accepted the stream.
    public var listener: ListenerRole = .outbound
    /// The Lua host's per-stream state (coroutine, s.vars), owned by MoonletLua.
    public var luaContext: StreamScriptState?
    /// The verified JWT of the request (RequestAuthentication), nil without one. Set
    /// only by the native JWT primitive; filters read it as `s.auth`.
    public var auth: RequestAuthResult?
    /// The peer workload learned through Istio's metadata exchange, trusted only over mTLS:
    /// the calling sidecar's on the inbound side, the answering sidecar's on the outbound
    /// side. nil when the peer sent none (not a mesh sidecar, or no mTLS).
    public var peerWorkload: MeshWorkload?
    /// Whether the upstream attempt that served the stream went over mesh mTLS (outbound).
    public var upstreamMeshMTLS = false
    /// Where the request filters paused (`FilterAction.pause`); not paused by default.
    public var filterPause = FilterPausePoint()
    /// The proxy's executor of this stream while a filter has it paused (nil otherwise).
    public var resumer: FilterResumer?

    /// `route` is the decision known before any filter runs (the inbound listener's
    /// fixed one); passing it here saves building an empty one and replacing it.
    public init(id: UInt64, request: HTTPHead, source: PeerInfo, filterCount: Int, startNanos: UInt64, route: RouteDecision = RouteDecision()) {
        self.id = id
        self.request = request
        self.route = route
        self.source = source
        self.startNanos = startNanos
        self.filterState = filterCount == 0 ? [] : [AnyObject?](repeating: nil, count: filterCount)
    }

    /// Runs `body` on the request head in place: passing `request` as an argument
    /// would copy the head (a retain of each of its buffers and arrays).
    @inline(__always)
    public func withRequest<R>(_ body: (inout HTTPHead) throws -> R) rethrows -> R { try body(&request) }

    /// Marks the stream finished; filter state is dropped so wrappers see it gone.
    public func end() {
        isActive = false
        for i in filterState.indices { filterState[i] = nil }
        resumer = nil
        filterPause = FilterPausePoint()
    }

    /// A filter that returned `FilterAction.pause` ends its phase with `action`: the
    /// chain goes on after it (on the stream's event loop). A no-op when the stream is
    /// not paused any more (it ended meanwhile).
    public func resumeFilters(_ action: FilterAction) {
        guard isActive, filterPause.isPaused, let r = resumer else { return }
        r.filtersResumed(self, action)
    }

    /// How many times `respond` was called: a phase that raises it answered locally.
    public private(set) var replyCount = 0

    /// Answers locally: records the reply the proxy sends instead of going upstream.
    public func respond(_ status: Int, body: String = "", headers: [(name: String, value: String)] = [], flags: ResponseFlags = []) {
        replyCount += 1
        localReply = LocalReply(status: status, body: body, headers: headers)
        responseFlags.formUnion(flags)
    }

    /// The status the client saw or will see.
    public var status: Int { localReply?.status ?? response?.status ?? responseCode }
}
