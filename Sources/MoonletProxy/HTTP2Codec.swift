import NIOCore

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

    static func writeFrameHeader(length: Int, type: UInt8, flags: UInt8, stream: UInt32, into b: inout ByteBuffer) {
        b.writeInteger(UInt8(truncatingIfNeeded: length >> 16))
        b.writeInteger(UInt16(truncatingIfNeeded: length))
        b.writeInteger(type)
        b.writeInteger(flags)
        b.writeInteger(stream)
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
