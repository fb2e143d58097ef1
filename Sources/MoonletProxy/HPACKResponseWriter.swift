import NIOCore
#if canImport(Glibc)
import Glibc
#endif
import MoonletHTTP
import MoonletTelemetry

/// Writes an HPACK header block into bytes reserved beforehand (ByteBuffer's
/// writeWithUnsafeMutableBytes): the caller bounds the block's size from the head, so
/// the whole block costs one capacity check instead of one per byte. A field's literal
/// takes its name and value plus at most 11 bytes (a byte, two lengths of up to 5);
/// a parsed head's line holds them plus 3 at least (":" and CRLF): 8 more per field
/// over the head's bytes is always enough.
struct HPACKRawWriter {
    let p: UnsafeMutableRawPointer
    var count = 0

    init(_ p: UnsafeMutableRawPointer) { self.p = p }

    /// The first byte of a literal field with a new name: 0x10 ("never indexed", RFC 7541
    /// §7.1.3) for credentials (authorization, proxy-authorization, cookie, set-cookie),
    /// so that no intermediary after this hop puts them in a compression table; 0
    /// (without indexing) otherwise.
    @inline(__always)
    static func literalFlag(_ name: UnsafeRawBufferPointer) -> UInt8 {
        switch name.count {
        case 6: return HTTP2FieldCheck.equals(name, "cookie", foldingCase: true) ? 0x10 : 0
        case 10: return HTTP2FieldCheck.equals(name, "set-cookie", foldingCase: true) ? 0x10 : 0
        case 13: return HTTP2FieldCheck.equals(name, "authorization", foldingCase: true) ? 0x10 : 0
        case 19: return HTTP2FieldCheck.equals(name, "proxy-authorization", foldingCase: true) ? 0x10 : 0
        default: return 0
        }
    }

    static func literalFlag(_ name: String) -> UInt8 {
        switch name.utf8.count {
        case 6, 10, 13, 19: var n = name; return n.withUTF8 { literalFlag(UnsafeRawBufferPointer($0)) }
        default: return 0
        }
    }

    /// The most a string literal of `n` bytes takes (its length as a 7-bit-prefix
    /// integer: up to 5 bytes for what a header block can hold).
    @inline(__always)
    static func bound(_ n: Int) -> Int { n + 5 }

    @inline(__always)
    mutating func byte(_ b: UInt8) {
        p.storeBytes(of: b, toByteOffset: count, as: UInt8.self)
        count += 1
    }

    /// An integer with an N-bit prefix (RFC 7541 §5.1) in a byte starting with `flags`.
    @inline(__always)
    mutating func integer(_ value: Int, prefix: Int, flags: UInt8) {
        let max = (1 << prefix) - 1
        if value < max { byte(flags | UInt8(value)); return }
        byte(flags | UInt8(max))
        var rest = value - max
        while rest >= 128 {
            byte(UInt8(truncatingIfNeeded: rest & 0x7f) | 0x80)
            rest >>= 7
        }
        byte(UInt8(rest))
    }

    /// A string literal without Huffman coding; `lowercase` folds ASCII letters.
    @inline(__always)
    mutating func string(_ bytes: UnsafeRawBufferPointer, lowercase: Bool) {
        let n = bytes.count
        integer(n, prefix: 7, flags: 0)
        guard n > 0 else { return }
        let dst = p + count
        if lowercase {
            // Eight bytes at a time: bit 7 of a lane is set where its byte is an ASCII
            // uppercase letter (0x41...0x5a, computed on the low 7 bits with no carry
            // between lanes, then bytes from 0x80 up left out), and 0x20 is or-ed there.
            let src = bytes.baseAddress!
            var j = 0
            while j + 8 <= n {
                let w = src.loadUnaligned(fromByteOffset: j, as: UInt64.self)
                let low = w & 0x7f7f_7f7f_7f7f_7f7f
                let upper = (low &+ 0x3f3f_3f3f_3f3f_3f3f) & ~(low &+ 0x2525_2525_2525_2525) & ~w & 0x8080_8080_8080_8080
                dst.storeBytes(of: w | (upper >> 2), toByteOffset: j, as: UInt64.self)
                j += 8
            }
            while j < n {
                let c = bytes[j]
                dst.storeBytes(of: c &- 65 < 26 ? c | 0x20 : c, toByteOffset: j, as: UInt8.self)
                j += 1
            }
        } else {
            dst.copyMemory(from: bytes.baseAddress!, byteCount: n)
        }
        count += n
    }

