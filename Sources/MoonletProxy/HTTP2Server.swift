import NIOCore
import MoonletCore
import MoonletHTTP

/// The server side of a downstream HTTP/2 connection (h2c prior knowledge, or h2 after
/// TLS ALPN), with no channel per stream. The frame layer (frames cut from the bytes,
/// frame headers, padding, error codes) is HTTP2Wire (HTTP2Codec.swift). It reads frames straight from the connection's
/// bytes, keeps the HPACK tables, the streams' states and both directions' flow-control
/// windows, and gives each stream its own DownstreamHandler: the request's header block
/// becomes HTTP/1.1 bytes for it (after the checks of RFC 9113 §8.2–8.3), and the
/// HTTP/1.1 response it writes becomes HEADERS and DATA frames.
///
/// Why not swift-nio-http2's multiplexer: a child channel per stream, its pipeline and
/// NIO's general state machines cost about two thirds of an HTTP/2 request's CPU
/// (85 user µs per request against HAProxy's ~25), like HAProxy's own mux, this
/// does the little a server needs. The upstream side (UpstreamH2Connection) is a client
/// on the same frame layer.
///
/// Limits against abusive peers: 100 concurrent streams (more get REFUSED_STREAM), a
/// header block of at most twice maxHeadBytes in at most 128 frames, 256 KB of request
/// body in flight per stream (its window is reopened only as the upstream takes the
/// bytes), and GOAWAY ENHANCE_YOUR_CALM for more than 200 streams reset by the client in
/// 30 s (rapid reset), 1000 empty DATA frames in a row, or 10000 control frames to
/// answer while the connection cannot write.
/// Everything runs on the connection's event loop.
final class HTTP2ServerConnection: DeferredFlush, HTTP2ConnectionCore {
    static let preface = HTTP2Wire.preface
    static let maxConcurrentStreams = 100
    /// The receive window each stream starts with (SETTINGS_INITIAL_WINDOW_SIZE).
    static let streamWindow = 256 * 1024
    /// The connection's receive window (raised from 65535 by the first WINDOW_UPDATE).
    static let connectionWindow = 4 << 20
    /// The largest frame accepted (SETTINGS_MAX_FRAME_SIZE left at its default).
    static let maxFrameSize = 16_384
    /// Response bytes queued on a stream (waiting for the peer's window) above which its
    /// DownstreamHandler stops reading the upstream, and below which it resumes.
    static let highWater = 64 * 1024, lowWater = 16 * 1024

    let ctx: LoopContext
    let role: ListenerRole
    let limits: ProxyLimits
    /// The connection's handler context (nil once the connection is gone).
    var context: ChannelHandlerContext?
    let peer: (info: PeerInfo, ip: String)
    /// The mTLS peer's X-Forwarded-Client-Cert element, for every stream's request.
    var clientCert: String?
    /// The connection's original destination when it was intercepted (its streams' handlers get it).
    var interception: InterceptedDestination?
    /// What every stream's handler would otherwise work out again per request: the
    /// address the connection was accepted on, and the metadata exchange's last peer
    /// (one decode per peer value on the connection, as over HTTP/1.1).
    var localAddress = ""
    var peerExchange = PeerExchange()
    /// When the last stream ended (uptime ns): with no stream open, the connection is
    /// idle since then (downstreamIdleTimeoutMs, Envoy's idle_timeout).
    var lastStreamEnd: UInt64
    var flushQueued = false

    // Input.
    var inbound: ByteBuffer?
    var prefaceSeen = false
    var settingsSeen = false
    /// The request header blocks' HPACK decoder (HPACKBlockDecoder: fields as bytes).
    let decoder: HPACKBlockDecoder
    /// Reused by each request's HTTP2RequestHead for the pseudo-header values and cookie crumbs.
    var requestScratch: [UInt8] = []
    /// A header block split over CONTINUATION frames, until END_HEADERS.
    var continuation: (stream: UInt32, endStream: Bool, block: ByteBuffer, frames: Int)?
    /// When a header block still waiting for END_HEADERS times out (uptime ns; 0: none):
    /// requestHeaderTimeoutMs from its HEADERS frame, however many CONTINUATION frames
    /// trickle in (DownstreamHandler.checkDeadlines sends GOAWAY).
    var continuationDeadline: UInt64 = 0
    var streams = HTTP2StreamTable<HTTP2ServerStream>()
    /// The highest stream id the client opened (streams below it are closed or open).
    var lastStreamID: UInt32 = 0
    /// Receive window of the connection, and bytes received since the last WINDOW_UPDATE.
    var recvWindow = 65_535
    var recvUnacked = 0

    // Output.
    var encoder = HPACKResponseWriter()
    var out: ByteBuffer?
    /// Counts the output buffers started: an offset into `out` is valid while it stays
    /// the same (and `out` is not nil), i.e. until those frames are handed to the channel.
    var outputEpoch = 0
    var sendWindow = 65_535
    var peerInitialWindow = 65_535
    var peerMaxFrameSize = 16_384
    /// Streams whose both sides ended, closed at the end of the batch (not from inside
    /// their handler's write).
    var ending: [HTTP2ServerStream] = []
    /// The streams being finished by flushNow (kept empty between batches).
    var endingDone: [HTTP2ServerStream] = []
    /// Handlers of finished streams that nothing else holds, for the next streams: a
    /// handler (with its executor and dispatcher) is made once per concurrent stream, not
    /// per request. Emptied when the connection closes (a spare refers to its last
    /// stream, which refers to the connection).
    var spareHandlers: [DownstreamHandler] = []
    static let maxSpareHandlers = 16
    var closed = false
    var goAwaySent = false
    var peerGoingAway = false

    // Abuse counters.
    var resetCount = 0
    var resetWindowStart: UInt64 = 0
    var emptyDataFrames = 0
    var controlWhileBlocked = 0

    init(ctx: LoopContext, role: ListenerRole, context: ChannelHandlerContext, peer: (info: PeerInfo, ip: String)) {
        self.ctx = ctx
        self.role = role
        self.limits = ctx.settings.limits
        self.context = context
        self.peer = peer
        lastStreamEnd = NIODeadline.now().uptimeNanoseconds
        decoder = HPACKBlockDecoder(maxHeaderListSize: Self.maxHeaderBlock(limits))
        requestScratch.reserveCapacity(256)
        ctx.metrics.count("moonlet_downstream_cx_http2_total")
        // The server's connection preface: SETTINGS, then the connection window raised.
        var b = output(capacity: 64)
        HTTP2Wire.writeSettings([
            (HTTP2Wire.settingMaxConcurrentStreams, UInt32(Self.maxConcurrentStreams)),
            (HTTP2Wire.settingInitialWindowSize, UInt32(Self.streamWindow)),
            (HTTP2Wire.settingMaxHeaderListSize, UInt32(limits.maxHeadBytes)),
        ], into: &b)
        out = b
        markUnflushed()
        writeWindowUpdate(stream: 0, Self.connectionWindow - HTTP2Wire.defaultWindow)
        recvWindow = Self.connectionWindow
    }

