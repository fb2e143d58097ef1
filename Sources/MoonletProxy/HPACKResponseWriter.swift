import NIOCore
import MoonletHTTP

/// Writes response header blocks straight from a parsed head, the way HAProxy's HPACK
/// encoder does: a static-table index where the table has the field, otherwise a
/// literal without indexing, no Huffman coding and no dynamic table. The first block
/// sets the dynamic table's size to 0, so the peer's SETTINGS_HEADER_TABLE_SIZE never
/// matters. Nothing is copied into Strings on the way (NIOHPACK's encoder wanted an
/// HPACKHeaders of Strings and searched its tables per field: a seventh of an HTTP/2
/// request's user CPU).
struct HPACKResponseWriter {
    var sentTableSize = false

    /// Static-table indexes (RFC 7541 Appendix A) of `:status` values.
    static func statusIndex(_ status: Int) -> UInt8? {
        switch status {
        case 200: return 8
        case 204: return 9
        case 206: return 10
        case 304: return 11
        case 400: return 12
        case 404: return 13
        case 500: return 14
        default: return nil
        }
    }

    /// An HPACK integer with an N-bit prefix (RFC 7541 §5.1) in a byte starting with `flags`.
    @inline(__always)
    static func writeInteger(_ value: Int, prefix: Int, flags: UInt8, into b: inout ByteBuffer) {
        let max = (1 << prefix) - 1
        if value < max { b.writeInteger(flags | UInt8(value)); return }
        b.writeInteger(flags | UInt8(max))
        var rest = value - max
        while rest >= 128 {
            b.writeInteger(UInt8(truncatingIfNeeded: rest & 0x7f) | 0x80)
            rest >>= 7
        }
        b.writeInteger(UInt8(rest))
    }

    /// A string literal without Huffman coding; `lowercase` folds ASCII letters.
    @inline(__always)
    static func writeString(_ bytes: UnsafeRawBufferPointer, lowercase: Bool, into b: inout ByteBuffer) {
        writeInteger(bytes.count, prefix: 7, flags: 0, into: &b)
        guard lowercase else { b.writeBytes(bytes); return }
        b.writeWithUnsafeMutableBytes(minimumWritableBytes: bytes.count) { dst in
            for j in 0..<bytes.count {
                let c = bytes[j]
                dst[j] = c &- 65 < 26 ? c | 0x20 : c
            }
            return bytes.count
        }
    }

    static func writeString(_ s: String, lowercase: Bool, into b: inout ByteBuffer) {
        var s = s
        s.withUTF8 { writeString(UnsafeRawBufferPointer($0), lowercase: lowercase, into: &b) }
    }

    /// Static-table name index of a response field, for the names responses carry most.
    @inline(__always)
    static func nameIndex(_ head: HTTPHead, _ i: Int) -> Int {
        switch head.fields[i].kind {
        case .contentLength: return 28
        case .server: return 54
        case .other:
            switch head.fields[i].nameLength {
            case 4: return head.nameEquals(i, lowercased: "date") ? 33 : 0
            case 12: return head.nameEquals(i, lowercased: "content-type") ? 31 : 0
            default: return 0
            }
        default: return 0
        }
    }

    /// `:status` (a static-table index when the table has the code, else a literal
    /// without indexing), after the table-size update that starts the first block.
    /// Alone, it is an interim response's block (100 Continue).
    mutating func writeStatus(_ status: Int, into b: inout ByteBuffer) {
        if !sentTableSize { sentTableSize = true; b.writeInteger(UInt8(0x20)) } // table size 0
        if let index = Self.statusIndex(status) {
            b.writeInteger(0x80 | index)
        } else {
            b.writeInteger(UInt8(0x08)) // literal without indexing, name :status (index 8)
            Self.writeString(String(status), lowercase: false, into: &b)
        }
    }

    /// A trailers block: literal fields without indexing (after the table-size update
    /// when it is the connection's first block).
    mutating func writeTrailers(_ t: HTTPTrailers, into b: inout ByteBuffer) {
        if !sentTableSize { sentTableSize = true; b.writeInteger(UInt8(0x20)) }
        for f in t.fields {
            b.writeInteger(UInt8(0))
            Self.writeString(f.name, lowercase: true, into: &b)
            Self.writeString(f.value, lowercase: false, into: &b)
        }
    }

    /// Writes `:status` and the head's fields as HTTP/2 allows them (see
    /// HTTPHead.isHTTP2Forbidden), then the fields filters added, then `server` when
    /// `server` is given. `headerOnly`: the block ends the stream, and a `content-length: 0`
    /// says nothing END_STREAM does not: it is left out (an HTTP/2 upstream's header-only
    /// response, gRPC's trailers-only one, reaches the proxy as HTTP/1.1 with that field
    /// added, which the client would otherwise see among its metadata).
    mutating func write(_ head: HTTPHead, server: String?, headerOnly: Bool = false, into b: inout ByteBuffer) {
        writeStatus(head.status, into: &b)
        head.bytes.withUnsafeReadableBytes { raw in
            for i in 0..<head.fields.count where !head.fields[i].removed && !head.isHTTP2Forbidden(i, isRequest: false) {
                let f = head.fields[i]
                if headerOnly && f.kind == .contentLength && f.valueLength == 1 && raw[Int(f.valueStart)] == UInt8(ascii: "0") { continue }
                let index = Self.nameIndex(head, i)
                if index > 0 {
                    Self.writeInteger(index, prefix: 4, flags: 0, into: &b)
                } else {
                    b.writeInteger(UInt8(0))
                    Self.writeString(UnsafeRawBufferPointer(rebasing: raw[Int(f.nameStart)..<Int(f.nameStart + f.nameLength)]), lowercase: true, into: &b)
                }
                Self.writeString(UnsafeRawBufferPointer(rebasing: raw[Int(f.valueStart)..<Int(f.valueStart + f.valueLength)]), lowercase: false, into: &b)
            }
        }
        for a in head.added {
            b.writeInteger(UInt8(0))
            Self.writeString(a.name, lowercase: true, into: &b)
            Self.writeString(a.value, lowercase: false, into: &b)
        }
        if let server {
            Self.writeInteger(54, prefix: 4, flags: 0, into: &b)
            Self.writeString(server, lowercase: false, into: &b)
        }
    }
}