    @inline(__always)
    mutating func string(_ s: String, lowercase: Bool) {
        var s = s
        s.withUTF8 { string(UnsafeRawBufferPointer($0), lowercase: lowercase) }
    }

    /// A decimal number as a string literal.
    mutating func decimal(_ value: Int64) {
        var digits = 1, v = value
        while v >= 10 { v /= 10; digits += 1 }
        byte(UInt8(digits))
        v = value
        for j in stride(from: digits - 1, through: 0, by: -1) {
            p.storeBytes(of: UInt8(48 + v % 10), toByteOffset: count + j, as: UInt8.self)
            v /= 10
        }
        count += digits
    }

    /// Runs `body` on a writer over `bound` bytes reserved at the end of `b`.
    @inline(__always)
    static func write(into b: inout ByteBuffer, bound: Int, _ body: (inout HPACKRawWriter) -> Void) {
        b.writeWithUnsafeMutableBytes(minimumWritableBytes: bound) { raw in
            var w = HPACKRawWriter(raw.baseAddress!)
            body(&w)
            precondition(w.count <= bound, "HPACK block beyond its bound")
            return w.count
        }
    }

    /// What the fields filters added take at most.
    static func bound(_ added: [HeaderLine]) -> Int {
        var n = 0
        for a in added { n += a.name.utf8.count + a.valueByteCount + 11 }
        return n
    }
}

/// The HPACK encoder's dynamic table (RFC 7541 §2.3.2, §4) for the two fields a sidecar
/// repeats on every request and response between mesh sidecars: Istio's metadata
/// exchange headers, `x-envoy-peer-metadata` (a few hundred bytes) and its `-id`. The first
/// one on a connection is a literal with incremental indexing, every later one a one-byte
/// index, so the bytes encrypted, sent and decoded per request shrink by that much (as
/// Envoy's encoder indexes them; HTTP/1.1 cannot). Every other field stays a literal
/// without indexing. The table follows the peer's SETTINGS_HEADER_TABLE_SIZE (4096 until
/// it says otherwise): it only ever shrinks, the next block starting with the size update
/// (§4.2, §6.3), and an entry that does not fit goes as a literal without indexing.
struct HPACKEncoderTable {
    /// The table's maximum size, as the peer's decoder knows it.
    private(set) var maxSize = 4096
    /// A smaller maximum is due at the start of the next block.
    private var sizeUpdateDue = false
    /// A field in the table, with its §4.1 size.
    struct Entry {
        let name: String
        let value: String
        let size: Int
    }
    /// The entries, newest first (dynamic-table index 62 + position).
    private var entries: [Entry] = []
    private var used = 0

    /// The peer's SETTINGS_HEADER_TABLE_SIZE.
    mutating func peerTableSize(_ limit: Int) {
        guard limit < maxSize else { return }
        maxSize = limit
        sizeUpdateDue = true
        evict(toFit: 0)
    }

    /// Starts a header block: the size update a smaller SETTINGS_HEADER_TABLE_SIZE made
    /// due (at most 4 bytes).
    @inline(__always)
    mutating func startBlock(_ w: inout HPACKRawWriter) {
        if sizeUpdateDue { sizeUpdateDue = false; w.integer(maxSize, prefix: 5, flags: 0x20) }
    }

    /// Whether a field with this (lowercase) name is kept in the table.
    @inline(__always)
    static func indexes(_ name: String) -> Bool {
        switch name.utf8.count {
        case 21: return InlineUTF8.sameBytes(name, PeerMetadata.header)
        case 24: return InlineUTF8.sameBytes(name, PeerMetadata.idHeader)
        default: return false
        }
    }

    /// Writes a field `indexes` accepts: its index when the table has it, else a literal
    /// with incremental indexing (the table takes it, evicting the oldest entries), else
    /// (larger than the table) a literal without indexing.
    mutating func write(name: String, value: String, _ w: inout HPACKRawWriter) {
        var i = 0
        while i < entries.count {
            // The proxy's own metadata is one String object per sidecar (and the names
            // are literals): the same representation is the same bytes, with no compare.
            if InlineUTF8.sameBytes(entries[i].value, value) && InlineUTF8.sameBytes(entries[i].name, name) {
                w.integer(62 + i, prefix: 7, flags: 0x80)
                return
            }
            i += 1
        }
        let size = name.utf8.count + value.utf8.count + 32
        if size > maxSize {
            w.byte(0)
        } else {
            w.byte(0x40)
            evict(toFit: size)
            entries.insert(Entry(name: name, value: value, size: size), at: 0)
            used += size
        }
        w.string(name, lowercase: true)
        w.string(value, lowercase: false)
    }

