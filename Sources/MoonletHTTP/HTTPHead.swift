import NIOCore

/// One header line of a parsed head, as offsets into ``HTTPHead/bytes``.
public struct HTTPField: Sendable {
    public var nameStart: Int32
    public var nameLength: Int32
    public var valueStart: Int32
    public var valueLength: Int32
    /// Start and end (exclusive, after CRLF) of the whole line, for verbatim copying.
    public var lineStart: Int32
    public var lineEnd: Int32
    /// What the parser recognised the name as.
    public var kind: KnownHeader = .other
    /// Removed by an edit or by hop-by-hop stripping (the line is not written out).
    public var removed = false
}

/// Known header names the parser classifies while it scans, so framing and proxy
/// semantics never compare strings twice.
public enum KnownHeader: UInt8, Sendable {
    case other, contentLength, transferEncoding, connection, host, keepAlive, te, upgrade,
         proxyConnection, proxyAuthenticate, proxyAuthorization, expect, xForwardedFor, xRequestID,
         trailer, server, xForwardedProto, xForwardedClientCert
}

/// A header line an edit added to a head, or a trailer field (name lowercase). A struct,
/// not a `(name, value)` tuple: an array of tuples is destroyed element by element
/// through the generic tuple witness (about 250 instructions a line on every request).
///
/// The value is a String, or ids kept as numbers and written as lowercase hex where the
/// line is written (`init(_:hex:)`, `init(_:hex:_:)`, `init(_:traceparent:_:span:sampled:)`,
/// `init(_:uuid:_:)`): the x-request-id the proxy makes and the trace headers the tracing
/// filter adds per request cost no String (allocation, UTF-8 check, release). Hot paths read a value with `valueByteCount` and `withValueBytes`;
/// `value` makes a String of an id form when asked.
public struct HeaderLine: Sendable, Equatable {
    public var name: String
    @usableFromInline enum Storage: Sendable {
        case text(String)
        /// 16 hex digits.
        case hex64(UInt64)
        /// 32 hex digits (high, low).
        case hex128(UInt64, UInt64)
        /// W3C traceparent version 00: `00-` 32 digits `-` 16 digits `-0X` (55 bytes).
        case traceparent(UInt64, UInt64, UInt64, Bool)
        /// A version 4 UUID from 128 random bits (`Hex.uuidV4`, 36 bytes).
        case uuid(UInt64, UInt64)
    }
    @usableFromInline var storage: Storage

    @inlinable public init(name: String, value: String) { self.name = name; storage = .text(value) }
    @inlinable public init(_ name: String, _ value: String) { self.name = name; storage = .text(value) }
    /// A line whose value is the 16 lowercase hex digits of `v` (a B3 span id).
    @inlinable public init(_ name: String, hex v: UInt64) { self.name = name; storage = .hex64(v) }
    /// A line whose value is the 32 lowercase hex digits of `high` and `low` (a 128-bit trace id).
    @inlinable public init(_ name: String, hex high: UInt64, _ low: UInt64) { self.name = name; storage = .hex128(high, low) }
    /// A W3C traceparent line (version 00): `00-TRACEID-SPANID-FLAGS`, flags 01 when sampled.
    @inlinable public init(_ name: String, traceparent high: UInt64, _ low: UInt64, span: UInt64, sampled: Bool) {
        self.name = name; storage = .traceparent(high, low, span, sampled)
    }

    /// A line whose value is the version 4 UUID `Hex.uuidV4(random1, random2)` (x-request-id).
    @inlinable public init(_ name: String, uuid random1: UInt64, _ random2: UInt64) { self.name = name; storage = .uuid(random1, random2) }

    /// The value as a String (an id form is written out into one).
    public var value: String {
        @inlinable get {
            if case .text(let s) = storage { return s }
            return String(unsafeUninitializedCapacity: valueByteCount) { out in
                writeValue(to: UnsafeMutableRawPointer(out.baseAddress!))
            }
        }
        @inlinable set { storage = .text(newValue) }
    }

    /// The value's length in UTF-8 bytes (no copy).
    @inlinable public var valueByteCount: Int {
        switch storage {
        case .text(let s): return s.utf8.count
        case .hex64: return 16
        case .hex128: return 32
        case .traceparent: return 55
        case .uuid: return 36
        }
    }

