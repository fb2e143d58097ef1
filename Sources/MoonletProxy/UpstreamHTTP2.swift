import NIOCore
import NIOTLS
import NIOSSL
import MoonletTLS
import MoonletCore
import MoonletHTTP
import MoonletBalancer

/// The client side of an upstream HTTP/2 connection (a peer sidecar that chose "h2" by
/// ALPN over mTLS, or h2c to an app or plaintext port declared HTTP2/GRPC), on
/// Moonlet's own frame codec (HTTP2Wire, shared with HTTP2ServerConnection): one
/// channel handler per connection, no channel per stream.
///
/// A request becomes a stream (UpstreamH2Stream, an UpstreamConnection to the
/// dispatcher and the stream's handler): its HEADERS are written in HPACK straight from
/// the parsed request head, its body bytes leave as DATA within the peer's windows, its
/// trailers as a last HEADERS frame. The response's header block becomes an HTTPHead,
/// its DATA is handed on as it is, its trailers as HTTPTrailers, through the same
/// UpstreamDelegate calls an HTTP/1.1 connection makes.
///
/// Flow control both ways: the peer's windows (SETTINGS_INITIAL_WINDOW_SIZE, WINDOW_UPDATE)
/// bound what is sent, the rest waits per stream and the stream's handler stops reading
/// its client meanwhile; our stream windows (1 MB) are given back as the handler takes the
/// data and only while its client keeps up (backpressure to the upstream). Streams
/// beyond the peer's SETTINGS_MAX_CONCURRENT_STREAMS wait for one to end. GOAWAY: no new
/// stream, the streams it did not take fail as refused (retryable). Owned by one event loop.
final class UpstreamH2Connection: ChannelInboundHandler, HTTP2ConnectionCore {
    typealias InboundIn = ByteBuffer

    /// Our receive window per stream, and for the connection.
    static let streamWindow = 1 << 20
    static let connectionWindow = 8 << 20
    /// Request bytes queued on a stream (waiting for the peer's window) above which its
    /// handler stops reading the client, and below which it resumes.
    static let highWater = 64 * 1024, lowWater = 16 * 1024

    let key: String
    let limits: ProxyLimits
    var context: ChannelHandlerContext?
    let createdAt = NIODeadline.now().uptimeNanoseconds
    var idleSince = NIODeadline.now().uptimeNanoseconds
    var streamsStarted = 0
    /// The peer sent GOAWAY, or the cluster's per-connection request or lifetime bound
    /// was reached: no new stream; the connection closes when its last stream ends.
    var retiring = false
    var closed = false
    /// The cluster connection slot this connection holds (released when it closes).
    var circuit: CircuitCounters?
    /// `:scheme` of the requests: "https" over TLS, "http" over h2c.
    var scheme = "https"

    var streams = HTTP2StreamTable<UpstreamH2Stream>()
    /// The stream opened last while it is open (see `stream(_:)`).
    var lastStream: UpstreamH2Stream?
    var nextStreamID: UInt32 = 1
    /// Requests waiting for a stream (the peer's concurrency limit is reached): each gets
    /// its stream, or `otherwise` runs when this connection will not take it.
    var waiting = CircularBuffer<(done: (Result<UpstreamConnection, Error>) -> Void, otherwise: () -> Void)>()

    // Input.
    var inbound: ByteBuffer?
    var settingsSeen = false
    /// The response header blocks' HPACK decoder (HPACKBlockDecoder: fields as bytes).
    let decoder: HPACKBlockDecoder
    var continuation: (stream: UInt32, endStream: Bool, block: ByteBuffer, frames: Int)?
    var recvWindow = HTTP2Wire.defaultWindow
    var recvUnacked = 0

    // Output.
    var out: ByteBuffer?
    /// The last output buffer written, cleared and reused for the next frames once the
    /// channel has let go of it (one allocation per connection, not per flush).
    var spare: ByteBuffer?
    /// Frames were written to the channel apart from `out` (a large DATA payload) since
    /// the last flush.
    var wroteDirectly = false
    var sendWindow = HTTP2Wire.defaultWindow
    var peerInitialWindow = HTTP2Wire.defaultWindow
    var peerMaxFrameSize = 16_384
    /// The request blocks' dynamic table (the metadata exchange headers).
    var encoderTable = HPACKEncoderTable()
    var peerMaxStreams = Int.max
    var goAwaySent = false

    let allocator: ByteBufferAllocator

    init(key: String, limits: ProxyLimits, allocator: ByteBufferAllocator) {
        self.key = key
        self.limits = limits
        decoder = HPACKBlockDecoder(maxHeaderListSize: HTTP2ServerConnection.maxHeaderBlock(limits))
        self.allocator = allocator
    }

    var openStreams: Int { streams.count }

    /// Whether a new stream may start here. `maxRequests`: the cluster's
    /// maxRequestsPerConnection, `maxDurationMs`: its maxConnectionDuration (0: unbounded).
    func accepts(maxRequests: Int, maxDurationMs: Int) -> Bool {
        guard !closed, !retiring else { return false }
        if (maxRequests > 0 && streamsStarted + waiting.count >= maxRequests)
            || (maxDurationMs > 0 && NIODeadline.now().uptimeNanoseconds - createdAt > UInt64(maxDurationMs) * 1_000_000)
            || nextStreamID > 0x7fff_fff0 {
            retire()
            return false
        }
        return true
    }

