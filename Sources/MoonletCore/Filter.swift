import NIOCore

/// What a filter phase tells the chain to do next.
///
/// Buffering consequences (as Envoy's filter statuses):
/// - `continue`: the next filter runs; headers/data flow on without being held.
/// - `stopAndBuffer`: from `onRequest`, the proxy holds the request head and buffers
///   the whole request body (bounded by `Limits.maxBufferedBodyBytes`, 413 beyond),
///   then calls every `onRequestBody` once with the complete body and `endOfStream`,
///   and only then goes upstream. From `onResponse` (an upstream's response head),
///   the proxy holds the response head and buffers the whole response body and its
///   trailers (bounded by the same `maxBufferedBodyBytes`; beyond, the response is
///   replaced by a 500 local reply, as Envoy answers a response buffer overflow before
///   headers were sent: details `response_payload_too_large`), then calls every
///   `onResponseBody` once with the complete body (`stream.bufferedResponseBody`) and
///   `endOfStream` (filters whose `wantsResponseBody` is true), where a filter may
///   replace the body, edit headers and trailers or answer locally (`respond`); then
///   the head goes out with the content-length of the final body. A local reply's body
///   is handed over the same way (LocalReplyBuilder). Streams where no filter asks are
///   not buffered. From other phases it is treated as `continue`.
/// - `respond`: the filter has set `stream.localReply`; no later request filter runs,
///   nothing goes upstream, the local reply passes through the response filters and
///   `onLog` runs as for any stream.
/// - `pause`: the filter started work that completes later on the stream's event loop
///   (a Lua `moonlet.http.call`); the chain stops at this filter and nothing goes
///   upstream. Request body bytes that arrive meanwhile are held (bounded by
///   `maxBufferedBodyBytes`, reading paused). When its work is done the filter calls
///   `stream.resumeFilters(_:)` once, with the action its phase ends with (`continue`,
///   `stopAndBuffer` or `respond`; a filter with more work to wait for calls it only
///   when all of it is done); the chain then goes on with the next filter exactly as if
///   the phase had returned that action. Only `onRequest`, the buffered (whole-body)
///   `onRequestBody` call and `onResponse` of an upstream's response (not of a local
///   reply) may pause; while `onResponse` is paused nothing is sent to the client and
///   the upstream's body is held (its reading paused). From the
///   other phases (and from streamed body chunks) `pause` is treated as `continue`. If
///   the stream ends first (client gone, timeout) `resumeFilters` is a no-op: the
///   filter must release what it holds when its `onLog` runs or its work completes.
public enum FilterAction: Sendable, Equatable {
    case `continue`
    case stopAndBuffer
    case respond
    case pause
}

/// The proxy side of a paused stream (`FilterAction.pause`): the stream's executor,
/// told when the paused filter's phase ended. Set on the stream only while it is
/// paused, so a stream that never pauses costs nothing.
public protocol FilterResumer: AnyObject {
    /// The paused phase of `stream` ended with `action`; the chain goes on after the
    /// paused filter. Called on the stream's event loop.
    func filtersResumed(_ stream: ProxyStream, _ action: FilterAction)
}