    // MARK: input

    /// Bytes read from the connection: every complete frame is handled; a connection
    /// error sends GOAWAY and closes.
    func receive(_ incoming: ByteBuffer) {
        receive(incoming) { try readFrames(&$0) }
    }

    func readFrames(_ buf: inout ByteBuffer) throws {
        if !prefaceSeen {
            let n = min(buf.readableBytes, Self.preface.count)
            guard buf.readableBytesView.prefix(n).elementsEqual(Self.preface.prefix(n)) else {
                throw HTTP2ConnectionError(.protocolError, "not the HTTP/2 connection preface")
            }
            guard n == Self.preface.count else { return }
            buf.moveReaderIndex(forwardBy: n)
            prefaceSeen = true
        }
        while !closed, let f = try HTTP2Wire.nextFrame(&buf, maxFrameSize: Self.maxFrameSize) {
            try frame(type: f.type, flags: f.flags, stream: f.stream, payload: f.payload)
        }
    }

    func frame(type: UInt8, flags: UInt8, stream: UInt32, payload: ByteBuffer) throws {
        if let c = continuation {
            guard type == 9, stream == c.stream else {
                throw HTTP2ConnectionError(.protocolError, "frame of type \(type) inside the header block of stream \(c.stream)")
            }
        } else if !settingsSeen {
            guard type == 4, flags & 1 == 0 else { throw HTTP2ConnectionError(.protocolError, "the first frame is not SETTINGS") }
        }
        switch type {
        case 0: try data(flags: flags, stream: stream, payload: payload)
        case 1: try headers(flags: flags, stream: stream, payload: payload)
        case 2:
            guard stream != 0 else { throw HTTP2ConnectionError(.protocolError, "PRIORITY on stream 0") }
            if payload.readableBytes != 5 { writeRSTStream(stream, .frameSizeError) } // priorities are otherwise ignored
        case 3: try rstStream(stream: stream, payload: payload)
        case 4: try settings(flags: flags, stream: stream, payload: payload)
        case 5: throw HTTP2ConnectionError(.protocolError, "PUSH_PROMISE from a client")
        case 6: try ping(flags: flags, stream: stream, payload: payload)
        case 7:
            guard stream == 0, payload.readableBytes >= 8 else { throw HTTP2ConnectionError(.protocolError, "malformed GOAWAY") }
            peerGoingAway = true
            if streams.isEmpty { closeConnection() }
        case 8: try windowUpdate(stream: stream, payload: payload)
        case 9: try continuationFrame(flags: flags, stream: stream, payload: payload)
        default: break // unknown frame types are ignored (RFC 9113 §4.1)
        }
    }

    func data(flags: UInt8, stream id: UInt32, payload: ByteBuffer) throws {
        guard id != 0 else { throw HTTP2ConnectionError(.protocolError, "DATA on stream 0") }
        // Every DATA frame counts against the connection's window, whatever its stream.
        let flowLength = payload.readableBytes
        recvWindow -= flowLength
        guard recvWindow >= 0 else { throw HTTP2ConnectionError(.flowControlError, "DATA beyond the connection window") }
        recvUnacked += flowLength
        if recvUnacked >= Self.connectionWindow / 2 {
            writeWindowUpdate(stream: 0, recvUnacked)
            recvWindow += recvUnacked
            recvUnacked = 0
        }
        var body = payload
        try HTTP2Wire.unpad(flags, &body)
        let end = flags & 1 != 0
        if body.readableBytes == 0 && !end {
            emptyDataFrames += 1
            if emptyDataFrames > 1000 { throw HTTP2ConnectionError(.enhanceYourCalm, "too many empty DATA frames") }
        } else {
            emptyDataFrames = 0
        }
        guard let s = streams[id] else {
            guard id <= lastStreamID else { throw HTTP2ConnectionError(.protocolError, "DATA on idle stream \(id)") }
            writeRSTStream(id, .streamClosed)
            return
        }
        guard !s.remoteClosed else { s.reset(.streamClosed); return }
        s.recvWindow -= flowLength
        guard s.recvWindow >= 0 else { s.reset(.flowControlError); return }
        s.receiveData(body, end: end, flowLength: flowLength)
    }

    func headers(flags: UInt8, stream id: UInt32, payload: ByteBuffer) throws {
        guard id != 0 else { throw HTTP2ConnectionError(.protocolError, "HEADERS on stream 0") }
        var block = payload
        try HTTP2Wire.unpad(flags, &block, reserving: flags & 0x20 != 0 ? 5 : 0)
        var selfDependent = false
        if flags & 0x20 != 0 {
            guard let dependency = block.readInteger(as: UInt32.self), block.readInteger(as: UInt8.self) != nil else {
                throw HTTP2ConnectionError(.frameSizeError, "HEADERS too short for its priority")
            }
            selfDependent = dependency & 0x7fff_ffff == id
        }
        let endStream = flags & 1 != 0
        if flags & 0x4 != 0 {
            try headerBlock(stream: id, endStream: endStream, block: block, selfDependent: selfDependent)
        } else {
            guard block.readableBytes <= maxHeaderBlock else { throw HTTP2ConnectionError(.enhanceYourCalm, "header block too large") }
            continuation = (id, endStream, block, 1)
            if limits.requestHeaderTimeoutMs > 0 {
                continuationDeadline = NIODeadline.now().uptimeNanoseconds &+ UInt64(limits.requestHeaderTimeoutMs) * 1_000_000
            }
        }
    }

    /// The largest header block (and decoded header list) accepted: twice maxHeadBytes.
    static func maxHeaderBlock(_ limits: ProxyLimits) -> Int { max(4096, limits.maxHeadBytes * 2) }
    var maxHeaderBlock: Int { Self.maxHeaderBlock(limits) }

    func continuationFrame(flags: UInt8, stream id: UInt32, payload: ByteBuffer) throws {
        guard var c = continuation, c.stream == id else { throw HTTP2ConnectionError(.protocolError, "CONTINUATION without a header block") }
        var more = payload
        c.block.writeBuffer(&more)
        c.frames += 1
        guard c.block.readableBytes <= maxHeaderBlock, c.frames <= 128 else {
            throw HTTP2ConnectionError(.enhanceYourCalm, "header block too large")
        }
        if flags & 0x4 != 0 {
            continuation = nil
            continuationDeadline = 0
            try headerBlock(stream: id, endStream: c.endStream, block: c.block, selfDependent: false)
        } else {
            continuation = c
        }
    }