    /// Drops the oldest entries until `size` more bytes fit (§4.4).
    private mutating func evict(toFit size: Int) {
        while used + size > maxSize, let last = entries.popLast() { used -= last.size }
    }
}

/// Writes response header blocks straight from a parsed head, the way HAProxy's HPACK
/// encoder does: a static-table index where the table has the field, otherwise a
/// literal without indexing, no Huffman coding, and the dynamic table only for Istio's
/// metadata exchange headers (HPACKEncoderTable). Nothing is copied into Strings on the way (NIOHPACK's encoder wanted an
/// HPACKHeaders of Strings and searched its tables per field: a seventh of an HTTP/2
/// request's user CPU), and the block is written into bytes reserved once
/// (HPACKRawWriter).
struct HPACKResponseWriter {
    var table = HPACKEncoderTable()

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

    /// Static-table name index of a response field (`name`: its bytes), for the names
    /// responses carry most (RFC 7541 Appendix A): the name then costs one or two bytes,
    /// not a lowercased copy. Credentials (set-cookie) are left to the never-indexed literal.
    /// The name is compared a word at a time with its letters folded to lowercase (or-ing
    /// 0x20 into every byte is exact for token names: no other byte of a name folds onto a
    /// letter or "-").
    @inline(__always)
    static func nameIndex(_ kind: KnownHeader, _ name: UnsafeRawBufferPointer) -> Int {
        switch kind {
        case .contentLength: return 28
        case .server: return 54
        case .other: break
        default: return 0
        }
        @inline(__always) func w32(_ at: Int) -> UInt32 { name.loadUnaligned(fromByteOffset: at, as: UInt32.self) | 0x2020_2020 }
        @inline(__always) func w64(_ at: Int) -> UInt64 { name.loadUnaligned(fromByteOffset: at, as: UInt64.self) | 0x2020_2020_2020_2020 }
        // Little-endian words of the lowercase names.
        switch name.count {
        case 4:
            switch w32(0) {
            case 0x6574_6164: return 33 // date
            case 0x6761_7465: return 34 // etag
            case 0x7972_6176: return 59 // vary
            default: return 0
            }
        case 7: return w32(0) == 0x6970_7865 && w32(3) == 0x7365_7269 ? 36 : 0 // expires
        case 8: return w64(0) == 0x6e6f_6974_6163_6f6c ? 46 : 0 // location
        case 12: return w64(0) == 0x2d74_6e65_746e_6f63 && w32(8) == 0x6570_7974 ? 31 : 0 // content-type
        case 13:
            switch (w64(0), w64(5)) {
            case (0x646f_6d2d_7473_616c, 0x6465_6966_6964_6f6d): return 44 // last-modified
            case (0x722d_7470_6563_6361, 0x7365_676e_6172_2d74): return 18 // accept-ranges
            case (0x6f63_2d65_6863_6163, 0x6c6f_7274_6e6f_632d): return 24 // cache-control
            default: return 0
            }
        case 16: return w64(0) == 0x2d74_6e65_746e_6f63 && w64(8) == 0x676e_6964_6f63_6e65 ? 26 : 0 // content-encoding
        default: return 0
        }
    }

    /// `:status` (a static-table index when the table has the code, else a literal
    /// without indexing), after a table-size update that is due: at most 9 bytes.
    @inline(__always)
    mutating func writeStatus(_ status: Int, _ w: inout HPACKRawWriter) {
        table.startBlock(&w)
        if let index = Self.statusIndex(status) {
            w.byte(0x80 | index)
        } else {
            w.byte(0x08) // literal without indexing, name :status (index 8)
            w.decimal(Int64(status))
        }
    }

    /// An interim response's block (100 Continue): `:status` alone.
    mutating func writeStatus(_ status: Int, into b: inout ByteBuffer) {
        HPACKRawWriter.write(into: &b, bound: 32) { w in writeStatus(status, &w) }
    }

