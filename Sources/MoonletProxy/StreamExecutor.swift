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
        Self.applyRouteResponseEdits(s, to: &head)
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
        if result == .pause { return .paused }
        if result == .respond, s.localReply != nil {
            s.response = nil
            return .localReply
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

    /// A local reply's head and body, after the route's response edits and the response
    /// filters (which may replace the reply or change its status; the head is then
    /// rebuilt keeping the headers they added). Every head is held to LocalReplyCheck
    /// and the head size limit: a reply that would break the client's framing becomes a
    /// clean 500. Sets `s.response`, `s.responseCode` and `s.responseBodyBytes`.
    /// `requestWasHead`: a HEAD request gets no body.
    ///
    /// A reply to a gRPC request (content-type application/grpc) is written as a gRPC
    /// error before the response filters see it (GRPC.localReply, as Envoy's
    /// sendLocalReply): HTTP 200, grpc-status mapped from the HTTP status, grpc-message
    /// the body, no body (trailers-only; on HTTP/2 no content-length either).
    func localReply(_ s: ProxyStream, requestWasHead: Bool) -> (head: HTTPHead, body: ByteBuffer?) {
        guard var reply = s.localReply else { return (Self.localHead(LocalReplyCheck.replacement, allocator: ctx.allocator), nil) }
        if let why = LocalReplyCheck.problem(reply, limits: limits) { reply = rejectLocalReply(s, why) }
        let grpc = s.withRequest { GRPC.isGRPCRequest($0) }
        let h2 = s.protocolName == "HTTP/2"
        if grpc { reply = GRPC.replaceLocalReply(of: s, reply) }
        s.responseCode = reply.status
        var head = Self.localHead(reply, allocator: ctx.allocator, grpcOverHTTP2: grpc && h2)
        Self.applyRouteResponseEdits(s, to: &head)
        s.response = head
        let replaced = chain.runResponse(s) == .respond
        let current = s.localReply ?? reply
        if replaced || current.status != reply.status {
            reply = current
            if let why = LocalReplyCheck.problem(reply, limits: limits) { reply = rejectLocalReply(s, why) }
            if grpc { reply = GRPC.replaceLocalReply(of: s, reply) }
            head = Self.localHead(reply, allocator: ctx.allocator, grpcOverHTTP2: grpc && h2)
            if reply.status == current.status, let edited = s.response {
                head.added.append(contentsOf: edited.added.filter { a in !head.added.contains { $0.name == a.name } })
            }
        } else if let edited = s.response {
            head = edited
        }
        // The proxy frames the reply: a content-length a filter set is dropped.
        if head.added.contains(where: { $0.name == "content-length" }) {
            head.added.removeAll { $0.name == "content-length" }
            for i in head.fields.indices where head.fields[i].kind == .contentLength { head.fields[i].removed = false }
        }
        if let why = LocalReplyCheck.problem(head, limits: limits) {
            reply = rejectLocalReply(s, why)
            if grpc { reply = GRPC.replaceLocalReply(of: s, reply) }
            head = Self.localHead(reply, allocator: ctx.allocator, grpcOverHTTP2: grpc && h2)
        }
        let size = Self.writtenSize(head)
        if size > limits.maxHeadBytes {
            reply = rejectLocalReply(s, "head of \(size) bytes (at most \(limits.maxHeadBytes))")
            if grpc { reply = GRPC.replaceLocalReply(of: s, reply) }
            head = Self.localHead(reply, allocator: ctx.allocator, grpcOverHTTP2: grpc && h2)
        }
        let bodyOK = !requestWasHead && reply.status != 204 && reply.status != 304
        s.response = head
        s.responseCode = reply.status
        s.responseBodyBytes = Int64(bodyOK ? reply.body.utf8.count : 0)
        return (head, bodyOK && !reply.body.isEmpty ? ByteBuffer(string: reply.body) : nil)
    }

    /// A local reply that would break the client's framing: counted, logged, and
    /// replaced by a clean 500 (LocalReplyCheck).
    func rejectLocalReply(_ s: ProxyStream, _ why: String) -> LocalReply {
        ctx.metrics.count("moonlet_local_reply_invalid_total")
        ctx.logger.debug("stream \(s.id): local reply replaced by 500: \(why)")
        s.localReply = LocalReplyCheck.replacement
        return LocalReplyCheck.replacement
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

    // MARK: heads

    /// The matched route's `headers.response` set/add/remove (Envoy applies them in the
    /// router, before the response filters see the head).
    /// Reads the edits through the stream: taking the RouteDecision as an argument would
    /// copy it (a retain of each of its strings and arrays) on every response.
    static func applyRouteResponseEdits(_ s: ProxyStream, to head: inout HTTPHead) {
        for n in s.route.responseRemove { head.remove(n) }
        for (n, v) in s.route.responseSet { head.set(n, v) }
        for (n, v) in s.route.responseAdd { head.addLowercased(n, v) }
    }

    /// The head of a local reply that passed LocalReplyCheck (names are tokens, values
    /// have no control byte, no framing field, within the limits): content-length (none on
    /// 204 and 304), content-type for a text body, the filter's headers. Built in place
    /// (HTTPHeadBuilder), not written as bytes and parsed.
    /// `grpcOverHTTP2`: a gRPC trailers-only reply on HTTP/2, written without
    /// content-length (END_STREAM on its HEADERS frame ends it), as Envoy writes it.
    static func localHead(_ r: LocalReply, allocator: ByteBufferAllocator, grpcOverHTTP2: Bool = false) -> HTTPHead {
        var b = HTTPHeadBuilder(status: r.status, buffer: allocator.buffer(capacity: 128))
        let noBody = r.status == 204 || r.status == 304 || grpcOverHTTP2
        let length = r.body.utf8.count
        if !noBody { b.add("content-length", String(length), kind: .contentLength) }
        if !noBody && !r.headers.contains(where: { $0.name == "content-type" }) && !r.body.isEmpty { b.add("content-type", "text/plain", kind: .other) }
        for h in r.headers where h.name.lowercased() != "content-length" { b.add(h.name, h.value) }
        b.set(framing: noBody || length == 0 ? .none : .contentLength(Int64(length)))
        return b.finish()
    }

    /// The size of `head` as HeadWriter writes it to an HTTP/1.1 client (status line, kept
    /// lines, added lines, the proxy's server and connection lines): HTTP/2 replies are
    /// held to the same head limit.
    static func writtenSize(_ head: HTTPHead) -> Int {
        var n = 17 + 24 + 2 // "server: moonlet", "connection: keep-alive" (at most), the empty line
        if let first = head.fields.first { n += Int(first.lineStart) } else { n += head.bytes.readableBytes - 2 }
        for f in head.fields where !f.removed { n += Int(f.lineEnd - f.lineStart) }
        for a in head.added { n += a.name.utf8.count + a.value.utf8.count + 4 }
        return n
    }
}
