import NIOCore
import MoonletCore

// MARK: - Stream phases, the handler's side
//
// What the handler does around each phase the executor runs (StreamExecutor.swift;
// docs/architecture.md, phases 2 to 8 around the upstream dispatch): relays or buffers
// the request body, writes the response head the executor passed (or the local reply
// it built), relays the response body and end, and ends the stream (the executor's log
// phase, slots and endpoint released, keep-alive or close). The request head phase
// starts in DownstreamHandler.startStream; the writes go through the downstream stream
// interface (sendHead/sendBody/sendEnd).

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
        if exec.wantsRequestBody, exec.requestBody(s, chunk, endOfStream: false) == .respond {
            if upstream == nil && !dispatcher.state.isConnecting { sendLocalReply() } else { abortUpstreamAndReply() }
            return
        }
        let out = ChunkedEncoder.frame(chunk, chunked: requestChunked, allocator: ctx.allocator)
        dispatcher.recordForReplay(out)
        if let u = upstream {
            writeUpstream(u, out)
            if !u.isWritable { setReading(false) }
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
            switch exec.requestBody(s, s.bufferedRequestBody ?? ByteBuffer(), endOfStream: true) {
            case .respond: sendLocalReply(); return
            case .pause: pauseFilters(s); return
            default: break
            }
            dispatcher.start()
            return
        }
        if exec.wantsRequestBody, exec.requestBody(s, ByteBuffer(), endOfStream: true) == .respond {
            abortUpstreamAndReply(); return
        }
        if requestChunked {
            // The last chunk, with the request's trailers if it has some.
            let last = ChunkedEncoder.lastChunk(trailers: s.requestTrailers)
            if let u = upstream { writeUpstream(u, last) }
            else if dispatcher.pending != nil { var l = last; dispatcher.pending!.writeBuffer(&l) }
            dispatcher.recordForReplay(last)
            requestChunked = false
        } else if let u = upstream, u.multiplexed {
            // HTTP/2: the stream ends here, the trailers after a content-length body's DATA.
            u.requestEnded(trailers: s.requestTrailers)
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
        let outcome = AttemptOutcome.response(status: headIn.status, grpcStatus: AttemptOutcome.grpcStatus(of: headIn))
        if dispatcher.retryIfAllowed(s, outcome) { return }
        if dispatcher.attempt > 0, let r = s.route.retry, outcome.isRetried(by: r) { s.responseFlags.insert(.upstreamRetryLimitExceeded) }
        streamTimer?.cancel(); streamTimer = nil
        dispatcher.perTryTimer?.cancel(); dispatcher.perTryTimer = nil
        var head = consume headIn
        // Istio's metadata exchange: the peer's headers read and removed, ours added
        // (PeerExchange.swift), before the route's edits and the response filters.
        peerExchange.responseHead(&head, s, inbound: role == .inbound, downstreamMTLS: peerMTLS, ctx: ctx)
        switch exec.responseHead(s, consume head) {
        case .send:
            // Taken out of the stream while it is written, so it is not copied.
            let head = s.response.take()!
            sendHead(head)
            s.response = consume head
        case .localReply:
            // A response filter answered, or its edits would break the client's framing.
            if let u = upstream { u.abandon(); upstream = nil }
            sendLocalReply()
        case .buffer:
            // A response filter wants the whole body: held until upstreamResponseEnd.
            responseState = .buffering
        case .paused:
            pauseResponseFilters(s)
        }
    }

    /// The upstream's trailers (right before upstreamResponseEnd); those a filter set
    /// before they came keep their values.
    func upstreamResponseTrailers(_ t: HTTPTrailers) {
        guard let s = stream else { return }
        if s.responseTrailers == nil { s.responseTrailers = t } else { s.responseTrailers!.merge(under: t) }
    }

    func upstreamResponseBody(_ chunk: ByteBuffer) {
        guard let s = stream else { return }
        if responsePauseState != nil { holdResponseWhilePaused(chunk); return }
        if responseState == .buffering { bufferResponseChunk(s, chunk); return }
        s.responseBodyBytes += Int64(chunk.readableBytes)
        exec.responseBody(s, chunk, endOfStream: false)
        sendBody(chunk)
    }

    func upstreamResponseEnd(reusable: Bool) {
        guard let s = stream else { return }
        if let p = responsePauseState { p.ended = true; p.reusable = reusable; return }
        let now = NIODeadline.now().uptimeNanoseconds
        if responseState == .buffering {
            releaseUpstream(s, reusable: reusable, now: now)
            sendBufferedResponse(s)
            return
        }
        exec.responseBody(s, ByteBuffer(), endOfStream: true)
        sendEnd()
        releaseUpstream(s, reusable: reusable, now: now)
        finishStream(s, now: now)
    }

    /// The upstream response ended: its connection goes back to the pool when it can
    /// serve another request, else it closes (an HTTP/2 stream ends by itself).
    func releaseUpstream(_ s: ProxyStream, reusable: Bool, now: UInt64) {
        if let u = upstream {
            upstream = nil
            if upstreamPaused { upstreamPaused = false; u.setReading(true) }
            let cap = s.route.upstreamCluster?.maxRequestsPerConnection ?? 0
            if reusable && requestState.isComplete && !requestChunked && (cap == 0 || u.requestsServed < cap) { ctx.pool.release(u, now: now) }
            else if u.multiplexed && requestState.isComplete {
                // An HTTP/2 stream both sides have ended closes by itself; closing it
                // here would send RST_STREAM, which peers count against rapid-reset limits.
            } else { u.close() }
        }
    }

    // MARK: buffered responses (a response filter returned stop-and-buffer)

    /// A chunk of a buffered response body: collected, bounded by maxBufferedBodyBytes.
    /// Beyond, the response is replaced by Envoy's answer to a response buffer overflow
    /// before headers were sent: 500 "Internal Server Error", details
    /// response_payload_too_large; the upstream connection is dropped.
    func bufferResponseChunk(_ s: ProxyStream, _ chunk: ByteBuffer) {
        guard s.bufferedResponseBody != nil else { return }
        if s.bufferedResponseBody!.readableBytes + chunk.readableBytes > limits.maxBufferedBodyBytes {
            ctx.metrics.count("moonlet_response_too_large_total")
            s.bufferedResponseBody = nil
            s.response = nil
            s.responseTrailers = nil
            if let u = upstream { u.abandon(); upstream = nil }
            responseState = .none
            s.vars["response_code_details"] = "response_payload_too_large"
            s.respond(500, body: "Internal Server Error", headers: [])
            if !requestState.isComplete { closeAfterResponse() }
            sendLocalReply()
            return
        }
        var c = chunk
        s.bufferedResponseBody!.writeBuffer(&c)
    }

    /// The buffered response is complete (its trailers are in `s.responseTrailers`): the
    /// filters' body phase runs once, then the head (framed for the final body), the body
    /// and the trailers are written, or the local reply a filter made.
    func sendBufferedResponse(_ s: ProxyStream) {
        responseState = .none
        let isHead = s.withRequest { $0.isHead }
        let needChunked = h2 == nil
        switch exec.bufferedResponseEnd(s, requestWasHead: isHead, trailersNeedChunked: needChunked) {
        case .localReply:
            s.responseTrailers = nil
            sendLocalReply()
        case .send, .buffer, .paused:
            let body = s.bufferedResponseBody.take() ?? ByteBuffer()
            let head = s.response.take()!
            sendHead(head)
            s.response = consume head
            let bodyOK = !isHead && s.status != 204 && s.status != 304
            if bodyOK && body.readableBytes > 0 {
                s.responseBodyBytes = Int64(body.readableBytes)
                sendBody(body)
            }
            sendEnd()
            finishStream(s)
        }
    }

    // MARK: local replies

    /// Sends `stream.localReply` through the response filters (the executor builds the
    /// head and body), then finishes the stream.
    func sendLocalReply() {
        guard let s = stream, s.localReply != nil else { return }
        streamTimer?.cancel(); streamTimer = nil
        dispatcher.perTryTimer?.cancel(); dispatcher.perTryTimer = nil
        if let u = upstream { u.abandon(); upstream = nil }
        dispatcher.pending = nil
        if !requestState.isComplete && reqDecoder == nil && h2 == nil { requestState = .complete(buffered: requestState.isBuffered) }
        if !requestState.isComplete {
            // Unread request body: it can't be skipped reliably if large; close after.
            closeAfterResponse()
        }
        var (head, body) = exec.localReply(s, requestWasHead: s.withRequest({ $0.isHead }))
        // An mTLS caller learns this sidecar's workload from a local reply too (an RBAC
        // 403, a fault abort), as Istio's metadata exchange adds its headers to every
        // response it encodes (PeerExchange.swift).
        if role == .inbound && peerMTLS && head.first(PeerExchange.header) == nil { PeerExchange.addOwn(&head, ctx: ctx) }
        // The same writes as a proxied response (HTTP/1.1: head and a small body in one
        // write from the output buffer pool; HTTP/2: HPACK from the head, END_STREAM on
        // the last frame).
        sendHead(head)
        if let body { sendBody(body) }
        sendEnd()
        flushDownstream()
        finishStream(s)
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
        responsePauseState = nil
        let now = nowIn != 0 ? nowIn : NIODeadline.now().uptimeNanoseconds
        releaseHeldHead()
        responseState = .none
        streamTimer?.cancel(); streamTimer = nil
        dispatcher.streamEnded(s)
        exec.finish(s)
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