    @inlinable public var valueIsEmpty: Bool {
        if case .text(let s) = storage { return s.isEmpty }
        return false
    }

    /// Writes an id form's bytes at `p` (room for `valueByteCount`); returns how many.
    /// A text value is not written (0).
    @inlinable @inline(__always)
    public func writeValue(to p: UnsafeMutableRawPointer) -> Int {
        switch storage {
        case .text: return 0
        case .hex64(let v): Hex.write16(v, to: p); return 16
        case .hex128(let hi, let lo): Hex.write16(hi, to: p); Hex.write16(lo, to: p + 16); return 32
        case .traceparent(let hi, let lo, let span, let sampled):
            p.storeBytes(of: 0x30, as: UInt8.self); p.storeBytes(of: 0x30, toByteOffset: 1, as: UInt8.self)
            p.storeBytes(of: 0x2D, toByteOffset: 2, as: UInt8.self)
            Hex.write16(hi, to: p + 3); Hex.write16(lo, to: p + 19)
            p.storeBytes(of: 0x2D, toByteOffset: 35, as: UInt8.self)
            Hex.write16(span, to: p + 36)
            p.storeBytes(of: 0x2D, toByteOffset: 52, as: UInt8.self); p.storeBytes(of: 0x30, toByteOffset: 53, as: UInt8.self)
            p.storeBytes(of: sampled ? 0x31 : 0x30, toByteOffset: 54, as: UInt8.self)
            return 55
        case .uuid(let a, let b): Hex.writeUUIDv4(a, b, to: p); return 36
        }
    }

    /// Calls `body` with the value's UTF-8 bytes: a text value read in place when the
    /// String is native, an id form written on the stack.
    @inlinable @inline(__always)
    public func withValueBytes(_ body: (UnsafeRawBufferPointer) -> Void) {
        if case .text(let s) = storage {
            if s.utf8.withContiguousStorageIfAvailable({ body(UnsafeRawBufferPointer($0)) }) != nil { return }
            var copy = s
            copy.withUTF8 { body(UnsafeRawBufferPointer($0)) }
            return
        }
        withUnsafeTemporaryAllocation(byteCount: 64, alignment: 8) { buf in
            let n = writeValue(to: buf.baseAddress!)
            body(UnsafeRawBufferPointer(start: buf.baseAddress!, count: n))
        }
    }

    /// Whether a line's name can be read in place as `InlineUTF8` words from the line's
    /// address (the name is the struct's first field and Strings have that layout).
    public static let inlineNames: Bool = InlineUTF8.isAvailable && MemoryLayout<HeaderLine>.offset(of: \HeaderLine.name) == 0

    /// Where a text value's String lies in a line (the storage's payload, at the start
    /// of the enum), checked on a line made at run time; -1 when it is not found there
    /// (callers then read the value through the enum).
    @usableFromInline static let inlineTextOffset: Int = {
        guard inlineNames, let at = MemoryLayout<HeaderLine>.offset(of: \HeaderLine.storage) else { return -1 }
        var line = HeaderLine("a", String(decoding: [0x78, 0x79, 0x7A] as [UInt8], as: UTF8.self))
        let ok = withUnsafeBytes(of: &line) { raw -> Bool in
            guard at + 16 <= raw.count else { return false }
            let w = InlineUTF8.words(at: raw.baseAddress! + at)
            return w.0 == 0x7A_7978 && w.1 == 0xE3 << 56
        }
        return ok ? at : -1
    }()

    /// Whether this line's value is text (no copy of the value).
    @inlinable @inline(__always)
    public var isText: Bool { if case .text = storage { return true } else { return false } }

    public static func == (a: HeaderLine, b: HeaderLine) -> Bool {
        guard a.name == b.name else { return false }
        if case .text(let x) = a.storage, case .text(let y) = b.storage { return x == y }
        var same = false
        a.withValueBytes { x in b.withValueBytes { y in same = x.elementsEqual(y) } }
        return same
    }
}

