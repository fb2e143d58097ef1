import NIOCore
import NIOHTTP1
import NIOHTTP2
import NIOHPACK
import MoonletCore

/// HTTP/2 downstream (h2c prior knowledge now; ALPN h2 with TLS later), mapped onto
/// the same stream model: each HTTP/2 stream gets a child channel whose pipeline is
///
///     HTTP2StreamBridge ⇄ DownstreamHandler
///
/// The bridge writes the stream's request frames as HTTP/1.1 bytes into the same
/// DownstreamHandler the HTTP/1.1 path uses (so filters, limits and upstream pools
/// are shared), and parses the HTTP/1.1 response bytes it produces back into HEADERS
/// and DATA frames. swift-nio-http2 enforces the protocol limits (flow control, HPACK
/// list size, CONTINUATION flood, rapid reset).
enum HTTP2Server {
    static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    /// Connection settings: concurrent streams and header list bounded.
    static func connectionConfiguration(_ limits: ProxyLimits) -> NIOHTTP2Handler.ConnectionConfiguration {
        var c = NIOHTTP2Handler.ConnectionConfiguration()
        c.initialSettings = [
            HTTP2Setting(parameter: .maxConcurrentStreams, value: 100),
            HTTP2Setting(parameter: .maxHeaderListSize, value: limits.maxHeadBytes),
            HTTP2Setting(parameter: .initialWindowSize, value: 1 << 20),
        ]
        return c
    }

    /// Turns a downstream connection into an HTTP/2 server connection. Called by the
    /// HTTP/1.1 handler when the first bytes are the HTTP/2 preface.
    /// `peer`: the connection's peer (address, mTLS identity) and IP, handed to every stream.
    /// `activity`: counts the connection's open streams (for its idle timeout).
    static func configure(channel: Channel, ctx: LoopContext, role: ListenerRole, position: ChannelPipeline.Position,
                          peer: (info: PeerInfo, ip: String)? = nil, activity: HTTP2ConnectionActivity? = nil) throws {
        ctx.metrics.count("moonlet_downstream_cx_http2_total")
        var streamConfig = NIOHTTP2Handler.StreamConfiguration()
        streamConfig.targetWindowSize = 1 << 20
        // Stream responses finish one by one (each upstream read completes one); their
        // flushes are merged into one write per event-loop tick for the connection.
        let coalescer = FlushCoalescer()
        try channel.pipeline.syncOperations.addHandler(coalescer, position: ChannelPipeline.SynchronousOperations.Position(position))
        _ = try channel.pipeline.syncOperations.configureHTTP2Pipeline(
            mode: .server,
            connectionConfiguration: connectionConfiguration(ctx.settings.limits),
            streamConfiguration: streamConfig,
            position: .after(coalescer)
        ) { stream in
            stream.eventLoop.makeCompletedFuture {
                let sync = stream.pipeline.syncOperations
                try sync.addHandler(HTTP2StreamBridge(limits: ctx.settings.limits))
                let h = DownstreamHandler(ctx: ctx, role: role, http2Stream: true)
                h.inheritedPeer = peer
                h.h2Activity = activity
                try sync.addHandler(h)
            }
        }
    }
}

/// Open streams of one downstream HTTP/2 connection and when the last one ended: the
/// connection is idle (downstreamIdleTimeoutMs, Envoy's idle_timeout) only while it
/// has no open stream. Touched only on the connection's event loop.
final class HTTP2ConnectionActivity {
    var openStreams = 0
    var lastActivity: UInt64
    init(since: UInt64) { lastActivity = since }
}

/// Converts between one HTTP/2 stream's frames and HTTP/1.1 bytes: the request's
/// HEADERS and DATA become HTTP/1.1 bytes for the DownstreamHandler, and the HTTP/1.1
/// response it writes becomes HEADERS and DATA frames. There are no HTTP/1-style parts
/// in between: NIO's HTTP2FramePayloadToHTTP1ServerCodec, which built them, cost a sixth
/// of an HTTP/2 request's CPU. NIOHTTP2Handler has validated the request's header block
/// (lowercase names, no CR, LF or NUL in any value, well-formed pseudo-headers, no
/// connection-specific fields) before it reaches the stream, so fields are copied as
/// they are; the DownstreamHandler's parser checks the bytes again.
final class HTTP2StreamBridge: ChannelDuplexHandler {
    typealias InboundIn = HTTP2Frame.FramePayload
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = HTTP2Frame.FramePayload

