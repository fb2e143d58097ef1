import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOHPACK
import NIOTLS
import NIOSSL
import MoonletTLS
import MoonletCore
import MoonletHTTP
import MoonletBalancer

/// An HTTP/2 connection to an upstream (a peer sidecar that chose "h2" by ALPN over
/// mTLS). Every request is a stream of its own, whose child channel is
///
///     UpstreamH2StreamBridge ⇄ UpstreamConnection
///
/// so a stream speaks HTTP/1.1 bytes to the same UpstreamConnection and
/// DownstreamHandler as a pooled HTTP/1.1 connection. A stream is used once; the
/// next request opens the next stream on the same session. Owned by one event loop.
final class UpstreamH2Session {
    let key: String
    let channel: Channel
    let multiplexer: NIOHTTP2Handler.StreamMultiplexer
    let limits: ProxyLimits
    let createdAt = NIODeadline.now().uptimeNanoseconds
    var idleSince = NIODeadline.now().uptimeNanoseconds
    var openStreams = 0
    var streamsStarted = 0
    /// The peer sent GOAWAY, or the cluster's per-connection request or lifetime bound
    /// was reached: no new stream; the connection closes when its last stream ends.
    var retiring = false
    var closed = false
    /// The cluster connection slot this connection holds (released when it closes).
    var circuit: CircuitCounters?
    /// `:scheme` of the requests: "https" over TLS, "http" over h2c.
    var scheme = "https"

    init(key: String, channel: Channel, multiplexer: NIOHTTP2Handler.StreamMultiplexer, limits: ProxyLimits) {
        self.key = key
        self.channel = channel
        self.multiplexer = multiplexer
        self.limits = limits
    }

    /// Whether a new stream may start here. `maxRequests`: the cluster's
    /// maxRequestsPerConnection, `maxDurationMs`: its maxConnectionDuration (0: unbounded).
    func accepts(maxRequests: Int, maxDurationMs: Int) -> Bool {
        guard !closed, !retiring else { return false }
        if (maxRequests > 0 && streamsStarted >= maxRequests)
            || (maxDurationMs > 0 && NIODeadline.now().uptimeNanoseconds - createdAt > UInt64(maxDurationMs) * 1_000_000) {
            retire()
            return false
        }
        return true
    }

    /// No new streams; close once the open ones are done.
    func retire() {
        retiring = true
        if openStreams == 0 { channel.close(promise: nil) }
    }

    /// Opens a stream and hands its connection over once the child channel is active.
    func openStream(_ done: @escaping (Result<UpstreamConnection, Error>) -> Void) {
        streamsStarted += 1
        openStreams += 1
        let conn = UpstreamConnection(key: key, limits: limits)
        conn.multiplexed = true
        let limits = self.limits
        let scheme = self.scheme
        let promise = channel.eventLoop.makePromise(of: Channel.self)
        multiplexer.createStreamChannel(promise: promise) { ch in
            conn.channel = ch
            return ch.eventLoop.makeCompletedFuture {
                let sync = ch.pipeline.syncOperations
                try sync.addHandler(UpstreamH2StreamBridge(limits: limits, scheme: scheme))
                try sync.addHandler(conn)
            }
        }
        promise.futureResult.whenComplete { r in
            switch r {
            case .success(let ch):
                ch.closeFuture.whenComplete { _ in self.streamClosed() }
                done(.success(conn))
            case .failure(let e):
                self.streamClosed()
                done(.failure(UpstreamFailure.connectFailed("HTTP/2 stream could not open: \(e)")))
            }
        }
    }

    func streamClosed() {
        openStreams -= 1
        idleSince = NIODeadline.now().uptimeNanoseconds
        if retiring && openStreams == 0 { channel.close(promise: nil) }
    }

    /// Connection settings of an upstream HTTP/2 connection: no server push, header
    /// list and window bounded as downstream.
    static func connectionConfiguration(_ limits: ProxyLimits) -> NIOHTTP2Handler.ConnectionConfiguration {
        var c = NIOHTTP2Handler.ConnectionConfiguration()
        c.initialSettings = [
            HTTP2Setting(parameter: .enablePush, value: 0),
            HTTP2Setting(parameter: .maxHeaderListSize, value: limits.maxHeadBytes * 2),
            HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
        ]
        return c
    }
}

/// Watches an upstream HTTP/2 connection's own frames (stream 0): on GOAWAY the
/// session takes no new streams.
final class UpstreamH2Watcher: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    /// Strong: the cycle (session, channel, pipeline, watcher) ends when the connection
    /// closes and the watcher leaves its pipeline. A weak reference would put every
    /// retain and release of the session (one per stream) on the slow path.
    var session: UpstreamH2Session?

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .goAway = unwrapInboundIn(data).payload { session?.retire() }
    }

    func handlerRemoved(context: ChannelHandlerContext) { session = nil }

    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}

