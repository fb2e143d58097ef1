import NIOCore
import MoonletCore
import MoonletTelemetry
import MoonletBalancer
import MoonletTLS
import NIOSSL
import NIOTLS

/// The HTTP/1.1 fast path: one handler per downstream connection (or per HTTP/2 stream,
/// see HTTP2ServerStream) owns each stream from its first byte to its log line. It
/// parses heads in place, hands the stream to its executor at each phase
/// (docs/architecture.md has the lifecycle), writes the upstream request as the original
/// bytes with the filters' edits spliced in, and relays bodies as slices. Everything runs
/// on the connection's loop.
///
/// Split by concern: this file has the connection, the HTTP/1.1 request codec, the
/// request head phase and the calls of the downstream stream interface
/// (sendHead/sendBody/sendEnd, written by HTTP1Downstream or HTTP2ServerStream, see
/// DownstreamStream.swift). The phases themselves (filter chain, route response edits,
/// local reply heads, the log phase and request metrics) run in the StreamExecutor
/// (StreamExecutor.swift), which does no I/O; the handler's side of them (body relay,
/// writes, end of stream) is in StreamPhases.swift; the upstream side (endpoint, limits,
/// connect, retries with on_upstream_failure, mirrors) in UpstreamDispatcher
/// (UpstreamDispatch.swift, its own type with the attempt's state, one per handler,
/// pooled per loop); the per-side states in StreamStates.swift.
final class DownstreamHandler: ChannelInboundHandler, UpstreamDelegate {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let ctx: LoopContext
    let role: ListenerRole
    let limits: ProxyLimits
    var context: ChannelHandlerContext!
    var inbound: ByteBuffer?
    var parser: HTTPHeadParser
    var peer = PeerInfo(address: "")
    var peerIP = ""
    /// "ip:port" this connection was accepted on (the inbound stream's destination address).
    var localAddress = ""
    /// The downstream authenticated with mTLS (inbound): only then has it a principal.
    var peerMTLS: Bool { !peer.principal.isEmpty }
    /// The mTLS peer's X-Forwarded-Client-Cert element, once made (clientCertElement).
    var xfccElement: String?
    /// Closes a connection whose TLS handshake (or PERMISSIVE first byte) takes too long.
    var handshakeTimer: Scheduled<Void>?
    /// Where the connection's transport is: TLS handshake done or not (later TLS errors, an
    /// unclean close, are not refusals), first bytes read or not (they may be the HTTP/2
    /// preface, h2c prior knowledge). A stream's handler never reads a channel, so never
    /// leaves `.fresh`.
    var transport = TransportState.fresh

    // Current stream.
    var stream: ProxyStream?
    /// Runs the stream's phases through the filter chain and decides (StreamExecutor.swift);
    /// this handler does the reading and writing.
    let exec: StreamExecutor
    var reqDecoder: BodyDecoder?
    /// Where the current request is (head awaited, body streaming or being buffered,
    /// complete).
    var requestState = RequestState.head
    /// The upstream request is chunk-framed and its last chunk is not written yet. A flag,
    /// not a state: it holds across the RequestState cases (body, buffered, complete) and
    /// ends when the last chunk is written, which is not a change of the request's state.
    var requestChunked = false
    /// The upstream side of the streams (UpstreamDispatch.swift): endpoint, limits, pool
    /// wait, connect, retries, mirrors, and the current attempt's state.
    let dispatcher: UpstreamDispatcher
    /// Where the response to the client is (none yet, head held, streaming, ended). An
    /// HTTP/2 stream may close while an ended response is flushed, which is then not a
    /// downstream disconnect.
    var responseState = ResponseState.none
    /// The upstream's reading is paused because the downstream cannot take more; undone
    /// before the connection goes back to the pool (or an HTTP/2 stream finishes). A
    /// flag: backpressure, independent of the attempt's UpstreamState (always attached).
    var upstreamPaused = false
    /// Open, closing once the current response is written, or closed.
    var connection = ConnectionState.open
    var streamTimer: Scheduled<Void>?
    /// When an incomplete request head times out (uptime ns; 0: no head pending).
    var headerDeadline: UInt64 = 0
    /// Place in the loop's watch list (LoopContext.watch), -1 when not watched.
    var watchIndex = -1
    var lastActivity: UInt64 = 0
    /// Istio's metadata exchange headers of this connection's streams (PeerExchange.swift).
    var peerExchange = PeerExchange()
    /// Set while a filter has the stream paused (FilterPause.swift): the request body
    /// bytes held meanwhile.
    var filterPauseState: FilterPauseState?
    /// Set while a response filter has the stream paused: the upstream's body held.
    var responsePauseState: FilterPauseState?

