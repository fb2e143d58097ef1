import NIOCore
import MoonletCore

// MARK: - Downstream stream interface
//
// What the stream executor gives the client, for both protocols: a head, body chunks, the
// end, or a reset; and reading on or off. Each protocol keeps its own write state in its
// own type: `HTTP1Downstream` (one per HTTP/1.1 connection: the held head, the chunked
// re-framing, the deferred flush) and `HTTP2ServerStream` (one per HTTP/2 stream: the held
// HEADERS and DATA, the flow-control queue). A proxied response and a local reply take
// the same calls. The handler holds a `Downstream` (an enum of the two final classes), so
// a call is a switch and a direct call, not an existential dispatch.

/// The client side of one stream.
protocol DownstreamStream: AnyObject {
    /// The response head (after the response filters). `closeAfter`: the connection
    /// closes after this response; the protocol may set it (its framing needs it, or the
    /// request body is unfinished).
    func sendHead(_ head: HTTPHead, clientMinor: Int, requestComplete: Bool, draining: Bool, closeAfter: inout Bool)
    /// A chunk of the response body.
    func sendBody(_ chunk: ByteBuffer)
    /// The response is complete; `trailers` follow the body where the framing allows
    /// (HTTP/2 HEADERS; HTTP/1.1 chunked trailer section).
    func sendEnd(trailers: HTTPTrailers?)
    /// Writes a held head (and what is held with it) now; its flush is already queued.
    func releaseHeld()
    /// Flushes what was written to the client now.
    func flush()
    /// Flushes what was written, then closes the connection (HTTP/1.1) or ends the stream
    /// (HTTP/2: after a complete response, or with a reset).
    func reset()
    /// Closes the connection once what was written is out, reading no more (HTTP/1.1),
    /// or ends the stream (HTTP/2).
    func closeTransport()
    /// Pauses or resumes reading from the client; a no-op when already in that state.
    func setReading(_ on: Bool)
    /// Whether reading from the client is paused (backpressure or pipelined backlog).
    var readPaused: Bool { get }
    /// Whether the client side takes more bytes now.
    var writable: Bool { get }
    /// `expect: 100-continue`: the client may send the body.
    func sendContinue()
    /// A request that failed to parse (or is refused as the parser would): the answer,
    /// then the connection or stream closes.
    func sendProtocolError(_ e: HTTPParseError, body: String)
}

/// The handler's downstream: one of the two implementations, called without an
/// existential (a switch on the case, then a direct call of a final class).
enum Downstream {
    case http1(HTTP1Downstream)
    case http2(HTTP2ServerStream)

    @inline(__always)
    func sendHead(_ head: HTTPHead, clientMinor: Int, requestComplete: Bool, draining: Bool, closeAfter: inout Bool) {
        switch self {
        case .http1(let d): d.sendHead(head, clientMinor: clientMinor, requestComplete: requestComplete, draining: draining, closeAfter: &closeAfter)
        case .http2(let d): d.sendHead(head, clientMinor: clientMinor, requestComplete: requestComplete, draining: draining, closeAfter: &closeAfter)
        }
    }

    @inline(__always)
    func sendBody(_ chunk: ByteBuffer) {
        switch self {
        case .http1(let d): d.sendBody(chunk)
        case .http2(let d): d.sendBody(chunk)
        }
    }

    @inline(__always)
    func sendEnd(trailers: HTTPTrailers?) {
        switch self {
        case .http1(let d): d.sendEnd(trailers: trailers)
        case .http2(let d): d.sendEnd(trailers: trailers)
        }
    }

    @inline(__always)
    func releaseHeld() {
        switch self {
        case .http1(let d): d.releaseHeld()
        case .http2(let d): d.releaseHeld()
        }
    }

    @inline(__always)
    func flush() {
        switch self {
        case .http1(let d): d.flush()
        case .http2(let d): d.flush()
        }
    }

    @inline(__always)
    func reset() {
        switch self {
        case .http1(let d): d.reset()
        case .http2(let d): d.reset()
        }
    }

    @inline(__always)
    func closeTransport() {
        switch self {
        case .http1(let d): d.closeTransport()
        case .http2(let d): d.closeTransport()
        }
    }

    @inline(__always)
    func setReading(_ on: Bool) {
        switch self {
        case .http1(let d): d.setReading(on)
        case .http2(let d): d.setReading(on)
        }
    }

    var readPaused: Bool {
        switch self {
        case .http1(let d): return d.readPaused
        case .http2(let d): return d.readPaused
        }
    }

    var writable: Bool {
        switch self {
        case .http1(let d): return d.writable
        case .http2(let d): return d.writable
        }
    }

    func sendContinue() {
        switch self {
        case .http1(let d): d.sendContinue()
        case .http2(let d): d.sendContinue()
        }
    }

