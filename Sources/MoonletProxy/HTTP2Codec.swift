import NIOCore
import MoonletCore

/// HTTP/2 error codes (RFC 9113 §7).
enum HTTP2ErrorCode: UInt32 {
    case noError = 0, protocolError = 1, internalError = 2, flowControlError = 3, streamClosed = 5,
         frameSizeError = 6, refusedStream = 7, cancel = 8, compressionError = 9, enhanceYourCalm = 11
}

/// A connection error (RFC 9113 §5.4.1): the connection sends GOAWAY with `code` and closes.
struct HTTP2ConnectionError: Error {
    let code: HTTP2ErrorCode
    let reason: String
    init(_ code: HTTP2ErrorCode, _ reason: String) { self.code = code; self.reason = reason }
}

/// The frame layer of Moonlet's own HTTP/2 codec, with no state: the connection
/// preface, frames cut from the connection's bytes (as slices, no copy), frame headers
/// written, padding stripped. The downstream server (HTTP2ServerConnection) keeps its
/// streams, windows and HPACK tables itself; an upstream client on the same codec would
/// share this layer.
enum HTTP2Wire {
    static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    /// One frame: its header's fields and its payload (a slice of the connection's bytes).
    struct Frame {
        let type: UInt8
        let flags: UInt8
        let stream: UInt32
        let payload: ByteBuffer
    }

    /// The complete frame at the front of `buf`, consumed; nil while it has not all
    /// arrived. A frame longer than `maxFrameSize` is a connection error (FRAME_SIZE_ERROR).
    @inline(__always)
    static func nextFrame(_ buf: inout ByteBuffer, maxFrameSize: Int) throws -> Frame? {
        guard buf.readableBytes >= 9 else { return nil }
        let r = buf.readerIndex
        let length = Int(buf.getInteger(at: r, as: UInt8.self)!) << 16 | Int(buf.getInteger(at: r + 1, as: UInt16.self)!)
        guard length <= maxFrameSize else {
            throw HTTP2ConnectionError(.frameSizeError, "frame of \(length) bytes, more than \(maxFrameSize)")
        }
        guard buf.readableBytes >= 9 + length else { return nil }
        let f = Frame(type: buf.getInteger(at: r + 3, as: UInt8.self)!, flags: buf.getInteger(at: r + 4, as: UInt8.self)!,
                      stream: buf.getInteger(at: r + 5, as: UInt32.self)! & 0x7fff_ffff, payload: buf.getSlice(at: r + 9, length: length)!)
        buf.moveReaderIndex(forwardBy: 9 + length)
        return f
    }

    /// A frame header (9 bytes), written in one reservation of the buffer.
    @inline(__always)
    static func writeFrameHeader(length: Int, type: UInt8, flags: UInt8, stream: UInt32, into b: inout ByteBuffer) {
        b.writeWithUnsafeMutableBytes(minimumWritableBytes: 9) { raw in
            fillFrameHeader(raw, at: 0, length: length, type: type, flags: flags, stream: stream)
            return 9
        }
    }

    /// Stores a frame header's 9 bytes at `at` in `raw`.
    @inline(__always)
    static func fillFrameHeader(_ raw: UnsafeMutableRawBufferPointer, at: Int, length: Int, type: UInt8, flags: UInt8, stream: UInt32) {
        raw[at] = UInt8(truncatingIfNeeded: length >> 16)
        raw[at + 1] = UInt8(truncatingIfNeeded: length >> 8)
        raw[at + 2] = UInt8(truncatingIfNeeded: length)
        raw[at + 3] = type
        raw[at + 4] = flags
        raw[at + 5] = UInt8(truncatingIfNeeded: stream >> 24)
        raw[at + 6] = UInt8(truncatingIfNeeded: stream >> 16)
        raw[at + 7] = UInt8(truncatingIfNeeded: stream >> 8)
        raw[at + 8] = UInt8(truncatingIfNeeded: stream)
    }