    /// Where the responses go (DownstreamStream.swift): the connection's HTTP/1.1 writer,
    /// or the HTTP/2 stream this handler serves (its bytes come from and go to the
    /// stream, not a channel: `context` stays nil). An HTTP/2 connection reuses a
    /// finished stream's handler for its next stream (h2StreamReused).
    private(set) var downstream: Downstream
    /// The HTTP/2 stream this handler serves, if it serves one.
    var h2: HTTP2ServerStream? { downstream.http2 }
    /// Whether this handler serves one HTTP/2 stream.
    var http2Stream: Bool { h2 != nil }
    /// After the switch to HTTP/2 this connection's bytes go to its HTTP/2 server side.
    var h2Connection: HTTP2ServerConnection?
    /// The original destination of an intercepted connection (Interception.swift), nil
    /// when the client called the listener itself.
    var interception: InterceptedDestination?

    /// `stream`: the HTTP/2 stream this handler serves (nil: an HTTP/1.1 connection).
    init(ctx: LoopContext, role: ListenerRole, stream: HTTP2ServerStream? = nil) {
        self.ctx = ctx
        downstream = stream.map { .http2($0) } ?? .http1(HTTP1Downstream(ctx: ctx))
        self.role = role
        self.limits = ctx.settings.limits
        exec = StreamExecutor(ctx: ctx, role: role)
        dispatcher = ctx.takeDispatcher()
        parser = HTTPHeadParser(limits: HTTPParserLimits(maxHeadBytes: limits.maxHeadBytes, maxHeaderCount: limits.maxHeaderCount))
        ctx.liveHandlers += 1
        dispatcher.h = self
    }