/// Where the chain of a stream paused: the filter's index in `FilterChain.filters` and
/// the phase (`onRequest` or the buffered `onRequestBody`), with what the filters before
/// it asked for (`stopAndBuffer`). `index < 0`: not paused.
public struct FilterPausePoint: Sendable {
    public var index: Int = -1
    public var inBody = false
    public var wantsBody = false
    /// Paused in `onResponse` (`runResponse`); `responseResult` is what the filters after
    /// it in response order already asked (`respond`, `stopAndBuffer` or `continue`).
    public var inResponse = false
    public var responseResult = FilterAction.continue
    public init() {}
    public var isPaused: Bool { index >= 0 }
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
    /// The upstream answered a gRPC request with a non-zero `grpc-status` in its response
    /// head (a trailers-only response, HTTP 200): `grpcStatus` has the code. Istio's
    /// retryOn `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable` are read from it, as Envoy reads them from the response headers.
    case grpcStatus = "grpc-status"
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
    /// The `grpc-status` of the response head (0-16), -1 when it has none.
    public var grpcStatus: Int
    public init(kind: UpstreamFailureKind, status: Int = 0, attempt: Int, endpoint: String, grpcStatus: Int = -1) {
        self.kind = kind; self.status = status; self.attempt = attempt; self.endpoint = endpoint; self.grpcStatus = grpcStatus
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
    /// request headers, write `stream.route`, answer locally (`respond`), ask for the
    /// whole body (`stopAndBuffer`) or wait for work of its own (`pause`, then
    /// `stream.resumeFilters` with how the phase ended).
    func onRequest(_ stream: ProxyStream) -> FilterAction
    /// Runs for each request body chunk as it streams (observe only), or once with the
    /// whole body when a filter asked for `stopAndBuffer`. `respond` answers locally;
    /// `pause` is honoured only in the call with the whole body.
    func onRequestBody(_ stream: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction
    /// Runs once the response head is known (upstream's or a local reply), in reverse
    /// chain order. May edit response headers; `respond` replaces the response;
    /// `stopAndBuffer` (upstream responses) holds the head until the whole body is in,
    /// then `onResponseBody` gets it once (see `FilterAction.stopAndBuffer`).
    func onResponse(_ stream: ProxyStream) -> FilterAction
    /// Runs when an upstream attempt failed (connect failure, reset, refused stream,
    /// 5xx, per-try timeout), before the proxy decides to retry. In chain order, the
    /// first filter that returns `.retry` or `.noRetry` decides; `.routePolicy` defers.
    func onUpstreamFailure(_ stream: ProxyStream, _ failure: UpstreamFailureInfo) -> RetryVerdict
    /// Runs for each response body chunk as it streams (observe only; the result is
    /// ignored), or once with the whole body and `endOfStream` when a filter's
    /// `onResponse` returned `stopAndBuffer`: then the filter may replace
    /// `stream.bufferedResponseBody`, edit `stream.response` and `stream.responseTrailers`,
    /// and `respond` replaces the response with a local reply.
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
    /// Returns `pause` when a filter paused: `s.filterPause` says where, and
    /// `resumeRequest` goes on once the filter called `s.resumeFilters`.
    public func runRequest(_ s: ProxyStream) -> FilterAction {
        runRequest(s, from: 0, result: .continue)
    }

    @inline(__always)
    func runRequest(_ s: ProxyStream, from start: Int, result initial: FilterAction) -> FilterAction {
        var result = initial
        var i = start
        let n = filters.count
        while i < n {
            switch filters[i].onRequest(s) {
            case .respond: return .respond
            case .stopAndBuffer: result = .stopAndBuffer
            case .continue: break
            case .pause:
                s.filterPause.index = i
                s.filterPause.inBody = false
                s.filterPause.wantsBody = result == .stopAndBuffer
                return .pause
            }
            if s.localReply != nil { return .respond }
            i += 1
        }
        return result
    }

    /// The buffered (whole-body) or streamed `onRequestBody` calls, in order; the first
    /// `respond` stops. `pause` (only from the call with the whole body, `buffered`)
    /// records the pause point as `runRequest` does.
    public func runRequestBody(_ s: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction {
        runRequestBody(s, chunk: chunk, endOfStream: endOfStream, from: 0)
    }

    @inline(__always)
    func runRequestBody(_ s: ProxyStream, chunk: ByteBuffer, endOfStream: Bool, from start: Int) -> FilterAction {
        var i = start
        let n = filters.count
        while i < n {
            let f = filters[i]
            if f.wantsRequestBody {
                let a = f.onRequestBody(s, chunk: chunk, endOfStream: endOfStream)
                if a == .respond || s.localReply != nil { return .respond }
                if a == .pause && endOfStream && s.bufferedRequestBody != nil {
                    s.filterPause.index = i
                    s.filterPause.inBody = true
                    s.filterPause.wantsBody = false
                    return .pause
                }
            }
            i += 1
        }
        return .continue
    }

    /// Goes on after the paused filter of `s` once its phase ended with `action` (the
    /// argument of `resumeFilters`): the rest of the head phase (`onRequest`) or of the
    /// buffered body phase, with the same result rules as `runRequest` and
    /// `runRequestBody`. Clears the pause point; `pause` again sets a new one.
    public func resumeRequest(_ s: ProxyStream, after action: FilterAction) -> FilterAction {
        let p = s.filterPause
        s.filterPause = FilterPausePoint()
        guard p.index >= 0 else { return action }
        if action == .respond || s.localReply != nil { return .respond }
        if p.inBody {
            return runRequestBody(s, chunk: s.bufferedRequestBody ?? ByteBuffer(), endOfStream: true, from: p.index + 1)
        }
        return runRequest(s, from: p.index + 1, result: p.wantsBody || action == .stopAndBuffer ? .stopAndBuffer : .continue)
    }

    /// Runs `onResponse` in reverse order. A `respond` replaces the response with the
    /// filter's local reply; the remaining filters still see it. Returns `respond` if a
    /// filter answered, else `pause` when a filter paused on an upstream's response
    /// (`s.filterPause` says where; `resumeResponse` goes on once the filter called
    /// `s.resumeFilters`; a local reply's filters do not pause: `pause` counts as
    /// `continue` there), else `stopAndBuffer` if a filter asked for the whole body, else
    /// `continue`.
    public func runResponse(_ s: ProxyStream) -> FilterAction {
        runResponse(s, below: filters.count, result: .continue)
    }

    @inline(__always)
    func runResponse(_ s: ProxyStream, below end: Int, result initial: FilterAction) -> FilterAction {
        var result = initial
        var i = end - 1
        while i >= 0 {
            switch filters[i].onResponse(s) {
            case .respond: result = .respond
            case .stopAndBuffer: if result == .continue { result = .stopAndBuffer }
            case .pause where s.localReply == nil:
                s.filterPause.index = i
                s.filterPause.inBody = false
                s.filterPause.inResponse = true
                s.filterPause.responseResult = result
                return .pause
            default: break
            }
            i -= 1
        }
        return result
    }

    /// Goes on with the response filters after the one paused in `onResponse` once its
    /// phase ended with `action`; the result is `runResponse`'s. Clears the pause point.
    public func resumeResponse(_ s: ProxyStream, after action: FilterAction) -> FilterAction {
        let p = s.filterPause
        s.filterPause = FilterPausePoint()
        guard p.index >= 0 else { return action }
        let soFar = p.responseResult
        let merged: FilterAction = action == .respond || soFar == .respond ? .respond : (action == .stopAndBuffer || soFar == .stopAndBuffer ? .stopAndBuffer : .continue)
        return runResponse(s, below: p.index, result: merged)
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

    /// Streamed response body chunks, in reverse order (observe only).
    public func runResponseBody(_ s: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) {
        for f in filters.reversed() where f.wantsResponseBody {
            _ = f.onResponseBody(s, chunk: chunk, endOfStream: endOfStream)
        }
    }

    /// The buffered response body (`s.bufferedResponseBody`), once, with `endOfStream`,
    /// in reverse order. The first `respond` (or `s.respond` called) stops: the response
    /// is replaced by `s.localReply`. Each filter sees the body as the filters before it
    /// left it.
    public func runBufferedResponseBody(_ s: ProxyStream) -> FilterAction {
        let replies = s.replyCount
        var i = filters.count - 1
        while i >= 0 {
            let f = filters[i]
            if f.wantsResponseBody {
                let a = f.onResponseBody(s, chunk: s.bufferedResponseBody ?? ByteBuffer(), endOfStream: true)
                if a == .respond || s.replyCount != replies { return .respond }
            }
            i -= 1
        }
        return .continue
    }

    public func runLog(_ s: ProxyStream) {
        for f in filters { f.onLog(s) }
    }
}