    /// No new streams; close once the open ones are done. Requests waiting for a stream
    /// go elsewhere.
    func retire() {
        guard !retiring else { return }
        retiring = true
        let w = waiting
        waiting.removeAll()
        for x in w { x.otherwise() }
        if streams.isEmpty { closeConnection() }
    }

    /// Whether `openStream` would open a stream at once (not closed or retiring, below
    /// the peer's concurrency limit): the caller may take `newStream()` itself.
    var opensAtOnce: Bool { !closed && !retiring && streams.count < peerMaxStreams }

    /// Opens a stream for a request, at once (`done` is called before this returns), or
    /// once a stream of this connection ends when the peer's concurrency limit is reached.
    func openStream(_ done: @escaping (Result<UpstreamConnection, Error>) -> Void, otherwise: @escaping () -> Void) {
        guard !closed, !retiring else { otherwise(); return }
        if streams.count >= peerMaxStreams {
            waiting.append((done, otherwise))
            return
        }
        done(.success(newStream()))
    }

    func newStream() -> UpstreamH2Stream {
        streamsStarted += 1
        let id = nextStreamID
        nextStreamID += 2
        let s = UpstreamH2Stream(id: id, connection: self, sendWindow: peerInitialWindow)
        streams.append(s)
        lastStream = s
        return s
    }

    /// The open stream `id`: the newest one without a hash lookup (with requests one at a
    /// time, every frame of a response is for it).
    @inline(__always)
    func stream(_ id: UInt32) -> UpstreamH2Stream? {
        if let s = lastStream, s.id == id { return s }
        return streams[id]
    }

    /// A stream ended (both sides, reset, or abandoned): a waiting request takes its place.
    func streamEnded(_ s: UpstreamH2Stream) {
        if lastStream === s { lastStream = nil }
        guard streams.remove(s) else { return }
        idleSince = NIODeadline.now().uptimeNanoseconds
        while !waiting.isEmpty, streams.count < peerMaxStreams, !closed, !retiring {
            let w = waiting.removeFirst()
            w.done(.success(newStream()))
        }
        if (retiring || goAwaySent) && streams.isEmpty { closeConnection() }
    }

