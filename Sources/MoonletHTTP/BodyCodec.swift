import NIOCore

/// Incremental body decoder for one message: Content-Length, chunked (strict: hex
/// sizes of at most 16 digits, CRLF only, bounded extensions and trailers) or until close.
/// A chunked body's trailer section is kept (`trailers`, once the body is complete), to
/// be forwarded; a body without trailers allocates nothing for them.
/// It consumes bytes from the front of a buffer and hands out the payload as slices
/// (no copy); bytes after the end of the body stay in the buffer (pipelining).
public struct BodyDecoder: Sendable {
    enum State: Sendable {
        case length(remaining: Int64)
        case chunkSize(value: UInt64, digits: Int, inExtension: Bool, extBytes: Int)
        case chunkSizeLF(value: UInt64)
        case chunkData(remaining: UInt64)
        case chunkDataCR
        case chunkDataLF
        case trailerLineStart
        case trailerLine(bytes: Int)
        case trailerLF(emptyLine: Bool)
        case untilClose
        case done
    }

    var state: State
    /// Bytes of chunk extensions and trailers accepted per message.
    public var maxMetadataBytes = 8 * 1024
    var trailerBytes = 0
    /// The trailer section's bytes as they arrive (lines with their CRLF), nil until one comes.
    var trailerRaw: [UInt8]?
    /// The chunked body's trailer fields, set when the body completes with a non-empty
    /// trailer section (fields that may not be trailers are dropped: HTTPTrailers.isAllowed).
    public private(set) var trailers: HTTPTrailers?

    public init(framing: BodyFraming) {
        switch framing {
        case .none: state = .done
        case .contentLength(let n): state = n == 0 ? .done : .length(remaining: n)
        case .chunked: state = .chunkSize(value: 0, digits: 0, inExtension: false, extBytes: 0)
        case .untilClose: state = .untilClose
        }
    }

    public var isDone: Bool { if case .done = state { return true }; return false }
    public var isUntilClose: Bool { if case .untilClose = state { return true }; return false }

    /// Consumes what it can of `buffer`, calling `emit` with each payload slice. Returns
    /// true once the body is complete. Throws HTTPParseError(400) on malformed chunking.
    public mutating func decode(_ buffer: inout ByteBuffer, emit: (ByteBuffer) -> Void) throws -> Bool {
        while buffer.readableBytes > 0 {
            switch state {
            case .done:
                return true
            case .untilClose:
                emit(buffer.readSlice(length: buffer.readableBytes)!)
                return false
            case .length(let remaining):
                let n = Int(min(Int64(buffer.readableBytes), remaining))
                emit(buffer.readSlice(length: n)!)
                let left = remaining - Int64(n)
                state = left == 0 ? .done : .length(remaining: left)
            case .chunkData(let remaining):
                let n = Int(min(UInt64(buffer.readableBytes), remaining))
                emit(buffer.readSlice(length: n)!)
                let left = remaining - UInt64(n)
                state = left == 0 ? .chunkDataCR : .chunkData(remaining: left)
            case .chunkSize(var value, var digits, var inExt, var extBytes):
                let c = buffer.readInteger(as: UInt8.self)!
                if c == 13 {
                    guard digits > 0 else { throw HTTPParseError(400, "chunk size missing") }
                    state = .chunkSizeLF(value: value)
                    continue
                }
                if inExt {
                    extBytes += 1
                    if extBytes > maxMetadataBytes { throw HTTPParseError(400, "chunk extension too long") }
                    if c == 10 || c == 0 || (c < 32 && c != 9) || c == 127 { throw HTTPParseError(400, "bad chunk extension") }
                    state = .chunkSize(value: value, digits: digits, inExtension: true, extBytes: extBytes)
                    continue
                }
                if let d = hexValue(c) {
                    if digits > 0 && extBytes > 0 { throw HTTPParseError(400, "bad chunk size") } // whitespace inside size
                    digits += 1
                    if digits > 16 { throw HTTPParseError(400, "chunk size too large") }
                    value = value << 4 | UInt64(d)
                    if value > UInt64(Int64.max) { throw HTTPParseError(400, "chunk size too large") }
                } else if c == 59 /* ; */ && digits > 0 {
                    inExt = true
                } else if (c == 32 || c == 9) && digits > 0 {
                    extBytes += 1 // BWS before ';' only
                } else {
                    throw HTTPParseError(400, "bad chunk size")
                }
                state = .chunkSize(value: value, digits: digits, inExtension: inExt, extBytes: extBytes)
            case .chunkSizeLF(let value):
                guard buffer.readInteger(as: UInt8.self)! == 10 else { throw HTTPParseError(400, "bad chunk size line ending") }
                state = value == 0 ? .trailerLineStart : .chunkData(remaining: value)
            case .chunkDataCR:
                guard buffer.readInteger(as: UInt8.self)! == 13 else { throw HTTPParseError(400, "chunk data longer than its size") }
                state = .chunkDataLF
            case .chunkDataLF:
                guard buffer.readInteger(as: UInt8.self)! == 10 else { throw HTTPParseError(400, "bad chunk data line ending") }
                state = .chunkSize(value: 0, digits: 0, inExtension: false, extBytes: 0)
            case .trailerLineStart:
                let c = buffer.readInteger(as: UInt8.self)!
                if c == 13 { state = .trailerLF(emptyLine: true) }
                else if c == 10 { throw HTTPParseError(400, "bare LF in trailers") }
                else { try countTrailer(); keepTrailer(c); state = .trailerLine(bytes: 1) }
            case .trailerLine(let bytes):
                let c = buffer.readInteger(as: UInt8.self)!
                if c == 13 { state = .trailerLF(emptyLine: false) }
                else if c == 10 || c == 0 { throw HTTPParseError(400, "bad trailer line") }
                else { try countTrailer(); keepTrailer(c); state = .trailerLine(bytes: bytes + 1) }
            case .trailerLF(let empty):
                guard buffer.readInteger(as: UInt8.self)! == 10 else { throw HTTPParseError(400, "bad trailer line ending") }
                state = empty ? .done : .trailerLineStart
                if empty {
                    if let raw = trailerRaw {
                        trailerRaw = nil
                        let t = try HTTPTrailers.parse(http1: raw)
                        if !t.isEmpty { trailers = t }
                    }
                    return true
                }
                keepTrailer(13); keepTrailer(10)
            }
        }
        if case .done = state { return true }
        return false
    }

