import NIOCore
import MoonletCore
import MoonletTelemetry
import MoonletBalancer
import MoonletTLS
import NIOSSL
import NIOTLS

/// The HTTP/1.1 fast path: one handler per downstream connection owns each stream
/// from its first byte to its log line. It parses heads in place, runs the filter
/// chain, writes the upstream request as the original bytes with the filters' edits
/// spliced in, and relays bodies as slices. Everything runs on the connection's loop.
final class DownstreamHandler: ChannelInboundHandler, UpstreamDelegate, DeferredFlush {
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
    /// The inbound TLS handshake completed: later TLS errors (an unclean close) are not refusals.
    var tlsEstablished = false
    /// TLS setting of the endpoint the current attempt goes to (nil: plaintext).
    var upstreamTLS: UpstreamTLS?

    // Current stream.
    var stream: ProxyStream?
    var chain: FilterChain = .empty
    var reqDecoder: BodyDecoder?
    var requestComplete = false
    var requestChunked = false
    var buffering = false
    var upstream: UpstreamConnection?
    var connecting = false
    var pendingUpstream: ByteBuffer?
    var responseStarted = false
    /// The whole response has been written (an HTTP/2 stream may close while it is
    /// flushed, which is then not a downstream disconnect).
    var responseEnded = false
    /// The upstream's reading is paused because the downstream cannot take more; undone
    /// before the connection goes back to the pool (or an HTTP/2 stream finishes).
    var upstreamPaused = false
    var responseChunked = false
    var responseCloseDelimited = false
    /// Bytes were written to the client since its last flush.
    var unflushed = false
    /// A flush of the client connection waits for the end of the loop's batch of I/O
    /// events (see LoopContext.flushLater).
    var flushQueued = false
    /// The response head, held back until the first body bytes, the end of the
    /// response or the end of the upstream read: a small response then leaves in one
    /// write (one trip through the pipeline) instead of two.
    var heldHead: ByteBuffer?
    var closeAfterResponse = false
    var streamTimer: Scheduled<Void>?
    var perTryTimer: Scheduled<Void>?
    /// Retry attempt of the current stream (0 = first try) and the request bytes
    /// kept to replay it.
    var attempt = 0
    var replay: ByteBuffer?
    /// Set while the stream waits for a connection (cluster at maxConnections).
    var waiter: PoolWaiter?
    var waitingCircuit: CircuitCounters?
    var waitTimer: RepeatedTask?
    /// The cluster retry slot (maxRetries) of the attempt in flight.
    var retrySlotHeld: CircuitCounters?
    /// Whether the stream counts against its cluster's http2MaxRequests.
    var holdsRequestSlot = false
    /// Mirror copies waiting for the request to complete, and where the body starts
    /// in `replay`.
    var mirrorHeads: [(UpstreamCluster, ByteBuffer)] = []
    var replayHeadLength = 0
    /// When an incomplete request head times out (uptime ns; 0: no head pending).
    var headerDeadline: UInt64 = 0
    /// Place in the loop's watch list (LoopContext.watch), -1 when not watched.
    var watchIndex = -1
    var lastActivity: UInt64 = 0
    var closed = false
    /// Whether reading from the client is paused (backpressure or pipelined backlog).
    var readPaused = false
    var lastSeries: RequestSeries?
    var lastSeriesKey: SeriesKey?

    /// The HTTP/2 stream this handler serves: its bytes come from and go to the stream,
    /// not a channel (`context` stays nil). Set before its first request byte.
    var h2: HTTP2ServerStream?
    /// Whether this handler serves one HTTP/2 stream.
    var http2Stream: Bool { h2 != nil }
    /// First bytes of a connection not seen yet: they may be the HTTP/2 preface (h2c
    /// prior knowledge). A stream's handler never reads a channel, so never sniffs.
    var sniffing = true
    /// After the switch to HTTP/2 this connection's bytes go to its HTTP/2 server side.
    var h2Connection: HTTP2ServerConnection?

    init(ctx: LoopContext, role: ListenerRole) {
        self.ctx = ctx
        self.role = role
        self.limits = ctx.settings.limits
        parser = HTTPHeadParser(limits: HTTPParserLimits(maxHeadBytes: limits.maxHeadBytes, maxHeaderCount: limits.maxHeaderCount))
        ctx.liveHandlers += 1
    }

    deinit { ctx.liveHandlers -= 1 }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    /// The connection is gone: drop the stored context. Handler and context refer to each
    /// other, so without this every closed connection's handler, context and buffers
    /// stayed in memory (about 3 KB per connection, seen as RSS growth under churn).
    /// Every callback that can still arrive checks `closed` first.
    func handlerRemoved(context: ChannelHandlerContext) {
        closed = true
        cancelTimers()
        self.context = nil
        h2Connection?.connectionClosed()
        h2Connection = nil
    }

    /// Cancels the connection's timers, which hold this handler (see "timers" below).
    func cancelTimers() {
        streamTimer?.cancel(); perTryTimer?.cancel(); handshakeTimer?.cancel()
        streamTimer = nil; perTryTimer = nil; handshakeTimer = nil
        ctx.unwatch(self)
    }

    func channelActive(context: ChannelHandlerContext) {
        if let a = context.channel.remoteAddress {
            peerIP = a.ipAddress ?? ""
            peer = PeerInfo(address: "\(peerIP):\(a.port ?? 0)")
        }
        if role == .inbound, let l = context.channel.localAddress { localAddress = "\(l.ipAddress ?? ""):\(l.port ?? 0)" }
        ctx.activeConnections += 1
        ctx.metrics.connectionOpened(role.rawValue)
        lastActivity = NIODeadline.now().uptimeNanoseconds
        ctx.watch(self)
    }