    // MARK: channel

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // The client's connection preface: the magic, SETTINGS, the connection window raised.
        var b = output(capacity: 128)
        b.writeBytes(HTTP2Wire.preface)
        HTTP2Wire.writeSettings([
            (HTTP2Wire.settingEnablePush, 0),
            (HTTP2Wire.settingInitialWindowSize, UInt32(Self.streamWindow)),
            (HTTP2Wire.settingMaxHeaderListSize, UInt32(HTTP2ServerConnection.maxHeaderBlock(limits))),
        ], into: &b)
        HTTP2Wire.writeWindowUpdate(stream: 0, Self.connectionWindow - HTTP2Wire.defaultWindow, into: &b)
        recvWindow = Self.connectionWindow
        out = b
        if context.channel.isActive { flush() }
    }

    func channelActive(context: ChannelHandlerContext) {
        flush()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        receive(unwrapInboundIn(data)) { buf in
            while !closed, let f = try HTTP2Wire.nextFrame(&buf, maxFrameSize: HTTP2ServerConnection.maxFrameSize) {
                try frame(f)
            }
        }
    }

    /// The end of a read: what the frames read made us write (SETTINGS and PING
    /// acknowledgements, WINDOW_UPDATE, RST_STREAM) leaves; with nothing written, no
    /// flush goes through the pipeline (the TLS handler) for nothing.
    func channelReadComplete(context: ChannelHandlerContext) {
        flushIfWritten()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        for s in streams.values { s.updateWritability() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        connectionClosed()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        connectionClosed()
        self.context = nil
    }

    // MARK: input

    func frame(_ f: HTTP2Wire.Frame) throws {
        if let c = continuation {
            guard f.type == HTTP2Wire.continuation, f.stream == c.stream else {
                throw HTTP2ConnectionError(.protocolError, "frame of type \(f.type) inside the header block of stream \(c.stream)")
            }
        } else if !settingsSeen {
            guard f.type == HTTP2Wire.settings, f.flags & 1 == 0 else { throw HTTP2ConnectionError(.protocolError, "the server's first frame is not SETTINGS") }
        }
        switch f.type {
        case HTTP2Wire.data: try data(f)
        case HTTP2Wire.headers: try headers(f)
        case HTTP2Wire.priority: break
        case HTTP2Wire.rstStream:
            guard f.stream != 0 else { throw HTTP2ConnectionError(.protocolError, "RST_STREAM on stream 0") }
            guard f.payload.readableBytes == 4 else { throw HTTP2ConnectionError(.frameSizeError, "RST_STREAM of \(f.payload.readableBytes) bytes") }
            let code = f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)!
            stream(f.stream)?.resetByPeer(code)
        case HTTP2Wire.settings: try settings(f)
        case HTTP2Wire.pushPromise: throw HTTP2ConnectionError(.protocolError, "PUSH_PROMISE with server push disabled")
        case HTTP2Wire.ping:
            guard f.stream == 0 else { throw HTTP2ConnectionError(.protocolError, "PING on stream \(f.stream)") }
            guard f.payload.readableBytes == 8 else { throw HTTP2ConnectionError(.frameSizeError, "PING of \(f.payload.readableBytes) bytes") }
            if f.flags & 1 == 0 {
                var b = output(capacity: 17)
                HTTP2Wire.writePingAck(f.payload, into: &b)
                out = b
            }
        case HTTP2Wire.goAway: try goAway(f)
        case HTTP2Wire.windowUpdate: try windowUpdate(f)
        case HTTP2Wire.continuation: try continuationFrame(f)
        default: break // unknown frame types are ignored (RFC 9113 §4.1)
        }
    }

    func data(_ f: HTTP2Wire.Frame) throws {
        guard f.stream != 0 else { throw HTTP2ConnectionError(.protocolError, "DATA on stream 0") }
        let flowLength = f.payload.readableBytes
        recvWindow -= flowLength
        guard recvWindow >= 0 else { throw HTTP2ConnectionError(.flowControlError, "DATA beyond the connection window") }
        // The connection's window is given back as data arrives (each stream's own window
        // bounds what it buffers), so one slow stream never stalls the others.
        recvUnacked += flowLength
        if recvUnacked >= Self.connectionWindow / 2 {
            var b = output(capacity: 13)
            HTTP2Wire.writeWindowUpdate(stream: 0, recvUnacked, into: &b)
            out = b
            recvWindow += recvUnacked
            recvUnacked = 0
        }
        guard let s = stream(f.stream) else {
            guard f.stream < nextStreamID, f.stream & 1 == 1 else { throw HTTP2ConnectionError(.protocolError, "DATA on idle stream \(f.stream)") }
            return // a stream we reset or finished: its late frames are dropped
        }
        var body = f.payload
        try HTTP2Wire.unpad(f.flags, &body)
        s.receiveData(body, end: f.flags & 1 != 0, flowLength: flowLength)
    }

    func headers(_ f: HTTP2Wire.Frame) throws {
        guard f.stream != 0 else { throw HTTP2ConnectionError(.protocolError, "HEADERS on stream 0") }
        var block = f.payload
        try HTTP2Wire.unpad(f.flags, &block, reserving: f.flags & 0x20 != 0 ? 5 : 0)
        if f.flags & 0x20 != 0 {
            guard block.readInteger(as: UInt32.self) != nil, block.readInteger(as: UInt8.self) != nil else {
                throw HTTP2ConnectionError(.frameSizeError, "HEADERS too short for its priority")
            }
        }
        let endStream = f.flags & 1 != 0
        if f.flags & 0x4 != 0 {
            try headerBlock(stream: f.stream, endStream: endStream, block: block)
        } else {
            guard block.readableBytes <= maxHeaderBlock else { throw HTTP2ConnectionError(.enhanceYourCalm, "header block too large") }
            continuation = (f.stream, endStream, block, 1)
        }
    }

    var maxHeaderBlock: Int { HTTP2ServerConnection.maxHeaderBlock(limits) }

    func continuationFrame(_ f: HTTP2Wire.Frame) throws {
        guard var c = continuation, c.stream == f.stream else { throw HTTP2ConnectionError(.protocolError, "CONTINUATION without a header block") }
        var more = f.payload
        c.block.writeBuffer(&more)
        c.frames += 1
        guard c.block.readableBytes <= maxHeaderBlock, c.frames <= 128 else {
            throw HTTP2ConnectionError(.enhanceYourCalm, "header block too large")
        }
        if f.flags & 0x4 != 0 {
            continuation = nil
            try headerBlock(stream: f.stream, endStream: c.endStream, block: c.block)
        } else {
            continuation = c
        }
    }

    /// A complete header block: the response head (or an interim one), or its trailers.
    /// Decoded whatever becomes of the stream (HPACK's table depends on it), straight
    /// into the response's HTTPHead (UpstreamH2ResponseHead) or its trailers.
    func headerBlock(stream id: UInt32, endStream: Bool, block: ByteBuffer) throws {
        guard let s = stream(id), !s.ended else {
            var none = HPACKDiscardingSink()
            try decode(stream: id, block, into: &none)
            if streams[id] == nil {
                guard id < nextStreamID, id & 1 == 1 else { throw HTTP2ConnectionError(.protocolError, "HEADERS on stream \(id), which this client did not open") }
            }
            return
        }
        if s.responseStarted {
            var t = HTTP2TrailersSink()
            try decode(stream: id, block, into: &t)
            s.receiveTrailers(t, endStream: endStream)
        } else {
            let allocator = self.allocator
            var head = UpstreamH2ResponseHead(allocator: allocator, capacity: max(256, min(2 * block.readableBytes, limits.maxHeadBytes) + 64))
            try decode(stream: id, block, into: &head)
            s.receiveHead(&head, endStream: endStream)
        }
    }

    /// Decodes a header block into `sink`; a malformed one is a connection error.
    @inline(__always)
    func decode<S: HPACKFieldSink>(stream id: UInt32, _ block: ByteBuffer, into sink: inout S) throws {
        do { try decoder.decode(block, into: &sink) } catch {
            throw HTTP2ConnectionError(.compressionError, "header block of stream \(id): \(error)")
        }
    }

    func settings(_ f: HTTP2Wire.Frame) throws {
        if f.flags & 1 != 0 {
            guard f.payload.readableBytes == 0 else { throw HTTP2ConnectionError(.frameSizeError, "SETTINGS ACK with a payload") }
            return
        }
        settingsSeen = true
        var windowGrew = false
        try HTTP2Wire.readSettings(stream: f.stream, f.payload) { id, v in
            switch id {
            case HTTP2Wire.settingInitialWindowSize:
                windowGrew = try initialWindowChanged(to: v) || windowGrew
            case HTTP2Wire.settingMaxFrameSize: peerMaxFrameSize = Int(v)
            case HTTP2Wire.settingMaxConcurrentStreams: peerMaxStreams = Int(v)
            case HTTP2Wire.settingHeaderTableSize: encoderTable.peerTableSize(Int(v))
            default: break
            }
        }
        var b = output(capacity: 9)
        HTTP2Wire.writeSettingsAck(into: &b)
        out = b
        if windowGrew { resumeStreams() }
        // A raised concurrency limit lets waiting requests in.
        while !waiting.isEmpty, streams.count < peerMaxStreams, !retiring {
            let w = waiting.removeFirst()
            w.done(.success(newStream()))
        }
    }

    func goAway(_ f: HTTP2Wire.Frame) throws {
        guard f.stream == 0, f.payload.readableBytes >= 8 else { throw HTTP2ConnectionError(.protocolError, "malformed GOAWAY") }
        let last = f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)! & 0x7fff_ffff
        // Retired first: the streams' ends below must not hand waiting requests new
        // streams here (above `last`, the server would never answer them), and their
        // retries go elsewhere.
        retire()
        // Streams above the last one the server took were never processed: refused
        // (retryable, as REFUSED_STREAM).
        for s in streams.values where s.id > last { s.resetByPeer(HTTP2ErrorCode.refusedStream.rawValue) }
    }

    func windowUpdate(_ f: HTTP2Wire.Frame) throws {
        let increment = try HTTP2Wire.windowIncrement(f.payload)
        if f.stream == 0 {
            try connectionWindowUpdated(by: increment)
        } else if let s = stream(f.stream) {
            s.windowUpdated(by: increment)
        }
    }


    // MARK: output

    /// The connection's output buffer, to append frames to (put back into `out`).
    @inline(__always)
    func output(capacity: Int) -> ByteBuffer {
        if let b = out { out = nil; return b }
        if var b = spare {
            spare = nil
            b.clear(minimumCapacity: max(capacity, 4096))
            return b
        }
        return allocator.buffer(capacity: max(capacity, 4096))
    }

    /// A request head as HEADERS (and CONTINUATION frames past the peer's frame size),
    /// the HPACK block written in place behind the frame header.
    func writeRequestHeaders(stream: UInt32, _ head: HTTPHead, contentLength: Int64, endStream: Bool) {
        var b = output(capacity: head.bytes.readableBytes + 64)
        HTTP2Wire.writeHeaderBlock(stream: stream, endStream: endStream, maxFrameSize: peerMaxFrameSize, into: &b) {
            HPACKRequestWriter.write(head, scheme: scheme, contentLength: contentLength, table: &encoderTable, into: &$0)
        }
        out = b
    }

    func writeTrailers(stream: UInt32, _ trailers: HTTPTrailers) {
        var b = output(capacity: 256)
        HTTP2Wire.writeHeaderBlock(stream: stream, endStream: true, maxFrameSize: peerMaxFrameSize, into: &b) {
            HPACKResponseWriter.writeTrailers(trailers, table: &encoderTable, into: &$0)
        }
        out = b
    }

    /// One DATA frame (the windows already taken). Small payloads are copied behind the
    /// frame header; large ones are written as they are.
    func writeData(stream: UInt32, _ payload: ByteBuffer, endStream: Bool) {
        let flags: UInt8 = endStream ? 1 : 0
        var b = output(capacity: 9 + min(payload.readableBytes, 8192))
        HTTP2Wire.writeFrameHeader(length: payload.readableBytes, type: HTTP2Wire.data, flags: flags, stream: stream, into: &b)
        if payload.readableBytes <= 8192 {
            b.writeImmutableBuffer(payload)
            out = b
        } else {
            context?.write(NIOAny(b), promise: nil)
            context?.write(NIOAny(payload), promise: nil)
            wroteDirectly = true
        }
    }

    func writeWindowUpdate(stream: UInt32, _ increment: Int) {
        var b = output(capacity: 13)
        HTTP2Wire.writeWindowUpdate(stream: stream, increment, into: &b)
        out = b
    }

    func writeRSTStream(_ stream: UInt32, _ code: HTTP2ErrorCode) {
        var b = output(capacity: 13)
        HTTP2Wire.writeRSTStream(stream, code, into: &b)
        out = b
    }

    /// Flushes when frames were written since the last flush: the streams of one
    /// connection that wrote in the same batch each ask (DeferredFlush), the first one
    /// sends them all.
    @inline(__always)
    func flushIfWritten() {
        if out != nil || wroteDirectly { flush() }
    }

    /// Writes the frames gathered and flushes.
    func flush() {
        guard let c = context else { out = nil; return }
        wroteDirectly = false
        if let b = out {
            out = nil
            c.write(NIOAny(b), promise: nil)
            c.flush()
            // Written (the TLS handler has encrypted it, or the socket took it): reused
            // by the next frames; a buffer the channel still holds is copied on clear,
            // never overwritten. Large ones are let go.
            if b.capacity <= 16 * 1024 + 4096 { spare = b }
        } else {
            c.flush()
        }
    }

    var connectionWritable: Bool { context?.channel.isWritable ?? false }

    // MARK: connection end

    /// A connection error: GOAWAY with its code, and the connection closes.
    func fail(_ e: HTTP2ConnectionError) {
        guard !closed else { return }
        if !goAwaySent {
            goAwaySent = true
            var b = output(capacity: 17)
            HTTP2Wire.writeGoAway(lastStream: 0, e.code, into: &b)
            out = b
        }
        closeConnection()
    }

    /// Flushes what is queued and closes the TCP connection.
    func closeConnection() {
        guard !closed else { return }
        closed = true
        inbound = nil
        guard let c = context else { return }
        flush()
        c.close(promise: nil)
    }

    /// The TCP connection closed: every open stream fails as a reset (a request that
    /// never reached the server is retryable like any reset), waiting requests go elsewhere.
    func connectionClosed() {
        closed = true
        out = nil
        inbound = nil
        let open = streams.values
        streams.removeAll()
        lastStream = nil
        for s in open { s.connectionLost() }
        let w = waiting
        waiting.removeAll()
        for x in w { x.otherwise() }
    }
}