    /// A trailers block: literal fields without indexing (credentials never indexed),
    /// after a table-size update that is due.
    mutating func writeTrailers(_ t: HTTPTrailers, into b: inout ByteBuffer) {
        Self.writeTrailers(t, table: &table, into: &b)
    }

    /// A trailers block (of a response or, from the upstream client, a request).
    static func writeTrailers(_ t: HTTPTrailers, table: inout HPACKEncoderTable, into b: inout ByteBuffer) {
        HPACKRawWriter.write(into: &b, bound: 5 + HPACKRawWriter.bound(t.fields)) { w in
            table.startBlock(&w)
            writeLiterals(t.fields, lowercase: true, &w)
        }
    }

    /// Literal fields without indexing, new names (`lowercase`: names folded).
    @inline(__always)
    static func writeLiterals(_ fields: [HeaderLine], lowercase: Bool, _ w: inout HPACKRawWriter) {
        for f in fields { writeLiteral(f, lowercase: lowercase, &w) }
    }

    /// One field as a literal without indexing, new name (credentials never indexed).
    @inline(__always)
    static func writeLiteral(_ f: HeaderLine, lowercase: Bool, _ w: inout HPACKRawWriter) {
        w.byte(HPACKRawWriter.literalFlag(f.name))
        w.string(f.name, lowercase: lowercase)
        f.withValueBytes { w.string($0, lowercase: false) }
    }

    /// One field a filter or the proxy added (lowercase name): a metadata exchange
    /// header through the dynamic table, any other as a literal without indexing.
    @inline(__always)
    static func writeAdded(_ f: HeaderLine, table: inout HPACKEncoderTable, _ w: inout HPACKRawWriter) {
        if HPACKEncoderTable.indexes(f.name) { table.write(name: f.name, value: f.value, &w) } else { writeLiteral(f, lowercase: true, &w) }
    }

    /// The fields filters and the proxy added (lowercase names): the metadata exchange
    /// headers through the dynamic table, the others as literals without indexing.
    @inline(__always)
    static func writeAdded(_ fields: [HeaderLine], table: inout HPACKEncoderTable, _ w: inout HPACKRawWriter) {
        for f in fields { writeAdded(f, table: &table, &w) }
    }

    /// Writes `:status` and the head's fields as HTTP/2 allows them (see
    /// HTTPHead.isHTTP2Forbidden), then the fields filters added, then `server` when
    /// `server` is given. `headerOnly`: the block ends the stream, and a `content-length: 0`
    /// says nothing END_STREAM does not: it is left out (an HTTP/2 upstream's header-only
    /// response, gRPC's trailers-only one, reaches the proxy as HTTP/1.1 with that field
    /// added, which the client would otherwise see among its metadata).
    mutating func write(_ head: HTTPHead, server: String?, headerOnly: Bool = false, into b: inout ByteBuffer) {
        let bound = 32 + head.bytes.readableBytes + 8 * head.fields.count + HPACKRawWriter.bound(head.added)
            + (server.map { $0.utf8.count + 8 } ?? 0)
        HPACKRawWriter.write(into: &b, bound: bound) { w in
            writeStatus(head.status, &w)
            head.bytes.withUnsafeReadableBytes { raw in
                for i in 0..<head.fields.count where !head.fields[i].removed && !head.isHTTP2Forbidden(i, isRequest: false) {
                    let f = head.fields[i]
                    if headerOnly && f.kind == .contentLength && f.valueLength == 1 && raw[Int(f.valueStart)] == UInt8(ascii: "0") { continue }
                    let name = UnsafeRawBufferPointer(rebasing: raw[Int(f.nameStart)..<Int(f.nameStart + f.nameLength)])
                    let index = Self.nameIndex(f.kind, name)
                    if index > 0 {
                        w.integer(index, prefix: 4, flags: 0)
                    } else {
                        w.byte(HPACKRawWriter.literalFlag(name))
                        w.string(name, lowercase: true)
                    }
                    w.string(UnsafeRawBufferPointer(rebasing: raw[Int(f.valueStart)..<Int(f.valueStart + f.valueLength)]), lowercase: false)
                }
            }
            Self.writeAdded(head.added, table: &table, &w)
            if let server {
                w.integer(54, prefix: 4, flags: 0)
                w.string(server, lowercase: false)
            }
        }
    }
}