    func sendProtocolError(_ e: HTTPParseError, body: String) {
        switch self {
        case .http1(let d): d.sendProtocolError(e, body: body)
        case .http2(let d): d.sendProtocolError(e, body: body)
        }
    }

    /// The HTTP/2 stream, when the handler serves one.
    @inline(__always)
    var http2: HTTP2ServerStream? {
        if case .http2(let s) = self { return s } else { return nil }
    }
}

/// HTTP/1.1 writes to the client's channel, one per connection (reused by its keep-alive
/// requests). The head is written as bytes and held, so a small body leaves in the same
/// write; a chunked or close-delimited upstream body is re-framed chunked for a 1.1 client.
///
/// Every write is flushed by the end of the event loop's current batch of I/O events
/// (LoopContext.flushLater), not at once: the writes for all the streams whose bytes
/// arrived in one batch then leave together, as HAProxy sends after its poll loop, and
/// the client and the app behind the proxy are woken once per burst instead of once
/// per response (measured: a quarter fewer epoll wake-ups of the load generator).
/// Before a close, and when a channel's buffer is full, the flush happens at once.
final class HTTP1Downstream: DownstreamStream, DeferredFlush {
    let ctx: LoopContext
    /// The connection's pipeline context; nil once the handler left its pipeline (the
    /// handler drops it then: context and handler refer to each other).
    var context: ChannelHandlerContext?
    /// The response head, held back until the first body bytes, the end of the
    /// response or the end of the loop's batch: a small response then leaves in one
    /// write (one trip through the pipeline) instead of two.
    var heldHead: ByteBuffer?
    /// How the response body is framed to the client.
    var framing = ResponseFraming.asIs
    /// Bytes were written to the client since its last flush.
    var unflushed = false
    /// A flush waits for the end of the loop's batch of I/O events.
    var flushQueued = false
    var readPaused = false

    /// Bodies up to this size are copied behind a held head rather than written apart.
    static let mergedBodyLimit = 16 * 1024

    init(ctx: LoopContext) { self.ctx = ctx }

    func sendHead(_ head: HTTPHead, clientMinor: Int, requestComplete: Bool, draining: Bool, closeAfter: inout Bool) {
        framing = .asIs
        switch head.framing {
        case .chunked, .untilClose:
            if clientMinor == 1 { framing = .chunked } else { framing = .untilClose; closeAfter = true }
        default: break
        }
        if !requestComplete || draining { closeAfter = true } // body still arriving: can't resync
        // Room for a small body too: it is copied behind the head (see heldHead).
        var room = 0
        if case .contentLength(let n) = head.framing, n <= Self.mergedBodyLimit { room = Int(n) }
        var out = ctx.outputBuffer(capacity: head.bytes.readableBytes + 128 + room)
        let chunked = framing == .chunked
        let close = closeAfter
        HeadWriter.writeResponse(head, into: &out) { o in
            o.writeStaticString("server: moonlet\r\n")
            if chunked { o.writeStaticString("transfer-encoding: chunked\r\n") }
            if close { o.writeStaticString("connection: close\r\n") }
            else if clientMinor == 0 { o.writeStaticString("connection: keep-alive\r\n") }
        }
        heldHead = out
        markUnflushed()
    }

    func sendBody(_ chunk: ByteBuffer) {
        if heldHead != nil {
            if chunk.readableBytes <= Self.mergedBodyLimit {
                if framing == .chunked { ChunkedEncoder.writeChunk(chunk, into: &heldHead!) } else { var c = chunk; heldHead!.writeBuffer(&c) }
                releaseHeld()
                if !writable { flush() }
                return
            }
            releaseHeld()
        }
        write(ChunkedEncoder.frame(chunk, chunked: framing == .chunked, allocator: ctx.allocator))
        if !writable { flush() }
    }

    /// The last chunk when re-framed, with the trailers (sent whether or not the client
    /// sent `TE: trailers`, as Envoy does; a response with a content-length has no place
    /// for them and they are dropped). Flushed at the end of the batch (the head or a body
    /// write already queued the flush).
    func sendEnd(trailers: HTTPTrailers?) {
        guard framing == .chunked else { return }
        if heldHead != nil { ChunkedEncoder.writeLastChunk(trailers: trailers, into: &heldHead!) }
        else { write(ChunkedEncoder.lastChunk(trailers: trailers)) }
    }

    /// Writes `b` to the client; flushed at the end of the batch.
    @inline(__always)
    func write(_ b: ByteBuffer) {
        emit(b)
        markUnflushed()
    }

    /// Hands `b` to the client's channel.
    @inline(__always)
    func emit(_ b: ByteBuffer) {
        context!.write(NIOAny(b), promise: nil)
    }

