import NIOCore

/// What a filter phase tells the chain to do next.
///
/// Buffering consequences (as Envoy's filter statuses):
/// - `continue`: the next filter runs; headers/data flow on without being held.
/// - `stopAndBuffer`: from `onRequest`, the proxy holds the request head and buffers
///   the whole request body (bounded by `Limits.maxBufferedBodyBytes`, 413 beyond),
///   then calls every `onRequestBody` once with the complete body and `endOfStream`,
///   and only then goes upstream. From other phases it is treated as `continue`.
/// - `respond`: the filter has set `stream.localReply`; no later request filter runs,
///   nothing goes upstream, the local reply passes through the response filters and
///   `onLog` runs as for any stream.
public enum FilterAction: Sendable, Equatable {
    case `continue`
    case stopAndBuffer
    case respond
}

/// What went wrong with one upstream attempt, as `Filter.onUpstreamFailure` sees it.
/// The names are Envoy's retryOn conditions.
public enum UpstreamFailureKind: String, Sendable, CaseIterable {
    /// The connection (or its TLS handshake) could not be made.
    case connectFailure = "connect-failure"
    /// The upstream reset or closed the connection before a response head.
    case reset
    /// An HTTP/2 upstream refused the stream (REFUSED_STREAM).
    case refusedStream = "refused-stream"
    /// The upstream answered 5xx (other than 502, 503, 504).
    case status5xx = "5xx"
    /// The upstream answered 502, 503 or 504.
    case gatewayError = "gateway-error"
    /// The per-try timeout passed without a response head.
    case timeout
}

/// One failed upstream attempt, before the proxy decides whether to retry it.
public struct UpstreamFailureInfo: Sendable {
    public var kind: UpstreamFailureKind
    /// The upstream's status for 5xx / gateway-error; 0 otherwise.
    public var status: Int
    /// 0 for the first try, 1 for the first retry, ...
    public var attempt: Int
    /// "ip:port" of the endpoint that failed ("" when none was reached).
    public var endpoint: String
    public init(kind: UpstreamFailureKind, status: Int = 0, attempt: Int, endpoint: String) {
        self.kind = kind; self.status = status; self.attempt = attempt; self.endpoint = endpoint
    }
}

/// A filter's say on retrying a failed upstream attempt.
public enum RetryVerdict: Sendable, Equatable {
    /// The filter has no opinion: the next filter, then the route's retry policy decides.
    case routePolicy
    /// Retry (still bounded by the route's attempts, the replay buffer and the cluster's maxRetries).
    case retry
    /// Do not retry: the failure stands.
    case noRetry
}

/// Filter ordering, as Istio's WasmPlugin phases: AUTHN, then AUTHZ, then unset
/// (routing and the rest), then STATS.
public enum FilterPhase: Int, Sendable, Comparable, CaseIterable {
    case authn = 0, authz = 1, unspecified = 2, stats = 3
    public static func < (a: FilterPhase, b: FilterPhase) -> Bool { a.rawValue < b.rawValue }
    public init?(istio: String) {
        switch istio.uppercased() {
        case "AUTHN": self = .authn
        case "AUTHZ": self = .authz
        case "STATS": self = .stats
        case "UNSPECIFIED_PHASE", "": self = .unspecified
        default: return nil
        }
    }
    public var istioName: String { ["AUTHN", "AUTHZ", "UNSPECIFIED_PHASE", "STATS"][rawValue] }
}

/// A filter of the chain, native or Lua. Every phase has a default that does nothing
/// and continues. Phases run on the stream's event loop; they must not block.
public protocol Filter: AnyObject {
    /// Name for logs, metrics and /plugins.
    var name: String { get }
    var phase: FilterPhase { get }
    /// Higher priority runs first within a phase (Istio's WasmPlugin rule).
    var priority: Int { get }
    /// Whether `onRequestBody` / `onResponseBody` do anything: the proxy skips body
    /// calls entirely when no filter of the chain wants them.
    var wantsRequestBody: Bool { get }
    var wantsResponseBody: Bool { get }
    /// Whether `onUpstreamFailure` does anything. The chain calls `onUpstreamFailure`
    /// only on filters that say so (as the body phases), and the proxy keeps a replay
    /// copy of a request without a route retry policy only when one filter does.
    var wantsUpstreamFailure: Bool { get }