    deinit {
        ctx.liveHandlers -= 1
        // Nothing refers to the dispatcher any more: its callbacks all held this handler.
        ctx.giveBack(dispatcher)
    }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if case .http1(let d) = downstream { d.context = context }
    }

    /// The connection is gone: drop the stored context. Handler and context refer to each
    /// other, so without this every closed connection's handler, context and buffers
    /// stayed in memory (about 3 KB per connection, seen as RSS growth under churn).
    /// Every callback that can still arrive checks `closed` first.
    func handlerRemoved(context: ChannelHandlerContext) {
        connection = .closed
        cancelTimers()
        self.context = nil
        if case .http1(let d) = downstream { d.context = nil }
        h2Connection?.connectionClosed()
        h2Connection = nil
    }

    /// Cancels the connection's timers, which hold this handler (see "timers" below).
    func cancelTimers() {
        streamTimer?.cancel(); dispatcher.perTryTimer?.cancel(); handshakeTimer?.cancel()
        streamTimer = nil; dispatcher.perTryTimer = nil; handshakeTimer = nil
        ctx.unwatch(self)
    }

    func channelActive(context: ChannelHandlerContext) {
        if let a = context.channel.remoteAddress {
            peerIP = a.ipAddress ?? ""
            peer = PeerInfo(address: "\(peerIP):\(a.port ?? 0)")
        }
        ctx.activeConnections += 1
        ctx.metrics.connectionOpened(role.rawValue)
        lastActivity = NIODeadline.now().uptimeNanoseconds
        ctx.watch(self)
    }

    /// An HTTP/2 stream opened (its request head arrives next): the counterpart of
    /// channelActive for a handler that serves one stream. The stream takes its
    /// connection's peer (the address is not formatted again).
    func h2StreamOpened(_ c: HTTP2ServerConnection) {
        peer = c.peer.info
        peerIP = c.peer.ip
        // The body idle timeout counts from here while the head waits for a DATA frame.
        lastActivity = NIODeadline.now().uptimeNanoseconds
    }

    /// This handler, whose HTTP/2 stream ended with nothing left holding it
    /// (HTTP2ServerConnection.recycle), serves `s`, the connection's next stream: the
    /// counterpart of h2StreamOpened. What belongs to the connection (peer, accepted
    /// address, client certificate element, interception, the executor and the
    /// dispatcher) stays; the per-stream state was reset when the last stream finished
    /// (finishStream), and the handler is open again.
    func h2StreamReused(_ s: HTTP2ServerStream) {
        downstream = .http2(s)
        connection = .open
        requestState = .head
        responseState = .none
        requestChunked = false
        upstreamPaused = false
        lastActivity = NIODeadline.now().uptimeNanoseconds
    }

    /// Whether this handler, its HTTP/2 stream ended, holds nothing of it any more
    /// (no stream, upstream or paused filter): it can serve another stream.
    var h2Reusable: Bool {
        stream == nil && upstream == nil && filterPauseState == nil && responsePauseState == nil && closed
    }

    func channelInactive(context: ChannelHandlerContext) {
        ctx.activeConnections -= 1
        ctx.metrics.connectionClosed(role.rawValue)
        if let h = h2Connection { h2Connection = nil; h.connectionClosed() }
        ended()
    }

    /// The HTTP/2 stream ended (both sides done, reset, or its connection gone): the
    /// counterpart of channelInactive.
    func h2StreamClosed() {
        ended()
    }

    /// The connection or stream is gone: a stream in progress ends as a downstream
    /// disconnect unless its whole response was written.
    func ended() {
        connection = .closed
        cancelTimers()
        if let s = stream {
            if responseState != .ended { s.responseFlags.insert(.downstreamConnectionTermination) }
            if let u = upstream { u.abandon(); upstream = nil }
            finishStream(s)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if !transport.tlsEstablished && (error is NIOSSLError || error is BoringSSLError || error is PeerIdentityError) {
            // A refused mTLS handshake: untrusted, expired, no certificate, or not TLS at all.
            ctx.metrics.count("moonlet_inbound_tls_refused_total")
            if ctx.mayLogTLSRefusal() {
                let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)
                let why = TLSMaterial.refusalReason(TLSMaterial.identityRefusal(of: tls) ?? error, peerCertificate: tls?.peerCertificate, trust: ctx.tls?.trustDomains)
                ctx.logger.warning("mTLS handshake with \(peer.address) refused (\(ctx.inboundMTLS.mode.rawValue) by \(ctx.inboundMTLS.source)): \(why)")
            }
        }
        context.close(promise: nil)
    }

    func armHandshakeTimer(_ ch: Channel) {
        let ms = limits.tlsHandshakeTimeoutMs
        guard ms > 0 else { return }
        handshakeTimer = ch.eventLoop.scheduleTask(in: .milliseconds(Int64(ms))) {
            self.ctx.metrics.count("moonlet_inbound_tls_handshake_timeouts_total")
            ch.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            handshakeTimer?.cancel(); handshakeTimer = nil
            // A resumed TLS session skips certificate verification, where the peer's identity
            // is taken: take it from the session's certificate (its chain was checked when
            // the session was made, by this same TLS context).
            if peer.principal.isEmpty, let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self), let cert = tls.peerCertificate {
                switch ctx.tls.map({ $0.trustDomains.resumed(cert) }) {
                case .success(let id)?: peerAuthenticated(id)
                case .failure(let e)?: errorCaught(context: context, error: e); return
                case nil: context.close(promise: nil); return
                }
            }
            transport.tlsCompleted()
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// The peer's certificate verified and carries this SPIFFE id (called by the TLS
    /// handler before any application byte of the connection is read).
    func peerAuthenticated(_ id: SpiffeID) {
        peer.principal = id.principal
        peer.namespace = id.namespace
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let incoming = unwrapInboundIn(data)
        if let h = h2Connection { h.receive(incoming); return }
        if transport.firstBytes {
            // "PRI " starts only the HTTP/2 preface (PRI is not an HTTP/1.1 method in use).
            transport.firstBytesRead()
            if incoming.readableBytesView.starts(with: HTTP2ServerConnection.preface.prefix(4)) {
                switchToHTTP2(context: context, first: incoming)
                return
            }
        }
        received(incoming)
    }

    /// An HTTP/2 stream's request head, built from its HPACK fields (HTTP2RequestHead):
    /// the stream starts as an HTTP/1.1 one does after its head parsed.
    func h2Request(_ head: consuming HTTPHead) {
        guard !closed, stream == nil else { return }
        lastActivity = NIODeadline.now().uptimeNanoseconds
        startStream(head)
    }

    /// An HTTP/2 stream's request head that the HTTP/1.1 parser would refuse too (the
    /// same answer: 400, 403, 431).
    func h2RequestRefused(_ e: HTTPParseError) {
        guard !closed else { return }
        protocolError(e)
    }

    /// A DATA frame's bytes of the current request.
    func h2Body(_ chunk: ByteBuffer) {
        guard !closed, stream != nil, requestState.isArriving else { return }
        lastActivity = NIODeadline.now().uptimeNanoseconds
        requestBodyChunk(chunk)
    }

    /// The HTTP/2 request's trailers (a HEADERS frame after its DATA); the body end follows.
    func h2Trailers(_ t: HTTPTrailers) {
        guard !closed, let s = stream, requestState.isArriving, !t.isEmpty else { return }
        s.requestTrailers = t
    }

    /// The HTTP/2 request body ended (END_STREAM, or its content-length reached).
    func h2BodyEnd() {
        guard !closed, stream != nil, requestState.isArriving else { return }
        requestBodyEnd()
    }

    @inline(__always)
    func received(_ b: ByteBuffer) {
        var incoming = b
        lastActivity = NIODeadline.now().uptimeNanoseconds
        if inbound == nil || inbound!.readableBytes == 0 { inbound = incoming } else { inbound!.writeBuffer(&incoming) }
        process()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if let h = h2Connection { h.writabilityChanged(context.channel.isWritable); return }
        downstreamWritabilityChanged(context.channel.isWritable)
    }

    /// The HTTP/2 stream's queue filled or drained.
    func h2WritabilityChanged(_ writable: Bool) {
        guard !closed else { return }
        downstreamWritabilityChanged(writable)
    }

    /// Downstream can't take more: stop reading the upstream response (and resume).
    func downstreamWritabilityChanged(_ writable: Bool) {
        guard let u = upstream else { return }
        upstreamPaused = !writable
        // A response filter waiting on the head keeps reading off until it resumes
        // (responseFiltersResumed restores it from upstreamPaused).
        if responsePauseState != nil { return }
        // HTTP/1.1: autoRead; an HTTP/2 stream: its window is given back only while reading.
        u.setReading(writable)
    }


    // MARK: writes
    //
    // The client's writes go through `downstream` (DownstreamStream.swift), flushed at the
    // end of the loop's batch of I/O events (LoopContext.flushLater); the upstream's here.

    /// Flushes what was written to the client now.
    @inline(__always)
    func flushDownstream() { downstream.flush() }

    /// Flushes what the client has pending, then closes its connection (or ends its
    /// HTTP/2 stream: after a complete response, or with a reset).
    func closeDownstream() { downstream.reset() }

    /// Closes the client connection, or ends the HTTP/2 stream.
    func closeTransport() { downstream.closeTransport() }

    /// Writes `b` to the upstream connection `u`; flushed at the end of the batch.
    @inline(__always)
    func writeUpstream(_ u: UpstreamConnection, _ b: ByteBuffer) {
        u.send(b)
        if !u.flushQueued { ctx.flushLater(u) }
    }

    /// Writes the held response head, if any. Its flush is already queued: holding a
    /// head marked the client unflushed.
    @inline(__always)
    func releaseHeldHead() {
        if responseState == .headHeld { responseState = .streaming }
        downstream.releaseHeld()
    }

    func upstreamWritabilityChanged(_ writable: Bool) {
        guard !closed else { return }
        setReading(writable)
    }

    /// Pauses or resumes reading from the client; a no-op when already in that state.
    @inline(__always)
    func setReading(_ on: Bool) { downstream.setReading(on) }

    /// The first bytes are the HTTP/2 preface (h2c prior knowledge, or h2 after ALPN):
    /// from now on this connection's bytes go to its HTTP/2 server side, and each stream
    /// gets its own DownstreamHandler.
    func switchToHTTP2(context: ChannelHandlerContext, first: ByteBuffer) {
        // The idle deadline stays: the connection is idle while it has no open stream.
        let h = HTTP2ServerConnection(ctx: ctx, role: role, context: context, peer: (peer, peerIP))
        if role == .inbound && peerMTLS { h.clientCert = clientCertElement() }
        h.interception = interception
        h2Connection = h
        h.receive(first)
    }

    // MARK: request side

    func process() {
        while !closed, var buf = inbound {
            if stream == nil {
                guard buf.readableBytes > 0 else { return }
                switch parser.parseRequest(buf) {
                case .needMore:
                    if headerDeadline == 0 && limits.requestHeaderTimeoutMs > 0 {
                        headerDeadline = lastActivity &+ UInt64(limits.requestHeaderTimeoutMs) * 1_000_000
                    }
                    return
                case .error(let e):
                    protocolError(e)
                    return
                case .complete(let head, let consumed):
                    buf.moveReaderIndex(forwardBy: consumed)
                    // Let go of a consumed read buffer (see UpstreamConnection.channelRead).
                    inbound = buf.readableBytes > 0 ? buf : nil
                    headerDeadline = 0
                    startStream(consume head)
                    continue
                }
            }
            // A stream is active: feed its request body.
            if var d = reqDecoder {
                if buf.readableBytes == 0 { return }
                var failure: HTTPParseError?
                var done = false
                do {
                    done = try d.decode(&buf) { chunk in self.requestBodyChunk(chunk) }
                } catch let e as HTTPParseError { failure = e } catch { failure = HTTPParseError(400, "bad body") }
                inbound = buf.readableBytes > 0 ? buf : nil
                reqDecoder = d
                if let failure {
                    if !responseStarted { stream?.responseFlags.insert(.downstreamProtocolError); localReplyAndClose(failure.status, failure.reason) }
                    else { resetDownstream() }
                    return
                }
                if done {
                    if let t = d.trailers { stream?.requestTrailers = t }
                    requestBodyEnd()
                }
                if !done { return }
                continue
            }
            // Request complete, response pending: later bytes are pipelined requests.
            if buf.readableBytes > limits.maxHeadBytes * 2 { setReading(false) }
            return
        }
    }

    /// Request header names with "_" (limits.headersWithUnderscores): dropped, refused
    /// (400), or kept except where they fold onto a header the proxy manages. Runs only
    /// when the parser saw an underscore in a name.
    func applyUnderscoreAction(_ head: inout HTTPHead) -> HTTPParseError? {
        let action = limits.headersWithUnderscores
        for i in 0..<head.fields.count where !head.fields[i].removed {
            let name = head.lowercasedName(at: i)
            guard name.utf8.contains(95) else { continue }
            if action == .reject { return HTTPParseError(400, "header name with an underscore") }
            if action == .drop || ManagedHeaders.isProxySet(String(name.map { $0 == "_" ? "-" : $0 })) {
                head.fields[i].removed = true
                ctx.metrics.count("moonlet_downstream_underscore_headers_dropped_total")
            }
        }
        return nil
    }


    func startStream(_ headIn: consuming HTTPHead) {
        var head = consume headIn
        if head.targetForm != .origin || head.hostIndex < 0 || head.fields[head.hostIndex].valueLength == 0,
           let e = normalizeTargetAndHost(&head) {
            protocolError(e)
            return
        }
        // Istio's path normalization, before anything reads the path.
        var originalPath: String? = nil
        switch normalizePath(&head, mode: ctx.snapshot.pathNormalization) {
        case .success(let o): originalPath = o
        case .failure(let e): protocolError(e); return
        }
        head.stripHopByHop()
        if head.underscoreInName, let e = applyUnderscoreAction(&head) {
            protocolError(e)
            return
        }
        // Proxy headers (Envoy's): x-forwarded-for appended, x-request-id kept or made,
        // x-forwarded-proto, x-forwarded-client-cert. Edited on the local head, which then
        // moves into the stream (edits through the stream's property would copy the head).
        // Room for the proxy headers and the filters' few (istio-tracing adds four or
        // five): one allocation, not three.
        head.added.reserveCapacity(12)
        // One pass finds the proxy headers; a client's x-forwarded-client-cert is dropped
        // unless an mTLS peer's element is appended to it (Istio's inbound APPEND_FORWARD;
        // elsewhere Envoy's SANITIZE).
        let mtls = role == .inbound && peerMTLS
        var requestID = -1, forwardedFor = -1, forwardedProto = -1, clientCert = false
        for i in 0..<head.fields.count where !head.fields[i].removed {
            switch head.fields[i].kind {
            case .xRequestID: if requestID < 0 { requestID = i }
            case .xForwardedFor: if forwardedFor < 0 { forwardedFor = i }
            case .xForwardedProto: if forwardedProto < 0 { forwardedProto = i }
            case .xForwardedClientCert: clientCert = true
            default: break
            }
        }
        if requestID < 0 { head.added.append(ctx.requestIDLine()) }
        if forwardedFor >= 0 {
            let v = head.value(at: forwardedFor)
            head.fields[forwardedFor].removed = true
            head.addLowercased("x-forwarded-for", v.isEmpty ? peerIP : v + ", " + peerIP)
        } else {
            head.addLowercased("x-forwarded-for", peerIP)
        }
        if mtls {
            // Every client value: a second x-forwarded-proto would sit next to the proxy's.
            if forwardedProto >= 0 { head.removeAll(of: .xForwardedProto) }
            head.addLowercased("x-forwarded-proto", "https")
            appendClientCert(&head, clientSent: clientCert)
        } else {
            if forwardedProto < 0 { head.addLowercased("x-forwarded-proto", "http") }
            if clientCert { head.removeAll(of: .xForwardedClientCert) }
        }
        let peerWorkload = peerExchange.take(&head, read: mtls, cache: ctx.peerCache)
        head.markFiltersStart()
        let keepAlive = head.keepAlive, framing = head.framing
        // The stream starts when its head was read: lastActivity is that read's time (process()
        // runs right after channelRead or finishStream set it), so the clock is not read again.
        let s = ProxyStream(id: ctx.nextStreamID, request: consume head, source: peer, filterCount: 0, startNanos: lastActivity,
                            route: role == .inbound ? ctx.inboundRoute : RouteDecision())
        ctx.nextStreamID &+= 1
        ctx.activeStreams += 1
        stream = s
        responseState = .none
        connection = keepAlive ? .open : .closeAfterResponse
        requestChunked = framing == .chunked
        // An HTTP/2 stream's body comes as DATA chunks (h2Body), not bytes to decode.
        reqDecoder = framing == .none || h2 != nil ? nil : BodyDecoder(framing: framing)
        requestState = framing == .none ? .complete(buffered: false) : .body
        // Outbound: the port the app addressed (the Host's, 80 without one), which a
        // VirtualService `match.port` compares with; the endpoint's port replaces it once picked.
        s.destination.port = role == .inbound ? ctx.settings.appPort : Self.authorityPort(s.withRequest({ $0.host }))
        if role == .inbound { s.destination.address = acceptedAddress() }
        if let o = originalPath { s.originalPath = o }
        if http2Stream { s.protocolName = "HTTP/2" }
        s.config = ctx.snapshot
        s.listener = role
        s.peerWorkload = peerWorkload
        if let i = interception { i.applyHTTP(s, self) }
        let action = exec.requestHead(s)
        // A filter waits for work of its own (moonlet.http.call): FilterPause.swift.
        if action == .pause { pauseFilters(s); return }
        requestFiltersDone(s, action)
    }

    /// The request head phase is done (at once, or after a filter's pause): answer
    /// locally, buffer the body for a filter, or go upstream.
    func requestFiltersDone(_ s: ProxyStream, _ action: FilterAction) {
        switch action {
        case .respond:
            // The request body (if any) is read and dropped; the reply goes out now.
            sendLocalReply()
            return
        case .stopAndBuffer:
            if requestState == .body {
                requestState = .buffered
                s.bufferedRequestBody = ctx.allocator.buffer(capacity: 0)
                return // the body arrives through process(); requestBodyEnd continues.
            }
            s.bufferedRequestBody = ByteBuffer()
            switch exec.requestBody(s, ByteBuffer(), endOfStream: true) {
            case .respond: sendLocalReply(); return
            case .pause: pauseFilters(s); return
            default: break
            }
        case .continue, .pause:
            break
        }
        if s.request.expectContinue && requestState == .body {
            s.request.removeAll(of: .expect)
            downstream.sendContinue()
        }
        if s.route.delayMs > 0 {
            // Fault injection delay (DI): the request waits on this loop, nothing blocks.
            s.responseFlags.insert(.delayInjected)
            dispatcher.holdBody()
            let sid = s.id
            ctx.loop.scheduleTask(in: .milliseconds(Int64(s.route.delayMs))) {
                guard let cur = self.stream, cur.id == sid, !self.closed else { return }
                self.dispatcher.start()
            }
            return
        }
        dispatcher.start()
    }

    /// RFC 9112 §3.2.2: an absolute-form target's authority replaces Host, and the
    /// upstream (and the filters) get origin-form. A request without a Host (HTTP/1.0) or
    /// with an empty one gets the destination's. HTTP/2 (RFC 9113 §8.3.1): `:path` must
    /// be origin-form, and a request needs `:authority` or host. Returns the error to
    /// answer with.
    func normalizeTargetAndHost(_ head: inout HTTPHead) -> HTTPParseError? {
        if head.targetForm == .absolute {
            if http2Stream { return HTTPParseError(400, ":path is not origin-form") }
            let path = head.string(head.targetPathRange)
            head.targetOverride = path.isEmpty ? "/" : path.utf8.first == UInt8(ascii: "?") ? "/" + path : path
            head.setHost(head.string(head.targetAuthorityRange))
            return nil
        }
        if head.hostIndex < 0 || head.fields[head.hostIndex].valueLength == 0 {
            if http2Stream { return HTTPParseError(400, "request has neither :authority nor host") }
            head.setHost(destinationAuthority())
        }
        return nil
    }


    /// "ip:port" the client's connection was accepted on (the inbound stream's
    /// destination address), worked out once per connection or HTTP/2 stream.
    func acceptedAddress() -> String {
        // An HTTP/2 stream's handler gets it from its connection (HTTP2ServerStream.open).
        if localAddress.isEmpty, let a = (context ?? h2?.connection.context)?.channel.localAddress {
            localAddress = "\(a.ipAddress ?? ""):\(a.port ?? 0)"
        }
        return localAddress
    }

    /// The port of an authority ("host:port", "[v6]:port"), 80 when it names none.
    static func authorityPort(_ authority: String) -> Int {
        var a = authority
        // One backward scan over the bytes for the digits after the last ':' (none, or
        // a ']' after it: the default port); no String or index arithmetic per request.
        return a.withUTF8 { u -> Int in
            var i = u.count - 1, port = 0, scale = 1
            while i >= 0, u[i] >= 0x30, u[i] <= 0x39 {
                if scale > 10_000 { return 80 }
                port += Int(u[i] - 0x30) * scale; scale *= 10; i -= 1
            }
            guard i >= 0, u[i] == UInt8(ascii: ":"), i < u.count - 1, (1...65535).contains(port) else { return 80 }
            return port
        }
    }

    /// host:port of where the client's request goes: the app on the inbound listener,
    /// the address the client connected to on the outbound one.
    func destinationAuthority() -> String {
        if role == .inbound { return ctx.inboundKey }
        guard let a = context?.channel.localAddress, let ip = a.ipAddress, let port = a.port else { return "localhost" }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    /// Appends the verified mTLS peer's X-Forwarded-Client-Cert element to what the
    /// client sent (Envoy's APPEND_FORWARD): one field, elements separated by commas.
    /// `clientSent`: the head has an x-forwarded-client-cert field of the client's.
    func appendClientCert(_ head: inout HTTPHead, clientSent: Bool) {
        // No element of our own (e.g. a peer certificate with a control byte in a name):
        // the client's values go too, or its last (forged) one would read as verified.
        guard let element = clientCertElement() else { head.removeAll(of: .xForwardedClientCert); return }
        // The usual case, a peer sidecar's request: the element alone (no list to join).
        guard clientSent else { head.addLowercased("x-forwarded-client-cert", element); return }
        var values: [String] = []
        for i in 0..<head.fields.count where !head.fields[i].removed && head.fields[i].kind == .xForwardedClientCert {
            let v = head.value(at: i)
            if !v.isEmpty { values.append(v) }
            head.fields[i].removed = true
        }
        values.append(element)
        head.addLowercased("x-forwarded-client-cert", values.joined(separator: ","))
    }

    /// The peer's element, made on the connection's first request (an HTTP/2 stream takes
    /// its connection's).
    func clientCertElement() -> String? {
        if let e = xfccElement { return e }
        if let h2 { xfccElement = h2.connection.clientCert; return xfccElement }
        guard let context, let own = ctx.tls?.identity.uri,
              let handler = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self),
              let cert = handler.peerCertificate else { return nil }
        xfccElement = ForwardedClientCert.element(peer: cert, by: own)
        return xfccElement
    }

    // MARK: downstream stream interface
    //
    // What the phases give the client, for both protocols: sendHead, sendBody, sendEnd,
    // resetDownstream, setReading. The handler keeps the response's state (ResponseState,
    // ConnectionState); the writes are the `downstream`'s: HTTP1Downstream writes the
    // head as bytes (held so a small body leaves in the same write, body re-framed chunked
    // when needed), HTTP2ServerStream writes HPACK and DATA frames. A proxied response
    // and a local reply take the same path.

    /// The response head (after the response filters).
    func sendHead(_ head: HTTPHead) {
        guard let s = stream else { return }
        responseState = .headHeld
        var close = connection != .open
        downstream.sendHead(head, clientMinor: s.request.versionMinor, requestComplete: requestState.isComplete,
                            draining: ctx.draining, closeAfter: &close)
        if close { closeAfterResponse() }
    }

    /// A chunk of the response body.
    @inline(__always)
    func sendBody(_ chunk: ByteBuffer) {
        if responseState == .headHeld { responseState = .streaming }
        downstream.sendBody(chunk)
    }

    /// The response is complete (HTTP/2: END_STREAM on the last frame; HTTP/1.1: the last
    /// chunk when re-framed). Flushed at the end of the batch (the head or a body write
    /// already queued the flush).
    func sendEnd() {
        downstream.sendEnd(trailers: stream?.responseTrailers)
        responseState = .ended
    }

    /// The response cannot be completed: what was written is flushed, then the HTTP/1.1
    /// connection closes, or the HTTP/2 stream ends (a reset unless its response ended).
    func resetDownstream() { closeDownstream() }

    /// A head that failed to parse: answer (400/431/...), log, close.
    func protocolError(_ e: HTTPParseError) {
        ctx.metrics.count("moonlet_downstream_protocol_errors_total")
        ctx.logger.debug("downstream \(peer.address): \(e.reason)")
        let body = e.reason + "\n"
        exec.protocolError(status: e.status, responseBytes: body.utf8.count)
        connection = .closed
        inbound = nil
        downstream.sendProtocolError(e, body: body)
    }

    // MARK: timers
    //
    // Callbacks hold the handler strongly, never weakly: one weak reference gives the
    // handler a side table for good, which sends every retain and release of it down
    // Swift's slow reference-counting path. The connection's timers (handshake, stream,
    // per try) are cancelled when it closes, and it leaves the loop's deadline watch
    // (request header and idle timeouts); the other callbacks (connect
    // results, name lookups, pool waits, retry backoff, fault delay) end in bounded
    // time or are cancelled by finishStream, and each checks that its stream is still
    // the current one.

    /// The proxy drains: HTTP/2 sends GOAWAY; HTTP/1.1 closes after the response in flight.
    func drain() {
        guard !closed, context != nil else { return }
        if let h = h2Connection { h.drain() } else if stream != nil { closeAfterResponse() }
    }

    /// The loop's deadline check (LoopContext.checkDeadlines, every watchTickMs): an
    /// incomplete request head that outlived requestHeaderTimeoutMs gets 408; a
    /// connection with no open stream idle for downstreamIdleTimeoutMs (Envoy's
    /// idle_timeout) is closed.
    func checkDeadlines(now: UInt64) {
        guard !closed, context != nil else { return }
        if headerDeadline != 0 && stream == nil && now >= headerDeadline {
            headerDeadline = 0
            protocolError(HTTPParseError(408, "request header timeout"))
            return
        }
        if let h = h2Connection, h.continuationDeadline != 0 && now >= h.continuationDeadline {
            // A header block split over CONTINUATION frames that never ends: no other
            // frame can come meanwhile, so the connection goes.
            connection = .closed
            h.fail(HTTP2ConnectionError(.enhanceYourCalm, "request header timeout (CONTINUATION)"))
            return
        }
        if limits.requestBodyIdleTimeoutMs > 0 || limits.requestTimeoutMs > 0 {
            if let h = h2Connection {
                for st in h.streams.values { st.handler?.checkBodyIdle(now: now) }
            } else if stream != nil {
                checkBodyIdle(now: now)
                return
            }
        }
        let idleMs = limits.downstreamIdleTimeoutMs
        guard idleMs > 0, stream == nil, h2Connection?.streams.isEmpty ?? true else { return }
        let last = max(lastActivity, h2Connection?.lastStreamEnd ?? 0)
        if now &- last >= UInt64(idleMs) * 1_000_000 {
            connection = .closed
            if let h = h2Connection { h.fail(HTTP2ConnectionError(.noError, "idle")) } else { context.close(promise: nil) }
        }
    }

    /// A request body that stalls (no byte for requestBodyIdleTimeoutMs while the proxy
    /// reads it, before its response starts; Envoy's stream idle timeout) gets 408 with
    /// flag SI, and the connection closes (an HTTP/2 stream is ended). A stream whose
    /// reading is paused by backpressure is not idle.
    /// The same for a request still arriving after requestTimeoutMs from its head, however
    /// steadily its bytes come.
    func checkBodyIdle(now: UInt64) {
        guard !closed else { return }
        let ms = limits.requestBodyIdleTimeoutMs, total = limits.requestTimeoutMs
        let idle = ms > 0 && !downstream.readPaused && now &- lastActivity >= UInt64(ms) * 1_000_000
        if let s = stream {
            // Once the response is under way the stream ends with it (finishStream closes
            // a connection whose request body is unfinished).
            guard requestState.isArriving, !responseStarted else { return }
            let late = total > 0 && now &- s.startNanos >= UInt64(total) * 1_000_000
            guard idle || late else { return }
            s.responseFlags.insert(.streamIdleTimeout)
            localReplyAndClose(408, late ? "request timeout" : "request body timeout")
        } else if idle, h2?.pendingHead != nil {
            // HTTP/2 HEADERS without END_STREAM or content-length, then nothing.
            protocolError(HTTPParseError(408, "request body timeout"))
        }
    }

    /// The route's timeout (else the listener's stream timeout), from the dispatch of
    /// the request to the response head: once the head arrived the response streams for
    /// as long as it lasts. A gRPC request's `grpc-timeout` bounds it (GRPC.swift: the
    /// smaller of the two, 0 meaning none, as Envoy with Istio's max_grpc_timeout).
    func armStreamTimer(_ s: ProxyStream) {
        var ms = s.route.timeoutMs > 0 ? s.route.timeoutMs : limits.streamTimeoutMs
        if let g = s.withRequest({ Self.grpcTimeoutMs($0) }) { ms = GRPC.effectiveTimeoutMs(routeMs: ms, grpcTimeoutMs: g) }
        guard ms > 0 else { return }
        let sid = s.id
        streamTimer = ctx.loop.scheduleTask(in: .milliseconds(Int64(ms))) {
            guard let cur = self.stream, cur.id == sid, !self.responseStarted else { return }
            cur.respond(504, body: "upstream request timeout", flags: .upstreamRequestTimeout)
            if !self.requestState.isComplete { self.closeAfterResponse() }
            self.sendLocalReply()
        }
    }

    /// A gRPC request's `grpc-timeout` in milliseconds; nil without one (or when the
    /// request is not gRPC, or the value does not parse: Envoy ignores it then).
    @inline(__always)
    static func grpcTimeoutMs(_ head: HTTPHead) -> Int? {
        guard let i = head.firstIndex(lowercased: "grpc-timeout"), GRPC.isGRPCRequest(head) else { return nil }
        return GRPC.timeoutMs(head.value(at: i))
    }
}
