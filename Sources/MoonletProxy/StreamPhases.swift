import NIOCore
import MoonletCore

// MARK: - Stream phases
//
// The executor side of a stream (docs/architecture.md, phases 2 to 8 around the upstream
// dispatch): the request body phase (streamed or buffered for a filter), the response
// head phase with the route's edits and the response filters, the response body and end,
// local replies through the response filters, and the end of the stream (on_log,
// telemetry, slots and endpoint released, keep-alive or close). The request head phase
// starts in DownstreamHandler.startStream; the writes go through the downstream stream
// interface (sendHead/sendBody/sendEnd). An extension of the handler: the stream's state
// is the handler's and every call is direct.

extension DownstreamHandler {
    func requestBodyChunk(_ chunk: ByteBuffer) {
        guard let s = stream else { return }
        if filterPauseState != nil { holdWhilePaused(chunk); return }
        s.requestBodyBytes += Int64(chunk.readableBytes)
        if s.localReply != nil { return } // replying locally: drain and drop
        if case .buffered = requestState {
            if s.bufferedRequestBody!.readableBytes + chunk.readableBytes > limits.maxBufferedBodyBytes {
                requestState = .body
                s.bufferedRequestBody = nil
                localReplyAndClose(413, "request body larger than \(limits.maxBufferedBodyBytes) bytes")
                return
            }
            var c = chunk
            s.bufferedRequestBody!.writeBuffer(&c)
            return
        }
        if chain.wantsRequestBody, chain.runRequestBody(s, chunk: chunk, endOfStream: false) == .respond {
            if upstream == nil && !dispatcher.state.isConnecting { sendLocalReply() } else { abortUpstreamAndReply() }
            return
        }
        let out = ChunkedEncoder.frame(chunk, chunked: requestChunked, allocator: ctx.allocator)
        dispatcher.recordForReplay(out)
        if let u = upstream, let ch = u.channel {
            writeUpstream(u, out)
            if !ch.isWritable { setReading(false) }
        } else if dispatcher.pending != nil {
            var o = out
            dispatcher.pending!.writeBuffer(&o)
            if dispatcher.pending!.readableBytes > limits.highWaterMarkBytes { setReading(false) }
        }
    }

    func requestBodyEnd() {
        reqDecoder = nil
        if filterPauseState != nil { holdEndWhilePaused(); return }
        let buffered = requestState.isBuffered
        requestState = .complete(buffered: buffered)
        guard let s = stream else { return }
        if s.localReply != nil {
            if !responseStarted && upstream == nil && !dispatcher.state.isConnecting { sendLocalReply() }
            return
        }
        if buffered {
            switch chain.runRequestBody(s, chunk: s.bufferedRequestBody ?? ByteBuffer(), endOfStream: true) {
            case .respond: sendLocalReply(); return
            case .pause: pauseFilters(s); return
            default: break
            }
            dispatcher.start()
            return
        }
        if chain.wantsRequestBody, chain.runRequestBody(s, chunk: ByteBuffer(), endOfStream: true) == .respond {
            abortUpstreamAndReply(); return
        }
        if requestChunked {
            if let u = upstream { writeUpstream(u, ByteBuffer(staticString: ChunkedEncoder.lastChunk)) }
            else if dispatcher.pending != nil { dispatcher.pending!.writeStaticString(ChunkedEncoder.lastChunk) }
            dispatcher.recordForReplay(ByteBuffer(staticString: ChunkedEncoder.lastChunk))
            requestChunked = false
        }
        if !dispatcher.mirrorHeads.isEmpty { dispatcher.sendMirrors() }
    }

    func abortUpstreamAndReply() {
        if let u = upstream { u.abandon(); upstream = nil }
        dispatcher.pending = nil
        if responseStarted { resetDownstream(); return }
        if !requestState.isComplete { closeAfterResponse() }
        sendLocalReply()
    }

    // MARK: response side