    /// Records that the client has bytes to flush (written, or a held head) and queues
    /// the flush.
    @inline(__always)
    func markUnflushed() {
        unflushed = true
        if !flushQueued { ctx.flushLater(self) }
    }

    @inline(__always)
    func releaseHeld() {
        if let h = heldHead { heldHead = nil; emit(h); ctx.recycle(h) }
    }

    /// Flushes what was written to the client now, skipping the pipeline when nothing was.
    @inline(__always)
    func flush() {
        guard unflushed else { return }
        releaseHeld()
        unflushed = false
        context!.flush()
    }

    /// The end of the loop's batch (nothing once the handler has left its pipeline).
    func flushNow() {
        guard context != nil else { return }
        flush()
    }

    func reset() { closeTransport() }

    /// Closes once everything written is out, or after closeFlushTimeoutMs when the
    /// client does not take it. Not at once: NIO's full close drops the writes still
    /// pending, which cut the end of a large response to a client reading slower than
    /// the upstream answered (connection: close), or a local reply. Reading goes on
    /// meanwhile and what arrives is dropped (the handler is closed): a client still
    /// sending a body it was answered early is not blocked into never reading.
    func closeTransport() {
        guard let c = context else { return }
        setReading(true)
        flush()
        c.closeWhenWritesAreOut(timeoutMs: ctx.settings.limits.closeFlushTimeoutMs)
    }

    func setReading(_ on: Bool) {
        guard readPaused == on else { return }
        readPaused = !on
        context!.channel.setOption(ChannelOptions.autoRead, value: on).whenComplete { _ in }
    }

    var writable: Bool { context!.channel.isWritable }

    func sendContinue() { write(ByteBuffer(staticString: "HTTP/1.1 100 Continue\r\n\r\n")) }

    func sendProtocolError(_ e: HTTPParseError, body: String) {
        var out = ctx.allocator.buffer(capacity: 128)
        HeadWriter.writeStatusLine(e.status, reason: nil, into: &out)
        out.writeString("content-length: \(body.utf8.count)\r\ncontent-type: text/plain\r\nserver: moonlet\r\nconnection: close\r\n\r\n")
        out.writeString(body)
        let c = context!
        c.write(NIOAny(out), promise: nil)
        c.closeWhenWritesAreOut(timeoutMs: ctx.settings.limits.closeFlushTimeoutMs)
    }
}

/// HTTP/2 writes: the parsed head and the body chunks go to the stream, which writes
/// HPACK HEADERS and DATA frames (held until the next chunk, the end of the response or
/// the end of the loop's batch, so END_STREAM rides on the last frame).
extension HTTP2ServerStream: DownstreamStream, DeferredFlush {
    func sendHead(_ head: HTTPHead, clientMinor: Int, requestComplete: Bool, draining: Bool, closeAfter: inout Bool) {
        // HTTP/2 frames the body itself: the head goes to the stream as it is (written
        // as HEADERS at once, or held: then released by the end of the batch).
        if !requestComplete { closeAfter = true }
        if holdResponseHead(head) { markHeld() }
    }

    func sendBody(_ chunk: ByteBuffer) {
        responseBody(chunk)
        markHeld()
        if !writable { flush() }
    }

    /// END_STREAM on the last frame, or on a HEADERS frame of trailers after it.
    func sendEnd(trailers: HTTPTrailers?) { endResponse(trailers: trailers) }

    func releaseHeld() { releaseHeld(end: false) }

    /// Queues the release of what is held for the end of the loop's batch. (The frames
    /// are flushed by the connection, queued when written.)
    @inline(__always)
    func markHeld() {
        unflushed = true
        if !flushQueued { connection.ctx.flushLater(self) }
    }

    @inline(__always)
    func flush() {
        guard unflushed else { return }
        releaseHeld(end: false)
        unflushed = false
    }

    /// The end of the loop's batch (nothing once the stream's handler has closed).
    func flushNow() {
        guard let h = handler, !h.closed else { return }
        flush()
    }

    func reset() {
        flush()
        close()
    }

    func closeTransport() { close() }

    func sendContinue() { writeContinue() }

    /// The same answer as a head, not bytes.
    func sendProtocolError(_ e: HTTPParseError, body: String) {
        var b = HTTPHeadBuilder(status: e.status, buffer: connection.ctx.allocator.buffer(capacity: 96))
        b.add("content-length", String(body.utf8.count), kind: .contentLength)
        b.add("content-type", "text/plain", kind: .other)
        b.set(framing: .contentLength(Int64(body.utf8.count)))
        holdResponseHead(b.finish())
        if !requestIsHead { responseBody(ByteBuffer(string: body)) }
        endResponse()
        close()
    }
}
