import NIOCore

/// A header block HPACK cannot decode (RFC 7541): the connection ends with
/// COMPRESSION_ERROR, as the decoder's tables can no longer agree with the peer's.
struct HPACKDecodingError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Receives a header block's fields in order, as HPACKBlockDecoder decodes them. `name`
/// and `value` point into the block, the decoder's tables or its Huffman scratch: they
/// are valid during the call only (copy what must outlive it). Nothing is checked but
/// HPACK's own rules: names and values are the peer's bytes.
protocol HPACKFieldSink {
    mutating func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)
}

/// A sink that drops every field: a block that must be decoded (HPACK's dynamic table
/// depends on every block) for a stream that will not use it.
struct HPACKDiscardingSink: HPACKFieldSink {
    @inline(__always)
    mutating func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) {}
}

/// Moonlet's HPACK decoder (RFC 7541), one per HTTP/2 connection and direction: header
/// blocks are decoded into fields handed over as raw bytes, with no String, no
/// HPACKHeaders and no allocation per field (NIOHPACK's decoder made two Strings per
/// field, a tenth of an HTTP/2 request's instructions through a sidecar).
///
/// Everything of RFC 7541: indexed fields, literals with, without and never indexing,
/// the static table (Appendix A), the dynamic table with its size accounting (32 +
/// name + value per entry, §4.1) and eviction (§4.4), table size updates (at the start
/// of a block only, at most two, at most `maxTableSize`: our SETTINGS_HEADER_TABLE_SIZE,
/// which neither Moonlet side advertises, so 4096, the protocol's default), integers with
/// an overflow bound (§5.1), Huffman-coded strings (Appendix B) by a 4-bit state machine
/// built once from the code table, as nghttp2's: padding of at most 7 bits, all ones, and
/// EOS in a string is an error (§5.2). A decoded header list larger than
/// `maxHeaderListSize` (32 + name + value per field, as SETTINGS_MAX_HEADER_LIST_SIZE
/// counts it) is an error too. Every error is a connection error: the caller sends
/// GOAWAY COMPRESSION_ERROR.
///
/// The dynamic table's bytes live in one block of twice the table's size: entries are
/// appended, eviction moves the start, and the live bytes are moved back to the front
/// when an entry does not fit behind them (at most once per table's worth of entries).
final class HPACKBlockDecoder {
    /// SETTINGS_HEADER_TABLE_SIZE's default (RFC 9113 §6.5.2), what both Moonlet
    /// sides leave it at.
    static let defaultTableSize = 4096

    /// The largest table size update accepted (our SETTINGS_HEADER_TABLE_SIZE).
    let maxTableSize: Int
    /// The largest decoded header list (32 + name + value per field).
    let maxHeaderListSize: Int
    /// The table's size bound, as the peer's last size update set it.
    private(set) var capacity: Int
    /// The entries' size (32 + name + value each).
    private(set) var size = 0
    /// The number of entries in the dynamic table.
    private(set) var count = 0

    typealias Entry = (start: Int32, nameLength: Int32, valueLength: Int32)
    /// The entries' bytes: [0, 2 * maxTableSize) for the table, then maxTableSize to
    /// move a name aside while the table is compacted.
    private let store: UnsafeMutableRawPointer
    private var liveStart = 0, liveEnd = 0
    /// The entries, a ring: `oldest` is the oldest one's slot.
    private let entries: UnsafeMutablePointer<Entry>
    private let entryCapacity: Int
    private var oldest = 0
    /// Huffman-decoded names and values of the field being decoded.
    private var scratch: UnsafeMutableRawPointer
    private var scratchCapacity: Int
    private let tables = HPACKTables.shared

    init(maxTableSize: Int = HPACKBlockDecoder.defaultTableSize, maxHeaderListSize: Int) {
        self.maxTableSize = maxTableSize
        self.maxHeaderListSize = maxHeaderListSize
        capacity = maxTableSize
        store = .allocate(byteCount: 3 * max(maxTableSize, 1), alignment: 8)
        entryCapacity = maxTableSize / 32 + 1
        entries = .allocate(capacity: entryCapacity)
        scratchCapacity = 1024
        scratch = .allocate(byteCount: scratchCapacity, alignment: 8)
    }