/// ASCII case folding eight bytes at a time.
public enum ASCIIWords {
    /// `w` with every ASCII uppercase letter lowercased: bit 7 of a lane is set where
    /// its byte is 0x41...0x5a (computed on the low 7 bits with no carry between lanes,
    /// bytes from 0x80 up left out), and 0x20 is or-ed there.
    @inlinable @inline(__always)
    public static func lowercased(_ w: UInt64) -> UInt64 {
        let low = w & 0x7f7f_7f7f_7f7f_7f7f
        let upper = (low &+ 0x3f3f_3f3f_3f3f_3f3f) & ~(low &+ 0x2525_2525_2525_2525) & ~w & 0x8080_8080_8080_8080
        return w | (upper >> 2)
    }

    /// Whether the `n` bytes at `a`, ASCII-lowercased, are the `n` bytes at `lower`
    /// (already lowercase): a word at a time, the last one overlapping.
    @inlinable @inline(__always)
    public static func equalLowercased(_ a: UnsafeRawPointer, _ lower: UnsafeRawPointer, _ n: Int) -> Bool {
        if n >= 8 {
            var i = 0
            while i &+ 8 <= n {
                if lowercased(a.loadUnaligned(fromByteOffset: i, as: UInt64.self)) != lower.loadUnaligned(fromByteOffset: i, as: UInt64.self) { return false }
                i &+= 8
            }
            return i == n || lowercased(a.loadUnaligned(fromByteOffset: n &- 8, as: UInt64.self)) == lower.loadUnaligned(fromByteOffset: n &- 8, as: UInt64.self)
        }
        var i = 0
        while i < n {
            var c = a.load(fromByteOffset: i, as: UInt8.self)
            if c &- 65 < 26 { c |= 0x20 }
            if c != lower.load(fromByteOffset: i, as: UInt8.self) { return false }
            i &+= 1
        }
        return true
    }
}

/// The form of a request target (RFC 9112 §3.2).
public enum RequestTargetForm: UInt8, Sendable {
    /// `/path?query`: the only form sent upstream.
    case origin
    /// `http://authority/path?query`: the authority replaces Host, the path is sent.
    case absolute
    /// `host:port`, CONNECT only.
    case authority
    /// `*`, OPTIONS only.
    case asterisk
}

/// Why a head was refused. `status` is the HTTP status a server answers with.
public struct HTTPParseError: Error, Equatable, Sendable, CustomStringConvertible {
    public var status: Int
    public var reason: String
    public init(_ status: Int, _ reason: String) { self.status = status; self.reason = reason }
    public var description: String { "\(status): \(reason)" }
}

/// How a message body is delimited (RFC 9112 §6.3).
public enum BodyFraming: Equatable, Sendable {
    case none
    case contentLength(Int64)
    case chunked
    /// Response only: body runs until the upstream closes the connection.
    case untilClose
}

/// A request or response head parsed in place: every name and value is a range of
/// `bytes`, nothing is copied into Strings unless asked for. Edits made by filters are
/// recorded beside the original (removed lines, added lines) and spliced in when
/// the head is written out again.
public struct HTTPHead: Sendable {
    /// The head exactly as received, from the first byte of the start line to the
    /// CRLF that ends the header section (inclusive). Reader index is 0.
    public var bytes: ByteBuffer
    public var isRequest: Bool
    public var methodRange: Range<Int> = 0..<0
    public var targetRange: Range<Int> = 0..<0
    public var status: Int = 0
    public var reasonRange: Range<Int> = 0..<0
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    public var versionMinor: Int = 1
    /// Header lines in order (one allocation per head: kind and removal live in the field).
    public var fields: [HTTPField] = []
    /// Lines added by edits, written after the kept original lines. Names are stored
    /// lowercased (HTTP/2 style), so lookups compare without folding.
    public var added: [HeaderLine] = []
    /// How many lines and bytes (names and values) `added` held when the filter chain
    /// started: the proxy's own lines (x-forwarded-for, the XFCC chain, sized by the
    /// client) do not count against what filters may add.
    public var addedBeforeFilters = 0
    public var addedBytesBeforeFilters = 0
    /// Replacement request target (rewrite), if any.
    public var targetOverride: String? = nil
    public var framing: BodyFraming = .none
    /// Connection semantics of the message: false when it carried "Connection: close"
    /// (or HTTP/1.0 without keep-alive).
    public var keepAlive: Bool = true
    public var expectContinue: Bool = false
    /// Header names listed in Connection (lowercased), hop-by-hop by RFC 9110 §7.6.1.
    public var connectionTokens: [String] = []
    public var hostIndex: Int = -1
    public var isHead: Bool = false
    /// Form of the request target; for `.absolute`, where its authority and its path
    /// (with the query; empty when the URI has none) are in `bytes`.
    public var targetForm: RequestTargetForm = .origin
    public var targetAuthorityRange: Range<Int> = 0..<0
    public var targetPathRange: Range<Int> = 0..<0
    /// Whether some header name has an underscore (the parser notes it in its name scan).
    public var underscoreInName = false