/// One request on an UpstreamH2Connection. To the dispatcher and the stream's handler
/// it is an UpstreamConnection that is never pooled (`multiplexed`): the request's head
/// reaches it parsed (`startRequest`), its body as the HTTP/1.1-framed bytes the handler
/// writes to any upstream (`send`: raw after a content-length, chunk-framed otherwise),
/// which leave as DATA frames; the response is handed to the delegate as parsed head,
/// raw DATA, trailers and end.
final class UpstreamH2Stream: UpstreamConnection, HTTP2FlowControlledSender {
    let id: UInt32
    /// Strong: the connection lets go of its streams when they end or it closes.
    let connection: UpstreamH2Connection

    // Request side.
    var sendWindow: Int
    /// DATA waiting for the peer's windows: rarely any, so a stream starts with the
    /// shared empty queue (no allocation; copied on its first append).
    var pending = HTTP2Wire.noneQueued
    var pendingBytes = 0
    var pendingTrailers: HTTPTrailers?
    var writable = true
    /// Bytes of the HTTP/1.1 request head still to skip in what `send` gets.
    var headToSkip = 0
    /// Body bytes still to come after a content-length (-1: the body is chunk-framed).
    var bodyRemaining: Int64 = 0
    var chunkDecoder: BodyDecoder?
    /// The request is complete downstream (its end may be sent once its bytes are).
    var requestComplete = false
    var requestTrailers: HTTPTrailers?
    /// The last DATA of a content-length body, held until the request is known complete
    /// (END_STREAM then rides on it, or its trailers follow it).
    var heldLast: ByteBuffer?
    /// END_STREAM was written or queued.
    var localEnded = false
    /// END_STREAM is on the wire (not only queued behind the send window).
    var endWritten = false
    var started = false

