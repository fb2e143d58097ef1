/// Istio's `meshConfig.pathNormalization.normalization`: how the request path is
/// normalized before routing, authorization, filters, logs and the upstream see it.
///
/// Istio configures Envoy per mode (HttpConnectionManager):
/// - NONE: nothing (normalize_path false).
/// - BASE: normalize_path (RFC 3986 through Chromium's path canonicalizer).
/// - MERGE_SLASHES: BASE, then merge_slashes.
/// - DECODE_AND_MERGE_SLASHES: path_with_escaped_slashes_action UNESCAPE_AND_FORWARD
///   (%2F/%2f to "/", %5C/%5c to "\"), then BASE, then merge_slashes.
///
/// In every mode a fragment ("#" onwards) is dropped first, and `%00` in the path (before
/// "?") is refused. Envoy refuses `%00` only where it canonicalizes (not in NONE);
/// Moonlet refuses it in NONE too, so a NUL never reaches a filter or the upstream.
public enum PathNormalization: String, Sendable, CaseIterable {
    case none = "NONE"
    case base = "BASE"
    case mergeSlashes = "MERGE_SLASHES"
    case decodeAndMergeSlashes = "DECODE_AND_MERGE_SLASHES"
}

/// What `PathNormalization.normalize` decided.
public enum PathNormalizationResult: Equatable, Sendable {
    /// The input is already normal: use it as is (nothing was allocated).
    case unchanged
    /// The normalized target: path, then the query as it was; no fragment.
    case normalized([UInt8])
    /// The path cannot be normalized (`%00`): answer 400.
    case rejected
}

extension PathNormalization {
    /// Normalizes an origin-form request target (`/path[?query][#fragment]`). A target
    /// that does not start with "/" (asterisk-form, or anything else) is left unchanged.
    ///
    /// The common case costs one scan and no allocation: without "%", "\", "//", "/.",
    /// "#" or a byte Chromium's canonicalizer escapes, the answer is `.unchanged`.
    public func normalize(_ target: UnsafeRawBufferPointer) -> PathNormalizationResult {
        let n = target.count
        guard n > 0, target[0] == 0x2F else { return .unchanged }
        // One scan up to "?" or "#": is there anything this mode could change?
        var pathEnd = n
        var hasFragment = false
        var needsWork = false
        var prev: UInt8 = 0
        var i = 0
        while i < n {
            let c = target[i]
            if c == 0x3F { pathEnd = i; break }
            if c == 0x23 { pathEnd = i; hasFragment = true; break }
            if self == PathNormalization.none {
                if c == 0x25 { needsWork = true }
            } else if c == 0x25 || c == 0x5C || Self.canonEscapes(c)
                        || (prev == 0x2F && (c == 0x2F || c == 0x2E)) {
                needsWork = true
            }
            prev = c
            i += 1
        }
        if !hasFragment && pathEnd < n {
            // The query is kept as is, but "#" in it still starts a fragment.
            var j = pathEnd
            while j < n { if target[j] == 0x23 { hasFragment = true; break }; j += 1 }
        }
        if !needsWork && !hasFragment { return .unchanged }

        // The target without its fragment.
        var end = n
        if hasFragment { var j = 0; while target[j] != 0x23 { j += 1 }; end = j }
        let path = UnsafeRawBufferPointer(rebasing: target[0..<pathEnd])
        let query = UnsafeRawBufferPointer(rebasing: target[pathEnd..<end])

        if self == PathNormalization.none {
            if Self.containsEscapedNul(path) { return .rejected }
            return hasFragment ? .normalized(Array(target[0..<end])) : .unchanged
        }

        var out: [UInt8]
        if self == .decodeAndMergeSlashes {
            let decoded = Self.unescapeSlashes(path)
            guard let c = decoded.withUnsafeBytes({ Self.canonicalize($0) }) else { return .rejected }
            out = c
        } else {
            guard let c = Self.canonicalize(path) else { return .rejected }
            out = c
        }
        if self != .base { out = Self.mergeSlashes(out) }
        out.append(contentsOf: query)
        if !hasFragment && out.count == n && out.elementsEqual(target) { return .unchanged }
        return .normalized(out)
    }

    /// `normalize` for a String (tests, config, the Lua side).
    public func normalize(_ target: String) -> PathNormalizationResult {
        var s = target
        return s.withUTF8 { normalize(UnsafeRawBufferPointer($0)) }
    }