    func upstreamResponseHead(_ headIn: consuming HTTPHead) {
        guard let s = stream else { return }
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster { ctx.balancer.report(c, s.route.endpointIndex, status: headIn.status) }
        if dispatcher.retryIfAllowed(s, .response(status: headIn.status)) { return }
        if dispatcher.attempt > 0 && (s.route.retry?.retries(status: headIn.status) ?? false) { s.responseFlags.insert(.upstreamRetryLimitExceeded) }
        streamTimer?.cancel(); streamTimer = nil
        dispatcher.perTryTimer?.cancel(); dispatcher.perTryTimer = nil
        var head = consume headIn
        head.stripHopByHop()
        head.removeAll(of: .server)
        Self.applyRouteResponseEdits(s, to: &head)
        if chain.filters.isEmpty {
            sendHead(head)
            s.response = consume head
            return
        }
        head.markFiltersStart()
        s.response = consume head
        if chain.runResponse(s) == .respond, s.localReply != nil {
            // A response filter replaced the upstream response.
            if let u = upstream { u.abandon(); upstream = nil }
            s.response = nil
            sendLocalReply()
            return
        }
        // Taken out of the stream while it is written, so it is not copied.
        let edited = s.response.take()!
        // The filters' edits are checked as a local reply's are: none is written if the
        // head would break the client's framing or limits; a clean 500 goes instead.
        if let why = LocalReplyCheck.problem(edited, limits: limits) {
            if let u = upstream { u.abandon(); upstream = nil }
            _ = rejectLocalReply(s, why)
            sendLocalReply()
            return
        }
        sendHead(edited)
        s.response = consume edited
    }

    func upstreamResponseBody(_ chunk: ByteBuffer) {
        guard let s = stream else { return }
        s.responseBodyBytes += Int64(chunk.readableBytes)
        if chain.wantsResponseBody { chain.runResponseBody(s, chunk: chunk, endOfStream: false) }
        sendBody(chunk)
    }