    // Response side.
    var remoteEnded = false
    var responseStarted = false
    var recvWindow = UpstreamH2Connection.streamWindow
    var recvUnacked = 0
    var readPaused = false
    var ended = false

    init(id: UInt32, connection: UpstreamH2Connection, sendWindow: Int) {
        self.id = id
        self.connection = connection
        self.sendWindow = sendWindow
        super.init(key: connection.key, limits: connection.limits)
        multiplexed = true
    }

    override var isWritable: Bool { writable }

    /// The request starts: HEADERS from `head` (the filters' edits included). The bytes
    /// the handler sends next begin with the `headBytes` bytes of the same head as
    /// HTTP/1.1 (skipped), then the body: `bodyLength` bytes (-1: chunk-framed).
    /// `complete`: the request is complete downstream, with `trailers`.
    func startRequest(_ head: HTTPHead, headBytes: Int, bodyLength: Int64, complete: Bool, trailers: HTTPTrailers?) {
        guard !ended else { return }
        started = true
        headToSkip = headBytes
        bodyRemaining = bodyLength
        if bodyLength < 0 { chunkDecoder = BodyDecoder(framing: .chunked) }
        requestComplete = complete
        requestTrailers = trailers.flatMap { $0.isEmpty ? nil : $0 }
        let headerOnly = bodyLength == 0 && complete && requestTrailers == nil
        connection.writeRequestHeaders(stream: id, head, contentLength: bodyLength, endStream: headerOnly)
        // A request without body ends on its HEADERS: END_STREAM is written with them, so
        // the response's end closes the stream quietly (no RST_STREAM after every GET).
        if headerOnly { localEnded = true; endWritten = true }
        else if bodyLength == 0 && complete { endRequest() }
    }

