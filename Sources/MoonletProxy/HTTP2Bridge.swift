import NIOCore
import NIOHPACK
import MoonletCore

extension HTTPHead {
    /// Whether field `i` must not go into an HTTP/2 header block: the HTTP/1.1
    /// connection-specific ones (RFC 9113 §8.2.2: Connection and the fields it names,
    /// Keep-Alive, Proxy-Connection, Transfer-Encoding, Upgrade), TE other than
    /// "trailers", and in a request Host (`:authority` carries it).
    @inline(__always)
    func isHTTP2Forbidden(_ i: Int, isRequest: Bool) -> Bool {
        switch fields[i].kind {
        case .connection, .transferEncoding, .keepAlive, .upgrade, .proxyConnection: return true
        case .te: return !(isRequest && isTETrailers(i))
        case .host where isRequest: return true
        default: return !connectionTokens.isEmpty && connectionTokens.contains(lowercasedName(at: i))
        }
    }

    /// Appends the head's fields (and those a filter added) to an HTTP/2 header block,
    /// names lowercased, without those `isHTTP2Forbidden` names.
    func appendHTTP2Fields(to headers: inout HPACKHeaders, isRequest: Bool) {
        for i in 0..<fields.count where !fields[i].removed && !isHTTP2Forbidden(i, isRequest: isRequest) {
            headers.add(name: lowercasedName(at: i), value: value(at: i))
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
/// DATA frames out (the request to an HTTP/2 upstream; the downstream HTTP/2 server is
/// given parsed heads and body chunks, see HTTP2ServerStream). Within
/// one write the head and the last body chunk are held until the next part shows
/// whether they end the stream: END_STREAM then rides on them instead of an empty DATA
/// frame of its own. Nothing is held past the write, so a streamed body never waits.
struct HTTP1ToHTTP2Frames {
    var reader: HTTPMessageReader

    init(requests: Bool, limits: ProxyLimits) {
        reader = HTTPMessageReader(requests: requests, limits: HTTPParserLimits(maxHeadBytes: limits.maxHeadBytes * 2, maxHeaderCount: limits.maxHeaderCount + 16))
    }

    /// One frame's worth of the message: the head, or body bytes; `endStream` on the last.
    enum Part {
        case headers(HTTPHead, endStream: Bool)
        case data(ByteBuffer, endStream: Bool)
        /// The chunked body's trailers: a HEADERS frame that ends the stream.
        case trailers(HTTPTrailers)
    }

    /// Feeds `bytes` and hands each frame's worth to `emit`. Throws the parse error of a
    /// malformed message.
    mutating func relay(_ bytes: ByteBuffer, emit: (Part) -> Void) throws {
        var heldHead: HTTPHead?
        var heldData: ByteBuffer?
        var heldTrailers: HTTPTrailers?
        func sendHeld(endStream: Bool) {
            if let h = heldHead {
                heldHead = nil
                emit(.headers(h, endStream: endStream && heldData == nil))
            }
            if let d = heldData {
                heldData = nil
                emit(.data(d, endStream: endStream))
            }
        }
        try reader.feed(bytes) { event in
            switch event {
            case .head(let head):
                heldHead = head
            case .body(let chunk):
                sendHeld(endStream: false)
                heldData = chunk
            case .trailers(let t):
                sendHeld(endStream: false)
                heldTrailers = t
            case .end:
                if let t = heldTrailers {
                    heldTrailers = nil
                    emit(.trailers(t))
                    return
                }
                if heldHead == nil && heldData == nil { heldData = ByteBuffer() }
                sendHeld(endStream: true)
            }
        }
        sendHeld(endStream: false)
    }
}
