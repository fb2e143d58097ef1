/// JSON text helpers for the admin API, `moonlet validate`, the CA service and the span
/// exporters.
public enum JSON {
    /// `s` as a JSON string literal: `"` and `\` escaped, newline, carriage return and tab
    /// as `\n` `\r` `\t`, other control characters as `\u00XX`; everything else (UTF-8
    /// included) as it is. Works on the UTF-8 bytes: one pass to size the result, one to
    /// write it, one allocation.
    public static func quote(_ s: String) -> String {
        var s = s
        return s.withUTF8 { src in
            var extra = 0
            for c in src where c < 0x20 || c == 34 || c == 92 {
                extra += (c == 34 || c == 92 || c == 10 || c == 13 || c == 9) ? 1 : 5
            }
            let n = src.count + 2 + extra
            return String(unsafeUninitializedCapacity: n) { out in
                out[0] = 34
                var i = 1
                if extra == 0 {
                    if let base = src.baseAddress, src.count > 0 {
                        UnsafeMutableRawPointer(out.baseAddress! + 1).copyMemory(from: base, byteCount: src.count)
                    }
                    i += src.count
                } else {
                    for c in src { escape(c) { out[i] = $0; i += 1 } }
                }
                out[i] = 34
                return i + 1
            }
        }
    }

    /// Appends `s` as a JSON string literal (as `quote` writes it) to `out`: the bytes are
    /// copied as they are unless one needs escaping.
    public static func appendQuoted(_ s: String, to out: inout [UInt8]) {
        var s = s
        s.withUTF8 { src in
            out.append(34)
            var plain = true
            for c in src where c < 0x20 || c == 34 || c == 92 { plain = false; break }
            if plain {
                out.append(contentsOf: src)
            } else {
                for c in src { escape(c) { out.append($0) } }
            }
            out.append(34)
        }
    }

    /// Writes byte `c` of a string's UTF-8 as it appears inside a JSON literal.
    @inline(__always)
    static func escape(_ c: UInt8, _ put: (UInt8) -> Void) {
        switch c {
        case 34, 92: put(92); put(c)
        case 10: put(92); put(110)
        case 13: put(92); put(114)
        case 9: put(92); put(116)
        case 0..<0x20: put(92); put(117); put(48); put(48); put(hexDigit(c >> 4)); put(hexDigit(c & 15))
        default: put(c)
        }
    }

    @inline(__always)
    static func hexDigit(_ v: UInt8) -> UInt8 { v < 10 ? 48 + v : 87 + v }
}