    /// Runs once the request head is parsed, before anything goes upstream. May edit
    /// request headers, write `stream.route`, answer locally (`respond`) or ask for the
    /// whole body (`stopAndBuffer`).
    func onRequest(_ stream: ProxyStream) -> FilterAction
    /// Runs for each request body chunk as it streams (observe only), or once with the
    /// whole body when a filter asked for `stopAndBuffer`. `respond` answers locally.
    func onRequestBody(_ stream: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction
    /// Runs once the response head is known (upstream's or a local reply), in reverse
    /// chain order. May edit response headers; `respond` replaces the response.
    func onResponse(_ stream: ProxyStream) -> FilterAction
    /// Runs when an upstream attempt failed (connect failure, reset, refused stream,
    /// 5xx, per-try timeout), before the proxy decides to retry. In chain order, the
    /// first filter that returns `.retry` or `.noRetry` decides; `.routePolicy` defers.
    func onUpstreamFailure(_ stream: ProxyStream, _ failure: UpstreamFailureInfo) -> RetryVerdict
    /// Runs for each response body chunk as it streams (observe only).
    func onResponseBody(_ stream: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction
    /// Runs once for every stream after its last byte was sent or it failed, local
    /// replies and errors included. Its result is ignored.
    func onLog(_ stream: ProxyStream)
}

extension Filter {
    public var phase: FilterPhase { .unspecified }
    public var priority: Int { 0 }
    public var wantsRequestBody: Bool { false }
    public var wantsResponseBody: Bool { false }
    public var wantsUpstreamFailure: Bool { false }
    public func onRequest(_ stream: ProxyStream) -> FilterAction { .continue }
    public func onRequestBody(_ stream: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction { .continue }
    public func onResponse(_ stream: ProxyStream) -> FilterAction { .continue }
    public func onUpstreamFailure(_ stream: ProxyStream, _ failure: UpstreamFailureInfo) -> RetryVerdict { .routePolicy }
    public func onResponseBody(_ stream: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction { .continue }
    public func onLog(_ stream: ProxyStream) {}
}

/// An ordered, immutable chain of filters, built once per config snapshot and shared
/// by every stream started under it.
public final class FilterChain {
    public let filters: [Filter]
    public let wantsRequestBody: Bool
    public let wantsResponseBody: Bool
    public let wantsUpstreamFailure: Bool

    /// Orders by phase, then by descending priority, keeping the given order for ties.
    public init(_ filters: [Filter]) {
        let ordered = filters.enumerated().sorted { a, b in
            if a.element.phase != b.element.phase { return a.element.phase < b.element.phase }
            if a.element.priority != b.element.priority { return a.element.priority > b.element.priority }
            return a.offset < b.offset
        }.map(\.element)
        self.filters = ordered
        self.wantsRequestBody = ordered.contains { $0.wantsRequestBody }
        self.wantsResponseBody = ordered.contains { $0.wantsResponseBody }
        self.wantsUpstreamFailure = ordered.contains { $0.wantsUpstreamFailure }
    }

    public static let empty = FilterChain([])

    /// Runs `onRequest` in order. Stops at the first `respond`; returns `stopAndBuffer`
    /// if any filter asked for the body (the later filters still run their head phase).
    public func runRequest(_ s: ProxyStream) -> FilterAction {
        var result = FilterAction.continue
        for f in filters {
            switch f.onRequest(s) {
            case .respond: return .respond
            case .stopAndBuffer: result = .stopAndBuffer
            case .continue: break
            }
            if s.localReply != nil { return .respond }
        }
        return result
    }

    public func runRequestBody(_ s: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction {
        for f in filters where f.wantsRequestBody {
            if f.onRequestBody(s, chunk: chunk, endOfStream: endOfStream) == .respond || s.localReply != nil { return .respond }
        }
        return .continue
    }

    /// Runs `onResponse` in reverse order. A `respond` replaces the response with the
    /// filter's local reply; the remaining filters still see it.
    public func runResponse(_ s: ProxyStream) -> FilterAction {
        var result = FilterAction.continue
        for f in filters.reversed() {
            if f.onResponse(s) == .respond { result = .respond }
        }
        return result
    }

    /// Asks the filters whether to retry a failed attempt: the first verdict in chain
    /// order wins; `.routePolicy` when none has one.
    public func runUpstreamFailure(_ s: ProxyStream, _ failure: UpstreamFailureInfo) -> RetryVerdict {
        for f in filters where f.wantsUpstreamFailure {
            let v = f.onUpstreamFailure(s, failure)
            if v != .routePolicy { return v }
        }
        return .routePolicy
    }

    public func runResponseBody(_ s: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) {
        for f in filters.reversed() where f.wantsResponseBody {
            _ = f.onResponseBody(s, chunk: chunk, endOfStream: endOfStream)
        }
    }

    public func runLog(_ s: ProxyStream) {
        for f in filters { f.onLog(s) }
    }
}
