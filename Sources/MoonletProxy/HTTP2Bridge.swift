import NIOCore
import NIOHTTP1
import NIOHTTP2
import MoonletCore

/// HTTP/2 downstream (h2c prior knowledge now; ALPN h2 with TLS later), mapped onto
/// the same stream model: each HTTP/2 stream gets a child channel whose pipeline is
///
///     HTTP2FramePayloadToHTTP1ServerCodec ⇄ HTTP2StreamBridge ⇄ DownstreamHandler
///
/// The bridge writes the stream's request as HTTP/1.1 bytes into the same
/// DownstreamHandler the HTTP/1.1 path uses (so filters, limits and upstream pools
/// are shared), and parses the HTTP/1.1 response bytes it produces back into HTTP/2
/// response parts. swift-nio-http2 enforces the protocol limits (flow control, HPACK
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
                try sync.addHandler(HTTP2FramePayloadToHTTP1ServerCodec())
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

/// Converts between one HTTP/2 stream's HTTP/1-style parts and HTTP/1.1 bytes.
final class HTTP2StreamBridge: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = HTTPServerResponsePart

    var pendingHead: HTTPRequestHead?
    var chunked = false
    var response: HTTPMessageReader

    init(limits: ProxyLimits) {
        response = HTTPMessageReader(requests: false, limits: HTTPParserLimits(maxHeadBytes: limits.maxHeadBytes * 2, maxHeaderCount: limits.maxHeaderCount + 16))
    }

    // Request: parts -> HTTP/1.1 bytes. The head is held until the next part shows
    // whether a body follows (HTTP/2 knows it from END_STREAM).
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            pendingHead = h
            response.requestWasHead = h.method == .HEAD
        case .body(let b):
            if let h = pendingHead {
                pendingHead = nil
                chunked = !h.headers.contains(name: "content-length")
                emitHead(context: context, h, body: true)
            }
            context.fireChannelRead(wrapInboundOut(ChunkedEncoder.frame(b, chunked: chunked, allocator: context.channel.allocator)))
        case .end:
            if let h = pendingHead {
                pendingHead = nil
                emitHead(context: context, h, body: false)
            } else if chunked {
                context.fireChannelRead(wrapInboundOut(ByteBuffer(staticString: ChunkedEncoder.lastChunk)))
            }
            context.fireChannelReadComplete()
        }
    }

    func emitHead(context: ChannelHandlerContext, _ h: HTTPRequestHead, body: Bool) {
        var out = context.channel.allocator.buffer(capacity: 512)
        out.writeString(h.method.rawValue)
        out.writeInteger(UInt8(32))
        out.writeString(h.uri)
        out.writeStaticString(" HTTP/1.1\r\n")
        var hasHost = false
        for (name, value) in h.headers {
            let lower = name.lowercased()
            if lower == "host" { if hasHost { continue }; hasHost = true }
            if lower == "transfer-encoding" || lower == "connection" { continue }
            HeadWriter.writeField(lower, value, into: &out)
        }
        if !hasHost { out.writeStaticString("host: \r\n") }
        if body && chunked { out.writeStaticString("transfer-encoding: chunked\r\n") }
        out.writeStaticString("\r\n")
        context.fireChannelRead(wrapInboundOut(out))
    }

    // Response: HTTP/1.1 bytes -> parts.
    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        response.relay(unwrapOutboundIn(data), context: context, promise: promise) { head in
            var headers = HTTPHeaders()
            for i in 0..<head.fields.count {
                switch head.fields[i].kind {
                case .connection, .transferEncoding, .keepAlive, .upgrade, .proxyConnection: continue
                default: headers.add(name: head.name(at: i).lowercased(), value: head.value(at: i))
                }
            }
            return HTTPResponseHead(version: .http2, status: HTTPResponseStatus(statusCode: head.status), headers: headers)
        }
    }
}

extension HTTPMessageReader {
    /// Feeds `bytes` and writes each message part to `context` as an HTTP/1-style part
    /// (`HTTPPart<Head, IOData>`, what NIO's HTTP/2 codecs take), the head converted by
    /// `head`. A malformed message fails `promise` and closes the stream.
    mutating func relay<Head: Equatable & Sendable>(_ bytes: ByteBuffer, context: ChannelHandlerContext, promise: EventLoopPromise<Void>?,
                              head: (HTTPHead) -> Head) {
        do {
            try feed(bytes) { event in
                switch event {
                case .head(let h): context.write(NIOAny(HTTPPart<Head, IOData>.head(head(h))), promise: nil)
                case .body(let chunk): context.write(NIOAny(HTTPPart<Head, IOData>.body(.byteBuffer(chunk))), promise: nil)
                case .end: context.write(NIOAny(HTTPPart<Head, IOData>.end(nil)), promise: nil)
                }
            }
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