    // MARK: - The steps, as Envoy runs them

    static func containsEscapedNul(_ p: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        while i + 2 < p.count {
            if p[i] == 0x25 && p[i + 1] == 0x30 && p[i + 2] == 0x30 { return true }
            i += 1
        }
        return false
    }

    /// Envoy's PathUtil::unescapeSlashes: %2F and %2f become "/", %5C and %5c become "\"
    /// (exact-case patterns, one pass each, as its replacements run).
    static func unescapeSlashes(_ p: UnsafeRawBufferPointer) -> [UInt8] {
        var s = Array(p)
        for (hi, lo, to) in [(UInt8(0x32), UInt8(0x46), UInt8(0x2F)), (0x32, 0x66, 0x2F), (0x35, 0x43, 0x5C), (0x35, 0x63, 0x5C)] {
            var r: [UInt8] = []
            r.reserveCapacity(s.count)
            var i = 0
            while i < s.count {
                if s[i] == 0x25 && i + 2 < s.count && s[i + 1] == hi && s[i + 2] == lo {
                    r.append(to); i += 3
                } else { r.append(s[i]); i += 1 }
            }
            s = r
        }
        return s
    }

    /// Envoy's PathTransformer::mergeSlashes on a path without query: if it holds "//",
    /// its non-empty segments joined by "/", with the leading and trailing "/" kept.
    static func mergeSlashes(_ p: [UInt8]) -> [UInt8] {
        var has = false
        var i = 1
        while i < p.count { if p[i] == 0x2F && p[i - 1] == 0x2F { has = true; break }; i += 1 }
        if !has { return p }
        var out: [UInt8] = []
        out.reserveCapacity(p.count)
        if p.first == 0x2F { out.append(0x2F) }
        var wroteSegment = false
        for seg in p.split(separator: 0x2F, omittingEmptySubsequences: true) {
            if wroteSegment { out.append(0x2F) }
            out.append(contentsOf: seg)
            wroteSegment = true
        }
        if p.last == 0x2F { out.append(0x2F) }
        return out
    }

    // Chromium's path character classes (Envoy's snapshot, source/common/chromium_url).
    private static let pass: UInt8 = 0, escape: UInt8 = 1, unescape: UInt8 = 2, invalid: UInt8 = 3, dot: UInt8 = 4

    /// The class of byte `c` in a path: pass through, escape, unescape when escaped,
    /// invalid (NUL) or the dot.
    @inline(__always)
    static func charClass(_ c: UInt8) -> UInt8 {
        switch c {
        case 0: return invalid
        case 0x30...0x39, 0x41...0x5A, 0x61...0x7A, 0x2D, 0x5F, 0x7E: return unescape
        case 0x2E: return dot
        case 0x21, 0x24, 0x26...0x2C, 0x2F, 0x3A, 0x3B, 0x3D, 0x40, 0x5B, 0x5D: return pass
        default: return escape // controls, space " # % < > ? \ ^ ` { | } DEL, bytes >= 0x80
        }
    }

    /// Whether Chromium writes a raw `c` escaped (other than "%" and "\", handled apart).
    @inline(__always)
    static func canonEscapes(_ c: UInt8) -> Bool {
        c <= 0x20 || c >= 0x7F || c == 0x22 || c == 0x3C || c == 0x3E || c == 0x5E || c == 0x60 || c == 0x7B || c == 0x7C || c == 0x7D
    }