    /// A complete header block: a new request, or the trailers of an open one. It is
    /// decoded whatever becomes of the stream (HPACK's table depends on it), straight
    /// into what the stream needs: the request's HTTPHead, checked as it is built
    /// (HTTP2RequestHead), or its trailers.
    func headerBlock(stream id: UInt32, endStream: Bool, block: ByteBuffer, selfDependent: Bool) throws {
        if let s = streams[id] {
            // Trailers: they end the request (RFC 9113 §8.1: END_STREAM, no pseudo-header).
            var t = HTTP2TrailersSink()
            try decode(stream: id, block, into: &t)
            guard !s.remoteClosed else { s.reset(.streamClosed); return }
            guard endStream, !t.malformed else { s.reset(.protocolError); return }
            s.receiveTrailers(t.trailers)
            return
        }
        let opening = id & 1 == 1 && id > lastStreamID
        guard opening, !selfDependent, !goAwaySent, !peerGoingAway, streams.count < Self.maxConcurrentStreams else {
            var none = HPACKDiscardingSink()
            try decode(stream: id, block, into: &none)
            guard opening else {
                throw HTTP2ConnectionError(.protocolError, "HEADERS opening stream \(id) after stream \(lastStreamID)")
            }
            lastStreamID = id
            writeRSTStream(id, selfDependent ? .protocolError : .refusedStream)
            return
        }
        var request = HTTP2RequestHead(limits: limits, allocator: ctx.allocator, blockSize: block.readableBytes)
        // The connection's scratch bytes, swapped in and out: never shared, so emptying
        // them keeps their storage (no allocation per block).
        swap(&request.saved, &requestScratch)
        request.saved.removeAll(keepingCapacity: true)
        defer { swap(&request.saved, &requestScratch) }
        try decode(stream: id, block, into: &request)
        lastStreamID = id
        guard request.complete() else {
            ctx.metrics.count("moonlet_downstream_protocol_errors_total")
            writeRSTStream(id, .protocolError)
            return
        }
        // A finished stream's handler and stream object serve this one (recycle), else new ones.
        let spare = spareHandlers.popLast()
        let s: HTTP2ServerStream
        if let old = spare?.h2 {
            old.reopen(id: id, sendWindow: peerInitialWindow)
            s = old
        } else {
            s = HTTP2ServerStream(id: id, connection: self, sendWindow: peerInitialWindow)
        }
        streams.append(s)
        s.open(&request, endStream: endStream, handler: spare)
    }

    /// Decodes a header block into `sink`; a malformed one is a connection error.
    @inline(__always)
    func decode<S: HPACKFieldSink>(stream id: UInt32, _ block: ByteBuffer, into sink: inout S) throws {
        do { try decoder.decode(block, into: &sink) } catch {
            throw HTTP2ConnectionError(.compressionError, "header block of stream \(id): \(error)")
        }
    }

    func rstStream(stream id: UInt32, payload: ByteBuffer) throws {
        guard id != 0 else { throw HTTP2ConnectionError(.protocolError, "RST_STREAM on stream 0") }
        guard payload.readableBytes == 4 else { throw HTTP2ConnectionError(.frameSizeError, "RST_STREAM of \(payload.readableBytes) bytes") }
        guard id <= lastStreamID else { throw HTTP2ConnectionError(.protocolError, "RST_STREAM on idle stream \(id)") }
        guard let s = streams[id] else { return }
        // Rapid reset (CVE-2023-44487): streams opened and cancelled at once cost the
        // upstream work while never counting as concurrent.
        let now = NIODeadline.now().uptimeNanoseconds
        if now &- resetWindowStart > 30_000_000_000 { resetWindowStart = now; resetCount = 0 }
        resetCount += 1
        if resetCount > 200 { throw HTTP2ConnectionError(.enhanceYourCalm, "more than 200 streams reset by the client in 30 s") }
        s.resetByPeer()
    }

    func settings(flags: UInt8, stream: UInt32, payload: ByteBuffer) throws {
        guard stream == 0 else { throw HTTP2ConnectionError(.protocolError, "SETTINGS on stream \(stream)") }
        if flags & 1 != 0 {
            guard payload.readableBytes == 0 else { throw HTTP2ConnectionError(.frameSizeError, "SETTINGS ACK with a payload") }
            return
        }
        settingsSeen = true
        var windowGrew = false
        try HTTP2Wire.readSettings(stream: stream, payload) { id, v in
            switch id {
            case HTTP2Wire.settingHeaderTableSize: encoder.table.peerTableSize(Int(v))
            case HTTP2Wire.settingInitialWindowSize:
                windowGrew = try initialWindowChanged(to: v) || windowGrew
            case HTTP2Wire.settingMaxFrameSize: peerMaxFrameSize = Int(v)
            default: break
            }
        }
        writeFrame(type: HTTP2Wire.settings, flags: 1, stream: 0, length: 0) // ACK
        try controlFrameWritten()
        if windowGrew { resumeStreams() }
    }

    func ping(flags: UInt8, stream: UInt32, payload: ByteBuffer) throws {
        guard stream == 0 else { throw HTTP2ConnectionError(.protocolError, "PING on stream \(stream)") }
        guard payload.readableBytes == 8 else { throw HTTP2ConnectionError(.frameSizeError, "PING of \(payload.readableBytes) bytes") }
        guard flags & 1 == 0 else { return }
        var b = output(capacity: 17)
        HTTP2Wire.writePingAck(payload, into: &b)
        out = b
        markUnflushed()
        try controlFrameWritten()
    }

    /// Answers to PING and SETTINGS pile up when the peer does not read: bounded.
    func controlFrameWritten() throws {
        if let ch = context?.channel, !ch.isWritable {
            controlWhileBlocked += 1
            if controlWhileBlocked > 10_000 { throw HTTP2ConnectionError(.enhanceYourCalm, "control frames flood while not reading") }
        }
    }

    func windowUpdate(stream id: UInt32, payload: ByteBuffer) throws {
        let increment = try HTTP2Wire.windowIncrement(payload)
        if id == 0 {
            try connectionWindowUpdated(by: increment)
        } else if let s = streams[id] {
            s.windowUpdated(by: increment)
        } else if id > lastStreamID {
            throw HTTP2ConnectionError(.protocolError, "WINDOW_UPDATE on idle stream \(id)")
        }
    }


    // MARK: output