    @inline(__always)
    private mutating func keepTrailer(_ c: UInt8) {
        if trailerRaw == nil { trailerRaw = []; trailerRaw!.reserveCapacity(64) }
        trailerRaw!.append(c)
    }

    private mutating func countTrailer() throws {
        trailerBytes += 1
        if trailerBytes > maxMetadataBytes { throw HTTPParseError(400, "trailers too long") }
    }

    @inline(__always)
    func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case 48...57: return c - 48
        case 65...70: return c - 55
        case 97...102: return c - 87
        default: return nil
        }
    }
}

/// Writes chunked framing around payload slices (RFC 9112 §7.1).
public enum ChunkedEncoder {
    public static func writeChunkHeader(_ size: Int, into out: inout ByteBuffer) {
        // Hex digits, most significant first, written straight into the buffer.
        var shift = 0
        while shift < 60 && size >> (shift + 4) > 0 { shift += 4 }
        out.reserveCapacity(minimumWritableBytes: shift / 4 + 3)
        while shift >= 0 {
            let d = UInt8((size >> shift) & 0xF)
            out.writeInteger(d < 10 ? d + 48 : d + 87)
            shift -= 4
        }
        out.writeInteger(UInt16(0x0D0A))
    }
    public static func writeChunk(_ data: ByteBuffer, into out: inout ByteBuffer) {
        writeChunkHeader(data.readableBytes, into: &out)
        var d = data
        out.writeBuffer(&d)
        out.writeInteger(UInt16(0x0D0A))
    }
    public static let lastChunk: StaticString = "0\r\n\r\n"

    /// `data` as it goes on the wire: one chunk when `chunked`, else unchanged (no copy).
    public static func frame(_ data: ByteBuffer, chunked: Bool, allocator: ByteBufferAllocator) -> ByteBuffer {
        guard chunked else { return data }
        var out = allocator.buffer(capacity: data.readableBytes + 16)
        writeChunk(data, into: &out)
        return out
    }
}

/// Splits HTTP/1.1 messages arriving as bytes (in any pieces) into their heads, body
/// slices and ends: what a bridge to a framed protocol (HTTP/2) needs. Interim (1xx)
/// responses are skipped; a response without length ends with its bytes (a bridge
/// has no connection close to wait for).
public struct HTTPMessageReader {
    public enum Event {
        case head(HTTPHead)
        case body(ByteBuffer)
        /// The chunked body's trailers (right before `.end`).
        case trailers(HTTPTrailers)
        case end
    }

    var parser: HTTPHeadParser
    let requests: Bool
    var buffer: ByteBuffer?
    var decoder: BodyDecoder?
    /// The message being read is the response to a HEAD request (no body).
    public var requestWasHead = false

    /// `requests`: the bytes are requests (else responses).
    public init(requests: Bool, limits: HTTPParserLimits) {
        self.requests = requests
        parser = HTTPHeadParser(limits: limits)
    }

    /// Consumes `incoming`, calling `emit` for each event it completes. Throws the
    /// parse error of a malformed head or body.
    public mutating func feed(_ incoming: ByteBuffer, _ emit: (Event) -> Void) throws {
        var incoming = incoming
        if buffer == nil || buffer!.readableBytes == 0 { buffer = incoming } else { buffer!.writeBuffer(&incoming) }
        while var buf = buffer, buf.readableBytes > 0 {
            if decoder == nil {
                let result = requests ? parser.parseRequest(buf) : parser.parseResponse(buf, requestWasHead: requestWasHead)
                switch result {
                case .needMore:
                    return
                case .error(let e):
                    throw e
                case .complete(let head, let consumed):
                    buf.moveReaderIndex(forwardBy: consumed)
                    buffer = buf
                    parser.reset()
                    if !requests && head.status >= 100 && head.status < 200 { continue }
                    let d = BodyDecoder(framing: head.framing == .untilClose ? .none : head.framing)
                    emit(.head(head))
                    if d.isDone { emit(.end); continue }
                    decoder = d
                }
            }
            var d = decoder!
            let done = try d.decode(&buf) { emit(.body($0)) }
            buffer = buf
            if done {
                decoder = nil
                if let t = d.trailers { emit(.trailers(t)) }
                emit(.end)
            } else { decoder = d }
        }
    }
}
