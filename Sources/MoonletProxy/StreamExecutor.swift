import NIOCore
import MoonletCore
import MoonletHTTP

/// The stream executor: runs one stream's phases through the filter chain and decides
/// what the stream does next, without doing any I/O itself (docs/architecture.md has the
/// phase chart). Its owner, DownstreamHandler, reads the request and writes the response
/// (through the downstream stream interface), and its UpstreamDispatcher connects and
/// retries; at each phase they hand the stream here and act on the answer.
///
/// One per downstream connection (or HTTP/2 stream), reused by the connection's streams.
/// Everything runs on the connection's event loop.
final class StreamExecutor {
    let ctx: LoopContext
    let limits: ProxyLimits
    /// The chain the current stream started with: a reload that swaps the loop's chain
    /// never changes the filters under a running stream.
    private(set) var chain: FilterChain = .empty
    /// Counts the requests that never became streams (their head did not parse); the
    /// streams' own metrics are recorded by the istio-stats filter's on_log.
    var telemetry: StreamTelemetry

    init(ctx: LoopContext, role: ListenerRole) {
        self.ctx = ctx
        self.limits = ctx.settings.limits
        telemetry = StreamTelemetry(role: role)
    }

    /// What became of an upstream response head after the route's edits and the
    /// response filters.
    enum ResponseHeadOutcome {
        /// `s.response` holds the head to write to the client.
        case send
        /// A response filter answered (s:respond), or the filters' edits would break the
        /// client's framing: `s.localReply` is set; the upstream response is dropped and
        /// the local reply goes out instead.
        case localReply
        /// A response filter asked for the whole body (`stopAndBuffer`): `s.response`
        /// holds the head, `s.bufferedResponseBody` is started; nothing is written until
        /// the body and trailers are in (`bufferedResponseEnd`).
        case buffer
        /// A response filter paused (moonlet.http.call in on_response): nothing goes to
        /// the client until it resumes (`resumeResponseHead`); FilterPause.swift.
        case paused
    }

    // MARK: request

    /// Request head phase: runs when the head is parsed and the stream made, before
    /// anything goes upstream. Returns the chain's decision: continue (go upstream),
    /// stop and buffer (read the whole body first), respond (`s.localReply` is set), or
    /// pause (a filter waits for work of its own, moonlet.http.call; FilterPause.swift).
    @inline(__always)
    func requestHead(_ s: ProxyStream) -> FilterAction {
        chain = ctx.chain
        return chain.runRequest(s)
    }

    /// Whether any filter of the stream's chain observes request body chunks (when none
    /// does, the body is relayed without calls).
    var wantsRequestBody: Bool { chain.wantsRequestBody }

    /// Request body phase: one chunk as it streams, or the whole buffered body once with
    /// `endOfStream`. `.respond`: a filter answered locally (`s.localReply` is set);
    /// `.pause` (whole body only): a filter waits for work of its own (FilterPause.swift).
    @inline(__always)
    func requestBody(_ s: ProxyStream, _ chunk: ByteBuffer, endOfStream: Bool) -> FilterAction {
        chain.runRequestBody(s, chunk: chunk, endOfStream: endOfStream)
    }

    /// A paused filter's phase ended with `action`: the request phase goes on after it.
    /// Returns the chain's decision, `.pause` when a later filter paused in turn.
    func resumeRequest(_ s: ProxyStream, after action: FilterAction) -> FilterAction {
        chain.resumeRequest(s, after: action)
    }

    // MARK: upstream

    /// Whether a filter wants `on_upstream_failure` (the dispatcher then keeps a replay
    /// copy of the request even without a route retry policy).
    var wantsUpstreamFailure: Bool { chain.wantsUpstreamFailure }

    /// Upstream failure phase: an attempt failed; the first filter with an opinion
    /// decides whether to retry (`.routePolicy`: the route's retry policy decides).
    func upstreamFailure(_ s: ProxyStream, _ failure: UpstreamFailureInfo) -> RetryVerdict {
        chain.filters.isEmpty ? .routePolicy : chain.runUpstreamFailure(s, failure)
    }

    // MARK: response

    /// Response head phase for an upstream head: hop-by-hop fields and `server` go, the
    /// route's `headers.response` edits apply, then the response filters run in reverse
    /// chain order. The head ends in `s.response` (`.send`), or is replaced by a local
    /// reply (`.localReply`).
    @inline(__always)
    func responseHead(_ s: ProxyStream, _ headIn: consuming HTTPHead) -> ResponseHeadOutcome {
        var head = consume headIn
        head.stripHopByHop()
        head.removeAll(of: .server)
        LocalReplyBuilder.applyRouteResponseEdits(s, to: &head)
        if chain.filters.isEmpty {
            s.response = consume head
            return .send
        }
        head.markFiltersStart()
        s.response = consume head
        return responseFiltersDone(s, chain.runResponse(s))
    }

    /// The response filters paused on `s` ended their phase with `action`: the rest of
    /// them run, then the head is checked as `responseHead` does.
    func resumeResponseHead(_ s: ProxyStream, after action: FilterAction) -> ResponseHeadOutcome {
        responseFiltersDone(s, chain.resumeResponse(s, after: action))
    }