    /// A request head without content-length, held until the next frame shows whether
    /// a body follows (then it is sent chunked).
    var pendingHead: HPACKHeaders?
    var headSeen = false
    var requestEnded = false
    var chunked = false
    var response: HTTP1ToHTTP2Frames

    init(limits: ProxyLimits) {
        response = HTTP1ToHTTP2Frames(requests: false, limits: limits)
    }

    // Request: frames -> HTTP/1.1 bytes.
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !requestEnded else { return }
        switch unwrapInboundIn(data) {
        case .headers(let h):
            if headSeen {
                // Trailers end the request; HTTP/1.1 upstreams get the body without them.
                endRequest(context: context)
                return
            }
            headSeen = true
            response.reader.requestWasHead = h.headers.first(name: ":method") == "HEAD"
            if h.endStream {
                emitHead(context: context, h.headers, body: false)
                requestEnded = true
                context.fireChannelReadComplete()
            } else if h.headers.contains(name: "content-length") {
                emitHead(context: context, h.headers, body: true)
            } else {
                pendingHead = h.headers
            }
        case .data(let d):
            if let h = pendingHead {
                pendingHead = nil
                if d.endStream && d.data.readableBytes == 0 {
                    // No body after all: the head alone.
                    emitHead(context: context, h, body: false)
                    requestEnded = true
                    context.fireChannelReadComplete()
                    return
                }
                chunked = true
                emitHead(context: context, h, body: true)
            }
            context.fireHTTP1Body(d.data, chunked: chunked)
            if d.endStream { endRequest(context: context) } else { context.fireChannelReadComplete() }
        default:
            break
        }
    }

    func endRequest(context: ChannelHandlerContext) {
        requestEnded = true
        if let h = pendingHead {
            pendingHead = nil
            emitHead(context: context, h, body: false)
        } else if chunked {
            context.fireChannelRead(wrapInboundOut(ByteBuffer(staticString: ChunkedEncoder.lastChunk)))
        }
        context.fireChannelReadComplete()
    }

    /// Writes the request line and fields. `:authority` becomes `host` (a `host` field
    /// beside it is dropped); the cookie crumbs HTTP/2 allows are joined with "; ", as
    /// HTTP/1.1 wants one cookie field (RFC 9113 8.2.3).
    func emitHead(context: ChannelHandlerContext, _ h: HPACKHeaders, body: Bool) {
        var method = "", path = "", authority: String? = nil
        for (name, value, _) in h {
            guard name.utf8.first == UInt8(ascii: ":") else { break } // pseudo-headers come first
            switch name {
            case ":method": method = value
            case ":path": path = value
            case ":authority": authority = value
            default: break
            }
        }
        if method == "CONNECT" { path = authority ?? "" }
        var out = context.channel.allocator.buffer(capacity: 512)
        out.writeString(method)
        out.writeInteger(UInt8(32))
        out.writeString(path)
        out.writeStaticString(" HTTP/1.1\r\n")
        if let authority { HeadWriter.writeField("host", authority, into: &out) }
        var hasHost = authority != nil
        var cookie: String? = nil
        for (name, value, _) in h {
            if name.utf8.first == UInt8(ascii: ":") { continue }
            switch name {
            case "host":
                if hasHost { continue }
                hasHost = true
            case "cookie":
                cookie = cookie.map { $0 + "; " + value } ?? value
                continue
            case "transfer-encoding", "connection": continue
            default: break
            }
            HeadWriter.writeField(name, value, into: &out)
        }
        if let cookie { HeadWriter.writeField("cookie", cookie, into: &out) }
        if !hasHost { out.writeStaticString("host: \r\n") }
        if body && chunked { out.writeStaticString("transfer-encoding: chunked\r\n") }
        out.writeStaticString("\r\n")
        context.fireChannelRead(wrapInboundOut(out))
    }

    // Response: HTTP/1.1 bytes -> frames.
    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        response.relay(unwrapOutboundIn(data), context: context, promise: promise, headers: Self.responseHeaders)
    }

    /// `:status`, then the fields as HTTP/2 allows them.
    static func responseHeaders(_ head: HTTPHead) -> HPACKHeaders {
        var headers = HPACKHeaders()
        headers.reserveCapacity(head.fields.count + 1)
        headers.add(name: ":status", value: String(head.status))
        head.appendHTTP2Fields(to: &headers, isRequest: false)
        return headers
    }
}