    deinit {
        store.deallocate()
        entries.deallocate()
        scratch.deallocate()
    }

    /// Decodes one complete header block, handing each field to `sink` in order. Throws
    /// HPACKDecodingError when the block is malformed (the table is then out of step
    /// with the peer's: the connection must end).
    func decode<S: HPACKFieldSink>(_ block: ByteBuffer, into sink: inout S) throws {
        try block.withUnsafeReadableBytes { try decode($0, into: &sink) }
    }

    func decode<S: HPACKFieldSink>(_ block: UnsafeRawBufferPointer, into sink: inout S) throws {
        guard let base = block.baseAddress, block.count > 0 else { return }
        let end = block.count
        // A Huffman string of n bytes decodes to at most 8n/5 (the shortest code has 5 bits).
        if scratchCapacity < 2 * end + 16 {
            scratch.deallocate()
            scratchCapacity = 2 * end + 16
            scratch = .allocate(byteCount: scratchCapacity, alignment: 8)
        }
        var p = 0
        var listSize = 0
        var fieldsSeen = false
        var updates = 0
        while p < end {
            let b = base.load(fromByteOffset: p, as: UInt8.self)
            if b & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = try Self.integer(base, &p, end, prefix: 7)
                let (name, value) = try entry(index)
                listSize += 32 + name.count + value.count
                guard listSize <= maxHeaderListSize else { throw HPACKDecodingError("header list larger than \(maxHeaderListSize) bytes") }
                fieldsSeen = true
                sink.field(name: name, value: value)
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): at the start of a block only (§4.2).
                guard !fieldsSeen else { throw HPACKDecodingError("dynamic table size update after a field") }
                updates += 1
                guard updates <= 2 else { throw HPACKDecodingError("more than two dynamic table size updates") }
                let newSize = try Self.integer(base, &p, end, prefix: 5)
                guard newSize <= maxTableSize else {
                    throw HPACKDecodingError("dynamic table size update to \(newSize), above SETTINGS_HEADER_TABLE_SIZE \(maxTableSize)")
                }
                capacity = newSize
                while size > capacity { evictOldest() }
            } else {
                // Literal with incremental indexing (§6.2.1), without indexing (§6.2.2) or
                // never indexed (§6.2.3).
                let indexing = b & 0x40 != 0
                let index = try Self.integer(base, &p, end, prefix: indexing ? 6 : 4)
                var used = 0
                let name = index == 0 ? try string(base, &p, end, &used) : try entry(index).name
                let value = try string(base, &p, end, &used)
                listSize += 32 + name.count + value.count
                guard listSize <= maxHeaderListSize else { throw HPACKDecodingError("header list larger than \(maxHeaderListSize) bytes") }
                fieldsSeen = true
                if indexing {
                    let added = insert(name: name, value: value)
                    sink.field(name: added.name, value: added.value)
                } else {
                    sink.field(name: name, value: value)
                }
            }
        }
    }

    // MARK: primitives

    /// An integer with an N-bit prefix (§5.1), at most 2^28 + 2^N - 2: no length or
    /// index beyond that is meaningful, and the bound keeps it from overflowing.
    @inline(__always)
    static func integer(_ base: UnsafeRawPointer, _ p: inout Int, _ end: Int, prefix: Int) throws -> Int {
        let mask = (1 << prefix) - 1
        var v = Int(base.load(fromByteOffset: p, as: UInt8.self)) & mask
        p += 1
        if v < mask { return v }
        var shift = 0
        while true {
            guard p < end else { throw HPACKDecodingError("truncated integer") }
            let c = Int(base.load(fromByteOffset: p, as: UInt8.self))
            p += 1
            v += (c & 0x7f) << shift
            if c & 0x80 == 0 { return v }
            shift += 7
            guard shift <= 21 else { throw HPACKDecodingError("integer too large") }
        }
    }

    /// A string literal (§5.2): the block's bytes, or its Huffman decoding in the scratch
    /// (from `used`, which grows by the decoded length).
    @inline(__always)
    func string(_ base: UnsafeRawPointer, _ p: inout Int, _ end: Int, _ used: inout Int) throws -> UnsafeRawBufferPointer {
        guard p < end else { throw HPACKDecodingError("truncated field") }
        let huffman = base.load(fromByteOffset: p, as: UInt8.self) & 0x80 != 0
        let length = try Self.integer(base, &p, end, prefix: 7)
        guard length <= end - p else { throw HPACKDecodingError("string literal beyond the header block") }
        let start = base + p
        p += length
        guard huffman else { return UnsafeRawBufferPointer(start: start, count: length) }
        let out = scratch + used
        let n = try Self.huffmanDecode(start, length, into: out, fsm: tables.fsm)
        used += n
        return UnsafeRawBufferPointer(start: out, count: n)
    }

    /// Decodes `length` Huffman-coded bytes into `out` (room for 8 * length / 5 bytes),
    /// a nibble at a time; returns the decoded length.
    static func huffmanDecode(_ src: UnsafeRawPointer, _ length: Int, into out: UnsafeMutableRawPointer, fsm: UnsafePointer<UInt32>) throws -> Int {
        var state = 0
        var accept = true
        var k = 0
        for i in 0..<length {
            let c = Int(src.load(fromByteOffset: i, as: UInt8.self))
            let high = fsm[state << 4 | c >> 4]
            if high & (HPACKTables.fail | HPACKTables.emit) != 0 {
                if high & HPACKTables.fail != 0 { throw HPACKDecodingError("EOS in a Huffman-coded string") }
                out.storeBytes(of: UInt8(truncatingIfNeeded: high >> 8), toByteOffset: k, as: UInt8.self)
                k += 1
            }
            let low = fsm[Int(high & 0xff) << 4 | c & 0xf]
            if low & (HPACKTables.fail | HPACKTables.emit) != 0 {
                if low & HPACKTables.fail != 0 { throw HPACKDecodingError("EOS in a Huffman-coded string") }
                out.storeBytes(of: UInt8(truncatingIfNeeded: low >> 8), toByteOffset: k, as: UInt8.self)
                k += 1
            }
            state = Int(low & 0xff)
            accept = low & HPACKTables.accept != 0
        }
        guard accept else { throw HPACKDecodingError("bad Huffman padding") }
        return k
    }

    /// The ring slot of position `i` (below 2 * entryCapacity: `oldest` is a slot and
    /// `count` is below entryCapacity, as every entry takes 32 bytes of the table's size),
    /// by a compare, not a division (a divide per indexed field, some 25 cycles).
    @inline(__always)
    private func slot(_ i: Int) -> Int { i >= entryCapacity ? i - entryCapacity : i }

    /// Field `index` of the static table (1...61) or the dynamic table (62..., newest first).
    @inline(__always)
    func entry(_ index: Int) throws -> (name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) {
        if index >= 1 && index <= HPACKTables.staticCount {
            let e = tables.staticEntries[index - 1]
            let s = UnsafeRawPointer(tables.staticBytes) + Int(e.start)
            return (UnsafeRawBufferPointer(start: s, count: Int(e.nameLength)), UnsafeRawBufferPointer(start: s + Int(e.nameLength), count: Int(e.valueLength)))
        }
        let d = index - HPACKTables.staticCount - 1
        guard index > 0 else { throw HPACKDecodingError("index 0") }
        guard d < count else { throw HPACKDecodingError("index \(index) beyond the tables") }
        let e = entries[slot(oldest + count - 1 - d)]
        let s = UnsafeRawPointer(store) + Int(e.start)
        return (UnsafeRawBufferPointer(start: s, count: Int(e.nameLength)), UnsafeRawBufferPointer(start: s + Int(e.nameLength), count: Int(e.valueLength)))
    }

    /// Adds a field to the dynamic table (§4.4): older entries are evicted until it fits;
    /// one larger than the table empties it and is not added. Returns the field's bytes
    /// (in the table when added).
    func insert(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) -> (name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) {
        let n = name.count, v = value.count
        let need = 32 + n + v
        guard need <= capacity else {
            while count > 0 { evictOldest() }
            return (name, value)
        }
        while size + need > capacity { evictOldest() }
        var nameBytes = name.baseAddress
        if liveEnd + n + v > 2 * maxTableSize {
            // The name may be an entry's (an indexed name, evicted or not): moved aside
            // before the live bytes move to the front.
            if let nb = nameBytes, nb >= UnsafeRawPointer(store), nb < UnsafeRawPointer(store) + 2 * maxTableSize {
                let aside = store + 2 * maxTableSize
                aside.copyMemory(from: nb, byteCount: n)
                nameBytes = UnsafeRawPointer(aside)
            }
            let live = liveEnd - liveStart
            if live > 0 { store.copyMemory(from: store + liveStart, byteCount: live) }
            for j in 0..<count {
                entries[slot(oldest + j)].start -= Int32(liveStart)
            }
            liveStart = 0
            liveEnd = live
        }
        let s = store + liveEnd
        if n > 0, let nb = nameBytes { s.copyMemory(from: nb, byteCount: n) }
        if v > 0, let vb = value.baseAddress { (s + n).copyMemory(from: vb, byteCount: v) }
        entries[slot(oldest + count)] = (Int32(liveEnd), Int32(n), Int32(v))
        count += 1
        size += need
        liveEnd += n + v
        return (UnsafeRawBufferPointer(start: s, count: n), UnsafeRawBufferPointer(start: s + n, count: v))
    }

    func evictOldest() {
        let e = entries[oldest]
        size -= 32 + Int(e.nameLength) + Int(e.valueLength)
        oldest = slot(oldest + 1)
        count -= 1
        if count == 0 {
            liveStart = 0
            liveEnd = 0
        } else {
            liveStart = Int(entries[oldest].start)
        }
    }

    /// The dynamic table's entries, newest first (tests).
    var dynamicEntries: [(name: String, value: String)] {
        (0..<count).map { d in
            let f = try! entry(HPACKTables.staticCount + 1 + d)
            return (String(decoding: f.name, as: UTF8.self), String(decoding: f.value, as: UTF8.self))
        }
    }
}