    /// Strips the padding of a DATA or HEADERS frame (flag PADDED).
    static func unpad(_ flags: UInt8, _ payload: inout ByteBuffer, reserving: Int = 0) throws {
        guard flags & 0x8 != 0 else { return }
        guard let pad = payload.readInteger(as: UInt8.self), Int(pad) + reserving <= payload.readableBytes else {
            throw HTTP2ConnectionError(.protocolError, "padding as long as the frame")
        }
        payload.moveWriterIndex(to: payload.writerIndex - Int(pad))
    }
}

// MARK: - Frames written, SETTINGS read (both sides of the codec)

extension HTTP2Wire {
    /// Frame types (RFC 9113 §6).
    static let data: UInt8 = 0, headers: UInt8 = 1, priority: UInt8 = 2, rstStream: UInt8 = 3, settings: UInt8 = 4,
               pushPromise: UInt8 = 5, ping: UInt8 = 6, goAway: UInt8 = 7, windowUpdate: UInt8 = 8, continuation: UInt8 = 9
    /// SETTINGS identifiers (RFC 9113 §6.5.2).
    static let settingHeaderTableSize: UInt16 = 1, settingEnablePush: UInt16 = 2, settingMaxConcurrentStreams: UInt16 = 3,
               settingInitialWindowSize: UInt16 = 4, settingMaxFrameSize: UInt16 = 5, settingMaxHeaderListSize: UInt16 = 6
    /// The empty DATA queue every stream starts with: shared, so opening a stream
    /// allocates none (CircularBuffer copies its storage on the first append).
    static let noneQueued = CircularBuffer<(data: ByteBuffer, end: Bool)>(initialCapacity: 1)
    /// The window every stream and the connection start with, and the largest one.
    static let defaultWindow = 65_535, maxWindow = 0x7fff_ffff

    /// A SETTINGS frame with `values` (identifier, value).
    static func writeSettings(_ values: [(UInt16, UInt32)], into b: inout ByteBuffer) {
        writeFrameHeader(length: 6 * values.count, type: settings, flags: 0, stream: 0, into: &b)
        for (id, v) in values { b.writeInteger(id); b.writeInteger(v) }
    }

    static func writeSettingsAck(into b: inout ByteBuffer) {
        writeFrameHeader(length: 0, type: settings, flags: 1, stream: 0, into: &b)
    }

    static func writeWindowUpdate(stream: UInt32, _ increment: Int, into b: inout ByteBuffer) {
        writeFrameHeader(length: 4, type: windowUpdate, flags: 0, stream: stream, into: &b)
        b.writeInteger(UInt32(increment))
    }

    static func writeRSTStream(_ stream: UInt32, _ code: HTTP2ErrorCode, into b: inout ByteBuffer) {
        writeFrameHeader(length: 4, type: rstStream, flags: 0, stream: stream, into: &b)
        b.writeInteger(code.rawValue)
    }

    static func writeGoAway(lastStream: UInt32, _ code: HTTP2ErrorCode, into b: inout ByteBuffer) {
        writeFrameHeader(length: 8, type: goAway, flags: 0, stream: 0, into: &b)
        b.writeInteger(lastStream)
        b.writeInteger(code.rawValue)
    }

    /// The PING acknowledgement carrying the peer's 8 bytes back.
    static func writePingAck(_ payload: ByteBuffer, into b: inout ByteBuffer) {
        writeFrameHeader(length: 8, type: ping, flags: 1, stream: 0, into: &b)
        var p = payload
        b.writeBuffer(&p)
    }

    /// Frames the header block `block` (consumed): HEADERS, then CONTINUATION frames past
    /// `maxFrameSize`, END_HEADERS on the last, END_STREAM on the HEADERS when `endStream`.
    static func writeHeaderBlock(_ block: inout ByteBuffer, stream: UInt32, endStream: Bool, maxFrameSize: Int, into b: inout ByteBuffer) {
        var type = headers
        repeat {
            let n = min(block.readableBytes, maxFrameSize)
            let last = n == block.readableBytes
            var flags: UInt8 = last ? 0x4 : 0
            if type == headers && endStream { flags |= 0x1 }
            writeFrameHeader(length: n, type: type, flags: flags, stream: stream, into: &b)
            var part = block.readSlice(length: n)!
            b.writeBuffer(&part)
            type = continuation
        } while block.readableBytes > 0
    }