    /// The connection's output buffer, to append frames to (put back into `out`).
    @inline(__always)
    func output(capacity: Int) -> ByteBuffer {
        if let b = out { out = nil; return b }
        outputEpoch &+= 1
        return ctx.outputBuffer(capacity: max(capacity, 4096))
    }

    /// Appends one frame to the output (`payload` writes its `length` bytes) and queues
    /// the flush.
    @inline(__always)
    func writeFrame(type: UInt8, flags: UInt8, stream: UInt32, length: Int, _ payload: (inout ByteBuffer) -> Void = { _ in }) {
        var b = output(capacity: 9 + length)
        HTTP2Wire.writeFrameHeader(length: length, type: type, flags: flags, stream: stream, into: &b)
        payload(&b)
        out = b
        markUnflushed()
    }

    func writeWindowUpdate(stream: UInt32, _ increment: Int) {
        var b = output(capacity: 13)
        HTTP2Wire.writeWindowUpdate(stream: stream, increment, into: &b)
        out = b
        markUnflushed()
    }

    /// Resets a stream (also one with no state here: refused, malformed, or closed).
    func writeRSTStream(_ stream: UInt32, _ code: HTTP2ErrorCode) {
        var b = output(capacity: 13)
        HTTP2Wire.writeRSTStream(stream, code, into: &b)
        out = b
        markUnflushed()
    }

    /// Trailers as a HEADERS frame (and CONTINUATION) that ends the stream.
    func writeTrailers(stream: UInt32, _ trailers: HTTPTrailers) {
        writeHeaderBlock(stream: stream, endStream: true, capacity: 256) { e, b in e.writeTrailers(trailers, into: &b) }
    }

    /// A response head as HEADERS (and CONTINUATION past the peer's frame size), with
    /// a `server` field added when given. Returns where the HEADERS frame starts in the
    /// output (valid while `outputEpoch` stays the same: setEndStream).
    @discardableResult
    func writeHeaders(stream: UInt32, _ head: HTTPHead, server: String?, endStream: Bool) -> Int {
        writeHeaderBlock(stream: stream, endStream: endStream, capacity: head.bytes.readableBytes + 64) { e, b in
            e.write(head, server: server, headerOnly: endStream, into: &b)
        }
    }

    /// Sets END_STREAM on the frame (HEADERS) written at `at` in the output, if that
    /// output is still unsent (`epoch`, the outputEpoch it was written in); false if not.
    func setEndStream(onFrameAt at: Int, epoch: Int) -> Bool {
        guard epoch == outputEpoch, out != nil, let flags = out!.getInteger(at: at + 4, as: UInt8.self) else { return false }
        out!.setInteger(flags | 1, at: at + 4)
        return true
    }

    /// An interim response (HEADERS with `:status` 100, not ending the stream).
    func writeContinue(stream: UInt32) {
        writeHeaderBlock(stream: stream, endStream: false, capacity: 16) { e, b in e.writeStatus(100, into: &b) }
    }

    /// Appends the header block `encode` writes to the output, framed as HEADERS (then
    /// CONTINUATION frames past the peer's maximum frame size), written in place behind
    /// the frame header (HTTP2Wire.writeHeaderBlock).
    @discardableResult @inline(__always)
    func writeHeaderBlock(stream: UInt32, endStream: Bool, capacity: Int, _ encode: (inout HPACKResponseWriter, inout ByteBuffer) -> Void) -> Int {
        var b = output(capacity: capacity + 9)
        let at = b.writerIndex
        HTTP2Wire.writeHeaderBlock(stream: stream, endStream: endStream, maxFrameSize: peerMaxFrameSize, into: &b) { encode(&encoder, &$0) }
        out = b
        markUnflushed()
        return at
    }

    /// One DATA frame (the windows already taken). Small payloads are copied behind the
    /// frame header; large ones are written as they are.
    func writeData(stream: UInt32, _ payload: ByteBuffer, endStream: Bool) {
        let flags: UInt8 = endStream ? 1 : 0
        if payload.readableBytes <= 8192 {
            writeFrame(type: 0, flags: flags, stream: stream, length: payload.readableBytes) { b in b.writeImmutableBuffer(payload) }
        } else {
            markUnflushed()
            var b = output(capacity: 9)
            HTTP2Wire.writeFrameHeader(length: payload.readableBytes, type: 0, flags: flags, stream: stream, into: &b)
            context?.write(NIOAny(b), promise: nil)
            ctx.recycle(b)
            context?.write(NIOAny(payload), promise: nil)
        }
    }

    @inline(__always)
    func markUnflushed() {
        if !flushQueued { ctx.flushLater(self) }
    }

    /// The end of the loop's batch: writes the frames gathered, closes the streams that
    /// ended, and flushes.
    func flushNow() {
        guard let c = context else { out = nil; return }
        if !ending.isEmpty {
            // Swapped with a kept empty array: no array is allocated per batch (a
            // stream's finish may queue another into `ending`, served next batch).
            swap(&ending, &endingDone)
            for s in endingDone { s.finish() }
            while endingDone.popLast() != nil {} // keeps the capacity, no generic removal
        }
        if let b = out {
            out = nil
            c.write(NIOAny(b), promise: nil)
            ctx.recycle(b)
        }
        c.flush()
        if (peerGoingAway || goAwaySent) && streams.isEmpty { closeConnection() }
    }

    /// Keeps a finished stream's handler for a later stream (h2StreamReused), unless the
    /// connection is closing or has enough spares.
    func recycle(_ h: DownstreamHandler) {
        guard !closed, !goAwaySent, !peerGoingAway, spareHandlers.count < Self.maxSpareHandlers, h.h2Reusable else { return }
        spareHandlers.append(h)
    }

    /// The proxy drains: GOAWAY with NO_ERROR and the last stream opened; later streams
    /// are refused, and the connection closes after its last stream.
    func drain() {
        guard !closed, !goAwaySent else { return }
        writeGoAway(.noError)
    }

    // MARK: connection end

    /// Sends GOAWAY (the last stream this side handled) and closes.
    func fail(_ e: HTTP2ConnectionError) {
        guard !closed else { return }
        if e.code != .noError {
            ctx.metrics.count("moonlet_downstream_protocol_errors_total")
            ctx.logger.debug("HTTP/2 connection from \(peer.info.address): \(e.reason)")
        }
        writeGoAway(e.code)
        closeConnection()
    }

    func writeGoAway(_ code: HTTP2ErrorCode) {
        goAwaySent = true
        var b = output(capacity: 17)
        HTTP2Wire.writeGoAway(lastStream: lastStreamID, code, into: &b)
        out = b
        markUnflushed()
    }