    /// HTTP/1.1-framed request bytes from the handler (the head, then body bytes).
    override func send(_ bytes: ByteBuffer) {
        guard !ended, !localEnded else { return }
        var b = bytes
        if headToSkip > 0 {
            let n = min(headToSkip, b.readableBytes)
            b.moveReaderIndex(forwardBy: n)
            headToSkip -= n
        }
        guard b.readableBytes > 0 else { return }
        if var d = chunkDecoder {
            do {
                let done = try d.decode(&b) { chunk in self.sendData(chunk, end: false) }
                chunkDecoder = d
                if done {
                    chunkDecoder = nil
                    if let t = d.trailers, !t.isEmpty { requestTrailers = t }
                    requestComplete = true
                    bodyRemaining = 0
                    endRequest()
                }
            } catch {
                reset(.internalError)
                fail(.protocolError("request body: \(error)"))
            }
            return
        }
        guard bodyRemaining > 0 else { return }
        if Int64(b.readableBytes) > bodyRemaining { b = b.getSlice(at: b.readerIndex, length: Int(bodyRemaining))! }
        bodyRemaining -= Int64(b.readableBytes)
        if bodyRemaining == 0 {
            if requestComplete { sendData(b, end: requestTrailers == nil); if requestTrailers != nil { endRequest() } }
            else { heldLast = b }
        } else {
            sendData(b, end: false)
        }
    }

    /// The request ended downstream with these trailers (a content-length body: they
    /// follow its DATA as HTTP/2 allows; a chunked body brings its own in its last chunk).
    override func requestEnded(trailers: HTTPTrailers?) {
        guard !ended, !localEnded, chunkDecoder == nil else { return }
        requestComplete = true
        if let t = trailers, !t.isEmpty { requestTrailers = t }
        if bodyRemaining == 0 { endRequest() }
    }

    /// Ends the request: the held last DATA, then trailers or END_STREAM.
    func endRequest() {
        guard !localEnded else { return }
        if let t = requestTrailers {
            if let d = heldLast { heldLast = nil; sendData(d, end: false) }
            localEnded = true
            if pending.isEmpty { connection.writeTrailers(stream: id, t); sent() } else { pendingTrailers = t }
        } else {
            let d = heldLast ?? ByteBuffer()
            heldLast = nil
            sendData(d, end: true)
        }
    }

    func sendData(_ data: ByteBuffer, end: Bool) {
        if end { localEnded = true }
        guard data.readableBytes > 0 || end else { return }
        queueData(data, end: end)
    }

    /// END_STREAM is on the wire.
    func sent() {
        endWritten = true
        if remoteEnded { close(quietly: true) }
    }

    /// Tells the handler when the stream can take no more request bytes (and again when it can).
    func updateWritability() {
        let now = pendingBytes < (writable ? UpstreamH2Connection.highWater : UpstreamH2Connection.lowWater) && connection.connectionWritable
        guard now != writable else { return }
        writable = now
        delegate?.upstreamWritabilityChanged(now)
    }

    /// The end of the loop's batch: the connection writes and flushes its frames (once
    /// for all its streams that wrote in the batch).
    override func flushNow() { connection.flushIfWritten() }

    // MARK: response

    /// The response's trailers: END_STREAM, no pseudo-header (RFC 9113 §8.1).
    func receiveTrailers(_ t: HTTP2TrailersSink, endStream: Bool) {
        guard !ended else { return }
        guard endStream else { reset(.protocolError); fail(.protocolError("HEADERS in the middle of the response body")); return }
        guard !t.malformed else { reset(.protocolError); fail(.protocolError("malformed response trailers")); return }
        remoteEnded = true
        if !t.trailers.isEmpty { delegate?.upstreamResponseTrailers(t.trailers) }
        responseEnd()
    }

    /// The response head (or an interim one), decoded.
    func receiveHead(_ decoded: inout UpstreamH2ResponseHead, endStream: Bool) {
        guard !ended else { return }
        if decoded.error == nil && decoded.builder == nil { decoded.error = "response without :status" }
        if let e = decoded.error { reset(.protocolError); fail(.protocolError(e)); return }
        let status = decoded.builder!.head.status
        if status < 200 {
            // Interim responses are consumed here (the proxy answers 100-continue itself).
            if status == 101 || endStream { reset(.protocolError); fail(.protocolError("interim response \(status)")) }
            return
        }
        responseStarted = true
        if endStream { remoteEnded = true }
        guard let d = delegate else { return }
        // The head moves from the decoder's builder to the delegate (no copy).
        d.upstreamResponseHead(responseHead(&decoded, endStream: endStream))
        guard delegate != nil, !ended else { return } // abandoned
        if endStream { responseEnd() }
    }

    /// The final response's HTTPHead with its framing, taken from a well-formed block's
    /// builder (`receiveHead` checked it).
    func responseHead(_ decoded: inout UpstreamH2ResponseHead, endStream: Bool) -> HTTPHead {
        var b = decoded.builder.take()!
        let status = b.head.status
        let bodyless = requestWasHead || status == 204 || status == 304
        let length = decoded.length
        if bodyless {
            b.set(framing: .none)
        } else if length >= 0 {
            b.set(framing: length == 0 ? .none : .contentLength(length))
        } else if endStream {
            // No body: an HTTP/1.1 client must be told so.
            b.add("content-length", "0", kind: .contentLength)
            b.set(framing: .none)
        } else {
            b.set(framing: .chunked)
        }
        return b.finish()
    }