    public init(bytes: ByteBuffer, isRequest: Bool) {
        self.bytes = bytes
        self.isRequest = isRequest
    }

    @inline(__always)
    public func string(_ r: Range<Int>) -> String {
        bytes.getString(at: r.lowerBound, length: r.count) ?? ""
    }

    public var method: String { string(methodRange) }
    /// The Host value, edits included ("" when there is none).
    public var host: String {
        if hostIndex >= 0 && !fields[hostIndex].removed { return value(at: hostIndex) }
        return first("host") ?? ""
    }
    public var target: String { targetOverride ?? string(targetRange) }
    /// The request target as received, before any rewrite.
    public var originalTarget: String { string(targetRange) }
    public var reason: String { string(reasonRange) }

    public func name(at i: Int) -> String {
        let f = fields[i]; return bytes.getString(at: Int(f.nameStart), length: Int(f.nameLength)) ?? ""
    }
    /// Field `i`'s name in lowercase ASCII (HTTP/2 wants lowercase names).
    public func lowercasedName(at i: Int) -> String {
        let f = fields[i]
        return bytes.withUnsafeReadableBytes { raw in
            HTTPHeadParser.lowercasedString(raw, Int(f.nameStart), Int(f.nameStart + f.nameLength))
        }
    }
    public func value(at i: Int) -> String {
        let f = fields[i]; return bytes.getString(at: Int(f.valueStart), length: Int(f.valueLength)) ?? ""
    }

    /// Compares field `i`'s name with an already-lowercased ASCII name, case-insensitively.
    @inline(__always)
    public func nameEquals(_ i: Int, lowercased name: UnsafeRawBufferPointer) -> Bool {
        let f = fields[i]
        guard Int(f.nameLength) == name.count else { return false }
        return bytes.withUnsafeReadableBytes { raw in
            var k = 0
            let base = Int(f.nameStart)
            while k < name.count {
                var c = raw[base + k]
                if c >= 65 && c <= 90 { c |= 0x20 }
                if c != name[k] { return false }
                k += 1
            }
            return true
        }
    }

    public func nameEquals(_ i: Int, lowercased name: String) -> Bool {
        var n = name
        return n.withUTF8 { nameEquals(i, lowercased: UnsafeRawBufferPointer($0)) }
    }

    /// Index of the first live (not removed) original field named `lowercased`.
    public func firstIndex(lowercased name: String) -> Int? {
        var n = name
        return n.withUTF8 { p -> Int? in
            let raw = UnsafeRawBufferPointer(p)
            for i in 0..<fields.count where !fields[i].removed && nameEquals(i, lowercased: raw) { return i }
            return nil
        }
    }

    /// First value of a header (edits included), for a name given as lowercase ASCII
    /// bytes: no String is made for the name unless headers were added by filters.
    public func first(lowercasedASCII name: UnsafeRawBufferPointer) -> String? {
        for i in 0..<fields.count where !fields[i].removed && nameEquals(i, lowercased: name) { return value(at: i) }
        // Added names are lowercase: compared by length, then bytes (no String made).
        for a in added where a.name.utf8.count == name.count && a.name.utf8.elementsEqual(name) { return a.value }
        return nil
    }

    /// First value of a header (edits included), names case-insensitive.
    public func first(_ name: String) -> String? {
        let lower = name.lowercased()
        if let i = firstIndex(lowercased: lower) { return value(at: i) }
        for a in added where a.name == lower { return a.value }
        return nil
    }