extension HTTPHead {
    /// Appends the head's fields (and those a filter added) to an HTTP/2 header block,
    /// names lowercased, without the HTTP/1.1 connection-specific ones HTTP/2 forbids
    /// (RFC 9113 §8.2.2): Connection and the fields it names, Keep-Alive,
    /// Proxy-Connection, Transfer-Encoding, Upgrade. A request also drops TE and Host
    /// (`:authority` carries the host).
    func appendHTTP2Fields(to headers: inout HPACKHeaders, isRequest: Bool) {
        for i in 0..<fields.count where !fields[i].removed {
            switch fields[i].kind {
            case .connection, .transferEncoding, .keepAlive, .upgrade, .proxyConnection: continue
            case .te, .host where isRequest: continue
            default:
                let name = lowercasedName(at: i)
                if !connectionTokens.isEmpty && connectionTokens.contains(name) { continue }
                headers.add(name: name, value: value(at: i))
            }
        }
        for a in added {
            let name = a.name.lowercased()
            if isRequest && name == "host" { continue }
            headers.add(name: name, value: a.value)
        }
    }
}

extension ChannelHandlerContext {
    /// Passes a DATA frame's bytes on as HTTP/1.1 body bytes, chunk-framed when `chunked`.
    func fireHTTP1Body(_ data: IOData, chunked: Bool) {
        guard case .byteBuffer(let b) = data, b.readableBytes > 0 else { return }
        fireChannelRead(NIOAny(ChunkedEncoder.frame(b, chunked: chunked, allocator: channel.allocator)))
    }
}

/// One direction of an HTTP/2 stream bridge: HTTP/1.1 message bytes in, HEADERS and
/// DATA frames out (the response on the downstream side, the request upstream). Within
/// one write the head and the last body chunk are held until the next part shows
/// whether they end the stream: END_STREAM then rides on them instead of an empty DATA
/// frame of its own. Nothing is held past the write, so a streamed body never waits.
struct HTTP1ToHTTP2Frames {
    var reader: HTTPMessageReader

    init(requests: Bool, limits: ProxyLimits) {
        reader = HTTPMessageReader(requests: requests, limits: HTTPParserLimits(maxHeadBytes: limits.maxHeadBytes * 2, maxHeaderCount: limits.maxHeaderCount + 16))
    }

    /// Feeds `bytes` and writes the frames to `context` (whose outbound type is
    /// HTTP2Frame.FramePayload), the head converted by `headers`. A malformed message
    /// fails `promise` and closes the stream.
    mutating func relay(_ bytes: ByteBuffer, context: ChannelHandlerContext, promise: EventLoopPromise<Void>?,
                        headers: (HTTPHead) -> HPACKHeaders) {
        var heldHeaders: HPACKHeaders?
        var heldData: ByteBuffer?
        func send(_ payload: HTTP2Frame.FramePayload) { context.write(NIOAny(payload), promise: nil) }
        func sendHeld(endStream: Bool) {
            if let h = heldHeaders {
                heldHeaders = nil
                send(.headers(.init(headers: h, endStream: endStream && heldData == nil)))
            }
            if let d = heldData {
                heldData = nil
                send(.data(.init(data: .byteBuffer(d), endStream: endStream)))
            }
        }
        do {
            try reader.feed(bytes) { event in
                switch event {
                case .head(let head):
                    heldHeaders = headers(head)
                case .body(let chunk):
                    sendHeld(endStream: false)
                    heldData = chunk
                case .end:
                    if heldHeaders == nil && heldData == nil { heldData = ByteBuffer() }
                    sendHeld(endStream: true)
                }
            }
            sendHeld(endStream: false)
            promise?.succeed()
        } catch {
            promise?.fail(error)
            context.close(promise: nil)
        }
    }
}

/// Merges the flushes of one event-loop tick into one: the first flush schedules the
/// real one at the end of the tick, later ones in the same tick are absorbed. Used on
/// HTTP/2 connections, where every stream's response end would otherwise be a write
/// system call of its own.
final class FlushCoalescer: ChannelOutboundHandler {
    typealias OutboundIn = Any
    typealias OutboundOut = Any
    var scheduled = false

    func flush(context: ChannelHandlerContext) {
        guard !scheduled else { return }
        scheduled = true
        context.eventLoop.execute {
            self.scheduled = false
            context.flush()
        }
    }
}