    /// Writes a header block straight behind its HEADERS frame header in `b` (`encode`
    /// appends the block to `b`): no block is built apart and copied. The frame header's
    /// 9 bytes are reserved first and filled in once the block's length is known; a
    /// block longer than `maxFrameSize` (rare: a head of more than 16 KB by default) is
    /// moved out and framed as HEADERS and CONTINUATION frames (writeHeaderBlock).
    @inline(__always)
    static func writeHeaderBlock(stream: UInt32, endStream: Bool, maxFrameSize: Int, into b: inout ByteBuffer,
                                 _ encode: (inout ByteBuffer) -> Void) {
        let start = b.writerIndex
        b.writeWithUnsafeMutableBytes(minimumWritableBytes: 9) { _ in 9 } // filled in below
        encode(&b)
        let n = b.writerIndex - start - 9
        if n <= maxFrameSize {
            // The frame header in one pass over the bytes (one uniqueness check).
            let at = start - b.readerIndex
            let flags: UInt8 = endStream ? 0x5 : 0x4 // END_HEADERS, END_STREAM
            b.withUnsafeMutableReadableBytes { fillFrameHeader($0, at: at, length: n, type: headers, flags: flags, stream: stream) }
            return
        }
        var block = ByteBuffer(bytes: b.getBytes(at: start + 9, length: n)!)
        b.moveWriterIndex(to: start)
        writeHeaderBlock(&block, stream: stream, endStream: endStream, maxFrameSize: maxFrameSize, into: &b)
    }

    /// Reads a SETTINGS frame's payload (not an ACK), checking what RFC 9113 §6.5.2 bounds
    /// (ENABLE_PUSH 0 or 1, INITIAL_WINDOW_SIZE at most 2^31-1, MAX_FRAME_SIZE in
    /// 16384...16777215), and hands each pair to `apply`.
    static func readSettings(stream: UInt32, _ payload: ByteBuffer, _ apply: (UInt16, UInt32) throws -> Void) throws {
        guard stream == 0 else { throw HTTP2ConnectionError(.protocolError, "SETTINGS on stream \(stream)") }
        guard payload.readableBytes % 6 == 0 else { throw HTTP2ConnectionError(.frameSizeError, "SETTINGS of \(payload.readableBytes) bytes") }
        var p = payload
        while let id = p.readInteger(as: UInt16.self), let v = p.readInteger(as: UInt32.self) {
            switch id {
            case settingEnablePush: guard v <= 1 else { throw HTTP2ConnectionError(.protocolError, "SETTINGS_ENABLE_PUSH \(v)") }
            case settingInitialWindowSize: guard v <= 0x7fff_ffff else { throw HTTP2ConnectionError(.flowControlError, "SETTINGS_INITIAL_WINDOW_SIZE \(v)") }
            case settingMaxFrameSize: guard v >= 16_384 && v <= 16_777_215 else { throw HTTP2ConnectionError(.protocolError, "SETTINGS_MAX_FRAME_SIZE \(v)") }
            default: break
            }
            try apply(id, v)
        }
    }

    /// A WINDOW_UPDATE's increment (the frame must be 4 bytes).
    static func windowIncrement(_ payload: ByteBuffer) throws -> Int {
        guard payload.readableBytes == 4 else { throw HTTP2ConnectionError(.frameSizeError, "WINDOW_UPDATE of \(payload.readableBytes) bytes") }
        return Int(payload.getInteger(at: payload.readerIndex, as: UInt32.self)! & 0x7fff_ffff)
    }
}

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
}

/// A connection's side of a stream's outgoing DATA: its send window (shared by its
/// streams), the peer's largest frame, and the frame writers. Both of Moonlet's HTTP/2
/// connections (HTTP2ServerConnection, UpstreamH2Connection) are one.
protocol HTTP2DataWriter: AnyObject {
    var sendWindow: Int { get set }
    var peerMaxFrameSize: Int { get }
    func writeData(stream: UInt32, _ payload: ByteBuffer, endStream: Bool)
    func writeTrailers(stream: UInt32, _ trailers: HTTPTrailers)
}