/// HPACK's constant tables, built once: the static table (RFC 7541 Appendix A) as bytes,
/// and the Huffman decoding state machine (Appendix B): for each of the code tree's 256
/// inner nodes and each 4-bit input, the next node, the symbol completed on the way (at
/// most one: the shortest code has 5 bits), whether it went through EOS, and whether
/// stopping there is valid padding (at most 7 bits, all ones).
final class HPACKTables: @unchecked Sendable {
    static let shared = HPACKTables()
    static let staticCount = 61
    static let emit: UInt32 = 1 << 16, fail: UInt32 = 1 << 17, accept: UInt32 = 1 << 18

    let staticBytes: UnsafeMutableRawPointer
    let staticEntries: UnsafeMutablePointer<HPACKBlockDecoder.Entry>
    let fsm: UnsafeMutablePointer<UInt32>

    init() {
        let table = Self.staticTable
        let total = table.reduce(0) { $0 + $1.0.utf8.count + $1.1.utf8.count }
        staticBytes = .allocate(byteCount: total, alignment: 8)
        staticEntries = .allocate(capacity: table.count)
        var at = 0
        for (i, (name, value)) in table.enumerated() {
            let start = at
            for c in name.utf8 { staticBytes.storeBytes(of: c, toByteOffset: at, as: UInt8.self); at += 1 }
            for c in value.utf8 { staticBytes.storeBytes(of: c, toByteOffset: at, as: UInt8.self); at += 1 }
            staticEntries[i] = (Int32(start), Int32(name.utf8.count), Int32(value.utf8.count))
        }

        // The code tree: node 0 the root; children[2n], children[2n+1]; symbol of a leaf.
        var children = [Int](repeating: -1, count: 2 * 513)
        var symbol = [Int](repeating: -1, count: 513) // 256 inner nodes, 257 leaves
        var nodes = 1
        for sym in 0..<Self.huffmanCodes.count {
            let code = Self.huffmanCodes[sym], length = Int(Self.huffmanLengths[sym])
            var n = 0
            for bit in stride(from: length - 1, through: 0, by: -1) {
                let b = Int(code >> UInt32(bit)) & 1
                if children[2 * n + b] < 0 { children[2 * n + b] = nodes; nodes += 1 }
                n = children[2 * n + b]
            }
            symbol[n] = sym
        }
        // Inner nodes numbered as states (root 0); whether each is on EOS's all-ones path
        // within 7 bits of the last symbol.
        var state = [Int](repeating: -1, count: nodes)
        var inner: [Int] = []
        var onesDepth = [Int](repeating: -1, count: nodes) // -1: not all ones
        onesDepth[0] = 0
        for n in 0..<nodes where symbol[n] < 0 {
            state[n] = inner.count
            inner.append(n)
        }
        // Nodes are numbered in creation order: a parent before its children.
        for n in 0..<nodes where symbol[n] < 0 && onesDepth[n] >= 0 {
            let one = children[2 * n + 1]
            if one >= 0 { onesDepth[one] = onesDepth[n] + 1 }
        }
        precondition(inner.count == 256, "HPACK Huffman tree: \(inner.count) inner nodes")
        fsm = .allocate(capacity: 256 * 16)
        for (s, node) in inner.enumerated() {
            for nibble in 0..<16 {
                var n = node
                var e: UInt32 = 0
                for bit in stride(from: 3, through: 0, by: -1) {
                    n = children[2 * n + (nibble >> bit) & 1]
                    if symbol[n] >= 0 {
                        if symbol[n] == 256 { e |= Self.fail; n = 0; break }
                        e |= Self.emit | UInt32(symbol[n]) << 8
                        n = 0
                    }
                }
                e |= UInt32(state[n])
                if onesDepth[n] >= 0 && onesDepth[n] <= 7 { e |= Self.accept }
                fsm[s * 16 + nibble] = e
            }
        }
    }