    func receiveData(_ data: ByteBuffer, end: Bool, flowLength: Int) {
        guard !ended else { return }
        recvWindow -= flowLength
        guard recvWindow >= 0 else { reset(.flowControlError); fail(.protocolError("DATA beyond the stream window")); return }
        guard responseStarted else { reset(.protocolError); fail(.protocolError("DATA before the response head")); return }
        if end { remoteEnded = true }
        if data.readableBytes > 0 {
            delegate?.upstreamResponseBody(data)
            guard delegate != nil, !ended else { return } // abandoned while relaying
        }
        if end { responseEnd(); return }
        recvUnacked += flowLength
        if !readPaused { acknowledge() }
    }

    /// Reopens the stream's window once half of it was used.
    func acknowledge() {
        guard recvUnacked >= UpstreamH2Connection.streamWindow / 2, !remoteEnded, !ended else { return }
        connection.writeWindowUpdate(stream: id, recvUnacked)
        recvWindow += recvUnacked
        recvUnacked = 0
    }

    /// The handler's client cannot take more (or can again): the stream's window is
    /// given back only while it reads.
    override func setReading(_ on: Bool) {
        guard readPaused == on else { return }
        readPaused = !on
        if on && !ended {
            let before = recvUnacked
            acknowledge()
            if recvUnacked != before { connection.flush() }
        }
    }

    /// The response is complete.
    func responseEnd() {
        inResponse = false
        let d = delegate
        delegate = nil
        // The request's end still queued behind the window (an early answer to a large
        // upload): the peer gets RST_STREAM, not a stream left half-open.
        if localEnded { close(quietly: endWritten) }
        d?.upstreamResponseEnd(reusable: false)
    }

    // MARK: end

    /// Both sides ended, or the stream is given up: it leaves the connection.
    func close(quietly: Bool) {
        guard !ended else { return }
        ended = true
        if !quietly { connection.writeRSTStream(id, .cancel); connection.flush() }
        if !pending.isEmpty { pending.removeAll() }
        pendingBytes = 0
        connection.streamEnded(self)
    }

    /// The stream no longer wants this response (retry, local reply, client gone).
    override func abandon() {
        delegate = nil
        inResponse = false
        close(quietly: !started || (endWritten && remoteEnded))
    }

    /// Closes the stream: a request still being sent after the response ended is
    /// stopped with CANCEL.
    override func close() {
        close(quietly: endWritten && remoteEnded)
    }

    /// A stream error of ours: RST_STREAM with `code`.
    func reset(_ code: HTTP2ErrorCode) {
        guard !ended else { return }
        connection.writeRSTStream(id, code)
        ended = true
        connection.streamEnded(self)
    }

    /// The server reset the stream (or GOAWAY left it out): REFUSED_STREAM is a refusal
    /// (the server did not process it: retryable), anything else a reset.
    func resetByPeer(_ code: UInt32) {
        guard !ended else { return }
        ended = true
        connection.streamEnded(self)
        if inResponse || delegate != nil {
            fail(code == HTTP2ErrorCode.refusedStream.rawValue ? .refusedStream : .reset)
        }
    }

    /// The connection closed under the stream.
    func connectionLost() {
        guard !ended else { return }
        ended = true
        if delegate != nil { fail(.reset) }
    }

    override func fail(_ f: UpstreamFailure) {
        inResponse = false
        let d = delegate
        delegate = nil
        d?.upstreamFailed(f)
    }
}

/// Writes request header blocks straight from a parsed head (as HPACKResponseWriter
/// does responses): static-table indexes for the pseudo-headers' common values,
/// otherwise literals without indexing, no Huffman coding, the dynamic table only for
/// Istio's metadata exchange headers (HPACKEncoderTable).
enum HPACKRequestWriter {
    /// Whether a field a filter added is left out of an HTTP/2 request: Host (written as
    /// `:authority`) and the connection-specific fields HTTP/2 forbids (RFC 9113 §8.2.2).
    /// The length, then the one candidate of that length, compared from its first byte
    /// (`x-forwarded-proto`, as long as `transfer-encoding`, differs at once).
    @inline(__always)
    static func dropsAdded(_ name: String) -> Bool {
        switch name.utf8.count {
        case 4, 7, 10, 16, 17: break
        default: return false
        }
        var n = name
        return n.withUTF8 { p in
            let r = UnsafeRawBufferPointer(p)
            switch r.count {
            case 4: return HTTP2FieldCheck.equals(r, "host", foldingCase: true)
            case 7: return HTTP2FieldCheck.equals(r, "upgrade", foldingCase: true)
            case 10: return HTTP2FieldCheck.equals(r, "connection", foldingCase: true) || HTTP2FieldCheck.equals(r, "keep-alive", foldingCase: true)
            case 16: return HTTP2FieldCheck.equals(r, "proxy-connection", foldingCase: true)
            default: return HTTP2FieldCheck.equals(r, "transfer-encoding", foldingCase: true)
            }
        }
    }