    /// All values of a header (edits included), in order.
    public func all(_ name: String) -> [String] {
        let lower = name.lowercased()
        var out: [String] = []
        var n = lower
        n.withUTF8 { p in
            let raw = UnsafeRawBufferPointer(p)
            for i in 0..<fields.count where !fields[i].removed && nameEquals(i, lowercased: raw) { out.append(value(at: i)) }
        }
        for a in added where a.name == lower { out.append(a.value) }
        return out
    }

    /// Removes every value of a header. Returns how many were removed.
    @discardableResult
    public mutating func remove(_ name: String) -> Int { removeLowercased(name.lowercased()) }

    /// Removes every value of a header whose name is already lowercase (no folding).
    @discardableResult
    public mutating func removeLowercased(_ lower: String) -> Int {
        var count = 0
        var n = lower
        n.withUTF8 { p in
            let raw = UnsafeRawBufferPointer(p)
            for i in 0..<fields.count where !fields[i].removed && nameEquals(i, lowercased: raw) { fields[i].removed = true; count += 1 }
        }
        let before = added.count
        if before > 0 { added.removeAll { $0.name == lower } }
        return count + before - added.count
    }

    /// Replaces every value of a header with one value. Caller validated name/value.
    public mutating func set(_ name: String, _ value: String) {
        let lower = name.lowercased()
        removeLowercased(lower)
        added.append(HeaderLine(lower, value))
    }

    /// Adds a value, keeping existing ones. Caller validated name/value.
    public mutating func add(_ name: String, _ value: String) {
        added.append(HeaderLine(name.lowercased(), value))
    }

    /// Adds a value whose name is already lowercase (no folding). Inlinable: the
    /// proxy and the tracing filter add lines per request.
    @inlinable @inline(__always)
    public mutating func addLowercased(_ name: String, _ value: String) {
        added.append(HeaderLine(name, value))
    }

    /// Replaces Host (every Host line) with one value, which the caller validated: the
    /// one way the proxy and filters set it, so `host` and `hostIndex` always agree.
    public mutating func setHost(_ value: String) {
        if hostIndex >= 0 { fields[hostIndex].removed = true; hostIndex = -1 }
        removeLowercased("host")
        addLowercased("host", value)
    }

    /// Notes what `added` holds now, before filters run (see `addedBeforeFilters`).
    public mutating func markFiltersStart() {
        addedBeforeFilters = added.count
        var n = 0
        for a in added { n += a.name.utf8.count + a.valueByteCount }
        addedBytesBeforeFilters = n
    }

    /// Every live header in order (originals first, then added), as Strings.
    public func allFields() -> [(name: String, value: String)] {
        var out: [(String, String)] = []
        for i in 0..<fields.count where !fields[i].removed { out.append((name(at: i), value(at: i))) }
        for a in added { out.append((a.name, a.value)) }
        return out
    }

}

/// Validation of header names and values coming from filters (Lua, config): a value with
/// CR, LF or NUL would inject a header or split the message, so it is refused.
public enum HeaderValidation {
    public static func isToken(_ s: String) -> Bool {
        if s.isEmpty { return false }
        for b in s.utf8 where !isTchar(b) { return false }
        return true
    }
    public static func isValidValue(_ s: String) -> Bool {
        for b in s.utf8 where b == 0 || b == 10 || b == 13 { return false }
        return true
    }
    /// The parser's field-value rule (RFC 9110 §5.5): no control byte other than HTAB,
    /// and no DEL. A value the parser would refuse is never written.
    public static func isFieldValue(_ s: String) -> Bool {
        for b in s.utf8 where (b < 32 && b != 9) || b == 127 { return false }
        return true
    }
    /// RFC 9110 tchar (ALPHA, DIGIT and !#$%&'*+-.^_`|~), as two 64-bit masks for bytes
    /// 0-63 and 64-127: the parser tests every byte of every header name with it, with
    /// no table load, bounds check or lazy global per byte.
    @inlinable @inline(__always)
    public static func isTchar(_ c: UInt8) -> Bool {
        c < 64 ? (0x03ff_6cfa_0000_0000 as UInt64) >> UInt64(c) & 1 != 0
               : c < 128 && (0x57ff_ffff_c7ff_fffe as UInt64) >> UInt64(c &- 64) & 1 != 0
    }
}