    @inline(__always)
    static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: return c - 0x30
        case 0x41...0x46: return c - 0x41 + 10
        case 0x61...0x66: return c - 0x61 + 10
        default: return nil
        }
    }

    /// A "%XY" escape at `i`: its value.
    @inline(__always)
    static func decodeEscape<C: RandomAccessCollection>(_ s: C, _ i: Int) -> UInt8? where C.Element == UInt8, C.Index == Int {
        guard i + 3 <= s.endIndex, s[i] == 0x25, let h = hexValue(s[i + 1]), let l = hexValue(s[i + 2]) else { return nil }
        return h << 4 | l
    }

    /// Length of a dot at `i`: "." is 1, "%2e"/"%2E" is 3, otherwise 0.
    @inline(__always)
    static func dotLength(_ s: UnsafeRawBufferPointer, _ i: Int) -> Int {
        if s[i] == 0x2E { return 1 }
        if s[i] == 0x25 && i + 3 <= s.count && s[i + 1] == 0x32 && (s[i + 2] == 0x65 || s[i + 2] == 0x45) { return 3 }
        return 0
    }

    static let hexDigits: [UInt8] = Array("0123456789ABCDEF".utf8)

    /// Chromium's CanonicalizePath (DoPath/DoPartialPath) on a path without query or
    /// fragment: unreserved escapes decoded, other escapes kept byte for byte, "\" to "/",
    /// "." and ".." segments (also written %2e) resolved, bytes Chromium escapes written
    /// as %XX. Nil when the path holds a NUL, escaped or not.
    static func canonicalize(_ s: UnsafeRawBufferPointer) -> [UInt8]? {
        let end = s.count
        var out: [UInt8] = []
        out.reserveCapacity(end + 8)
        if end == 0 { return [0x2F] }
        if s[0] != 0x2F && s[0] != 0x5C { out.append(0x2F) }
        var success = true
        var lastInvalidPercent = Int.min
        var i = 0
        func isSlash(_ c: UInt8) -> Bool { c == 0x2F || c == 0x5C }
        while i < end {
            let c = s[i]
            let cls = charClass(c)
            let dl = (cls == dot || c == 0x25) ? dotLength(s, i) : 0
            if dl > 0 {
                if out.last == 0x2F {
                    // What follows the dot: end, a slash, or a second dot then end or slash.
                    let after = i + dl
                    var consumed = 0
                    var disposition = 0 // 0 not a directory, 1 current, 2 up
                    if after == end { disposition = 1 }
                    else if isSlash(s[after]) { disposition = 1; consumed = 1 }
                    else {
                        let dl2 = dotLength(s, after)
                        if dl2 > 0 {
                            let after2 = after + dl2
                            if after2 == end { disposition = 2; consumed = dl2 }
                            else if isSlash(s[after2]) { disposition = 2; consumed = dl2 + 1 }
                        }
                    }
                    switch disposition {
                    case 0: out.append(0x2E); i += dl
                    case 1: i += dl + consumed
                    default:
                        // Back up to the previous slash, never above the first one.
                        var k = out.count - 1
                        if k > 0 {
                            k -= 1
                            while out[k] != 0x2F && k > 0 { k -= 1 }
                            out.removeSubrange((k + 1)...)
                        }
                        i += dl + consumed
                    }
                } else {
                    out.append(0x2E); i += dl
                }
                continue
            }
            if c == 0x5C {
                out.append(0x2F)
            } else if c == 0x25 {
                if let v = decodeEscape(s, i) {
                    let vc = charClass(v)
                    if vc == unescape {
                        out.append(v)
                        if lastInvalidPercent >= out.count - 3 {
                            checkForNestedEscapes(s, i + 3, lastInvalidPercent, &out)
                        }
                    } else {
                        out.append(0x25); out.append(s[i + 1]); out.append(s[i + 2])
                        if vc == invalid { success = false }
                    }
                    i += 2
                } else {
                    lastInvalidPercent = out.count
                    out.append(0x25)
                }
            } else if cls == invalid {
                out.append(0x25); out.append(hexDigits[Int(c >> 4)]); out.append(hexDigits[Int(c & 15)])
                success = false
            } else if cls == escape {
                out.append(0x25); out.append(hexDigits[Int(c >> 4)]); out.append(hexDigits[Int(c & 15)])
            } else {
                out.append(c)
            }
            i += 1
        }
        return success ? out : nil
    }

    /// Chromium's CheckForNestedEscapes: after an unescape right behind a "%" that began
    /// no valid escape, the output must not now read as an escape ("%%30%30" would turn
    /// into "%00"); if it does, that "%" is written "%25".
    static func checkForNestedEscapes(_ s: UnsafeRawBufferPointer, _ next: Int, _ lastInvalid: Int, _ out: inout [UInt8]) {
        let length = out.count
        let lastUnescaped = out[length - 1]
        let appendNext = lastInvalid == length - 2
        if appendNext {
            if next == s.count || s[next] >= 0x80 { return }
            out.append(s[next])
        }
        if decodeEscape(out, lastInvalid) != nil {
            if !appendNext { out.append(out[lastInvalid + 1]) }
            out[lastInvalid + 1] = 0x32
            out[lastInvalid + 2] = 0x35
            out.append(lastUnescaped)
        } else if appendNext {
            out.removeSubrange(length...)
        }
    }
}