    func upstreamResponseEnd(reusable: Bool) {
        guard let s = stream else { return }
        let now = NIODeadline.now().uptimeNanoseconds
        if chain.wantsResponseBody { chain.runResponseBody(s, chunk: ByteBuffer(), endOfStream: true) }
        sendEnd()
        if let u = upstream {
            upstream = nil
            if upstreamPaused { upstreamPaused = false; u.channel?.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in } }
            let cap = s.route.upstreamCluster?.maxRequestsPerConnection ?? 0
            if reusable && requestState.isComplete && !requestChunked && (cap == 0 || u.requestsServed < cap) { ctx.pool.release(u, now: now) }
            else if u.multiplexed && requestState.isComplete {
                // An HTTP/2 stream both sides have ended closes by itself; closing it
                // here would send RST_STREAM, which peers count against rapid-reset limits.
            } else { u.channel?.close(promise: nil) }
        }
        finishStream(s, now: now)
    }

    // MARK: local replies

    /// Sends `stream.localReply` through the response filters, then finishes the stream.
    func sendLocalReply() {
        guard let s = stream, var reply = s.localReply else { return }
        streamTimer?.cancel(); streamTimer = nil
        dispatcher.perTryTimer?.cancel(); dispatcher.perTryTimer = nil
        if let u = upstream { u.abandon(); upstream = nil }
        dispatcher.pending = nil
        if !requestState.isComplete && reqDecoder == nil && h2 == nil { requestState = .complete(buffered: requestState.isBuffered) }
        if !requestState.isComplete {
            // Unread request body: it can't be skipped reliably if large; close after.
            closeAfterResponse()
        }
        if let why = LocalReplyCheck.problem(reply, limits: limits) { reply = rejectLocalReply(s, why) }
        s.responseCode = reply.status
        var head = localHead(&reply, s)
        Self.applyRouteResponseEdits(s, to: &head)
        s.response = head
        // A response filter may replace the reply (s:respond) or set its status; the
        // head is then rebuilt, keeping the headers filters added.
        let replaced = chain.runResponse(s) == .respond
        let current = s.localReply ?? reply
        if replaced || current.status != reply.status {
            reply = current
            if let why = LocalReplyCheck.problem(reply, limits: limits) { reply = rejectLocalReply(s, why) }
            head = localHead(&reply, s)
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
            head = localHead(&reply, s)
        }
        let bodyOK = !s.request.isHead && reply.status != 204 && reply.status != 304
        let size = Self.writtenSize(head)
        if size > limits.maxHeadBytes {
            reply = rejectLocalReply(s, "head of \(size) bytes (at most \(limits.maxHeadBytes))")
            head = localHead(&reply, s)
        }
        s.response = head
        s.responseCode = reply.status
        s.responseBodyBytes = Int64(bodyOK ? reply.body.utf8.count : 0)
        // The same writes as a proxied response (HTTP/1.1: head and a small body in one
        // write from the output buffer pool; HTTP/2: HPACK from the head, END_STREAM on
        // the last frame).
        sendHead(head)
        if bodyOK && !reply.body.isEmpty { sendBody(ByteBuffer(string: reply.body)) }
        sendEnd()
        flushDownstream()
        finishStream(s)
    }

    /// A local reply that would break the client's framing: counted, logged, and
    /// replaced by a clean 500 (LocalReplyCheck).
    func rejectLocalReply(_ s: ProxyStream, _ why: String) -> LocalReply {
        ctx.metrics.count("moonlet_local_reply_invalid_total")
        ctx.logger.debug("stream \(s.id): local reply replaced by 500: \(why)")
        s.localReply = LocalReplyCheck.replacement
        return LocalReplyCheck.replacement
    }

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
    static func localHead(_ r: LocalReply, allocator: ByteBufferAllocator) -> HTTPHead {
        var b = HTTPHeadBuilder(status: r.status, buffer: allocator.buffer(capacity: 128))
        let noBody = r.status == 204 || r.status == 304
        let length = r.body.utf8.count
        if !noBody { b.add("content-length", String(length), kind: .contentLength) }
        if !noBody && !r.headers.contains(where: { $0.name == "content-type" }) && !r.body.isEmpty { b.add("content-type", "text/plain", kind: .other) }
        for h in r.headers where h.name.lowercased() != "content-length" { b.add(h.name, h.value) }
        b.set(framing: noBody || length == 0 ? .none : .contentLength(Int64(length)))
        return b.finish()
    }

    /// The head of `reply`, which LocalReplyCheck passed (`reply` stays as it is; the
    /// parameter is inout for the callers that replace it on a later check).
    func localHead(_ reply: inout LocalReply, _ s: ProxyStream) -> HTTPHead {
        Self.localHead(reply, allocator: ctx.allocator)
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

    func localReplyAndClose(_ status: Int, _ reason: String) {
        guard let s = stream else { return }
        closeAfterResponse()
        s.respond(status, body: reason + "\n", headers: [])
        requestState = .complete(buffered: requestState.isBuffered)
        reqDecoder = nil
        if let u = upstream { u.abandon(); upstream = nil }
        dispatcher.pending = nil
        if responseStarted { finishStream(s); resetDownstream() } else { sendLocalReply() }
    }

    // MARK: end of stream

    /// `now`: the clock, when the caller has just read it (0: read it here).
    func finishStream(_ s: ProxyStream, now nowIn: UInt64 = 0) {
        guard stream === s else { return }
        filterPauseState = nil
        let now = nowIn != 0 ? nowIn : NIODeadline.now().uptimeNanoseconds
        releaseHeldHead()
        responseState = .none
        streamTimer?.cancel(); streamTimer = nil
        dispatcher.streamEnded(s)
        chain.runLog(s)
        ctx.lua.endStream(s)
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster { ctx.balancer.done(c, s.route.endpointIndex) }
        telemetry.record(s, now: now, ctx: ctx, peerPrincipal: peer.principal, upstreamMTLS: dispatcher.tls?.mode == .istioMutual)
        s.end()
        stream = nil
        let requestUnfinished = !requestState.isComplete
        requestState = .head
        ctx.activeStreams -= 1
        if let u = upstream { u.abandon(); upstream = nil }
        dispatcher.pending = nil
        dispatcher.state = .idle
        switch connection {
        case .closed: return
        case .closeAfterResponse: connection = .closed; closeDownstream(); return
        case .open: break
        }
        if requestUnfinished {
            // Answered before the body ended (local reply): the rest of the body cannot be
            // told apart from the next request reliably, so the connection closes.
            connection = .closed; closeTransport(); return
        }
        setReading(true)
        lastActivity = now
        if (inbound?.readableBytes ?? 0) > 0 { process() }
    }

}