    /// `:method`, `:scheme`, `:authority` (Host, or the one a filter set), `:path`, then
    /// the fields HTTP/2 allows (see HTTPHead.isHTTP2Forbidden). `contentLength` >= 0:
    /// the body's length, written when the head had a content-length (canonical). The
    /// block is written into bytes reserved once, bounded from the head (HPACKRawWriter).
    static func write(_ head: HTTPHead, scheme: String, contentLength: Int64, table: inout HPACKEncoderTable, into b: inout ByteBuffer) {
        // The head's bytes hold the method, target and every field (see HPACKRawWriter
        // for the 8 more per field); then the filters' additions.
        var hostAdded: String?
        for a in head.added where a.name.utf8.count == 4 && a.name.lowercased() == "host" { hostAdded = a.value }
        let bound = 64 + head.bytes.readableBytes + 8 * head.fields.count + HPACKRawWriter.bound(head.added)
            + (head.targetOverride?.utf8.count ?? 0) + (hostAdded?.utf8.count ?? 0)
        HPACKRawWriter.write(into: &b, bound: bound) { w in
            table.startBlock(&w)
            head.bytes.withUnsafeReadableBytes { raw in
                let method = UnsafeRawBufferPointer(rebasing: raw[head.methodRange])
                if HTTP2FieldCheck.equals(method, "GET") {
                    w.byte(0x82)
                } else if HTTP2FieldCheck.equals(method, "POST") {
                    w.byte(0x83)
                } else {
                    w.integer(2, prefix: 4, flags: 0)
                    w.string(method, lowercase: false)
                }
                w.byte(scheme == "http" ? 0x86 : 0x87)
                w.integer(1, prefix: 4, flags: 0)
                if let hostAdded {
                    w.string(hostAdded, lowercase: false)
                } else if head.hostIndex >= 0 && !head.fields[head.hostIndex].removed {
                    let f = head.fields[head.hostIndex]
                    w.string(UnsafeRawBufferPointer(rebasing: raw[Int(f.valueStart)..<Int(f.valueStart + f.valueLength)]), lowercase: false)
                } else {
                    w.byte(0)
                }
                if let path = head.targetOverride {
                    if path == "/" { w.byte(0x84) } else {
                        w.integer(4, prefix: 4, flags: 0)
                        w.string(path, lowercase: false)
                    }
                } else {
                    let path = UnsafeRawBufferPointer(rebasing: raw[head.targetRange])
                    if path.count == 1 && path[0] == UInt8(ascii: "/") { w.byte(0x84) } else {
                        w.integer(4, prefix: 4, flags: 0)
                        w.string(path, lowercase: false)
                    }
                }
                var lengthWritten = false
                for i in 0..<head.fields.count where !head.fields[i].removed && !head.isHTTP2Forbidden(i, isRequest: true) {
                    let f = head.fields[i]
                    if f.kind == .contentLength {
                        if lengthWritten || contentLength < 0 { continue }
                        lengthWritten = true
                        w.integer(28, prefix: 4, flags: 0)
                        w.decimal(contentLength)
                        continue
                    }
                    let name = UnsafeRawBufferPointer(rebasing: raw[Int(f.nameStart)..<Int(f.nameStart + f.nameLength)])
                    w.byte(HPACKRawWriter.literalFlag(name))
                    w.string(name, lowercase: true)
                    w.string(UnsafeRawBufferPointer(rebasing: raw[Int(f.valueStart)..<Int(f.valueStart + f.valueLength)]), lowercase: false)
                }
            }
            for a in head.added where !dropsAdded(a.name) {
                HPACKResponseWriter.writeAdded(a, table: &table, &w)
            }
        }
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

/// A response header block decoded straight into an HTTPHead (an HPACKFieldSink: each
/// field's bytes are checked and written once, no String is made): `:status` first and
/// once (three digits, 100 or more), no other pseudo-header and none after a field;
/// names of token characters; values without CR, LF, NUL or whitespace around them
/// (RFC 9113 §8.2.1) and without a control byte the HTTP/1.1 parser refuses; content-lengths
/// that agree (one is kept). Connection-specific fields are dropped. `error` says what
/// made the block malformed (the stream is then reset).
struct UpstreamH2ResponseHead: HPACKFieldSink {
    let allocator: ByteBufferAllocator
    /// The head buffer's capacity (from the block's size).
    let capacity: Int
    var builder: HTTPHeadBuilder?
    var length: Int64 = -1
    var error: String?

    init(allocator: ByteBufferAllocator, capacity: Int) {
        self.allocator = allocator
        self.capacity = capacity
    }

    mutating func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) {
        guard error == nil else { return }
        if name.first == UInt8(ascii: ":") {
            guard builder == nil, HTTP2FieldCheck.equals(name, ":status"), value.count == 3,
                  value.allSatisfy({ $0 &- 48 < 10 }), value[0] >= UInt8(ascii: "1") else {
                error = "malformed response header block"
                return
            }
            let status = Int(value[0] - 48) * 100 + Int(value[1] - 48) * 10 + Int(value[2] - 48)
            builder = HTTPHeadBuilder(status: status, buffer: allocator.buffer(capacity: capacity))
            return
        }
        guard builder != nil else { error = "response without :status"; return }
        guard HTTP2FieldCheck.value(value) == .valid else { error = "control character in a response header value"; return }
        // RFC 9113 §8.2.1: lowercase token characters only (an uppercase name is malformed).
        guard HTTP2FieldCheck.isName(name) else { error = "malformed response header block"; return }
        let kind = KnownHeader(lowercaseName: name)
        switch kind {
        case .connection, .transferEncoding, .keepAlive, .upgrade, .proxyConnection: return
        case .contentLength:
            guard let v = HTTPHeadParser.parseContentLength(value), length < 0 || length == v else { error = "bad content-length"; return }
            if length >= 0 { return }
            length = v
        default: break
        }
        builder!.add(name: name, value: value, kind: kind)
    }
}