    /// Flushes what is queued and closes the TCP connection.
    func closeConnection() {
        guard !closed else { return }
        closed = true
        inbound = nil
        guard let c = context else { return }
        if let b = out { out = nil; c.write(NIOAny(b), promise: nil) }
        c.flush()
        c.close(promise: nil)
    }

    /// The TCP connection closed: every open stream ends as a downstream disconnect.
    func connectionClosed() {
        closed = true
        context = nil
        out = nil
        inbound = nil
        let open = streams.values
        streams.removeAll()
        for s in open { s.resetByPeer() }
        for s in ending { s.finish() }
        ending = []
        spareHandlers = []
    }

    /// The connection's writability changed: every stream's handler hears of it.
    func writabilityChanged(_ writable: Bool) {
        if writable { controlWhileBlocked = 0 }
        for s in streams.values { s.updateWritability() }
    }

    var connectionWritable: Bool { context?.channel.isWritable ?? false }
}

/// One HTTP/2 stream of an HTTP2ServerConnection and the DownstreamHandler that serves
/// it. The request reaches the handler as an HTTPHead built from the HPACK fields and
/// as body chunks (nothing is written as HTTP/1.1 and parsed again); the response it
/// gives (a parsed head and body chunks) leaves as HEADERS and DATA frames, DATA within
/// the peer's windows (queued here until WINDOW_UPDATE opens them).
final class HTTP2ServerStream: HTTP2FlowControlledSender {
    /// The stream id (a reused stream object takes the next stream's: reopen).
    private(set) var id: UInt32
    let connection: HTTP2ServerConnection
    var handler: DownstreamHandler?

    // Request side.
    var remoteClosed = false
    var recvWindow = HTTP2ServerConnection.streamWindow
    /// Body bytes delivered but not yet given back to the peer by WINDOW_UPDATE.
    var recvUnacked = 0
    var readPaused = false
    /// A head without content-length, held until the next frame shows whether a body
    /// follows (then it is sent chunked).
    var pendingHead: HTTP2DecodedRequest?
    var contentLength = -1
    var bodyReceived = 0
    /// The handler was told the request body ended.
    var bodyEndDelivered = false

    // Response side.
    var requestIsHead = false
    var sendWindow: Int
    /// DATA waiting for the peer's windows: rarely any, so a stream starts with the
    /// shared empty queue (no allocation; copied on its first append).
    var pending = HTTP2Wire.noneQueued
    var pendingBytes = 0
    /// END_STREAM was written or queued.
    var endQueued = false
    var localClosed = false
    var writable = true
    var closeWhenDrained = false
    var finished = false
    /// A response head or chunk is held since the last release (DownstreamStream: its
    /// release is queued for the end of the loop's batch).
    var unflushed = false
    /// In the loop's deferred-flush queue (DeferredFlush).
    var flushQueued = false

    init(id: UInt32, connection: HTTP2ServerConnection, sendWindow: Int) {
        self.id = id
        self.connection = connection
        self.sendWindow = sendWindow
    }

    /// This stream object, finished and held by nothing but its handler (a spare of the
    /// connection's), becomes stream `id`: every field back to its initial value except
    /// `flushQueued` (the loop's deferred-flush queue may still list the object; that
    /// entry then serves the new stream, which is not queued twice).
    func reopen(id: UInt32, sendWindow: Int) {
        self.id = id
        handler = nil
        remoteClosed = false
        recvWindow = HTTP2ServerConnection.streamWindow
        recvUnacked = 0
        readPaused = false
        // The optionals are tested first: storing nil destroys the old value, not free
        // even when it is nil already.
        if pendingHead != nil { pendingHead = nil }
        contentLength = -1
        bodyReceived = 0
        bodyEndDelivered = false
        requestIsHead = false
        self.sendWindow = sendWindow
        if !pending.isEmpty { pending = HTTP2Wire.noneQueued }
        pendingBytes = 0
        endQueued = false
        localClosed = false
        writable = true
        closeWhenDrained = false
        finished = false
        unflushed = false
        if heldHead != nil { heldHead = nil }
        if heldData != nil { heldData = nil }
        if pendingTrailers != nil { pendingTrailers = nil }
        headersAt = -1
        responseHeadWritten = false
    }

    // MARK: request: frames -> head and body chunks

    /// The stream's request head arrived (`request`, complete: its head is moved out to
    /// the handler, not copied): `spare`, a finished stream's handler, serves it
    /// (h2StreamReused), else a new one.
    func open(_ request: inout HTTP2RequestHead, endStream: Bool, handler spare: DownstreamHandler?) {
        let c = connection
        let h: DownstreamHandler
        if let spare {
            h = spare
            h.h2StreamReused(self)
        } else {
            h = DownstreamHandler(ctx: c.ctx, role: c.role, stream: self)
            h.interception = c.interception
            if c.localAddress.isEmpty { c.localAddress = h.acceptedAddress() } else { h.localAddress = c.localAddress }
            h.h2StreamOpened(c)
        }
        h.peerExchange = c.peerExchange
        handler = h
        requestIsHead = request.isHead
        contentLength = request.contentLength
        if endStream {
            remoteClosed = true
            guard contentLength <= 0 else { reset(.protocolError); return }
            deliverHead(&request.head, refusal: request.refusal, chunked: false, to: h)
        } else if contentLength >= 0 {
            deliverHead(&request.head, refusal: request.refusal, chunked: false, to: h)
        } else {
            pendingHead = request.decoded()
        }
    }

    /// Hands the request's HTTPHead to the handler, moved out of `head` (or the error a
    /// refused one gets).
    @inline(__always)
    func deliverHead(_ head: inout HTTPHead?, refusal: HTTPParseError?, chunked: Bool, to h: DownstreamHandler) {
        guard head != nil else { h.h2RequestRefused(refusal!); return }
        let length = contentLength
        head!.framing = length > 0 ? .contentLength(Int64(length)) : length == 0 ? .none : chunked ? .chunked : .none
        h.h2Request(head.take()!)
        connection.peerExchange = h.peerExchange // the peer it read, for the next streams
    }

    /// The same for a head held until the next frame (pendingHead).
    func deliverHead(_ request: HTTP2DecodedRequest, chunked: Bool, to h: DownstreamHandler) {
        switch request.head {
        case .success(let head):
            var held: HTTPHead? = head
            deliverHead(&held, refusal: nil, chunked: chunked, to: h)
        case .failure(let e): h.h2RequestRefused(e)
        }
    }