    /// RFC 7541 Appendix A.
    static let staticTable: [(String, String)] = [
        (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
        (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
        (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
        ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""), ("cache-control", ""),
        ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
        ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""), ("date", ""),
        ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""), ("if-match", ""),
        ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""), ("if-unmodified-since", ""),
        ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""), ("proxy-authenticate", ""),
        ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""),
        ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
        ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
    ]

    /// RFC 7541 Appendix B: each symbol's code (0-255, then EOS), right-aligned, and its length in bits.
    static let huffmanCodes: [UInt32] = [
        0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7,
        0xfffffe8, 0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec,
        0xfffffed, 0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3,
        0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb,
        0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa,
        0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
        0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d,
        0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb, 0x3fc,
        0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62,
        0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a,
        0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72,
        0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0, 0x1ffc, 0x3ffc, 0x22,
        0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26,
        0x27, 0x6, 0x74, 0x75, 0x28, 0x29, 0x2a, 0x7,
        0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78,
        0x79, 0x7a, 0x7b, 0x7ffe, 0x7fc, 0x3ffd, 0x1ffd, 0xffffffc,
        0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4, 0x3fffd5, 0x7fffd9,
        0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf,
        0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
        0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef,
        0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde,
        0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec,
        0x1fffe0, 0x1fffe1, 0x3fffe0, 0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef,
        0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4, 0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1,
        0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7, 0x7ffff2, 0x3fffe8, 0x1ffffec,
        0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf, 0x3ffffe5, 0xfffff1, 0x1ffffed,
        0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2,
        0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5,
        0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
        0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4,
        0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea,
        0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
        0x3fffffff,
    ]
    static let huffmanLengths: [UInt8] = [
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
        28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
        5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7,
        7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
        15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7,
        7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
        24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21,
        23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
        26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24,
        21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
        26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
    ]
}