/// A stream's outgoing DATA under HTTP/2 flow control (RFC 9113 §5.2), the same for a
/// response the server sends and a request the upstream client sends: what fits the
/// stream's and the connection's windows and the peer's frame size is written at once,
/// the rest waits in `pending` for WINDOW_UPDATE (`drain`), then the trailers.
protocol HTTP2FlowControlledSender: AnyObject {
    associatedtype Writer: HTTP2DataWriter
    var id: UInt32 { get }
    var connection: Writer { get }
    var sendWindow: Int { get set }
    var pending: CircularBuffer<(data: ByteBuffer, end: Bool)> { get set }
    var pendingBytes: Int { get set }
    var pendingTrailers: HTTPTrailers? { get set }
    /// END_STREAM is on the wire (with the last DATA or the trailers).
    func sent()
    /// `pendingBytes` changed: tells the stream's user when it can take more.
    func updateWritability()
    /// A stream error: RST_STREAM with `code`, the stream ends.
    func reset(_ code: HTTP2ErrorCode)
}

extension HTTP2FlowControlledSender {
    /// Writes `data` (END_STREAM with it when `end`), or queues it behind what waits.
    @inline(__always)
    func queueData(_ data: ByteBuffer, end: Bool) {
        let c = connection
        if pending.isEmpty, data.readableBytes <= min(sendWindow, c.sendWindow, c.peerMaxFrameSize) {
            // The common case: it fits the windows and one frame.
            sendWindow -= data.readableBytes
            c.sendWindow -= data.readableBytes
            c.writeData(stream: id, data, endStream: end)
            if end { sent() }
            return
        }
        pending.append((data, end))
        pendingBytes += data.readableBytes
        drain()
    }

    /// The peer's WINDOW_UPDATE for this stream (RFC 9113 §6.9): a zero increment or a
    /// window past 2^31-1 resets the stream; otherwise queued DATA goes out.
    func windowUpdated(by increment: Int) {
        guard increment > 0 else { reset(.protocolError); return }
        sendWindow += increment
        guard sendWindow <= HTTP2Wire.maxWindow else { reset(.flowControlError); return }
        drain()
    }

    /// Writes queued DATA as far as both windows allow, then the trailers once none waits.
    func drain() {
        let c = connection
        while let first = pending.first {
            var chunk = first.data
            let n = chunk.readableBytes
            if n > 0 {
                let allowed = min(sendWindow, c.sendWindow, c.peerMaxFrameSize)
                guard allowed > 0 else { break }
                let take = min(n, allowed)
                let part = chunk.readSlice(length: take)!
                sendWindow -= take
                c.sendWindow -= take
                pendingBytes -= take
                let done = take == n
                c.writeData(stream: id, part, endStream: done && first.end)
                if !done { pending[pending.startIndex] = (chunk, first.end); continue }
            } else {
                c.writeData(stream: id, chunk, endStream: first.end)
            }
            pending.removeFirst()
            if first.end { sent() }
        }
        if pending.isEmpty, let t = pendingTrailers {
            pendingTrailers = nil
            c.writeTrailers(stream: id, t)
            sent()
        }
        updateWritability()
    }
}

/// What the server connection and the upstream client connection share of HTTP/2's
/// connection level: bytes carried over from one read to the next, connection errors,
/// and the send windows (the peer's SETTINGS_INITIAL_WINDOW_SIZE, the connection's
/// WINDOW_UPDATE).
protocol HTTP2ConnectionCore: HTTP2DataWriter {
    associatedtype Stream: HTTP2FlowControlledSender
    /// What the last read left of an incomplete frame.
    var inbound: ByteBuffer? { get set }
    var closed: Bool { get }
    /// The open streams.
    var streams: HTTP2StreamTable<Stream> { get }
    var peerInitialWindow: Int { get set }
    /// A connection error: GOAWAY with its code, and the connection closes.
    func fail(_ e: HTTP2ConnectionError)
}