    /// The request's trailers (HEADERS with END_STREAM after the head): handed to the
    /// handler, then the body ends.
    func receiveTrailers(_ t: HTTPTrailers) {
        guard !finished, let h = handler else { return }
        if let head = pendingHead.take() {
            // HEADERS, then trailers with no DATA: a body of length 0 that has trailers.
            deliverHead(head, chunked: true, to: h)
        }
        if !t.isEmpty { h.h2Trailers(t) }
        receiveData(ByteBuffer(), end: true, flowLength: 0)
    }

    func receiveData(_ data: ByteBuffer, end: Bool, flowLength: Int) {
        guard !finished, let h = handler else { return }
        bodyReceived += data.readableBytes
        if contentLength >= 0 && (bodyReceived > contentLength || (end && bodyReceived != contentLength)) {
            // The body disagrees with content-length: malformed (RFC 9113 §8.1.1).
            reset(.protocolError)
            return
        }
        if end { remoteClosed = true }
        var chunked = false
        if let head = pendingHead.take() {
            chunked = !(end && data.readableBytes == 0)
            // A body of unknown length follows; without one the request is complete.
            deliverHead(head, chunked: chunked, to: h)
            if !chunked { bodyEndDelivered = true }
        }
        if data.readableBytes > 0 { h.h2Body(data) }
        // The body ends with END_STREAM (trailers may follow a body of known length:
        // RFC 9113 §8.1, and they reach an HTTP/2 upstream).
        if !bodyEndDelivered && end {
            bodyEndDelivered = true
            h.h2BodyEnd()
        }
        if end {
            if localClosed { connection.ending.append(self) }
            return
        }
        recvUnacked += flowLength
        if !readPaused { acknowledge() }
    }

    /// Reopens the stream's window once half of it was used.
    func acknowledge() {
        guard recvUnacked >= HTTP2ServerConnection.streamWindow / 2, !remoteClosed else { return }
        connection.writeWindowUpdate(stream: id, recvUnacked)
        recvWindow += recvUnacked
        recvUnacked = 0
    }

    /// The handler pauses or resumes reading (its upstream's buffer filled or drained):
    /// the stream's window is given back only while it reads.
    func setReading(_ on: Bool) {
        guard readPaused == on else { return }
        readPaused = !on
        if on { acknowledge() }
    }

    // MARK: response: head and body chunks -> frames

    // A response (proxied or local) comes as its parsed head and raw body chunks (the
    // handler writes no HTTP/1.1 bytes for it, so nothing is parsed twice). The latest
    // chunk is held until the next chunk, the end of the response or the end of the loop's
    // batch: END_STREAM then rides on the last frame, as a small response leaves in one
    // HEADERS and one DATA frame. A head whose framing announces a body is written as
    // HEADERS at once (into the connection's output, unsent until the end of the batch):
    // should the response end with no DATA after all, END_STREAM is set on that frame
    // while it is still unsent (`headersAt`). A head announcing no body is held like a
    // chunk (the block it gets depends on whether it ends the stream: headerOnly).
    var heldHead: HTTPHead?
    var heldData: ByteBuffer?
    /// The response's HEADERS frame written at once: its offset in the connection's
    /// output while that output is unsent (connection.outputEpoch == headersEpoch) and no
    /// DATA of the stream follows it; -1 otherwise.
    var headersAt = -1
    var headersEpoch = 0
    /// The final response head was written (no interim 100 may follow it).
    var responseHeadWritten = false

    /// `expect: 100-continue`: the client may send the body (an interim HEADERS).
    func writeContinue() {
        guard !finished, !endQueued, heldHead == nil, !responseHeadWritten else { return }
        connection.writeContinue(stream: id)
    }

    /// The response head (from the upstream after the filters, or a local reply's):
    /// written as HEADERS now when a body follows, else held (true: held, to be released
    /// by the end of the batch).
    @discardableResult
    func holdResponseHead(_ head: HTTPHead) -> Bool {
        guard !finished else { return false }
        switch head.framing {
        case .contentLength(let n) where n > 0:
            break
        case .chunked, .untilClose:
            break
        case .none, .contentLength:
            heldHead = head
            return true
        }
        responseHeadWritten = true
        headersAt = connection.writeHeaders(stream: id, head, server: "moonlet", endStream: false)
        headersEpoch = connection.outputEpoch
        return false
    }

    /// A chunk of the response body.
    func responseBody(_ chunk: ByteBuffer) {
        guard !finished, chunk.readableBytes > 0 else { return }
        headersAt = -1 // DATA follows the HEADERS
        if heldData != nil { releaseHeld(end: false) }
        heldData = chunk
    }

    /// Trailers waiting for the DATA queued before them (flow control) to leave.
    var pendingTrailers: HTTPTrailers?

    /// The response is complete; non-empty `trailers` leave as a last HEADERS frame with
    /// END_STREAM, after every DATA frame.
    func endResponse(trailers: HTTPTrailers? = nil) {
        guard !finished else { return }
        guard let t = trailers, !t.isEmpty, !requestIsHead else { releaseHeld(end: true); return }
        releaseHeld(end: false)
        headersAt = -1 // the trailers' HEADERS end the stream, not the head's
        endQueued = true
        if pending.isEmpty {
            connection.writeTrailers(stream: id, t)
            sent()
        } else {
            pendingTrailers = t
        }
    }

    /// Sends what is held; `end` puts END_STREAM on the last frame (an empty DATA frame
    /// when nothing is held).
    func releaseHeld(end: Bool) {
        guard !finished, !(end && endQueued) else { return }
        if let h = heldHead.take() {
            responseHeadWritten = true
            connection.writeHeaders(stream: id, h, server: "moonlet", endStream: end && heldData == nil)
            if end && heldData == nil { endQueued = true; sent(); return }
        }
        if let d = heldData.take() {
            send(d, end: end)
        } else if end {
            // The HEADERS written at once still unsent, nothing after it: END_STREAM on it.
            if headersAt >= 0 {
                let at = headersAt
                headersAt = -1
                if connection.setEndStream(onFrameAt: at, epoch: headersEpoch) { endQueued = true; sent(); return }
            }
            send(ByteBuffer(), end: true)
        }
    }

    func send(_ data: ByteBuffer, end: Bool) {
        if end { endQueued = true }
        queueData(data, end: end)
    }

    /// END_STREAM is on the wire: the stream ends once the request has too.
    func sent() {
        guard pending.isEmpty else { return }
        localClosed = true
        if closeWhenDrained {
            closeWhenDrained = false
            close()
        } else if remoteClosed {
            connection.ending.append(self)
        }
    }

    /// Tells the handler when the stream can take no more (and again when it can).
    func updateWritability() {
        let now = pendingBytes < (writable ? HTTP2ServerConnection.highWater : HTTP2ServerConnection.lowWater) && connection.connectionWritable
        guard now != writable else { return }
        writable = now
        handler?.h2WritabilityChanged(now)
    }

