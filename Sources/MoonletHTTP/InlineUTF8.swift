#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Strings of at most 15 ASCII bytes read where they are stored: Swift keeps such a
/// String ("small") inside its own two words, the bytes in memory order followed by a
/// discriminator byte (bit 63: immortal, 62: ASCII, 61: small; bits 56-59: the count),
/// unused bytes zero. The names of the header lines the proxy and the telemetry filters
/// add per request (`x-request-id`, `x-b3-traceid`, `traceparent`...) and most short
/// values are such Strings: their bytes are compared and copied as two words, without
/// the stack copy the String API makes of a small String, and without ARC.
///
/// Everything here is a shortcut with a fallback: `isAvailable` (checked once) says
/// whether this build's Strings have that layout; when it is false, or a String is not
/// small ASCII (`count(_:)` answers -1), callers take the String API's path.
public enum InlineUTF8 {
    /// Whether Strings are laid out as described (64-bit little-endian Swift 5 ABI),
    /// checked on Strings made at run time.
    public static let isAvailable: Bool = {
        guard MemoryLayout<String>.size == 16, UInt16(1).littleEndian == 1 else { return false }
        let s = String(decoding: [0x61, 0x2D, 0x62] as [UInt8], as: UTF8.self)
        let w = words(s)
        let t = "traceparent"
        let u = words(t)
        return w.0 == 0x62_2D61 && w.1 == 0xE3 << 56 && count(u.1) == 11 && u.0 == 0x7261_7065_6361_7274
    }()

    /// The two words of `s`'s representation (no retain: a bit copy).
    @inlinable @inline(__always)
    public static func words(_ s: String) -> (UInt64, UInt64) { unsafeBitCast(s, to: (UInt64, UInt64).self) }

    /// Whether two Strings have the same representation (the same storage object, or the
    /// same small-string bits): then they have the same bytes. False says nothing (and is
    /// all it says where `isAvailable` is false: `words` is only read where it is true).
    @inlinable @inline(__always)
    public static func identical(_ a: String, _ b: String) -> Bool { isAvailable && words(a) == words(b) }

    /// Whether two Strings have the same UTF-8 bytes (String's `==` compares canonical
    /// equivalence, through the Unicode-aware path): the same representation at once,
    /// else the lengths, then the bytes.
    @inlinable @inline(__always)
    public static func sameBytes(_ a: String, _ b: String) -> Bool {
        if identical(a, b) { return true }
        let n = a.utf8.count
        guard n == b.utf8.count else { return false }
        if n == 0 { return true }
        var a = a, b = b
        return a.withUTF8 { x in b.withUTF8 { y in memcmp(x.baseAddress!, y.baseAddress!, n) == 0 } }
    }

    /// The two words of the String stored at `p` (a String field in memory), read
    /// without touching its reference count.
    @inlinable @inline(__always)
    public static func words(at p: UnsafeRawPointer) -> (UInt64, UInt64) {
        (p.load(as: UInt64.self), p.load(fromByteOffset: 8, as: UInt64.self))
    }

    /// The byte count of a small ASCII String whose second word is `w1`; -1 for any
    /// other String (large, or small with non-ASCII bytes).
    @inlinable @inline(__always)
    public static func count(_ w1: UInt64) -> Int { w1 >> 61 == 7 ? Int(truncatingIfNeeded: (w1 >> 56) & 0xF) : -1 }

    /// Stores the String at `p` (a String field in memory) at `to` as its two words when
    /// it is small ASCII (16 bytes written whatever its count: the caller has room);
    /// returns the byte after its count, nil (nothing written) for any other String.
    @inlinable @inline(__always)
    public static func store(from p: UnsafeRawPointer, to: UnsafeMutableRawPointer) -> UnsafeMutableRawPointer? {
        let w = words(at: p)
        let n = count(w.1)
        guard n >= 0 else { return nil }
        to.storeBytes(of: w.0, as: UInt64.self)
        to.storeBytes(of: w.1, toByteOffset: 8, as: UInt64.self)
        return to + n
    }

    /// The words `s` has when it is small ASCII (the key to compare a stored name with),
    /// nil when it is not (longer than 15 bytes, non-ASCII) or the layout is not available.
    public static func key(_ s: String) -> (UInt64, UInt64)? {
        guard isAvailable, s.utf8.count <= 15 else { return nil }
        // Made again from its bytes: a String built some other way still compares as
        // the small form every String of these bytes has.
        let fresh = String(decoding: Array(s.utf8), as: UTF8.self)
        let w = words(fresh)
        return count(w.1) == fresh.utf8.count ? w : nil
    }
}