extension HTTP2ConnectionCore {
    /// Bytes read from the connection, after what the last read left: `frames` handles
    /// every complete frame, the rest waits for the next read; a connection error (or
    /// any other thrown error, as INTERNAL_ERROR) sends GOAWAY and closes.
    @inline(__always)
    func receive(_ incoming: ByteBuffer, frames: (inout ByteBuffer) throws -> Void) {
        guard !closed else { return }
        var buf: ByteBuffer
        if var pending = inbound, pending.readableBytes > 0 {
            var more = incoming
            pending.writeBuffer(&more)
            buf = pending
        } else {
            buf = incoming
        }
        inbound = nil
        do {
            try frames(&buf)
            if buf.readableBytes > 0 && !closed { inbound = buf }
        } catch let e as HTTP2ConnectionError {
            fail(e)
        } catch {
            fail(HTTP2ConnectionError(.internalError, "\(error)"))
        }
    }

    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE: every open stream's send window moves
    /// by the change (RFC 9113 §6.9.2). True when the windows grew.
    func initialWindowChanged(to v: UInt32) throws -> Bool {
        let delta = Int(v) - peerInitialWindow
        peerInitialWindow = Int(v)
        for s in streams.values {
            s.sendWindow += delta
            guard s.sendWindow <= HTTP2Wire.maxWindow else { throw HTTP2ConnectionError(.flowControlError, "stream window above 2^31-1") }
        }
        return delta > 0
    }

    /// WINDOW_UPDATE on stream 0: the connection's send window grows, and the streams
    /// that queued DATA while it was closed send what now fits.
    func connectionWindowUpdated(by increment: Int) throws {
        guard increment > 0 else { throw HTTP2ConnectionError(.protocolError, "WINDOW_UPDATE of 0 on the connection") }
        sendWindow += increment
        guard sendWindow <= HTTP2Wire.maxWindow else { throw HTTP2ConnectionError(.flowControlError, "connection window above 2^31-1") }
        resumeStreams()
    }

    /// Sends what streams queued while the connection's window was closed.
    func resumeStreams() {
        streams.drainQueued { sendWindow > 0 }
    }
}

/// The open streams of an HTTP/2 connection, by id: an array in the order they were
/// opened (stream ids only grow, so it stays sorted by id). The newest stream, which
/// nearly every frame between sidecars is for, is checked first; any other is found by
/// binary search, so a connection with thousands of open streams (an upstream that
/// allows them, long-lived gRPC calls) costs a lookup per frame of O(log n). No hashing,
/// no dictionary entry made and dropped per stream.
struct HTTP2StreamTable<Stream: HTTP2FlowControlledSender> {
    private(set) var values: [Stream] = []

    var count: Int { values.count }
    var isEmpty: Bool { values.isEmpty }

    /// The position of the open stream `id`, if any.
    @inline(__always)
    func index(of id: UInt32) -> Int? {
        var hi = values.count
        guard hi > 0 else { return nil }
        let newest = values[hi - 1].id
        if newest == id { return hi - 1 }
        if newest < id { return nil }
        hi -= 1
        var lo = 0
        while lo < hi {
            let mid = (lo + hi) >> 1
            let m = values[mid].id
            if m == id { return mid }
            if m < id { lo = mid + 1 } else { hi = mid }
        }
        return nil
    }

    /// The open stream `id`, if any.
    @inline(__always)
    subscript(id: UInt32) -> Stream? {
        guard let i = index(of: id) else { return nil }
        return values[i]
    }

    /// A new stream, its id above every open one's (a lower one would break the search:
    /// both connection kinds only ever open streams with growing ids).
    @inline(__always)
    mutating func append(_ s: Stream) {
        precondition(values.last.map { $0.id < s.id } ?? true, "HTTP/2 stream ids must grow")
        if values.capacity == 0 { values.reserveCapacity(8) }
        values.append(s)
    }

    /// Removes `s` (this object, not another stream with its id); false when not open.
    @inline(__always)
    mutating func remove(_ s: Stream) -> Bool {
        guard let i = index(of: s.id), values[i] === s else { return false }
        if i == values.count - 1 { _ = values.popLast() } else { values.remove(at: i) }
        return true
    }

    /// Forgets every stream (keeping the storage).
    mutating func removeAll() { values.removeAll(keepingCapacity: true) }
}

extension HTTP2StreamTable {
    /// The connection's window reopened: each stream with queued DATA sends what it can,
    /// as long as `open()` says the connection's window has room.
    func drainQueued(while open: () -> Bool) {
        for s in values where s.pendingBytes > 0 || !s.pending.isEmpty {
            guard open() else { return }
            s.drain()
        }
    }
}