/// Converts between HTTP/1.1 bytes (what UpstreamConnection and the downstream
/// handler write and read) and one HTTP/2 client stream's frames, with no HTTP/1-style
/// parts in between.
final class UpstreamH2StreamBridge: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = HTTP2Frame.FramePayload

    var request: HTTP1ToHTTP2Frames
    var requestWasHead = false
    var responseStarted = false
    var responseChunked = false
    var responseEnded = false
    let scheme: String

    init(limits: ProxyLimits, scheme: String) {
        request = HTTP1ToHTTP2Frames(requests: true, limits: limits)
        self.scheme = scheme
    }

    // Request: HTTP/1.1 bytes -> frames.
    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        do {
            try request.relay(unwrapOutboundIn(data)) { part in
                switch part {
                case .headers(let head, let end):
                    requestWasHead = head.isHead
                    context.write(wrapOutboundOut(.headers(.init(headers: Self.requestHeaders(head, scheme: scheme), endStream: end))), promise: nil)
                case .data(let d, let end):
                    context.write(wrapOutboundOut(.data(.init(data: .byteBuffer(d), endStream: end))), promise: nil)
                case .trailers(let t):
                    var fields = HPACKHeaders()
                    for f in t.fields { fields.add(name: f.name, value: f.value) }
                    context.write(wrapOutboundOut(.headers(.init(headers: fields, endStream: true))), promise: nil)
                }
            }
            promise?.succeed()
        } catch {
            promise?.fail(error)
            context.close(promise: nil)
        }
    }

    /// The HTTP/2 request header block: the pseudo-headers (`:authority` from Host),
    /// then the fields as HTTP/2 allows them.
    static func requestHeaders(_ head: HTTPHead, scheme: String) -> HPACKHeaders {
        var authority = head.hostIndex >= 0 ? head.value(at: head.hostIndex) : ""
        for a in head.added where a.name.lowercased() == "host" { authority = a.value }
        var headers = HPACKHeaders()
        headers.reserveCapacity(head.fields.count + head.added.count + 4)
        headers.add(name: ":method", value: head.method)
        headers.add(name: ":scheme", value: scheme)
        headers.add(name: ":authority", value: authority)
        headers.add(name: ":path", value: head.target)
        head.appendHTTP2Fields(to: &headers, isRequest: true)
        return headers
    }

    // Response: frames -> HTTP/1.1 bytes (a stream carries one exchange; UpstreamConnection
    // never offers a multiplexed connection back to the pool).
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !responseEnded else { return }
        switch unwrapInboundIn(data) {
        case .headers(let h):
            if responseStarted {
                // Trailers: they end the response, as a chunked body's trailer section
                // (dropped when the response has a content-length: HTTP/1.1 has no place
                // for them then).
                var t = HTTPTrailers()
                for (name, value, _) in h.headers { t.add(checking: name, value) }
                endResponse(context: context, trailers: t)
                return
            }
            let code = Int(h.headers.first(name: ":status") ?? "") ?? 0
            if code >= 100 && code < 200 { return } // interim: the proxy answers 100-continue itself
            responseStarted = true
            var out = context.channel.allocator.buffer(capacity: 256)
            HeadWriter.writeStatusLine(code, reason: nil, into: &out)
            var hasLength = false
            for (name, value, _) in h.headers {
                if name.utf8.first == UInt8(ascii: ":") { continue }
                if name == "content-length" { hasLength = true }
                HeadWriter.writeField(name, value, into: &out)
            }
            let bodyless = requestWasHead || code == 204 || code == 304
            if h.endStream && !hasLength && !bodyless {
                out.writeStaticString("content-length: 0\r\n")
            } else {
                responseChunked = !hasLength && !bodyless
                if responseChunked { out.writeStaticString("transfer-encoding: chunked\r\n") }
            }
            out.writeStaticString("\r\n")
            context.fireChannelRead(wrapInboundOut(out))
            if h.endStream { responseEnded = true }
            context.fireChannelReadComplete()
        case .data(let d):
            guard responseStarted else { return }
            context.fireHTTP1Body(d.data, chunked: responseChunked)
            if d.endStream { endResponse(context: context) } else { context.fireChannelReadComplete() }
        default:
            break
        }
    }

    func endResponse(context: ChannelHandlerContext, trailers: HTTPTrailers? = nil) {
        responseEnded = true
        if responseChunked { context.fireChannelRead(wrapInboundOut(ChunkedEncoder.lastChunk(trailers: trailers))) }
        context.fireChannelReadComplete()
    }
}

/// Holds a new TLS upstream connection until its handshake is done (bounded by
/// `tlsHandshakeTimeoutMs`), then hands the negotiated ALPN protocol to `configure`,
/// which sets up the pipeline for HTTP/1.1 or HTTP/2 before any decrypted byte is
/// read. A close or error before then is reported through `failed`.
final class UpstreamHandshake: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let timeoutMs: Int
    var configure: ((ChannelHandlerContext, String?) -> Void)?
    var failed: ((String) -> Void)?
    var error: String?
    var timer: Scheduled<Void>?
    /// ISTIO_MUTUAL (mesh roots), else DestinationRule SIMPLE/MUTUAL: the refusal's wording.
    let mesh: Bool

    init(timeoutMs: Int, mesh: Bool = true, configure: @escaping (ChannelHandlerContext, String?) -> Void, failed: @escaping (String) -> Void) {
        self.timeoutMs = timeoutMs
        self.mesh = mesh
        self.configure = configure
        self.failed = failed
    }

    func channelActive(context: ChannelHandlerContext) {
        if timeoutMs > 0 {
            timer = context.eventLoop.scheduleTask(in: .milliseconds(Int64(timeoutMs))) { [weak self] in
                guard let self, self.configure != nil else { return }
                self.error = "TLS handshake did not finish within \(self.timeoutMs) ms"
                context.close(promise: nil)
            }
        }
        context.fireChannelActive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted(let proto) = event, let configure {
            self.configure = nil
            failed = nil
            timer?.cancel(); timer = nil
            configure(context, proto)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if self.error == nil {
            // In words (what failed, whose certificate), never the TLS library's dump.
            let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)
            self.error = "TLS handshake failed: " + TLSMaterial.upstreamRefusalReason(TLSMaterial.identityRefusal(of: tls) ?? error, peerCertificate: tls?.peerCertificate,
                                                                                      mesh: mesh)
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel(); timer = nil
        configure = nil
        if let f = failed { failed = nil; f(error ?? "TLS handshake failed: the server closed the connection during the handshake") }
        context.fireChannelInactive()
    }
}
