#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import MoonletCore

/// What an access log line is made from: one finished stream as Envoy's command
/// operators see it. Header names are lowercase; pseudo-headers (`:method`, `:path`,
/// `:authority`, `:scheme`) are answered by `requestHeader` too. nil or "" means "not
/// there" (printed as `-` in text, `null` in JSON, as Envoy does).
///
/// The byte rendering (`AccessLogFormat.render(_:into:clock:)`) reads request headers
/// through `withRequestHead`: a record over a parsed head finds every name the format
/// uses in one pass and points at the head's bytes; the defaults answer through
/// `requestHeader`/`responseHeader` (Strings), which is enough for tests and tools.
public protocol AccessLogRecord {
    /// Where the record copied request header values that `withRequestHead` marked as
    /// `AccessLogValueSpan.scratch` spans; nil when it copies none.
    var valueScratch: UnsafeRawPointer? { get }
    func requestHeader(_ name: String) -> String?
    func responseHeader(_ name: String) -> String?
    /// Start of the request, milliseconds since the Unix epoch.
    var startTimeMillis: Int64 { get }
    /// "HTTP/1.1", "HTTP/2".
    var protocolName: String { get }
    var responseCode: Int { get }
    var responseFlags: String { get }
    var responseCodeDetails: String { get }
    var connectionTerminationDetails: String { get }
    var upstreamTransportFailureReason: String { get }
    var bytesReceived: Int64 { get }
    var bytesSent: Int64 { get }
    var durationMillis: Int64 { get }
    var upstreamHost: String { get }
    var upstreamCluster: String { get }
    var upstreamLocalAddress: String { get }
    var downstreamLocalAddress: String { get }
    var downstreamRemoteAddress: String { get }
    var requestedServerName: String { get }
    var routeName: String { get }
    /// Hands the request header's first value (nil or "" = not there: returns false
    /// without calling `body`) to `body` as bytes. The default asks `requestHeader`.
    func withRequestHeader(_ name: String, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool
    /// Runs once per line, before anything is written: finds the first value of every
    /// request header in `names` (one pass over the head), writes one span per name into
    /// `spans` (`AccessLogValueSpan`: bytes of `head`, absent, or a value the record
    /// hands out itself through `withOtherRequestHeader`), then calls `body` with the
    /// bytes the spans point into. The default marks every span "other".
    func withRequestHead(_ names: AccessLogHeaderNames, _ spans: UnsafeMutablePointer<AccessLogValueSpan>, _ body: (UnsafeRawBufferPointer) -> Void)
    /// The value of a span `withRequestHead` marked "other" (`span.start <= -2`), for
    /// the name at `index` in `names`; false when there is none or it is empty. The
    /// default asks `withRequestHeader` by name.
    func withOtherRequestHeader(_ span: AccessLogValueSpan, index: Int, _ names: AccessLogHeaderNames, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool
    /// The response header's first value (lowercase ASCII name as bytes) handed to
    /// `body`; false (nothing called) when absent or empty. The default asks
    /// `responseHeader`.
    func withResponseHeader(lowercased name: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool
}

extension AccessLogRecord {
    public var valueScratch: UnsafeRawPointer? { nil }

    public func withRequestHeader(_ name: String, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
        guard var v = requestHeader(name), !v.isEmpty else { return false }
        v.withUTF8 { body(UnsafeRawBufferPointer($0)) }
        return true
    }

    public func withRequestHead(_ names: AccessLogHeaderNames, _ spans: UnsafeMutablePointer<AccessLogValueSpan>, _ body: (UnsafeRawBufferPointer) -> Void) {
        for i in 0..<names.count { spans[i] = AccessLogValueSpan(start: -2, length: 0) }
        body(UnsafeRawBufferPointer(start: nil, count: 0))
    }

    public func withOtherRequestHeader(_ span: AccessLogValueSpan, index: Int, _ names: AccessLogHeaderNames, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
        withRequestHeader(names.names[index], body)
    }

    public func withResponseHeader(lowercased name: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
        guard var v = responseHeader(String(decoding: name, as: UTF8.self)), !v.isEmpty else { return false }
        v.withUTF8 { body(UnsafeRawBufferPointer($0)) }
        return true
    }
}

/// Where one request header's value is, as `AccessLogRecord.withRequestHead` found it:
/// `start >= 0`: `length` bytes at `start` in the head's bytes (length 0: present but
/// empty, printed as missing); `start == -1`: absent; `start <= -2`: a value the record
/// hands out through `withOtherRequestHeader` (a header added by a filter, a rewritten
/// path), the code being the record's own; `scratch(at:length:)` codes are the record's
/// for values it copied into the clock's `scratch`.
public struct AccessLogValueSpan: Sendable {
    public var start: Int32
    public var length: Int32
    @inlinable @inline(__always) public init(start: Int32, length: Int32) { self.start = start; self.length = length }
    @inlinable public static var absent: AccessLogValueSpan { AccessLogValueSpan(start: -1, length: 0) }
    /// `length` bytes at `offset` in a scratch buffer (a code below every other).
    @inlinable @inline(__always)
    public static func scratch(at offset: Int, length: Int) -> AccessLogValueSpan {
        AccessLogValueSpan(start: Int32.min + Int32(offset), length: Int32(length))
    }
    /// The scratch offset of a `scratch(at:length:)` span, nil for any other.
    @inlinable @inline(__always)
    public var scratchOffset: Int? { start < -(1 << 30) ? Int(start - Int32.min) : nil }
}

/// The request header names a format reads (its `REQ()` operators), lowercase and
/// deduplicated at config load, with their bytes in one side table: a record finds all
/// of them in one pass over the head. Pseudo-headers carry a code instead (a record
/// answers them from the request line and Host).
public final class AccessLogHeaderNames: @unchecked Sendable {
    public enum Pseudo: UInt8, Sendable { case none, method, path, authority, scheme }
    @usableFromInline struct Entry {
        @usableFromInline var offset: Int32
        @usableFromInline var length: Int32
        @usableFromInline var pseudo: Pseudo
    }
    /// The names (lowercase), in table order.
    public let names: [String]
    public let count: Int
    /// Bit `length & 63` set for every regular (non-pseudo) name: a header whose name
    /// length has no bit is skipped without comparing.
    public let lengthMask: UInt64
    /// How many names are regular headers (not pseudo).
    public let regularCount: Int
    // Inlinable accessors below: a record (MoonletLua) reads them per header and line.
    @usableFromInline let entries: UnsafeMutablePointer<Entry>
    @usableFromInline let storage: UnsafeMutableRawPointer
    /// Per name, the two words of its small String form (`InlineUTF8.key`), or (0, 0)
    /// (no String has those: a pseudo-header, a name over 15 bytes): a header line
    /// added with a small name is matched by two compares.
    public let keys: UnsafeMutablePointer<(UInt64, UInt64)>

    init(_ names: [String]) {
        self.names = names
        count = names.count
        let total = names.reduce(0) { $0 + $1.utf8.count }
        let storage = UnsafeMutableRawPointer.allocate(byteCount: max(1, total), alignment: 8)
        let entries = UnsafeMutablePointer<Entry>.allocate(capacity: max(1, names.count))
        self.storage = storage
        self.entries = entries
        keys = .allocate(capacity: max(1, names.count))
        var off = 0, mask: UInt64 = 0, regular = 0
        for (i, n) in names.enumerated() {
            let b = Array(n.utf8)
            b.withUnsafeBytes { storage.advanced(by: off).copyMemory(from: $0.baseAddress ?? UnsafeRawPointer(storage), byteCount: b.count) }
            let p: Pseudo
            switch n {
            case ":method": p = .method
            case ":path": p = .path
            case ":authority": p = .authority
            case ":scheme": p = .scheme
            default: p = .none; mask |= 1 << UInt64(b.count & 63); regular += 1
            }
            entries[i] = Entry(offset: Int32(off), length: Int32(b.count), pseudo: p)
            keys[i] = p == .none ? (InlineUTF8.key(n) ?? (0, 0)) : (0, 0)
            off += b.count
        }
        lengthMask = mask
        regularCount = regular
    }

    deinit {
        storage.deallocate()
        entries.deallocate()
        keys.deallocate()
    }

    /// Name `i`'s bytes (lowercase ASCII).
    @inlinable @inline(__always)
    public func bytes(_ i: Int) -> UnsafeRawBufferPointer {
        let e = entries[i]
        return UnsafeRawBufferPointer(start: storage.advanced(by: Int(e.offset)), count: Int(e.length))
    }

    /// Name `i`'s pseudo-header, `.none` for a regular header.
    @inlinable @inline(__always)
    public func pseudo(_ i: Int) -> Pseudo { entries[i].pseudo }

    /// Whether `s`'s UTF-8 is `b` (a header name added by a filter against a name of
    /// the table): lengths first, then one memcmp.
    @inline(__always)
    public static func equals(_ s: String, _ b: UnsafeRawBufferPointer) -> Bool {
        let u = s.utf8
        guard u.count == b.count else { return false }
        if b.isEmpty { return true }
        return u.withContiguousStorageIfAvailable { memcmp($0.baseAddress!, b.baseAddress!, b.count) == 0 } ?? u.elementsEqual(b)
    }

    /// Name `i`'s length in bytes.
    @inlinable @inline(__always)
    public func length(_ i: Int) -> Int { Int(entries[i].length) }
}

/// One event loop's scratch for access log lines (not shared): the second-resolution
/// part of START_TIME (`2026-12-06T04:05:07.`) remembered for the current second, so a
/// line does not call gmtime; the buffer a line is written into before it is appended
/// to its output whole; the header spans of the line being written.
public final class AccessLogClock {
    var second: Int64 = .min
    /// "YYYY-MM-DDTHH:MM:SS." (20 bytes).
    let prefix = UnsafeMutablePointer<UInt8>.allocate(capacity: 20)
    // Read by the inlinable `AccessLogFormat.render` (specialised in the caller's module).
    @usableFromInline var line: UnsafeMutablePointer<UInt8>
    @usableFromInline var lineCapacity: Int
    @usableFromInline var spans: UnsafeMutablePointer<AccessLogValueSpan>
    @usableFromInline var spanCapacity: Int
    /// Bytes a record may copy request header values into while it locates them (values
    /// it cannot point at in the head: lines added by filters), for the line being
    /// written; see `AccessLogValueSpan.scratch`.
    public let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 1024, alignment: 8)
    /// `InlineUTF8.isAvailable`, read once.
    @usableFromInline let inlineStrings = InlineUTF8.isAvailable
    var offsetSecond: UInt64 = .max
    var offset: UInt64 = 0

    /// The wall clock minus the monotonic clock (nanoseconds), read again when `mono`
    /// (the monotonic time of the line) is in another second than the last reading: a
    /// line's START_TIME is its monotonic start shifted by it, without reading the wall
    /// clock per line (a change of the wall clock shows within a second). Never 0.
    public func wallMinusMono(mono: UInt64) -> UInt64 {
        let sec = mono / 1_000_000_000
        if sec != offsetSecond {
            offsetSecond = sec
            var ts = timespec(); clock_gettime(CLOCK_REALTIME, &ts)
            var m = timespec(); clock_gettime(CLOCK_MONOTONIC, &m)
            let wall = UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
            let now = UInt64(m.tv_sec) &* 1_000_000_000 &+ UInt64(m.tv_nsec)
            offset = max(1, wall &- now)
        }
        return offset
    }
    public init() {
        lineCapacity = 2048
        line = UnsafeMutablePointer<UInt8>.allocate(capacity: lineCapacity)
        spanCapacity = 16
        spans = UnsafeMutablePointer<AccessLogValueSpan>.allocate(capacity: spanCapacity)
    }

    deinit {
        prefix.deallocate()
        line.deallocate()
        spans.deallocate()
        scratch.deallocate()
    }

    @inlinable @inline(__always)
    func spans(_ n: Int) -> UnsafeMutablePointer<AccessLogValueSpan> {
        if _slowPath(n > spanCapacity) { return growSpans(n) }
        return spans
    }

    @usableFromInline @inline(never)
    func growSpans(_ n: Int) -> UnsafeMutablePointer<AccessLogValueSpan> {
        do {
            spans.deallocate()
            spanCapacity = n
            spans = UnsafeMutablePointer<AccessLogValueSpan>.allocate(capacity: n)
        }
        return spans
    }

    /// Writes START_TIME for `ms` (24 bytes; the writer has room).
    @usableFromInline
    func write(_ ms: Int64, _ w: inout LineWriter) {
        let sec = ms >= 0 ? ms / 1000 : (ms - 999) / 1000
        if sec != second {
            second = sec
            let full = Array(AccessLogFormat.iso8601(sec * 1000).utf8)   // "....:07.000Z"
            for i in 0..<20 { prefix[i] = i < full.count ? full[i] : 48 }
        }
        w.reserve(24)
        let p = w.base + w.count
        p.update(from: prefix, count: 20)
        let r = Int(ms - sec * 1000)
        p[20] = UInt8(48 + r / 100); p[21] = UInt8(48 + r / 10 % 10); p[22] = UInt8(48 + r % 10)
        p[23] = 90   // Z
        w.count += 24
    }
}

/// A growable byte buffer written through a pointer (the loop's line scratch).
@usableFromInline
struct LineWriter {
    @usableFromInline var base: UnsafeMutablePointer<UInt8>
    @usableFromInline var count: Int
    @usableFromInline var capacity: Int
    /// Whether small String values are read from their words (`InlineUTF8.isAvailable`).
    @usableFromInline var inline: Bool

    @inlinable @inline(__always)
    init(base: UnsafeMutablePointer<UInt8>, count: Int, capacity: Int, inline: Bool = false) {
        self.base = base; self.count = count; self.capacity = capacity; self.inline = inline
    }

    // Counts and sizes stay far below Int.max (a line is bounded by its values), so
    // the arithmetic below wraps instead of checking for overflow.
    @inlinable @inline(__always)
    mutating func reserve(_ n: Int) {
        if _slowPath(count &+ n > capacity) { grow(count &+ n) }
    }

    @usableFromInline @inline(never)
    mutating func grow(_ need: Int) {
        var c = capacity * 2
        while c < need { c *= 2 }
        let nb = UnsafeMutablePointer<UInt8>.allocate(capacity: c)
        nb.update(from: base, count: count)
        base.deallocate()
        base = nb
        capacity = c
    }

    @inlinable @inline(__always)
    mutating func byte(_ b: UInt8) {
        reserve(1)
        (base + count).initialize(to: b)
        count &+= 1
    }

    @inlinable @inline(__always)
    mutating func bytes(_ p: UnsafeRawPointer, _ n: Int) {
        reserve(n)
        Self.copy(UnsafeMutableRawPointer(base + count), p, n)
        count &+= n
    }

    /// Copies `n` bytes: up to 32 with (overlapping) word loads and stores, longer
    /// ones with memcpy. Literals and values are mostly short: a call costs more.
    @inlinable @inline(__always)
    static func copy(_ dst: UnsafeMutableRawPointer, _ src: UnsafeRawPointer, _ n: Int) {
        if n >= 8 {
            if n <= 16 {
                let a = src.loadUnaligned(as: UInt64.self), b = src.loadUnaligned(fromByteOffset: n &- 8, as: UInt64.self)
                dst.storeBytes(of: a, as: UInt64.self); dst.storeBytes(of: b, toByteOffset: n &- 8, as: UInt64.self)
            } else if n <= 32 {
                let a = src.loadUnaligned(as: UInt64.self), b = src.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
                let c = src.loadUnaligned(fromByteOffset: n &- 16, as: UInt64.self), d = src.loadUnaligned(fromByteOffset: n &- 8, as: UInt64.self)
                dst.storeBytes(of: a, as: UInt64.self); dst.storeBytes(of: b, toByteOffset: 8, as: UInt64.self)
                dst.storeBytes(of: c, toByteOffset: n &- 16, as: UInt64.self); dst.storeBytes(of: d, toByteOffset: n &- 8, as: UInt64.self)
            } else {
                memcpy(dst, src, n)
            }
        } else if n >= 4 {
            let a = src.loadUnaligned(as: UInt32.self), b = src.loadUnaligned(fromByteOffset: n &- 4, as: UInt32.self)
            dst.storeBytes(of: a, as: UInt32.self); dst.storeBytes(of: b, toByteOffset: n &- 4, as: UInt32.self)
        } else {
            var i = 0
            while i < n { dst.storeBytes(of: src.load(fromByteOffset: i, as: UInt8.self), toByteOffset: i, as: UInt8.self); i &+= 1 }
        }
    }

    @inlinable @inline(__always)
    mutating func bytes(_ b: UnsafeRawBufferPointer) {
        if let p = b.baseAddress { bytes(p, b.count) }
    }

    /// The high bit of every byte of `x` that is a control character, `"` or `\`
    /// (and possibly of bytes above such a byte: a hint, exact when it is zero).
    @inlinable @inline(__always)
    static func special(_ x: UInt64) -> UInt64 {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let q = x ^ (ones &* 34), bs = x ^ (ones &* 92)
        // A zero byte in q or bs, or a byte under 0x20 in x (x - 0x20 borrows with the high bit clear).
        return (((q &- ones) & ~q) | ((bs &- ones) & ~bs) | ((x &- ones &* 0x20) & ~x)) & 0x8080_8080_8080_8080
    }

    /// Appends bytes, JSON-escaped when `escape` (as `JSON.quote` escapes, without quotes).
    /// Escaped values are copied eight bytes at a time while they are checked (the last
    /// word overlapping the one before); only a value with a byte to escape is written
    /// again, byte by byte.
    @inlinable @inline(__always)
    mutating func put(_ p: UnsafeRawPointer, _ n: Int, escape: Bool) {
        guard escape else { bytes(p, n); return }
        reserve(n)
        let dst = UnsafeMutableRawPointer(base + count)
        var t: UInt64 = 0
        if n >= 8 {
            var i = 0
            while i &+ 8 <= n {
                let x = p.loadUnaligned(fromByteOffset: i, as: UInt64.self)
                t |= Self.special(x)
                dst.storeBytes(of: x, toByteOffset: i, as: UInt64.self)
                i &+= 8
            }
            if i < n {
                let x = p.loadUnaligned(fromByteOffset: n &- 8, as: UInt64.self)
                t |= Self.special(x)
                dst.storeBytes(of: x, toByteOffset: n &- 8, as: UInt64.self)
            }
        } else if n >= 4 {
            let x = UInt64(p.loadUnaligned(as: UInt32.self)) | UInt64(p.loadUnaligned(fromByteOffset: n &- 4, as: UInt32.self)) << 32
            t = Self.special(x)
            dst.storeBytes(of: UInt32(truncatingIfNeeded: x), as: UInt32.self)
            dst.storeBytes(of: UInt32(truncatingIfNeeded: x >> 32), toByteOffset: n &- 4, as: UInt32.self)
        } else {
            var i = 0
            while i < n {
                let c = p.load(fromByteOffset: i, as: UInt8.self)
                if c < 0x20 || c == 34 || c == 92 { t = 1 }
                dst.storeBytes(of: c, toByteOffset: i, as: UInt8.self)
                i &+= 1
            }
        }
        if _slowPath(t != 0) { putEscaped(UnsafeRawBufferPointer(start: p, count: n)); return }
        count &+= n
    }

    @inlinable @inline(__always)
    mutating func put(_ b: UnsafeRawBufferPointer, escape: Bool) {
        if let p = b.baseAddress { put(p, b.count, escape: escape) }
    }

    @usableFromInline @inline(never)
    mutating func putEscaped(_ b: UnsafeRawBufferPointer) {
        reserve(b.count * 6)
        let hex: StaticString = "0123456789abcdef"
        for c in b {
            switch c {
            case 34: base[count] = 92; base[count + 1] = 34; count += 2
            case 92: base[count] = 92; base[count + 1] = 92; count += 2
            case 10: base[count] = 92; base[count + 1] = 110; count += 2
            case 13: base[count] = 92; base[count + 1] = 114; count += 2
            case 9: base[count] = 92; base[count + 1] = 116; count += 2
            case 0..<0x20:
                base[count] = 92; base[count + 1] = 117; base[count + 2] = 48; base[count + 3] = 48
                base[count + 4] = hex.utf8Start[Int(c >> 4)]; base[count + 5] = hex.utf8Start[Int(c & 15)]
                count += 6
            default: base[count] = c; count += 1
            }
        }
    }

    /// Appends a String value; false (nothing written) when it is empty. A small ASCII
    /// String (`InlineUTF8`: the protocol, flags, details, addresses, route names) is
    /// checked for bytes to escape and stored as its two words, inline; any other goes
    /// through `putString`.
    @inlinable @inline(__always)
    mutating func put(_ s: String, escape: Bool) -> Bool {
        if inline {
            let w = InlineUTF8.words(s)
            let n = InlineUTF8.count(w.1)
            if n >= 0 {
                if n == 0 { return false }
                if escape {
                    // Only the lanes of the n bytes: the zero bytes past them (and the
                    // discriminator) would read as control characters.
                    let m0: UInt64 = n >= 8 ? ~0 : (1 &<< UInt64(n &* 8)) &- 1
                    let m1: UInt64 = n > 8 ? (1 &<< UInt64((n &- 8) &* 8)) &- 1 : 0
                    if _slowPath((Self.special(w.0) & m0) | (Self.special(w.1) & m1) != 0) { putEscaped(w, n); return true }
                }
                reserve(16)
                let dst = UnsafeMutableRawPointer(base + count)
                dst.storeBytes(of: w.0, as: UInt64.self)
                dst.storeBytes(of: w.1, toByteOffset: 8, as: UInt64.self)
                count &+= n
                return true
            }
        }
        return putString(s, escape: escape)
    }

    /// The first `n` bytes of `w` (a small String's words), escaped.
    @usableFromInline @inline(never)
    mutating func putEscaped(_ w: (UInt64, UInt64), _ n: Int) {
        var c = w
        withUnsafeBytes(of: &c) { putEscaped(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
    }

    /// `put(_:escape:)` for a String that is not small ASCII.
    @usableFromInline @inline(never)
    mutating func putString(_ s: String, escape: Bool) -> Bool {
        if s.isEmpty { return false }
        // Read in place (a native String: no copy of it); otherwise through a copy.
        if s.utf8.withContiguousStorageIfAvailable({ put(UnsafeRawBufferPointer($0), escape: escape) }) == nil {
            var v = s
            v.withUTF8 { put(UnsafeRawBufferPointer($0), escape: escape) }
        }
        return true
    }

    /// Appends a literal (its length a constant where inlined).
    @inlinable @inline(__always)
    mutating func lit(_ s: StaticString) { bytes(UnsafeRawPointer(s.utf8Start), s.utf8CodeUnitCount) }

    /// Ends a JSON string value whose opening quote is written: its closing quote when
    /// `found`, else `null` over the opening quote.
    @inlinable @inline(__always)
    mutating func close(_ found: Bool) {
        if found { byte(34) } else { count &-= 1; lit("null") }
    }

    /// `close(found)` followed by a literal: `quoted` (the closing quote and what
    /// follows) when found, else `null` over the opening quote and `bare` (what follows).
    @inlinable @inline(__always)
    mutating func close(_ found: Bool, _ quoted: StaticString, _ bare: StaticString) {
        if found { lit(quoted) } else { count &-= 1; lit("null"); lit(bare) }
    }

    @inlinable @inline(__always)
    mutating func int(_ v: Int64) {
        reserve(20)
        if v < 0 { base[count] = 45; count += 1 }
        var m = v.magnitude
        if m < 10 { base[count] = UInt8(48 + m); count += 1; return }
        // Up to four digits (status codes, small sizes and durations): no loop.
        if m < 10_000 {
            let p = base + count
            if m < 100 {
                p[0] = UInt8(truncatingIfNeeded: 48 &+ m / 10); p[1] = UInt8(truncatingIfNeeded: 48 &+ m % 10); count &+= 2
            } else if m < 1000 {
                p[0] = UInt8(truncatingIfNeeded: 48 &+ m / 100); p[1] = UInt8(truncatingIfNeeded: 48 &+ m / 10 % 10)
                p[2] = UInt8(truncatingIfNeeded: 48 &+ m % 10); count &+= 3
            } else {
                p[0] = UInt8(truncatingIfNeeded: 48 &+ m / 1000); p[1] = UInt8(truncatingIfNeeded: 48 &+ m / 100 % 10)
                p[2] = UInt8(truncatingIfNeeded: 48 &+ m / 10 % 10); p[3] = UInt8(truncatingIfNeeded: 48 &+ m % 10); count &+= 4
            }
            return
        }
        var n = 0
        var t = m
        while t > 0 { n += 1; t /= 10 }
        var k = count + n - 1
        while m > 0 { base[k] = UInt8(48 + m % 10); m /= 10; k -= 1 }
        count += n
    }
}

/// An Envoy access log format compiled once (at config load): text with `%OPERATOR%`
/// command operators, or JSON (`labels`) whose values are such texts. Moonlet supports the
/// operators of Istio's default formats and the common ones around them; an unknown
/// operator is an error naming it, never printed literally.
public struct AccessLogFormat: Sendable {
    /// Istio's default text format (meshConfig.accessLogFormat unset): the config layer's
    /// constant (MoonletCore's AccessLogFormatKeys).
    public static var istioText: String { AccessLogFormatKeys.istioText }

    /// Istio's default JSON format (meshConfig.accessLogEncoding: JSON), key by key.
    public static var istioJSONLabels: [(String, String)] { AccessLogFormatKeys.istioJSON }

    enum Op: Sendable, Equatable {
        case literal(String)
        case startTime
        /// Request header, with an alternative and a max length (REQ(X?Y):Z).
        case req(String, String?, Int?)
        case resp(String, String?, Int?)
        case proto, code, flags, details, termination, transportFailure, bytesIn, bytesOut, duration
        case upstreamHost, upstreamCluster, upstreamLocal, downstreamLocal, downstreamLocalNoPort, downstreamRemote, downstreamRemoteNoPort
        case sni, routeName
    }

    enum Shape: Sendable { case text([Op]), json([(String, [Op])]) }
    let shape: Shape

    /// The format compiled for byte output (see `Program`), built once with the format.
    @usableFromInline let program: Program
    var isJSON: Bool { program.isJSON }

    /// Compiles a text format; throws naming the first unsupported operator.
    public init(text: String) throws {
        let ops = try Self.compile(text)
        shape = .text(ops)
        program = Program(shape)
    }

    /// Compiles a JSON format (one object per line, keys in the given order).
    public init(json labels: [(String, String)]) throws {
        let fields = try labels.map { ($0.0, try Self.compile($0.1)) }
        shape = .json(fields)
        program = Program(shape)
    }

    init(_ shape: Shape, empty: AlwaysEmpty) {
        self.shape = shape
        program = Program(shape, empty: empty)
    }

    /// A JSON format that always runs the instruction loop (`straightLine: false`), to
    /// hold `runIstioJSON`'s lines equal to the loop's.
    init(json labels: [(String, String)], straightLine: Bool) throws {
        let fields = try labels.map { ($0.0, try Self.compile($0.1)) }
        shape = .json(fields)
        program = Program(shape, straightLine: straightLine)
    }

    /// Whether lines of this format are written by the straight-line path.
    var isStraightLine: Bool { program.istio != nil }

    /// Operators a record type always leaves empty (its values are constants).
    public struct AlwaysEmpty: OptionSet, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let connectionTerminationDetails = AlwaysEmpty(rawValue: 1)
        public static let upstreamTransportFailureReason = AlwaysEmpty(rawValue: 2)
        public static let upstreamLocalAddress = AlwaysEmpty(rawValue: 4)
    }

    /// The same format for a record type that always leaves `empty` empty: those
    /// operators are written as missing (`-`, or `null` for a JSON value) when the format
    /// is compiled, folded into the literals around them (no dispatch per line). Same
    /// lines for such a record.
    public func folding(alwaysEmpty empty: AlwaysEmpty) -> AccessLogFormat {
        empty.isEmpty ? self : AccessLogFormat(shape, empty: empty)
    }

    /// One instruction of a compiled format. Trivial (no reference counted payload), so
    /// the per-line loop reads them through a pointer without retaining anything.
    @usableFromInline
    struct Instr {
        @usableFromInline
        enum Code: UInt8 {
            /// `a`: offset, `b`: length of bytes in the side table, written as they are.
            case literal
            case startTime, proto, code, flags, details, termination, transportFailure, bytesIn, bytesOut, duration
            case upstreamHost, upstreamCluster, upstreamLocal, downstreamLocal, downstreamRemote, sni, routeName
            /// Request header: `a` the index of its name in `Program.names`, `b` the
            /// alternative's (-1 for none).
            case req
            /// Response header: `a`, `b` offset and length of its name in the side table;
            /// `c` and `d` the alternative's (`d` == 0: none).
            case resp
            /// An operator rendered through its String value (`value(_:_:)`): `REQ()` and
            /// `RESP()` with a length, the `_WITHOUT_PORT` addresses. `a`: index in `slow`.
            case slow
        }
        /// How a value is written: as it is, "-" when missing (text); JSON-escaped, "-"
        /// when missing (part of a JSON string); JSON-escaped in quotes, `null` when
        /// missing (a JSON value of one operator). Numbers are written as they are.
        @usableFromInline
        enum Mode: UInt8 { case text, jsonPart, jsonValue }
        @usableFromInline var code: Code
        @usableFromInline var mode: Mode
        @usableFromInline var a: Int32 = 0, b: Int32 = 0, c: Int32 = 0, d: Int32 = 0
        /// Literal bytes written before the value (offset and length in the side
        /// table): the literal before an operator is folded into it, with the opening
        /// quote of a `jsonValue`; a literal the format ends with stays a `.literal`
        /// instruction with only these.
        @usableFromInline var pa: Int32 = 0, pl: Int32 = 0
    }

    /// A format as a flat instruction array, with every literal, JSON key and response
    /// header name in one side table of bytes (JSON literals already escaped, adjacent
    /// literals merged), and the request header names it reads in an
    /// `AccessLogHeaderNames` (found in one pass over the head per line). Made at config
    /// load; read per line through pointers.
    @usableFromInline
    final class Program: @unchecked Sendable {
        let isJSON: Bool
        @usableFromInline let code: UnsafeMutableBufferPointer<Instr>
        @usableFromInline let table: UnsafeMutableRawBufferPointer
        @usableFromInline let names: AccessLogHeaderNames
        /// Operators of `.slow` instructions (rare: read only for them).
        let slow: [Op]
        /// Set when the format is Istio's default JSON (`istioJSONLabels`, the
        /// `accessLogEncoding: JSON` default): lines are written by `runIstioJSON`,
        /// straight-line code, instead of the instruction loop.
        @usableFromInline let istio: IstioJSONSlots?

        init(_ shape: Shape, empty: AlwaysEmpty = [], straightLine: Bool = true) {
            var instrs: [Instr] = []
            var bytes: [UInt8] = []
            var names: [String] = []
            var slow: [Op] = []
            func lit(_ b: [UInt8]) {
                guard !b.isEmpty else { return }
                if let last = instrs.last, last.code == .literal, Int(last.a + last.b) == bytes.count {
                    bytes.append(contentsOf: b)
                    instrs[instrs.count - 1].b += Int32(b.count)
                    return
                }
                instrs.append(Instr(code: .literal, mode: .text, a: Int32(bytes.count), b: Int32(b.count)))
                bytes.append(contentsOf: b)
            }
            func nameIndex(_ n: String) -> Int32 {
                if let i = names.firstIndex(of: n) { return Int32(i) }
                names.append(n)
                return Int32(names.count - 1)
            }
            func op(_ o: Op, _ mode: Instr.Mode) {
                var i = Instr(code: .literal, mode: mode)
                switch o {
                case .termination where empty.contains(.connectionTerminationDetails),
                     .transportFailure where empty.contains(.upstreamTransportFailureReason),
                     .upstreamLocal where empty.contains(.upstreamLocalAddress):
                    // Missing on every line: what `run` writes for a missing value.
                    lit(Array((mode == .jsonValue ? "null" : "-").utf8))
                    return
                case .literal(let l):
                    lit(mode == .text ? Array(l.utf8) : AccessLogFormat.escaped(l))
                    return
                case .startTime: i.code = .startTime
                case .proto: i.code = .proto
                case .code: i.code = .code
                case .flags: i.code = .flags
                case .details: i.code = .details
                case .termination: i.code = .termination
                case .transportFailure: i.code = .transportFailure
                case .bytesIn: i.code = .bytesIn
                case .bytesOut: i.code = .bytesOut
                case .duration: i.code = .duration
                case .upstreamHost: i.code = .upstreamHost
                case .upstreamCluster: i.code = .upstreamCluster
                case .upstreamLocal: i.code = .upstreamLocal
                case .downstreamLocal: i.code = .downstreamLocal
                case .downstreamRemote: i.code = .downstreamRemote
                case .sni: i.code = .sni
                case .routeName: i.code = .routeName
                case .req(let n, let alt, nil):
                    i.code = .req
                    i.a = nameIndex(n)
                    i.b = alt.map(nameIndex) ?? -1
                case .resp(let n, let alt, nil):
                    i.code = .resp
                    i.a = Int32(bytes.count); i.b = Int32(n.utf8.count); bytes.append(contentsOf: n.utf8)
                    if let alt { i.c = Int32(bytes.count); i.d = Int32(alt.utf8.count); bytes.append(contentsOf: alt.utf8) }
                case .req, .resp, .downstreamLocalNoPort, .downstreamRemoteNoPort:
                    i.code = .slow
                    i.a = Int32(slow.count)
                    slow.append(o)
                }
                instrs.append(i)
            }
            switch shape {
            case .text(let ops):
                isJSON = false
                for o in ops { op(o, .text) }
            case .json(let fields):
                isJSON = true
                for (k, (key, ops)) in fields.enumerated() {
                    lit(Array(((k == 0 ? "{" : ",") + JSON.quote(key) + ":").utf8))
                    if ops.count == 1 {
                        // One operator: its own type (numbers stay numbers, nothing is null).
                        if case .literal = ops[0] { lit([34]); op(ops[0], .jsonPart); lit([34]) }
                        else if AccessLogFormat.isNumeric(ops[0]) { op(ops[0], .text) }
                        else { op(ops[0], .jsonValue) }
                    } else {
                        lit([34])
                        for o in ops { op(o, .jsonPart) }
                        lit([34])
                    }
                }
                lit(Array("}\n".utf8))
            }
            // Each literal folded into the operator after it (one dispatch for both).
            var fused: [Instr] = []
            var k = 0
            while k < instrs.count {
                var i = instrs[k]
                var lit: [UInt8] = []
                if i.code == .literal {
                    lit = Array(bytes[Int(i.a)..<Int(i.a + i.b)])
                    if k + 1 < instrs.count, instrs[k + 1].code != .literal { k += 1; i = instrs[k] }
                }
                if i.code != .literal && i.mode == .jsonValue { lit.append(34) }
                if !lit.isEmpty { i.pa = Int32(bytes.count); i.pl = Int32(lit.count); bytes.append(contentsOf: lit) }
                fused.append(i)
                k += 1
            }
            instrs = fused
            code = .allocate(capacity: max(1, instrs.count))
            _ = code.initialize(from: instrs)
            let table = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 8)
            bytes.withUnsafeBytes { if $0.count > 0 { table.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
            self.table = table
            self.names = AccessLogHeaderNames(names)
            self.slow = slow
            count = instrs.count
            istio = straightLine ? IstioJSONSlots(shape, names: names) : nil
        }

        /// Instructions in use (`code` may have one slot more when empty).
        @usableFromInline let count: Int

        deinit {
            code.deallocate()
            table.deallocate()
        }
    }

    static func compile(_ f: String) throws -> [Op] {
        var ops: [Op] = []
        var lit = ""
        var i = f.startIndex
        while i < f.endIndex {
            let c = f[i]
            guard c == "%" else { lit.append(c); i = f.index(after: i); continue }
            let next = f.index(after: i)
            guard let end = f[next...].firstIndex(of: "%") else { throw AccessLogFormatError(message: "unterminated operator at \"\(f[i...].prefix(30))\"") }
            if end == next { lit.append("%"); i = f.index(after: end); continue }   // %% is a literal %
            if !lit.isEmpty { ops.append(.literal(lit)); lit = "" }
            ops.append(try op(String(f[next..<end])))
            i = f.index(after: end)
        }
        if !lit.isEmpty { ops.append(.literal(lit)) }
        return ops
    }

    static func op(_ s: String) throws -> Op {
        switch s {
        case "START_TIME": return .startTime
        case "PROTOCOL": return .proto
        case "RESPONSE_CODE": return .code
        case "RESPONSE_FLAGS": return .flags
        case "RESPONSE_CODE_DETAILS": return .details
        case "CONNECTION_TERMINATION_DETAILS": return .termination
        case "UPSTREAM_TRANSPORT_FAILURE_REASON": return .transportFailure
        case "BYTES_RECEIVED": return .bytesIn
        case "BYTES_SENT": return .bytesOut
        case "DURATION": return .duration
        case "UPSTREAM_HOST": return .upstreamHost
        case "UPSTREAM_CLUSTER", "UPSTREAM_CLUSTER_RAW": return .upstreamCluster
        case "UPSTREAM_LOCAL_ADDRESS": return .upstreamLocal
        case "DOWNSTREAM_LOCAL_ADDRESS": return .downstreamLocal
        case "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": return .downstreamLocalNoPort
        case "DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_PEER_ADDRESS": return .downstreamRemote
        case "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": return .downstreamRemoteNoPort
        case "REQUESTED_SERVER_NAME": return .sni
        case "ROUTE_NAME": return .routeName
        default: break
        }
        for (prefix, isReq) in [("REQ(", true), ("RESP(", false)] where s.hasPrefix(prefix) {
            guard let close = s.lastIndex(of: ")") else { break }
            let inner = s[s.index(s.startIndex, offsetBy: prefix.count)..<close]
            let parts = inner.split(separator: "?", maxSplits: 1).map { String($0).lowercased() }
            guard let name = parts.first, !name.isEmpty else { break }
            var maxLen: Int? = nil
            let rest = s[s.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":"), let n = Int(rest.dropFirst()), n > 0 else { throw AccessLogFormatError(message: "%\(s)%: the length after ':' must be a positive integer") }
                maxLen = n
            }
            let alt = parts.count > 1 ? parts[1] : nil
            return isReq ? .req(name, alt, maxLen) : .resp(name, alt, maxLen)
        }
        throw AccessLogFormatError(message: "%\(s)% is not an access log operator Moonlet supports")
    }

    /// The line for `r` (text formats end with what the format ends with; JSON gets a newline).
    public func render<R: AccessLogRecord>(_ r: R) -> String {
        var out: [UInt8] = []
        render(r, into: &out, clock: AccessLogClock())
        return String(decoding: out, as: UTF8.self)
    }

    /// Appends the line for `r` to `out` (the per-request path: the compiled format read
    /// through pointers, request headers found in one pass over the head, numbers and
    /// the time written as digits into the loop's line buffer, which is appended whole).
    /// Same text as `renderString`. Inlinable: specialised for the caller's record type
    /// (the record's fields read directly, not through its witness table).
    @inlinable
    public func render<R: AccessLogRecord>(_ r: R, into out: inout [UInt8], clock: AccessLogClock) {
        let p = program
        var w = LineWriter(base: clock.line, count: 0, capacity: clock.lineCapacity, inline: clock.inlineStrings)
        let spans = clock.spans(p.names.count)
        r.withRequestHead(p.names, spans) { head in
            if let x = p.istio { Self.runIstioJSON(x, r, head: head, spans: spans, names: p.names, &w, clock) }
            else { Self.run(p, r, head: head, spans: spans, &w, clock) }
        }
        clock.line = w.base
        clock.lineCapacity = w.capacity
        out.append(contentsOf: UnsafeRawBufferPointer(start: w.base, count: w.count))
    }

    @usableFromInline static let null: StaticString = "null"

    /// `s` JSON-escaped as a line's values are (no quotes).
    static func escaped(_ s: String) -> [UInt8] {
        let base = UnsafeMutablePointer<UInt8>.allocate(capacity: 64)
        var w = LineWriter(base: base, count: 0, capacity: 64)
        _ = w.put(s, escape: true)
        let out = Array(UnsafeBufferPointer(start: w.base, count: w.count))
        w.base.deallocate()
        return out
    }

    @inlinable @inline(__always)
    static func run<R: AccessLogRecord>(_ p: Program, _ r: R, head: UnsafeRawBufferPointer, spans: UnsafeMutablePointer<AccessLogValueSpan>,
                                        _ w: inout LineWriter, _ clock: AccessLogClock) {
        let code = p.code.baseAddress!
        let table = UnsafeRawPointer(p.table.baseAddress!)
        let names = p.names
        var pc = 0
        let end = p.count
        while pc < end {
            let ins = code[pc]
            pc &+= 1
            w.bytes(table + Int(ins.pa), Int(ins.pl))
            let found: Bool
            let escape = ins.mode != .text
            // Where a missing jsonValue's `null` goes: over its opening quote.
            let mark = ins.mode == .jsonValue ? w.count &- 1 : w.count
            switch ins.code {
            case .literal:
                continue
            case .startTime: clock.write(r.startTimeMillis, &w); found = true
            case .code: w.int(Int64(r.responseCode)); continue
            case .bytesIn: w.int(r.bytesReceived); continue
            case .bytesOut: w.int(r.bytesSent); continue
            case .duration: w.int(r.durationMillis); continue
            case .proto: found = w.put(r.protocolName, escape: escape)
            case .flags: found = w.put(r.responseFlags, escape: escape)
            case .details: found = w.put(r.responseCodeDetails, escape: escape)
            case .termination: found = w.put(r.connectionTerminationDetails, escape: escape)
            case .transportFailure: found = w.put(r.upstreamTransportFailureReason, escape: escape)
            case .upstreamHost: found = w.put(r.upstreamHost, escape: escape)
            case .upstreamCluster: found = w.put(r.upstreamCluster, escape: escape)
            case .upstreamLocal: found = w.put(r.upstreamLocalAddress, escape: escape)
            case .downstreamLocal: found = w.put(r.downstreamLocalAddress, escape: escape)
            case .downstreamRemote: found = w.put(r.downstreamRemoteAddress, escape: escape)
            case .sni: found = w.put(r.requestedServerName, escape: escape)
            case .routeName: found = w.put(r.routeName, escape: escape)
            case .req:
                var ok = header(Int(ins.a), r, head, spans, names, &w, escape)
                if !ok && ins.b >= 0 { ok = header(Int(ins.b), r, head, spans, names, &w, escape) }
                found = ok
            case .resp:
                var ok = r.withResponseHeader(lowercased: UnsafeRawBufferPointer(start: table + Int(ins.a), count: Int(ins.b))) { w.put($0, escape: escape) }
                if !ok && ins.d > 0 {
                    ok = r.withResponseHeader(lowercased: UnsafeRawBufferPointer(start: table + Int(ins.c), count: Int(ins.d))) { w.put($0, escape: escape) }
                }
                found = ok
            case .slow:
                found = w.put(slowValue(p, Int(ins.a), r) ?? "", escape: escape)
            }
            if found {
                if ins.mode == .jsonValue { w.byte(34) }
            } else if ins.mode == .jsonValue {
                w.count = mark
                w.bytes(null.utf8Start, 4)
            } else {
                w.byte(45)   // "-"
            }
        }
    }

    /// Istio's default JSON line (`istioJSONLabels`, keys in that order) for `r`, written
    /// by straight-line code: every key with its quotes is a literal of known length, every
    /// value written by its own kind (number, String, request or response header); no
    /// instruction to fetch and dispatch per field. The same bytes as `run` for that
    /// format (a test holds them equal).
    @inlinable @inline(__always)
    static func runIstioJSON<R: AccessLogRecord>(_ x: IstioJSONSlots, _ r: R, head: UnsafeRawBufferPointer, spans: UnsafeMutablePointer<AccessLogValueSpan>,
                                                 names: AccessLogHeaderNames, _ w: inout LineWriter, _ clock: AccessLogClock) {
        // A string value's closing quote and the next key are one literal (`null` and the
        // key without the quote when the value is missing).
        w.lit("{\"authority\":\"")
        w.close(header(x.authority, r, head, spans, names, &w, true), "\",\"bytes_received\":", ",\"bytes_received\":")
        w.int(r.bytesReceived)
        w.lit(",\"bytes_sent\":"); w.int(r.bytesSent)
        w.lit(",\"connection_termination_details\":\"")
        w.close(w.put(r.connectionTerminationDetails, escape: true), "\",\"downstream_local_address\":\"", ",\"downstream_local_address\":\"")
        w.close(w.put(r.downstreamLocalAddress, escape: true), "\",\"downstream_remote_address\":\"", ",\"downstream_remote_address\":\"")
        w.close(w.put(r.downstreamRemoteAddress, escape: true), "\",\"duration\":", ",\"duration\":")
        w.int(r.durationMillis)
        w.lit(",\"method\":\"")
        w.close(header(x.method, r, head, spans, names, &w, true), "\",\"path\":\"", ",\"path\":\"")
        var ok = header(x.originalPath, r, head, spans, names, &w, true)
        if !ok { ok = header(x.path, r, head, spans, names, &w, true) }
        w.close(ok, "\",\"protocol\":\"", ",\"protocol\":\"")
        w.close(w.put(r.protocolName, escape: true), "\",\"request_id\":\"", ",\"request_id\":\"")
        w.close(header(x.requestID, r, head, spans, names, &w, true), "\",\"requested_server_name\":\"", ",\"requested_server_name\":\"")
        w.close(w.put(r.requestedServerName, escape: true), "\",\"response_code\":", ",\"response_code\":")
        w.int(Int64(r.responseCode))
        w.lit(",\"response_code_details\":\"")
        w.close(w.put(r.responseCodeDetails, escape: true), "\",\"response_flags\":\"", ",\"response_flags\":\"")
        w.close(w.put(r.responseFlags, escape: true), "\",\"route_name\":\"", ",\"route_name\":\"")
        w.close(w.put(r.routeName, escape: true), "\",\"start_time\":\"", ",\"start_time\":\"")
        clock.write(r.startTimeMillis, &w)
        w.lit("\",\"upstream_cluster\":\"")
        w.close(w.put(r.upstreamCluster, escape: true), "\",\"upstream_host\":\"", ",\"upstream_host\":\"")
        w.close(w.put(r.upstreamHost, escape: true), "\",\"upstream_local_address\":\"", ",\"upstream_local_address\":\"")
        w.close(w.put(r.upstreamLocalAddress, escape: true), "\",\"upstream_service_time\":\"", ",\"upstream_service_time\":\"")
        w.close(r.withResponseHeader(lowercased: x.serviceTime) { w.put($0, escape: true) },
                "\",\"upstream_transport_failure_reason\":\"", ",\"upstream_transport_failure_reason\":\"")
        w.close(w.put(r.upstreamTransportFailureReason, escape: true), "\",\"user_agent\":\"", ",\"user_agent\":\"")
        w.close(header(x.userAgent, r, head, spans, names, &w, true), "\",\"x_forwarded_for\":\"", ",\"x_forwarded_for\":\"")
        w.close(header(x.forwardedFor, r, head, spans, names, &w, true), "\"}\n", "}\n")
    }

    /// Writes request header `i` of the format's names as `withRequestHead` located it;
    /// false (nothing written) when absent or empty.
    @inlinable @inline(__always)
    static func header<R: AccessLogRecord>(_ i: Int, _ r: R, _ head: UnsafeRawBufferPointer, _ spans: UnsafeMutablePointer<AccessLogValueSpan>,
                                           _ names: AccessLogHeaderNames, _ w: inout LineWriter, _ escape: Bool) -> Bool {
        let s = spans[i]
        if s.start >= 0 {
            if s.length == 0 { return false }
            w.put(head.baseAddress! + Int(s.start), Int(s.length), escape: escape)
            return true
        }
        if s.start == -1 { return false }
        if let at = s.scratchOffset, let base = r.valueScratch {
            // A value the record copied into its scratch (`AccessLogValueSpan.scratch`).
            w.put(base + at, Int(s.length), escape: escape)
            return true
        }
        return otherHeader(s, i, r, names, &w, escape)
    }

    /// A value the record hands out itself (`withOtherRequestHeader`: rare per line).
    @usableFromInline @inline(never)
    static func otherHeader<R: AccessLogRecord>(_ s: AccessLogValueSpan, _ i: Int, _ r: R, _ names: AccessLogHeaderNames, _ w: inout LineWriter, _ escape: Bool) -> Bool {
        r.withOtherRequestHeader(s, index: i, names) { w.put($0, escape: escape) }
    }

    /// The line for `r` as a String, by the String path (reference for `render(_:into:)`).
    public func renderString(_ r: AccessLogRecord) -> String {
        switch shape {
        case .text(let ops):
            var out = ""
            for o in ops { out += Self.value(o, r) ?? "-" }
            return out
        case .json(let fields):
            var out = "{"
            for (i, (k, ops)) in fields.enumerated() {
                if i > 0 { out += "," }
                out += JSON.quote(k) + ":"
                if ops.count == 1 {
                    // One operator: its own type (numbers stay numbers, nothing is null).
                    guard let v = Self.value(ops[0], r) else { out += "null"; continue }
                    out += Self.isNumeric(ops[0]) ? v : JSON.quote(v)
                } else {
                    out += JSON.quote(ops.map { Self.value($0, r) ?? "-" }.joined())
                }
            }
            return out + "}\n"
        }
    }

    /// The String value of `.slow` instruction `i`'s operator (not inlined: rare).
    @usableFromInline
    static func slowValue(_ p: Program, _ i: Int, _ r: AccessLogRecord) -> String? { value(p.slow[i], r) }

    static func isNumeric(_ o: Op) -> Bool {
        switch o { case .code, .bytesIn, .bytesOut, .duration: return true; default: return false }
    }

    static func value(_ o: Op, _ r: AccessLogRecord) -> String? {
        func nz(_ s: String) -> String? { s.isEmpty ? nil : s }
        switch o {
        case .literal(let s): return s
        case .startTime: return iso8601(r.startTimeMillis)
        case .req(let n, let alt, let max): return clip(r.requestHeader(n).flatMap(nz) ?? alt.flatMap { r.requestHeader($0) }.flatMap(nz), max)
        case .resp(let n, let alt, let max): return clip(r.responseHeader(n).flatMap(nz) ?? alt.flatMap { r.responseHeader($0) }.flatMap(nz), max)
        case .proto: return nz(r.protocolName)
        case .code: return String(r.responseCode)
        case .flags: return nz(r.responseFlags)
        case .details: return nz(r.responseCodeDetails)
        case .termination: return nz(r.connectionTerminationDetails)
        case .transportFailure: return nz(r.upstreamTransportFailureReason)
        case .bytesIn: return String(r.bytesReceived)
        case .bytesOut: return String(r.bytesSent)
        case .duration: return String(r.durationMillis)
        case .upstreamHost: return nz(r.upstreamHost)
        case .upstreamCluster: return nz(r.upstreamCluster)
        case .upstreamLocal: return nz(r.upstreamLocalAddress)
        case .downstreamLocal: return nz(r.downstreamLocalAddress)
        case .downstreamLocalNoPort: return nz(withoutPort(r.downstreamLocalAddress))
        case .downstreamRemote: return nz(r.downstreamRemoteAddress)
        case .downstreamRemoteNoPort: return nz(withoutPort(r.downstreamRemoteAddress))
        case .sni: return nz(r.requestedServerName)
        case .routeName: return nz(r.routeName)
        }
    }

    static func clip(_ s: String?, _ max: Int?) -> String? {
        guard let s, let max, s.count > max else { return s }
        return String(s.prefix(max))
    }

    static func withoutPort(_ a: String) -> String {
        if a.hasPrefix("["), let end = a.firstIndex(of: "]") { return String(a[a.index(after: a.startIndex)..<end]) }
        guard let colon = a.lastIndex(of: ":"), a.firstIndex(of: ":") == colon else { return a }
        return String(a[..<colon])
    }

    /// Envoy's default START_TIME: `2026-12-06T04:05:07.123Z`.
    public static func iso8601(_ ms: Int64) -> String {
        var t = time_t(ms / 1000)
        var tm = tm()
        gmtime_r(&t, &tm)
        func d(_ v: Int32, _ w: Int) -> String { let s = String(v); return String(repeating: "0", count: max(0, w - s.count)) + s }
        return "\(d(tm.tm_year + 1900, 4))-\(d(tm.tm_mon + 1, 2))-\(d(tm.tm_mday, 2))T\(d(tm.tm_hour, 2)):\(d(tm.tm_min, 2)):\(d(tm.tm_sec, 2)).\(d(Int32(ms % 1000), 3))Z"
    }
}

/// Where `AccessLogFormat.runIstioJSON` finds what Istio's default JSON format reads:
/// the indexes of its request header names in the format's `AccessLogHeaderNames`, and
/// the response header name of `upstream_service_time`. Made only for that format.
@usableFromInline
struct IstioJSONSlots: @unchecked Sendable {
    @usableFromInline let authority: Int, method: Int, originalPath: Int, path: Int, requestID: Int, userAgent: Int, forwardedFor: Int
    @usableFromInline let serviceTime: UnsafeRawBufferPointer
    static let serviceTimeName: StaticString = "x-envoy-upstream-service-time"

    /// nil unless `shape` is exactly Istio's default JSON format (keys, order, operators).
    init?(_ shape: AccessLogFormat.Shape, names: [String]) {
        guard case .json(let fields) = shape, let istio = Self.istioFields, fields.count == istio.count else { return nil }
        for (a, b) in zip(fields, istio) where a.0 != b.0 || a.1 != b.1 { return nil }
        func at(_ n: String) -> Int? { names.firstIndex(of: n) }
        guard let a = at(":authority"), let m = at(":method"), let o = at("x-envoy-original-path"), let p = at(":path"),
              let r = at("x-request-id"), let u = at("user-agent"), let f = at("x-forwarded-for") else { return nil }
        authority = a; method = m; originalPath = o; path = p; requestID = r; userAgent = u; forwardedFor = f
        serviceTime = UnsafeRawBufferPointer(start: Self.serviceTimeName.utf8Start, count: Self.serviceTimeName.utf8CodeUnitCount)
    }

    /// Istio's default JSON format compiled (what a format is compared with).
    static let istioFields: [(String, [AccessLogFormat.Op])]? = try? AccessLogFormat.istioJSONLabels.map { ($0.0, try AccessLogFormat.compile($0.1)) }
}

public struct AccessLogFormatError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}
