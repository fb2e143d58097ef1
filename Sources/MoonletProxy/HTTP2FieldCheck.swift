import MoonletHTTP

/// Byte checks of HTTP/2 field names and values (RFC 9113 §8.2), for requests,
/// responses and trailers alike.
enum HTTP2FieldCheck {
    enum Value { case valid, control, malformed }

    /// Lanes (bit 7 of each byte) of `w` that hold a control byte (below 0x20) or DEL,
    /// exactly per lane (no borrow crosses lanes); bytes from 0x80 up are never flagged.
    @inline(__always)
    static func controlLanes(_ w: UInt64) -> UInt64 {
        let low = w & 0x7f7f_7f7f_7f7f_7f7f
        let below20 = ~(low &+ 0x6060_6060_6060_6060)            // bit 7 clear where low >= 0x20
        let x = low ^ 0x7f7f_7f7f_7f7f_7f7f                       // 0 where low == 0x7f
        let del = ~((x &+ 0x7f7f_7f7f_7f7f_7f7f) | x)             // bit 7 set where x == 0
        return (below20 | del) & ~w & 0x8080_8080_8080_8080
    }

    /// Lanes of `w` that hold a lowercase letter, a digit or "-", the bytes field names
    /// are made of (exact per lane; bytes from 0x80 up are never set).
    @inline(__always)
    static func nameLanes(_ w: UInt64) -> UInt64 {
        let low = w & 0x7f7f_7f7f_7f7f_7f7f
        let lower = (low &+ 0x1f1f_1f1f_1f1f_1f1f) & ~(low &+ 0x0505_0505_0505_0505)  // 0x61...0x7a
        let digit = (low &+ 0x5050_5050_5050_5050) & ~(low &+ 0x4646_4646_4646_4646)  // 0x30...0x39
        let x = low ^ 0x2d2d_2d2d_2d2d_2d2d
        let dash = ~((x &+ 0x7f7f_7f7f_7f7f_7f7f) | x)                               // 0x2d
        return (lower | digit | dash) & ~w & 0x8080_8080_8080_8080
    }

    /// The bytes of `p` from `i` to `n` (fewer than 8, at least 1) as a word: the last 8
    /// bytes (overlapping ones already seen) when `n` >= 8, else padded with `pad` bytes.
    @inline(__always)
    static func tailWord(_ p: UnsafeRawPointer, _ i: Int, _ n: Int, pad: UInt64) -> UInt64 {
        if n >= 8 { return p.loadUnaligned(fromByteOffset: n - 8, as: UInt64.self) }
        var w = pad
        withUnsafeMutableBytes(of: &w) { $0.baseAddress!.copyMemory(from: p + i, byteCount: n - i) }
        return w
    }

    /// A value's verdict, in one pass: `.malformed` for CR, LF or NUL, or a space or tab
    /// at either end (RFC 9113 §8.2.1: the message is malformed); `.control` for another
    /// control byte or DEL (which the HTTP/1.1 parser's field-value rule refuses); else
    /// `.valid` (bytes from 0x80 up are obs-text, allowed). Sixteen bytes at a time
    /// (SSE2 compares: a third of the word loop's instructions on a long value such as
    /// x-envoy-peer-metadata), then eight, the tail as one word; a block with a control
    /// byte or DEL goes byte by byte.
    @inline(__always)
    static func value(_ v: UnsafeRawBufferPointer) -> Value {
        let n = v.count
        guard n > 0, let p = v.baseAddress else { return .valid }
        let first = p.load(as: UInt8.self), last = p.load(fromByteOffset: n - 1, as: UInt8.self)
        if first == 32 || first == 9 || last == 32 || last == 9 { return .malformed }
        var i = 0
        let space = SIMD16<UInt8>(repeating: 0x20), del = SIMD16<UInt8>(repeating: 0x7f)
        while i + 16 <= n {
            let w = p.loadUnaligned(fromByteOffset: i, as: SIMD16<UInt8>.self)
            if any((w .< space) .| (w .== del)) { return valueBytes(p, from: i, n) }
            i += 16
        }
        while i + 8 <= n {
            if controlLanes(p.loadUnaligned(fromByteOffset: i, as: UInt64.self)) != 0 { return valueBytes(p, from: i, n) }
            i += 8
        }
        if i < n && controlLanes(tailWord(p, i, n, pad: 0x6161_6161_6161_6161)) != 0 { return valueBytes(p, from: i, n) }
        return .valid
    }

    /// `value`'s verdict from byte `i` on, byte by byte.
    static func valueBytes(_ p: UnsafeRawPointer, from i: Int, _ n: Int) -> Value {
        var control = false
        var i = i
        while i < n {
            let c = p.load(fromByteOffset: i, as: UInt8.self)
            if c < 32 || c == 127 {
                if c == 0 || c == 10 || c == 13 { return .malformed }
                if c != 9 { control = true }
            }
            i += 1
        }
        return control ? .control : .valid
    }

    /// Field-name bytes allowed in HTTP/2: token characters (HeaderValidation.isTchar)
    /// other than uppercase letters; nothing empty.
    @inline(__always)
    static func isName(_ n: UnsafeRawBufferPointer) -> Bool {
        var underscore = false
        return isName(n, underscore: &underscore)
    }

    /// The same, setting `underscore` when the name has a "_" (the
    /// headersWithUnderscoresAction check). Eight bytes at a time while they are
    /// lowercase letters, digits and "-", the tail as one word; any other byte sends
    /// the rest byte by byte.
    @inline(__always)
    static func isName(_ n: UnsafeRawBufferPointer, underscore: inout Bool) -> Bool {
        let count = n.count
        guard count > 0, let p = n.baseAddress else { return false }
        var i = 0
        while i + 8 <= count {
            if nameLanes(p.loadUnaligned(fromByteOffset: i, as: UInt64.self)) != 0x8080_8080_8080_8080 {
                return nameBytes(p, from: i, count, underscore: &underscore)
            }
            i += 8
        }
        if i < count && nameLanes(tailWord(p, i, count, pad: 0x6161_6161_6161_6161)) != 0x8080_8080_8080_8080 {
            return nameBytes(p, from: i, count, underscore: &underscore)
        }
        return true
    }

    /// `isName` from byte `i` on, byte by byte.
    static func nameBytes(_ p: UnsafeRawPointer, from i: Int, _ n: Int, underscore: inout Bool) -> Bool {
        var seen = false
        var i = i
        while i < n {
            let c = p.load(fromByteOffset: i, as: UInt8.self)
            if !HeaderValidation.isTchar(c) || c &- 65 < 26 { return false }
            if c == 95 { seen = true }
            i += 1
        }
        if seen { underscore = true }
        return true
    }

    /// `v` is `lit`; `foldingCase`: in any case (`lit` is lowercase).
    @inline(__always)
    static func equals(_ v: UnsafeRawBufferPointer, _ lit: StaticString, foldingCase: Bool = false) -> Bool {
        let n = lit.utf8CodeUnitCount
        guard v.count == n else { return false }
        let p = lit.utf8Start
        for k in 0..<n {
            let c = v[k]
            if (foldingCase && c &- 65 < 26 ? c | 0x20 : c) != p[k] { return false }
        }
        return true
    }
}