    /// An HTTP/2 stream opened (its request head arrives next): the counterpart of
    /// channelActive for a handler that serves one stream. The stream takes its
    /// connection's peer (the address is not formatted again).
    func h2StreamOpened() {
        guard let p = h2?.connection.peer else { return }
        peer = p.info
        peerIP = p.ip
        // The body idle timeout counts from here while the head waits for a DATA frame.
        lastActivity = NIODeadline.now().uptimeNanoseconds
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
        closed = true
        cancelTimers()
        if let s = stream {
            if !responseEnded { s.responseFlags.insert(.downstreamConnectionTermination) }
            if let u = upstream { u.abandon(); upstream = nil }
            finishStream(s)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if !tlsEstablished && (error is NIOSSLError || error is BoringSSLError || error is PeerIdentityError) {
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
            tlsEstablished = true
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
        if sniffing {
            // "PRI " starts only the HTTP/2 preface (PRI is not an HTTP/1.1 method in use).
            sniffing = false
            if incoming.readableBytesView.starts(with: HTTP2ServerConnection.preface.prefix(4)) {
                switchToHTTP2(context: context, first: incoming)
                return
            }
        }
        received(incoming)
    }

    /// Request bytes of an HTTP/2 stream (as HTTP/1.1).
    func h2Received(_ b: ByteBuffer) {
        guard !closed else { return }
        received(b)
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
        u.channel?.setOption(ChannelOptions.autoRead, value: writable).whenComplete { _ in }
    }

    /// Whether the client side takes more bytes now (its channel, or its HTTP/2 stream).
    var downstreamWritable: Bool { h2?.writable ?? context.channel.isWritable }

    // MARK: writes
    //
    // Every write is flushed by the end of the event loop's current batch of I/O events
    // (LoopContext.flushLater), not at once: the writes for all the streams whose bytes
    // arrived in one batch then leave together, as HAProxy sends after its poll loop, and
    // the client and the app behind the proxy are woken once per burst instead of once
    // per response (measured: a quarter fewer epoll wake-ups of the load generator).
    // Before a close, and when a channel's buffer is full, the flush happens at once.

    /// Writes `b` to the client; flushed at the end of the batch.
    @inline(__always)
    func writeDownstream(_ b: ByteBuffer) {
        emit(b)
        markUnflushed()
    }

    /// Hands `b` to the client's channel, or to the HTTP/2 stream this handler serves.
    @inline(__always)
    func emit(_ b: ByteBuffer) {
        if let h2 { h2.write(b) } else { context.write(wrapOutboundOut(b), promise: nil) }
    }

    /// Records that the client has bytes to flush (written, or a held head) and queues
    /// the flush.
    @inline(__always)
    func markUnflushed() {
        unflushed = true
        if !flushQueued { ctx.flushLater(self) }
    }

    /// Flushes what was written to the client now, skipping the pipeline when nothing was.
    @inline(__always)
    func flushDownstream() {
        guard unflushed else { return }
        releaseHeldHead()
        unflushed = false
        // An HTTP/2 stream's frames are flushed by its connection (queued when written).
        if h2 == nil { context.flush() }
    }

    /// The end of the loop's batch: flushes the client's pending bytes (nothing once the
    /// handler has left its pipeline or its HTTP/2 stream ended).
    func flushNow() {
        guard context != nil || (h2 != nil && !closed) else { return }
        flushDownstream()
    }

    /// Flushes what the client has pending, then closes its connection (or ends its
    /// HTTP/2 stream: after a complete response, or with a reset).
    func closeDownstream() {
        flushDownstream()
        closeTransport()
    }

    /// Closes the client connection, or ends the HTTP/2 stream.
    func closeTransport() {
        if let h2 { h2.close() } else { context.close(promise: nil) }
    }

    /// Writes `b` to the upstream connection `u`; flushed at the end of the batch.
    @inline(__always)
    func writeUpstream(_ u: UpstreamConnection, _ b: ByteBuffer) {
        guard let ch = u.channel else { return }
        ch.write(b, promise: nil)
        if !u.flushQueued { ctx.flushLater(u) }
    }

    /// Writes the held response head, if any. Its flush is already queued: holding a
    /// head marked the client unflushed.
    @inline(__always)
    func releaseHeldHead() {
        if let h2 { h2.releaseHeld(end: false); return }
        if let h = heldHead { heldHead = nil; emit(h); ctx.recycle(h) }
    }

    /// Bodies up to this size are copied behind a held head rather than written apart.
    static let mergedBodyLimit = 16 * 1024

    func upstreamWritabilityChanged(_ writable: Bool) {
        guard !closed else { return }
        setReading(writable)
    }

    /// Pauses or resumes reading from the client; a no-op when already in that state.
    func setReading(_ on: Bool) {
        guard readPaused == on else { return }
        readPaused = !on
        if let h2 { h2.setReading(on); return }
        context.channel.setOption(ChannelOptions.autoRead, value: on).whenComplete { _ in }
    }

    /// The first bytes are the HTTP/2 preface (h2c prior knowledge, or h2 after ALPN):
    /// from now on this connection's bytes go to its HTTP/2 server side, and each stream
    /// gets its own DownstreamHandler.
    func switchToHTTP2(context: ChannelHandlerContext, first: ByteBuffer) {
        // The idle deadline stays: the connection is idle while it has no open stream.
        let h = HTTP2ServerConnection(ctx: ctx, role: role, context: context, peer: (peer, peerIP))
        if role == .inbound && peerMTLS { h.clientCert = clientCertElement() }
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
                    else { closeDownstream() }
                    return
                }
                if done { requestBodyEnd() }
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
        head.stripHopByHop()
        if head.underscoreInName, let e = applyUnderscoreAction(&head) {
            protocolError(e)
            return
        }
        // Proxy headers (Envoy's): x-forwarded-for appended, x-request-id kept or made,
        // x-forwarded-proto, x-forwarded-client-cert. Edited on the local head, which then
        // moves into the stream (edits through the stream's property would copy the head).
        // Room for the proxy headers and a filter's few: one allocation, not three.
        head.added.reserveCapacity(6)
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
        if requestID < 0 { head.addLowercased("x-request-id", ctx.requestID()) }
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
            appendClientCert(&head)
        } else {
            if forwardedProto < 0 { head.addLowercased("x-forwarded-proto", "http") }
            if clientCert { head.removeAll(of: .xForwardedClientCert) }
        }
        head.markFiltersStart()
        let keepAlive = head.keepAlive, framing = head.framing
        // The stream starts when its head was read: lastActivity is that read's time (process()
        // runs right after channelRead or finishStream set it), so the clock is not read again.
        let s = ProxyStream(id: ctx.nextStreamID, request: consume head, source: peer, filterCount: 0, startNanos: lastActivity,
                            route: role == .inbound ? ctx.inboundRoute : RouteDecision())
        ctx.nextStreamID &+= 1
        ctx.activeStreams += 1
        stream = s
        chain = ctx.chain
        requestComplete = false
        responseStarted = false
        responseChunked = false
        responseCloseDelimited = false
        buffering = false
        closeAfterResponse = !keepAlive
        requestChunked = framing == .chunked
        reqDecoder = framing == .none ? nil : BodyDecoder(framing: framing)
        if reqDecoder == nil { requestComplete = true }
        s.destination.port = role == .inbound ? ctx.settings.appPort : 0
        if role == .inbound { s.destination.address = localAddress }
        if http2Stream { s.protocolName = "HTTP/2" }
        s.config = ctx.snapshot
        s.listener = role
        switch chain.runRequest(s) {
        case .respond:
            // The request body (if any) is read and dropped; the reply goes out now.
            sendLocalReply()
            return
        case .stopAndBuffer:
            if reqDecoder != nil {
                buffering = true
                s.bufferedRequestBody = ctx.allocator.buffer(capacity: 0)
                return // the body arrives through process(); requestBodyEnd continues.
            }
            s.bufferedRequestBody = ByteBuffer()
            if chain.runRequestBody(s, chunk: ByteBuffer(), endOfStream: true) == .respond { sendLocalReply(); return }
        case .continue:
            break
        }
        if s.request.expectContinue && reqDecoder != nil {
            s.request.removeAll(of: .expect)
            if let h2 { h2.writeContinue() } else { writeDownstream(ByteBuffer(staticString: "HTTP/1.1 100 Continue\r\n\r\n")) }
        }
        if s.route.delayMs > 0 {
            // Fault injection delay (DI): the request waits on this loop, nothing blocks.
            s.responseFlags.insert(.delayInjected)
            let sid = s.id
            ctx.loop.scheduleTask(in: .milliseconds(Int64(s.route.delayMs))) {
                guard let cur = self.stream, cur.id == sid, !self.closed else { return }
                self.goUpstream()
            }
            return
        }
        goUpstream()
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


    /// host:port of where the client's request goes: the app on the inbound listener,
    /// the address the client connected to on the outbound one.
    func destinationAuthority() -> String {
        if role == .inbound { return ctx.inboundKey }
        guard let a = context?.channel.localAddress, let ip = a.ipAddress, let port = a.port else { return "localhost" }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    /// Appends the verified mTLS peer's X-Forwarded-Client-Cert element to what the
    /// client sent (Envoy's APPEND_FORWARD): one field, elements separated by commas.
    func appendClientCert(_ head: inout HTTPHead) {
        // No element of our own (e.g. a peer certificate with a control byte in a name):
        // the client's values go too, or its last (forged) one would read as verified.
        guard let element = clientCertElement() else { head.removeAll(of: .xForwardedClientCert); return }
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

    /// Picks the upstream from the route decision and sends the request head.
    /// Picks the endpoint (balancer, outlier state), or uses the route's host:port.
    /// Returns host, port and pool key, or nil after answering locally.
    func chooseEndpoint(_ s: ProxyStream, avoid: Int = -1) -> (String, Int, String)? {
        if s.route.endpoint.isEmpty, let c = s.route.upstreamCluster {
            var picked = ctx.balancer.pick(c, hash: avoid >= 0 ? nil : s.route.hashKey)
            // A retry prefers a different host (a few tries).
            var tries = 0
            while let p = picked, p == avoid, c.endpointCount > 1, tries < 3 {
                ctx.balancer.done(c, p)
                picked = ctx.balancer.pick(c)
                tries += 1
            }
            guard let i = picked else {
                reply503(s, "no healthy upstream", .noHealthyUpstream)
                return nil
            }
            let e = c.endpoint(i)
            s.route.endpointIndex = i
            s.route.endpoint = e.address
            s.route.endpointPort = e.port
            s.destination.address = e.address
            s.destination.port = e.port
        } else if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster {
            ctx.balancer.use(c, s.route.endpointIndex)  // a filter's endpoint override: counted as a pick is
        }
        let host = s.route.endpoint.isEmpty ? s.route.host : s.route.endpoint
        let port = s.route.endpoint.isEmpty ? s.route.port : s.route.endpointPort
        if host.isEmpty || port == 0 {
            s.respond(404, body: "", headers: [], flags: .noRouteFound)
            sendLocalReply()
            return nil
        }
        var key: String
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster { key = c.poolKey(s.route.endpointIndex) }
        else if role == .inbound && host == ctx.inboundRoute.host && port == ctx.inboundRoute.port { key = ctx.inboundKey }
        else { key = "\(host):\(port)" }
        s.upstreamHost = key
        upstreamTLS = nil
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster, let t = c.tls(s.route.endpointIndex) {
            if t.mode == .istioMutual && ctx.tls == nil {
                // Auto mTLS without a workload certificate: reach the workload in plaintext.
                if !t.automatic {
                    reply503(s, "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: ISTIO_MUTUAL needs a workload certificate (--certs)", .upstreamConnectionFailure)
                    return nil
                }
            } else if (t.mode == .simple || t.mode == .mutual) && t.context == nil {
                // The file error is in the log (at load); the client gets no file system path.
                reply503(s, "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: the DestinationRule's TLS files could not be loaded", .upstreamConnectionFailure)
                return nil
            } else {
                upstreamTLS = t
                key += t.poolTag
            }
        }
        return (host, port, key)
    }

    /// Picks the upstream from the route decision and sends the request head.
    func goUpstream() {
        guard let s = stream, let (host, port, key) = chooseEndpoint(s) else { return }
        armStreamTimer(s)
        var out = ctx.outputBuffer(capacity: s.request.bytes.readableBytes + 256)
        let chunked = requestChunked
        s.withRequest { head in
            HeadWriter.writeRequest(head, into: &out) { o in
                if chunked { o.writeStaticString("transfer-encoding: chunked\r\n") }
            }
        }
        if buffering, var body = s.bufferedRequestBody {
            // The whole body was buffered for a filter: send it with a content-length.
            if requestChunked {
                out = ctx.allocator.buffer(capacity: s.request.bytes.readableBytes + 256 + body.readableBytes)
                s.request.removeAll(of: .contentLength)
                HeadWriter.writeRequest(s.request, into: &out) { o in
                    HeadWriter.writeField("content-length", String(body.readableBytes), into: &o)
                }
            }
            out.writeBuffer(&body)
            requestChunked = false
        }
        attempt = 0
        replay = (s.route.retry != nil && s.route.retry!.attempts > 0) || !s.route.mirrors.isEmpty || chain.wantsUpstreamFailure ? out : nil
        replayHeadLength = out.readableBytes
        if !s.route.mirrors.isEmpty { prepareMirrors(s) }
        pendingUpstream = out
        dispatch(host: host, port: port, key: key)
    }

    /// Takes an idle pooled connection or connects, then sends `pendingUpstream`.
    func dispatch(host: String, port: Int, key: String) {
        guard let s = stream else { return }
        armPerTryTimer(s)
        let cl = s.route.upstreamCluster
        if let cl, !holdsRequestSlot {
            // http2MaxRequests: active requests per cluster across the sidecar.
            let cc = ctx.balancer.circuit(cl)
            guard cc.tryRequest(max: cl.maxRequests) else {
                replyOverflow(s)
                return
            }
            holdsRequestSlot = true
        }
        if let c = ctx.pool.takeIdle(key, idleTimeoutMs: cl?.idleTimeoutMs ?? 0, maxDurationMs: cl?.maxConnectionDurationMs ?? 0) {
            attach(c)
            return
        }
        if asksForHTTP2(s), ctx.pool.openStream(key, maxRequests: cl?.maxRequestsPerConnection ?? 0, maxDurationMs: cl?.maxConnectionDurationMs ?? 0,
                                                 connected(stream: s.id, attempt: attempt),
                                                 // The connection being set up failed, chose HTTP/1.1 or is full.
                                                 otherwise: redispatch(s.id, host: host, port: port, key: key)) {
            connecting = true
            return
        }
        let address: SocketAddress
        // A name being resolved (off the loop) dispatches again once its lookup is done.
        switch ctx.pool.address(host: host, port: port, ready: redispatch(s.id, host: host, port: port, key: key)) {
        case .ready(let a): address = a
        case .pending:
            connecting = true
            return
        case .failed(let e):
            upstreamFailed(.connectFailed("DNS resolution of \(host) failed: \(e)"))
            return
        }
        // Circuit breaking: connections are bounded per cluster across the sidecar;
        // past the bound a bounded number of streams wait, the rest get 503 UO at once.
        var slot: CircuitCounters? = nil
        if let cl = s.route.upstreamCluster {
            let cc = ctx.balancer.circuit(cl)
            if !cc.tryOpenConnection(max: cl.maxConnections) {
                if cc.tryWait(max: cl.maxPendingRequests) {
                    startWaiting(s, cc, cl, host: host, port: port, key: key, address: address)
                    return
                }
                replyOverflow(s)
                return
            }
            slot = cc
        }
        connect(s, key: key, address: address, slot: slot)
    }

    /// Starts `dispatch` over for stream `sid` once what it waited for is settled (a
    /// name lookup, an HTTP/2 connection being set up), if the stream is still current.
    func redispatch(_ sid: UInt64, host: String, port: Int, key: String) -> () -> Void {
        {
            guard self.stream?.id == sid, !self.closed else { return }
            self.connecting = false
            self.dispatch(host: host, port: port, key: key)
        }
    }

    /// Waits for a connection: one released on this loop for the same host, or a
    /// free slot (checked every 10 ms, since slots free up on other loops too).
    func startWaiting(_ s: ProxyStream, _ cc: CircuitCounters, _ cl: UpstreamCluster, host: String, port: Int, key: String, address: SocketAddress) {
        let sid = s.id
        waitingCircuit = cc
        let w = PoolWaiter(key: key) { c in
            guard let cur = self.stream, cur.id == sid, self.waiter != nil, !self.closed else { return false }
            self.stopWaiting()
            self.attach(c)
            return true
        }
        waiter = w
        ctx.pool.wait(w)
        waitTimer = ctx.loop.scheduleRepeatedTask(initialDelay: .milliseconds(10), delay: .milliseconds(10)) { _ in
            guard let cur = self.stream, cur.id == sid, self.waiter != nil else { return }
            if cc.tryOpenConnection(max: cl.maxConnections) {
                self.stopWaiting()
                self.connect(cur, key: key, address: address, slot: cc)
            }
        }
    }

    func stopWaiting() {
        if let w = waiter { ctx.pool.removeWaiter(w); waiter = nil }
        waitTimer?.cancel(); waitTimer = nil
        waitingCircuit?.doneWaiting(); waitingCircuit = nil
    }

    func connect(_ s: ProxyStream, key: String, address: SocketAddress, slot: CircuitCounters?) {
        connecting = true
        var tls: (() throws -> NIOSSLClientHandler)? = nil
        var tlsExpected = ""
        var tlsMesh = true
        // Only a mesh (ISTIO_MUTUAL) connection with a workload certificate offers h2.
        let h2 = asksForHTTP2(s)
        if let t = upstreamTLS {
            if t.mode == .istioMutual, let m = ctx.tls {
                let expected = t.fromServiceAccounts ? m.inOwnTrustDomain(t.subjectAltNames) : t.subjectAltNames
                tls = { try m.makeClientHandler(serverName: t.sni, expected: expected, offerH2: h2) }
                tlsExpected = expected.isEmpty ? "a mesh identity" : expected.joined(separator: " or ")
            } else if let c = t.context as? NIOSSLContext {
                tls = { try TLSMaterial.makeClientHandler(context: c, serverName: t.sni ?? s.route.host, expected: t.subjectAltNames) }
                tlsExpected = t.subjectAltNames.isEmpty ? (t.sni ?? s.route.host) : t.subjectAltNames.joined(separator: " or ")
                tlsMesh = false
            }
        }
        ctx.pool.connect(key: key, address: address, timeoutMs: s.route.upstreamCluster?.connectTimeoutMs ?? 0,
                         keepalive: s.route.upstreamCluster?.tcpKeepalive, tls: tls, tlsExpected: tlsExpected, tlsMesh: tlsMesh, offersH2: h2, slot: slot,
                         connected(stream: s.id, attempt: attempt))
    }

    /// Whether the connection to the peer sidecar asks for HTTP/2 (ALPN h2): mesh mTLS
    /// only, by the cluster's UpstreamProtocol and, for `likeDownstream`, what this
    /// stream's client spoke.
    func asksForHTTP2(_ s: ProxyStream) -> Bool {
        guard let t = upstreamTLS, t.mode == .istioMutual, ctx.tls != nil, let cl = s.route.upstreamCluster else { return false }
        switch cl.upstreamProtocol {
        case .http1: return false
        case .http2: return true
        case .likeDownstream: return http2Stream
        }
    }

    /// Completion of a connect or a new HTTP/2 stream: attaches the connection if the
    /// stream and attempt that asked for it are still current, else gives it back.
    func connected(stream sid: UInt64, attempt try_: Int) -> (Result<UpstreamConnection, Error>) -> Void {
        { r in
            let current = self.stream.map { $0.id == sid } == true && self.attempt == try_
            switch r {
            case .success(let c):
                guard current, !self.closed else { self.ctx.pool.release(c); return }
                self.connecting = false
                self.attach(c)
            case .failure(let e):
                guard current else { return }
                self.connecting = false
                self.upstreamFailed(e as? UpstreamFailure ?? .connectFailed("\(e)"))
            }
        }
    }

    /// Answers 503 locally with an Envoy response flag.
    func reply503(_ s: ProxyStream, _ body: String, _ flag: ResponseFlags) {
        s.respond(503, body: body, flags: flag)
        sendLocalReply()
    }

    /// Circuit breaking overflow (UO): counted and answered at once.
    func replyOverflow(_ s: ProxyStream) {
        ctx.metrics.count("moonlet_upstream_overflow_total")
        reply503(s, "upstream connect error or disconnect/reset before headers. reset reason: overflow", .upstreamOverflow)
    }

    /// Builds the head of each mirror copy: the same request with the shadow authority,
    /// closing its connection after the (ignored) response.
    func prepareMirrors(_ s: ProxyStream) {
        mirrorHeads = s.route.mirrors.map { m in
            var h = s.request
            h.set("host", m.authority)
            h.hostIndex = -1
            var b = ctx.allocator.buffer(capacity: h.bytes.readableBytes + 64)
            let chunked = requestChunked
            HeadWriter.writeRequest(h, into: &b) { o in
                if chunked { o.writeStaticString("transfer-encoding: chunked\r\n") }
                o.writeStaticString("connection: close\r\n")
            }
            return (m.cluster, b)
        }
        if requestComplete { sendMirrors() }
    }

    /// Sends the mirror copies once the request is complete (head + replayed body);
    /// a body past the replay bound is not mirrored.
    func sendMirrors() {
        guard !mirrorHeads.isEmpty, let bytes = replay else { mirrorHeads = []; return }
        var body = bytes
        body.moveReaderIndex(forwardBy: min(replayHeadLength, body.readableBytes))
        for (cluster, head) in mirrorHeads {
            guard let i = ctx.balancer.pick(cluster) else { continue }
            ctx.balancer.done(cluster, i)
            let e = cluster.endpoint(i)
            var payload = head
            var b = body
            payload.writeBuffer(&b)
            // A mirror whose name is not resolved yet is skipped (the lookup starts now).
            guard case .ready(let address) = ctx.pool.address(host: e.address, port: e.port, ready: {}) else { continue }
            ctx.metrics.count("moonlet_upstream_mirrored_total")
            MirrorSender.send(payload, to: address, on: ctx.loop, timeoutMs: limits.connectTimeoutMs)
        }
        mirrorHeads = []
    }

    /// Records bytes sent upstream for a possible retry (bounded: past the limit the
    /// request is no longer retried).
    @inline(__always)
    func recordForReplay(_ b: ByteBuffer) {
        guard replay != nil else { return }
        if replay!.readableBytes + b.readableBytes > limits.maxBufferedBodyBytes { replay = nil; return }
        var c = b
        replay!.writeBuffer(&c)
    }

    /// Retries the stream when the filters (on_upstream_failure) or else its route's
    /// policy allow it for this outcome: a different host is preferred, with 25 ms x
    /// jitter backoff. Returns false when the outcome stands (no policy, a filter said
    /// no, attempts used up, body not replayable).
    func retryIfAllowed(_ s: ProxyStream, status: Int?, connectFailure: Bool, timedOut: Bool = false) -> Bool {
        guard requestComplete, let bytes = replay else { return false }
        let verdict = upstreamFailureVerdict(s, status: status, connectFailure: connectFailure, timedOut: timedOut)
        guard let spec = Self.retryPolicy(verdict, route: s.route.retry, status: status, connectFailure: connectFailure), attempt < spec.attempts else { return false }
        // maxRetries bounds concurrent retries per cluster across the sidecar.
        var retrySlot: CircuitCounters? = nil
        if let cl = s.route.upstreamCluster {
            let cc = ctx.balancer.circuit(cl)
            guard cc.tryRetry(max: cl.maxRetries) else { ctx.metrics.count("moonlet_upstream_retry_overflow_total"); return false }
            retrySlot = cc
        }
        attempt += 1
        ctx.metrics.count("moonlet_upstream_retries_total")
        perTryTimer?.cancel(); perTryTimer = nil
        if let u = upstream { u.abandon(); upstream = nil }
        let avoid = s.route.endpointIndex
        if avoid >= 0, let c = s.route.upstreamCluster { ctx.balancer.done(c, avoid) }
        if s.route.upstreamCluster != nil { s.route.endpoint = ""; s.route.endpointIndex = -1 }
        let sid = s.id, try_ = attempt
        let backoffMs = Int64(25 * (1 + Int(ctx.rng.next() % UInt64(1 << min(attempt, 4)))))
        retrySlotHeld?.retryDone()
        retrySlotHeld = retrySlot   // held until this attempt ends (next retry or stream end)
        ctx.loop.scheduleTask(in: .milliseconds(backoffMs)) {
            guard let cur = self.stream, cur.id == sid, self.attempt == try_, !self.closed else { return }
            guard let (host, port, key) = self.chooseEndpoint(cur, avoid: avoid) else { return }
            self.pendingUpstream = bytes
            self.dispatch(host: host, port: port, key: key)
        }
        return true
    }

    func armPerTryTimer(_ s: ProxyStream) {
        perTryTimer?.cancel(); perTryTimer = nil
        guard let ms = s.route.retry?.perTryTimeoutMs, ms > 0 else { return }
        let sid = s.id, try_ = attempt
        perTryTimer = ctx.loop.scheduleTask(in: .milliseconds(Int64(ms))) {
            guard let cur = self.stream, cur.id == sid, self.attempt == try_, !self.responseStarted else { return }
            if self.retryIfAllowed(cur, status: 504, connectFailure: false, timedOut: true) { return }
            if let u = self.upstream { u.abandon(); self.upstream = nil }
            cur.respond(504, body: "upstream request timeout", flags: .upstreamRequestTimeout)
            self.closeAfterResponse = self.closeAfterResponse || !self.requestComplete
            self.sendLocalReply()
        }
    }

    func attach(_ c: UpstreamConnection) {
        guard let s = stream else { return }
        upstream = c
        c.begin(delegate: self, isHead: s.request.isHead)
        if var p = pendingUpstream {
            pendingUpstream = nil
            if requestComplete && requestChunked && !buffering {
                p.writeStaticString(ChunkedEncoder.lastChunk)
                recordForReplay(ByteBuffer(staticString: ChunkedEncoder.lastChunk))
                requestChunked = false
            }
            writeUpstream(c, p)
            ctx.recycle(p)
        }
    }

    func requestBodyChunk(_ chunk: ByteBuffer) {
        guard let s = stream else { return }
        s.requestBodyBytes += Int64(chunk.readableBytes)
        if s.localReply != nil { return } // replying locally: drain and drop
        if buffering {
            if s.bufferedRequestBody!.readableBytes + chunk.readableBytes > limits.maxBufferedBodyBytes {
                buffering = false
                s.bufferedRequestBody = nil
                localReplyAndClose(413, "request body larger than \(limits.maxBufferedBodyBytes) bytes")
                return
            }
            var c = chunk
            s.bufferedRequestBody!.writeBuffer(&c)
            return
        }
        if chain.wantsRequestBody, chain.runRequestBody(s, chunk: chunk, endOfStream: false) == .respond {
            if upstream == nil && !connecting { sendLocalReply() } else { abortUpstreamAndReply() }
            return
        }
        let out = ChunkedEncoder.frame(chunk, chunked: requestChunked, allocator: ctx.allocator)
        recordForReplay(out)
        if let u = upstream, let ch = u.channel {
            writeUpstream(u, out)
            if !ch.isWritable { setReading(false) }
        } else if pendingUpstream != nil {
            var o = out
            pendingUpstream!.writeBuffer(&o)
            if pendingUpstream!.readableBytes > limits.highWaterMarkBytes { setReading(false) }
        }
    }

    func requestBodyEnd() {
        reqDecoder = nil
        requestComplete = true
        guard let s = stream else { return }
        if s.localReply != nil {
            if !responseStarted && upstream == nil && !connecting { sendLocalReply() }
            return
        }
        if buffering {
            if chain.runRequestBody(s, chunk: s.bufferedRequestBody ?? ByteBuffer(), endOfStream: true) == .respond { sendLocalReply(); return }
            goUpstream()
            return
        }
        if chain.wantsRequestBody, chain.runRequestBody(s, chunk: ByteBuffer(), endOfStream: true) == .respond {
            abortUpstreamAndReply(); return
        }
        if requestChunked {
            if let u = upstream { writeUpstream(u, ByteBuffer(staticString: ChunkedEncoder.lastChunk)) }
            else if pendingUpstream != nil { pendingUpstream!.writeStaticString(ChunkedEncoder.lastChunk) }
            recordForReplay(ByteBuffer(staticString: ChunkedEncoder.lastChunk))
            requestChunked = false
        }
        if !mirrorHeads.isEmpty { sendMirrors() }
    }

    func abortUpstreamAndReply() {
        if let u = upstream { u.abandon(); upstream = nil }
        pendingUpstream = nil
        if responseStarted { closeDownstream(); return }
        closeAfterResponse = closeAfterResponse || !requestComplete
        sendLocalReply()
    }

    // MARK: response side

    func upstreamResponseHead(_ headIn: consuming HTTPHead) {
        guard let s = stream else { return }
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster { ctx.balancer.report(c, s.route.endpointIndex, status: headIn.status) }
        if retryIfAllowed(s, status: headIn.status, connectFailure: false) { return }
        if attempt > 0 && (s.route.retry?.retries(status: headIn.status) ?? false) { s.responseFlags.insert(.upstreamRetryLimitExceeded) }
        streamTimer?.cancel(); streamTimer = nil
        perTryTimer?.cancel(); perTryTimer = nil
        var head = consume headIn
        head.stripHopByHop()
        head.removeAll(of: .server)
        Self.applyRouteResponseEdits(s, to: &head)
        if chain.filters.isEmpty {
            writeResponseHead(head)
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
        writeResponseHead(edited)
        s.response = consume edited
    }

    func writeResponseHead(_ head: HTTPHead) {
        guard let s = stream else { return }
        let clientMinor = s.request.versionMinor
        responseChunked = false
        responseCloseDelimited = false
        if let h2 {
            // HTTP/2 frames the body itself: the head goes to the stream as it is.
            if !requestComplete { closeAfterResponse = true }
            responseStarted = true
            h2.holdResponseHead(head)
            markUnflushed()
            return
        }
        switch head.framing {
        case .chunked, .untilClose:
            if clientMinor == 1 { responseChunked = true } else { responseCloseDelimited = true; closeAfterResponse = true }
        default: break
        }
        if !requestComplete || ctx.draining { closeAfterResponse = true } // body still arriving: can't resync
        // Room for a small body too: it is copied behind the head (see heldHead).
        var room = 0
        if case .contentLength(let n) = head.framing, n <= Self.mergedBodyLimit { room = Int(n) }
        var out = ctx.outputBuffer(capacity: head.bytes.readableBytes + 128 + room)
        let chunked = responseChunked
        let close = closeAfterResponse
        HeadWriter.writeResponse(head, into: &out) { o in
            o.writeStaticString("server: moonlet\r\n")
            if chunked { o.writeStaticString("transfer-encoding: chunked\r\n") }
            if close { o.writeStaticString("connection: close\r\n") }
            else if clientMinor == 0 { o.writeStaticString("connection: keep-alive\r\n") }
        }
        responseStarted = true
        heldHead = out
        markUnflushed()
    }

    func upstreamResponseBody(_ chunk: ByteBuffer) {
        guard let s = stream else { return }
        s.responseBodyBytes += Int64(chunk.readableBytes)
        if chain.wantsResponseBody { chain.runResponseBody(s, chunk: chunk, endOfStream: false) }
        if let h2 {
            h2.responseBody(chunk)
            markUnflushed()
            if !downstreamWritable { flushDownstream() }
            return
        }
        if heldHead != nil {
            if chunk.readableBytes <= Self.mergedBodyLimit {
                if responseChunked { ChunkedEncoder.writeChunk(chunk, into: &heldHead!) } else { var c = chunk; heldHead!.writeBuffer(&c) }
                releaseHeldHead()
                if !downstreamWritable { flushDownstream() }
                return
            }
            releaseHeldHead()
        }
        writeDownstream(ChunkedEncoder.frame(chunk, chunked: responseChunked, allocator: ctx.allocator))
        if !downstreamWritable { flushDownstream() }
    }

    func upstreamResponseEnd(reusable: Bool) {
        guard let s = stream else { return }
        let now = NIODeadline.now().uptimeNanoseconds
        if chain.wantsResponseBody { chain.runResponseBody(s, chunk: ByteBuffer(), endOfStream: true) }
        if let h2 { h2.endResponse() }
        else if responseChunked {
            if heldHead != nil { heldHead!.writeStaticString(ChunkedEncoder.lastChunk) }
            else { writeDownstream(ByteBuffer(staticString: ChunkedEncoder.lastChunk)) }
        }
        responseEnded = true
        if let u = upstream {
            upstream = nil
            if upstreamPaused { upstreamPaused = false; u.channel?.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in } }
            let cap = s.route.upstreamCluster?.maxRequestsPerConnection ?? 0
            if reusable && requestComplete && !requestChunked && (cap == 0 || u.requestsServed < cap) { ctx.pool.release(u, now: now) }
            else if u.multiplexed && requestComplete {
                // An HTTP/2 stream both sides have ended closes by itself; closing it
                // here would send RST_STREAM, which peers count against rapid-reset limits.
            } else { u.channel?.close(promise: nil) }
        }
        finishStream(s, now: now)
    }

    func upstreamFailed(_ reason: UpstreamFailure) {
        guard let s = stream else { return }
        upstream = nil
        if !responseStarted, s.route.endpointIndex >= 0, let c = s.route.upstreamCluster {
            // Local-origin failure (connect failure, reset, protocol error) for outlier detection.
            ctx.balancer.report(c, s.route.endpointIndex, status: nil)
        }
        if !responseStarted {
            var connectFailure = false
            if case .connectFailed = reason { connectFailure = true }
            if retryIfAllowed(s, status: nil, connectFailure: connectFailure) { return }
            if attempt > 0 { s.responseFlags.insert(.upstreamRetryLimitExceeded) }
        }
        if responseStarted {
            // Mid-response failure: the client can only learn it from a reset.
            s.responseFlags.insert(.upstreamConnectionTermination)
            closeDownstream()
            return
        }
        switch reason {
        case .connectFailed(let why):
            s.respond(503, body: "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: \(why)", flags: .upstreamConnectionFailure)
        case .reset:
            s.respond(503, body: "upstream connect error or disconnect/reset before headers. reset reason: connection termination", flags: .upstreamConnectionTermination)
        case .protocolError(let why):
            s.respond(502, body: "upstream protocol error: \(why)", flags: .upstreamProtocolError)
        }
        if !requestComplete { closeAfterResponse = true }
        sendLocalReply()
    }

    // MARK: local replies

    /// Sends `stream.localReply` through the response filters, then finishes the stream.
    func sendLocalReply() {
        guard let s = stream, var reply = s.localReply else { return }
        streamTimer?.cancel(); streamTimer = nil
        perTryTimer?.cancel(); perTryTimer = nil
        if let u = upstream { u.abandon(); upstream = nil }
        pendingUpstream = nil
        if !requestComplete && reqDecoder == nil { requestComplete = true }
        if !requestComplete {
            // Unread request body: it can't be skipped reliably if large; close after.
            closeAfterResponse = true
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
        let close = closeAfterResponse
        let clientMinor = s.request.versionMinor
        if let why = LocalReplyCheck.problem(head, limits: limits) {
            reply = rejectLocalReply(s, why)
            head = localHead(&reply, s)
        }
        let bodyOK = !s.request.isHead && reply.status != 204 && reply.status != 304
        var out = ctx.allocator.buffer(capacity: 256 + reply.body.utf8.count)
        func writeHead(_ head: HTTPHead) {
            HeadWriter.writeResponse(head, into: &out) { o in
                o.writeStaticString("server: moonlet\r\n")
                if close { o.writeStaticString("connection: close\r\n") }
                else if clientMinor == 0 { o.writeStaticString("connection: keep-alive\r\n") }
            }
        }
        writeHead(head)
        if out.readableBytes > limits.maxHeadBytes {
            let size = out.readableBytes
            out.clear()
            reply = rejectLocalReply(s, "head of \(size) bytes (at most \(limits.maxHeadBytes))")
            head = localHead(&reply, s)
            writeHead(head)
        }
        s.response = head
        s.responseCode = reply.status
        if bodyOK { out.writeString(reply.body) }
        s.responseBodyBytes = Int64(bodyOK ? reply.body.utf8.count : 0)
        responseStarted = true
        responseEnded = true
        writeDownstream(out)
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

    /// The head of a local reply that passed LocalReplyCheck: content-length (none on
    /// 204 and 304), content-type for a text body, the filter's headers.
    static func localHead(_ r: LocalReply, limits: ProxyLimits, allocator: ByteBufferAllocator) -> HTTPHead? {
        var b = allocator.buffer(capacity: 128)
        HeadWriter.writeStatusLine(r.status, reason: nil, into: &b)
        let noBody = r.status == 204 || r.status == 304
        if !noBody {
            b.writeStaticString("content-length: ")
            b.writeString(String(r.body.utf8.count))
            b.writeStaticString("\r\n")
        }
        if !noBody && !r.headers.contains(where: { $0.name == "content-type" }) && !r.body.isEmpty { b.writeStaticString("content-type: text/plain\r\n") }
        for h in r.headers where h.name.lowercased() != "content-length" { HeadWriter.writeField(h.name, h.value, into: &b) }
        b.writeStaticString("\r\n")
        var p = HTTPHeadParser(limits: HTTPParserLimits(maxHeadBytes: max(limits.maxHeadBytes, 1024), maxHeaderCount: limits.maxHeaderCount))
        if case .complete(let head, _) = p.parseResponse(b, requestWasHead: false) { return head }
        return nil
    }

    /// The head of `reply`; when it does not re-parse, the whole reply (head and body)
    /// becomes the clean 500, so no byte of the intended body follows another head.
    func localHead(_ reply: inout LocalReply, _ s: ProxyStream) -> HTTPHead {
        if let head = Self.localHead(reply, limits: limits, allocator: ctx.allocator) { return head }
        reply = rejectLocalReply(s, "head does not re-parse")
        return Self.localHead(reply, limits: limits, allocator: ctx.allocator)!
    }

    /// A head that failed to parse: answer (400/431/...), log, close.
    func protocolError(_ e: HTTPParseError) {
        ctx.metrics.count("moonlet_downstream_protocol_errors_total")
        ctx.logger.debug("downstream \(peer.address): \(e.reason)")
        var out = ctx.allocator.buffer(capacity: 128)
        HeadWriter.writeStatusLine(e.status, reason: nil, into: &out)
        let body = e.reason + "\n"
        out.writeString("content-length: \(body.utf8.count)\r\ncontent-type: text/plain\r\nserver: moonlet\r\nconnection: close\r\n\r\n")
        out.writeString(body)
        ctx.metrics.recordRequest(RequestLabels(reporter: role == .inbound ? "destination" : "source", responseCode: e.status,
                                                responseFlags: "DPE", destinationService: "unknown"),
                                  durationMs: 0, requestBytes: 0, responseBytes: Int64(body.utf8.count))
        closed = true
        inbound = nil
        if let h2 {
            h2.write(out)
            h2.close()
            return
        }
        let c = context!
        c.writeAndFlush(wrapOutboundOut(out)).whenComplete { _ in c.close(promise: nil) }
    }

    func localReplyAndClose(_ status: Int, _ reason: String) {
        guard let s = stream else { return }
        closeAfterResponse = true
        s.respond(status, body: reason + "\n", headers: [])
        requestComplete = true
        reqDecoder = nil
        if let u = upstream { u.abandon(); upstream = nil }
        pendingUpstream = nil
        if responseStarted { finishStream(s); closeDownstream() } else { sendLocalReply() }
    }

    // MARK: end of stream

    /// `now`: the clock, when the caller has just read it (0: read it here).
    func finishStream(_ s: ProxyStream, now nowIn: UInt64 = 0) {
        guard stream === s else { return }
        let now = nowIn != 0 ? nowIn : NIODeadline.now().uptimeNanoseconds
        releaseHeldHead()
        responseEnded = false
        streamTimer?.cancel(); streamTimer = nil
        perTryTimer?.cancel(); perTryTimer = nil
        replay = nil
        mirrorHeads = []
        if waiter != nil { stopWaiting() }
        retrySlotHeld?.retryDone(); retrySlotHeld = nil
        if holdsRequestSlot, let c = s.route.upstreamCluster { ctx.balancer.circuit(c).requestDone() }
        holdsRequestSlot = false
        chain.runLog(s)
        ctx.lua.endStream(s)
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster { ctx.balancer.done(c, s.route.endpointIndex) }
        record(s, now: now)
        s.end()
        stream = nil
        ctx.activeStreams -= 1
        if let u = upstream { u.abandon(); upstream = nil }
        pendingUpstream = nil
        connecting = false
        if closeAfterResponse || closed {
            if !closed { closed = true; closeDownstream() }
            return
        }
        if reqDecoder != nil {
            // Answered before the body ended (local reply): the rest of the body cannot be
            // told apart from the next request reliably, so the connection closes.
            closed = true; closeTransport(); return
        }
        setReading(true)
        lastActivity = now
        if (inbound?.readableBytes ?? 0) > 0 { process() }
    }

    /// Istio's request metrics. The series is found by a small key (and the last one
    /// is reused when the key repeats), so the full label set is built once per series.
    func record(_ s: ProxyStream, now: UInt64) {
        let ms = Double(now &- s.startNanos) / 1e6
        let inbound = role == .inbound
        let service = inbound ? ctx.inboundService : (s.route.host.isEmpty ? "unknown" : s.route.host)
        let mtls = inbound ? peerMTLS : upstreamTLS?.mode == .istioMutual
        let key = SeriesKey(inbound: inbound, code: s.status, flags: s.responseFlags.rawValue, service: service, principal: inbound ? peer.principal : "", mtls: mtls)
        let series: RequestSeries
        if let last = lastSeries, lastSeriesKey == key { series = last } else {
            let flags = s.responseFlags
            series = ctx.metrics.series(key) {
                RequestLabels(reporter: inbound ? "destination" : "source", responseCode: key.code,
                              responseFlags: flags.envoyString, destinationService: service,
                              connectionSecurityPolicy: mtls ? "mutual_tls" : "none",
                              sourcePrincipal: key.principal.isEmpty ? "unknown" : "spiffe://" + key.principal)
            }
            lastSeries = series; lastSeriesKey = key
        }
        series.record(durationMs: ms, requestBytes: s.requestBodyBytes, responseBytes: s.responseBodyBytes)
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
        if let h = h2Connection { h.drain() } else if stream != nil { closeAfterResponse = true }
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
            closed = true
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
            closed = true
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
        let idle = ms > 0 && !readPaused && now &- lastActivity >= UInt64(ms) * 1_000_000
        if let s = stream {
            // Once the response is under way the stream ends with it (finishStream closes
            // a connection whose request body is unfinished).
            guard reqDecoder != nil, !responseStarted else { return }
            let late = total > 0 && now &- s.startNanos >= UInt64(total) * 1_000_000
            guard idle || late else { return }
            s.responseFlags.insert(.streamIdleTimeout)
            localReplyAndClose(408, late ? "request timeout" : "request body timeout")
        } else if idle, h2?.pendingHead != nil {
            // HTTP/2 HEADERS without END_STREAM or content-length, then nothing.
            protocolError(HTTPParseError(408, "request body timeout"))
        }
    }

    func armStreamTimer(_ s: ProxyStream) {
        let ms = s.route.timeoutMs > 0 ? s.route.timeoutMs : limits.streamTimeoutMs
        guard ms > 0 else { return }
        let sid = s.id
        streamTimer = ctx.loop.scheduleTask(in: .milliseconds(Int64(ms))) {
            guard let cur = self.stream, cur.id == sid, !self.responseStarted else { return }
            cur.respond(504, body: "upstream request timeout", flags: .upstreamRequestTimeout)
            self.closeAfterResponse = self.closeAfterResponse || !self.requestComplete
            self.sendLocalReply()
        }
    }
}