    @inline(__always)
    func responseFiltersDone(_ s: ProxyStream, _ result: FilterAction) -> ResponseHeadOutcome {
        switch result {
        case .pause: return .paused
        case .respond where s.localReply != nil:
            s.response = nil
            return .localReply
        case .stopAndBuffer:
            // Checked when it goes out (the body phase may still edit it).
            s.bufferedResponseBody = ctx.allocator.buffer(capacity: 0)
            return .buffer
        default: break
        }
        // The filters' edits are checked as a local reply's are: none is written if the
        // head would break the client's framing or limits; a clean 500 goes instead.
        // Taken out of the stream while it is checked, so it is not copied.
        let edited = s.response.take()!
        if let why = LocalReplyCheck.problem(edited, limits: limits) {
            _ = rejectLocalReply(s, why)
            return .localReply
        }
        s.response = consume edited
        return .send
    }

    /// Response body phase: one chunk of the upstream's body (observe only), or the end
    /// with an empty chunk and `endOfStream`.
    @inline(__always)
    func responseBody(_ s: ProxyStream, _ chunk: ByteBuffer, endOfStream: Bool) {
        if chain.wantsResponseBody { chain.runResponseBody(s, chunk: chunk, endOfStream: endOfStream) }
    }

    /// The buffered response is complete (body in `s.bufferedResponseBody`, trailers in
    /// `s.responseTrailers`): every `onResponseBody` gets it once with `endOfStream`; then
    /// the head is framed for the final body: content-length of its size (transfer-encoding
    /// goes), except when trailers go to an HTTP/1.1 client, which need chunked framing
    /// (`trailersNeedChunked`), as Envoy's HTTP/1 codec writes trailers only in a chunked
    /// body. A HEAD response, and 204/304, keep their head's framing fields (they carry no
    /// body). The head is held to LocalReplyCheck as any filter-edited head. `.send`:
    /// `s.response` and `s.bufferedResponseBody` are what to write; `.localReply`: a
    /// filter answered, or the head is refused (`s.localReply` is set).
    func bufferedResponseEnd(_ s: ProxyStream, requestWasHead: Bool, trailersNeedChunked: Bool) -> ResponseHeadOutcome {
        if chain.runBufferedResponseBody(s) == .respond, s.localReply != nil {
            s.response = nil
            s.bufferedResponseBody = nil
            return .localReply
        }
        guard var head = s.response.take() else { return .localReply }
        let status = head.status
        if !requestWasHead && status != 204 && status != 304 && !(100...199).contains(status) {
            let length = s.bufferedResponseBody?.readableBytes ?? 0
            let hadBody = head.framing != .none
            for i in head.fields.indices where head.fields[i].kind == .contentLength || head.fields[i].kind == .transferEncoding {
                head.fields[i].removed = true
            }
            head.added.removeAll { $0.name == "content-length" || $0.name == "transfer-encoding" }
            if trailersNeedChunked && !(s.responseTrailers?.isEmpty ?? true) {
                head.framing = .chunked
            } else if length > 0 || hadBody || trailersNeedChunked {
                // An HTTP/1.1 client (trailersNeedChunked) always gets a length, 0 included:
                // a head with no framing would read as "body until close".
                head.addLowercased("content-length", String(length))
                head.framing = .contentLength(Int64(length))
            } else {
                head.framing = .none
            }
        }
        if let why = LocalReplyCheck.problem(head, limits: limits) {
            _ = rejectLocalReply(s, why)
            s.bufferedResponseBody = nil
            return .localReply
        }
        s.response = consume head
        return .send
    }

    /// A local reply's head and body as the client gets it (LocalReplyBuilder, in
    /// MoonletCore, shared with the offline filter harness): LocalReplyCheck, the gRPC
    /// mapping, the route's response edits, the response filters (which may replace the
    /// reply or change its status, or take its body with stop-and-buffer), the header
    /// retention rule and the head limits; a reply that would break the client's framing
    /// becomes a clean 500 (counted, logged). Sets `s.response`, `s.responseCode` and
    /// `s.responseBodyBytes`. `requestWasHead`: a HEAD request gets no body.
    func localReply(_ s: ProxyStream, requestWasHead: Bool) -> (head: HTTPHead, body: ByteBuffer?) {
        LocalReplyBuilder.build(s, chain: chain, limits: limits, requestWasHead: requestWasHead, allocator: ctx.allocator) { why in
            noteRejected(s, why)
        }
    }

    /// A local reply that would break the client's framing: counted, logged, and
    /// replaced by a clean 500 (LocalReplyCheck).
    func rejectLocalReply(_ s: ProxyStream, _ why: String) -> LocalReply {
        noteRejected(s, why)
        s.localReply = LocalReplyCheck.replacement
        return LocalReplyCheck.replacement
    }

    func noteRejected(_ s: ProxyStream, _ why: String) {
        ctx.metrics.count("moonlet_local_reply_invalid_total")
        ctx.logger.debug("stream \(s.id): local reply replaced by 500: \(why)")
    }

    // MARK: end

    /// Log phase: runs once for every stream after its last byte was sent or it failed:
    /// on_log of every filter (the builtin istio-stats records Istio's request metrics
    /// there), the Lua state of the stream released, the endpoint's request done for the
    /// balancer.
    func finish(_ s: ProxyStream) {
        chain.runLog(s)
        ctx.lua.endStream(s)
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster { ctx.balancer.done(c, s.route.endpointIndex) }
    }

    /// A request whose head did not parse (never a stream): counted with flag DPE.
    func protocolError(status: Int, responseBytes: Int) {
        telemetry.recordProtocolError(status: status, responseBytes: responseBytes, ctx: ctx)
    }
}