    // MARK: end

    /// The handler is done with the stream (its "connection" closes): a complete response
    /// leaves first, then a request still being sent is stopped with NO_ERROR; an
    /// incomplete response is reset.
    func close() {
        guard !finished else { return }
        if localClosed {
            if !remoteClosed { connection.writeRSTStream(id, .noError) }
            finished = true
            connection.ending.append(self)
        } else if endQueued {
            closeWhenDrained = true
        } else {
            reset(.internalError)
        }
    }

    /// A stream error: RST_STREAM, and the handler sees a disconnect.
    func reset(_ code: HTTP2ErrorCode) {
        guard !finished else { return }
        connection.writeRSTStream(id, code)
        resetByPeer()
    }

    /// The client reset the stream (or the connection went): the handler sees a disconnect.
    func resetByPeer() {
        guard !finished else { return }
        finished = true
        if !pending.isEmpty { pending.removeAll() }
        pendingTrailers = nil
        pendingBytes = 0
        end()
    }

    /// Both sides ended (or close asked for it): the stream leaves the connection, and
    /// its handler serves the connection's next stream when nothing else holds it.
    func finish() {
        finished = true
        // A spare stream object keeps nothing of its request (a head still waiting for
        // its body, a head or DATA held after a reset) until its next stream.
        if pendingHead != nil { pendingHead = nil }
        if heldHead != nil { heldHead = nil }
        if heldData != nil { heldData = nil }
        end(recycling: true)
    }

    /// `recycling`: called from the end of the loop's batch (HTTP2ServerConnection.flushNow),
    /// with no frame of the handler's own on the stack.
    func end(recycling: Bool = false) {
        if connection.streams.remove(self) {
            connection.lastStreamEnd = NIODeadline.now().uptimeNanoseconds
        }
        if var h = handler.take() {
            h.h2StreamClosed()
            // Only this reference left: no timer, callback or upstream holds the handler.
            // (This relies on every callback holding the handler strongly; one holding it
            // weakly or unowned must check the stream id it was made for.)
            if recycling && isKnownUniquelyReferenced(&h) { connection.recycle(h) }
        }
    }
}

/// A request as its header block made it: the HTTPHead (or the status and reason it is
/// refused with), with its framing still to set (HTTP2ServerStream.deliverHead: whether
/// a body follows is known from the next frame), the agreed content-length (-1: none)
/// and whether the method is HEAD.
struct HTTP2DecodedRequest {
    var head: Result<HTTPHead, HTTPParseError>
    var contentLength: Int
    var isHead: Bool
}

/// A request header block decoded straight into an HTTPHead (an HPACKFieldSink: each
/// field's bytes are checked and written once, no String is made), with the checks of
/// RFC 9113 §8.2–8.3: lowercase token names; no CR, LF or NUL in any value and no
/// whitespace around one; the four request pseudo-headers once each, before the
/// fields; no connection-specific field; TE only "trailers"; content-lengths that
/// agree. A block that breaks one is malformed (`finish` returns nil: a stream error,
/// nothing of it reaches the handler, so no byte of a value can become a field of its
/// own).
///
/// Then the checks the HTTP/1.1 parser makes that RFC 9113 §8.2 does not, whose failure
/// is an HTTP answer (HTTPParseError): the target's bytes (no fragment, origin-form or
/// `*` for OPTIONS; CONNECT is refused with 403 as no tunnel is offered), no control
/// byte in a value, a valid authority, the header count and head size limits (431).
/// `:authority` becomes `host` (a `host` field beside it is dropped); one content-length
/// is written, in canonical form; the cookie crumbs HTTP/2 allows are joined with "; ",
/// as HTTP/1.1 wants one cookie field (RFC 9113 §8.2.3). A malformed block wins over a
/// refusal found before its fault, as when the two were separate passes.
struct HTTP2RequestHead: HPACKFieldSink {
    let limits: ProxyLimits
    let allocator: ByteBufferAllocator
    let blockSize: Int
    /// The pseudo-header values (they must outlive their field call), then the cookie
    /// crumbs. Empty at first: the connection swaps its scratch bytes in and out.
    var saved: [UInt8] = []
    var method = 0..<0, path = 0..<0
    var scheme: Range<Int>?, authority: Range<Int>?
    var seenMethod = false, seenPath = false
    /// A regular field was seen: the pseudo-headers are over.
    var regular = false
    var malformed = false
    var refusal: HTTPParseError?
    var builder: HTTPHeadBuilder?
    var contentLength = -1
    var isHead = false
    var hasHost = false, lengthWritten = false, underscore = false, expectContinue = false
    var cookie: Range<Int>?
    /// The request's head once `complete` found the block well-formed and not refused.
    var head: HTTPHead?

    init(limits: ProxyLimits, allocator: ByteBufferAllocator, blockSize: Int) {
        self.limits = limits
        self.allocator = allocator
        self.blockSize = blockSize
    }

    mutating func save(_ v: UnsafeRawBufferPointer) -> Range<Int> {
        let start = saved.count
        v.withMemoryRebound(to: UInt8.self) { saved.append(contentsOf: $0) } // typed: one copy, not a byte loop
        return start..<saved.count
    }

    mutating func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) {
        guard !malformed else { return }
        let verdict = HTTP2FieldCheck.value(value)
        guard verdict != .malformed, let first = name.first else { malformed = true; return }
        if first == UInt8(ascii: ":") {
            guard !regular else { malformed = true; return }
            if HTTP2FieldCheck.equals(name, ":method") {
                guard !seenMethod, !value.isEmpty, value.allSatisfy(HeaderValidation.isTchar) else { malformed = true; return }
                seenMethod = true
                method = save(value)
            } else if HTTP2FieldCheck.equals(name, ":path") {
                guard !seenPath, !value.isEmpty, !value.contains(32) else { malformed = true; return }
                seenPath = true
                path = save(value)
            } else if HTTP2FieldCheck.equals(name, ":scheme") {
                guard scheme == nil else { malformed = true; return }
                scheme = save(value)
            } else if HTTP2FieldCheck.equals(name, ":authority") {
                guard authority == nil, !value.contains(32) else { malformed = true; return }
                authority = save(value)
            } else {
                malformed = true
            }
            return
        }
        if !regular {
            regular = true
            endOfPseudoHeaders()
            guard !malformed else { return }
        }
        guard HTTP2FieldCheck.isName(name, underscore: &underscore) else { malformed = true; return }
        let kind = KnownHeader(lowercaseName: name)
        switch kind {
        case .connection, .keepAlive, .proxyConnection, .transferEncoding, .upgrade: malformed = true; return
        case .te: guard HTTP2FieldCheck.equals(value, "trailers") else { malformed = true; return }
        case .contentLength:
            // The HTTP/1.1 parser's rule, not Int(_:) (which takes "+5" and "-0"): the
            // value reaches an HTTP/1.1 upstream, which must read it as we did.
            guard let v = HTTPHeadParser.parseContentLength(value), contentLength < 0 || contentLength == Int(v) else { malformed = true; return }
            contentLength = Int(v)
        default: break
        }
        guard refusal == nil, builder != nil else { return }
        guard verdict == .valid else { refusal = HTTPParseError(400, "control character in header value"); return }
        switch kind {
        case .contentLength:
            // One content-length, in canonical form (every value is checked to agree):
            // the upstream never sees two, nor "007".
            if lengthWritten { return }
            lengthWritten = true
            var digits = 0
            while digits < value.count - 1 && value[digits] == UInt8(ascii: "0") { digits += 1 }
            builder!.add(name: name, value: UnsafeRawBufferPointer(rebasing: value[digits...]), kind: .contentLength)
            return
        case .host:
            if hasHost { return }
            guard value.isEmpty || HTTPHeadParser.isValidHost(value) else { refusal = HTTPParseError(400, "invalid host header"); return }
            hasHost = true
        case .expect:
            if value.count == 12 && HTTP2FieldCheck.equals(value, "100-continue", foldingCase: true) { expectContinue = true }
        case .other:
            if HTTP2FieldCheck.equals(name, "cookie") {
                if let c = cookie {
                    saved.append(contentsOf: "; ".utf8)
                    value.withMemoryRebound(to: UInt8.self) { saved.append(contentsOf: $0) }
                    cookie = c.lowerBound..<saved.count
                } else {
                    cookie = save(value)
                }
                return
            }
        default: break
        }
        builder!.add(name: name, value: value, kind: kind)
    }

    /// The pseudo-headers are all there: the request line is checked and written.
    mutating func endOfPseudoHeaders() {
        guard seenMethod else { malformed = true; return }
        let pseudo = saved
        pseudo.withUnsafeBytes { raw in
            let m = UnsafeRawBufferPointer(rebasing: raw[method])
            isHead = HTTP2FieldCheck.equals(m, "HEAD")
            let connect = HTTP2FieldCheck.equals(m, "CONNECT")
            if connect {
                guard let a = authority, !a.isEmpty, scheme == nil, !seenPath else { malformed = true; return }
                refusal = HTTPParseError(403, "CONNECT is not supported")
                return
            }
            guard scheme != nil, seenPath else { malformed = true; return }
            let target = UnsafeRawBufferPointer(rebasing: raw[path])
            var form = RequestTargetForm.origin
            for c in target where c <= 32 || c >= 127 || c == 35 {
                refusal = HTTPParseError(400, c == 35 ? "fragment in request target" : "bad request target")
                return
            }
            if target.first != UInt8(ascii: "/") {
                guard HTTP2FieldCheck.equals(target, "*") else { refusal = HTTPParseError(400, ":path is not origin-form"); return }
                guard HTTP2FieldCheck.equals(m, "OPTIONS") else {
                    refusal = HTTPParseError(400, "request target is not origin-form, absolute-form, * (OPTIONS) or authority-form (CONNECT)")
                    return
                }
                form = .asterisk
            }
            var b = HTTPHeadBuilder(method: m, target: target, buffer: allocator.buffer(capacity: max(512, min(2 * blockSize, limits.maxHeadBytes) + 64)))
            b.set(targetForm: form)
            // No authority and no host: the handler answers 400 (none is made up).
            if let a = authority, !a.isEmpty {
                let value = UnsafeRawBufferPointer(rebasing: raw[a])
                guard HTTPHeadParser.isValidHost(value) else { refusal = HTTPParseError(400, "invalid host header"); return }
                b.add(name: UnsafeRawBufferPointer(start: Self.hostName.utf8Start, count: 4), value: value, kind: .host)
                hasHost = true
            }
            builder = b
        }
    }

    static let hostName: StaticString = "host"
    static let cookieName: StaticString = "cookie"

    /// The block is decoded: false when it is malformed; otherwise `head` holds the
    /// request, or `refusal` the answer it gets. (The head is built in place and moved
    /// into `head`: the stream moves it on to its handler, no copy is made.)
    mutating func complete() -> Bool {
        if !regular && !malformed { endOfPseudoHeaders() }
        if malformed { return false }
        if refusal != nil { return true }
        if let c = cookie {
            let crumbs = saved
            crumbs.withUnsafeBytes { raw in
                _ = builder!.add(name: UnsafeRawBufferPointer(start: Self.cookieName.utf8Start, count: 6), value: UnsafeRawBufferPointer(rebasing: raw[c]), kind: .other)
            }
        }
        if builder!.head.fields.count > limits.maxHeaderCount {
            refusal = HTTPParseError(431, "more than \(limits.maxHeaderCount) headers")
            return true
        }
        builder!.set(underscoreInName: underscore)
        builder!.set(expectContinue: expectContinue)
        let h = builder.take()!.finished()
        if h.bytes.readableBytes > limits.maxHeadBytes {
            refusal = HTTPParseError(431, "request head larger than \(limits.maxHeadBytes) bytes")
            return true
        }
        head = consume h
        return true
    }

    /// What `complete` found, as one value (the head moved out of `head`).
    mutating func decoded() -> HTTP2DecodedRequest {
        if let h = head.take() { return HTTP2DecodedRequest(head: .success(h), contentLength: contentLength, isHead: isHead) }
        return HTTP2DecodedRequest(head: .failure(refusal!), contentLength: contentLength, isHead: isHead)
    }

    /// The request once its block is decoded; nil when the block is malformed.
    mutating func finish() -> HTTP2DecodedRequest? {
        complete() ? decoded() : nil
    }
}

/// A trailers block (RFC 9113 §8.1) decoded into HTTPTrailers: no pseudo-header, values
/// as HTTP/2 and the HTTP/1.1 parser allow them, token names (HTTPTrailers.add(checking:),
/// which drops what may not be a trailer). `malformed`: the stream is reset.
struct HTTP2TrailersSink: HPACKFieldSink {
    var trailers = HTTPTrailers()
    var malformed = false

    mutating func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) {
        guard !malformed else { return }
        guard HTTP2FieldCheck.isName(name), HTTP2FieldCheck.value(value) != .malformed,
              trailers.add(checking: String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self)) else {
            malformed = true
            return
        }
    }
}
