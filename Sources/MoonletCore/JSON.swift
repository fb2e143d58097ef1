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
                    for c in src {
                        switch c {
                        case 34, 92: out[i] = 92; out[i + 1] = c; i += 2
                        case 10: out[i] = 92; out[i + 1] = 110; i += 2
                        case 13: out[i] = 92; out[i + 1] = 114; i += 2
                        case 9: out[i] = 92; out[i + 1] = 116; i += 2
                        case 0..<0x20:
                            out[i] = 92; out[i + 1] = 117; out[i + 2] = 48; out[i + 3] = 48
                            out[i + 4] = hexDigit(c >> 4); out[i + 5] = hexDigit(c & 15)
                            i += 6
                        default: out[i] = c; i += 1
                        }
                    }
                }
                out[i] = 34
                return i + 1
            }
        }
    }

    @inline(__always)
    static func hexDigit(_ v: UInt8) -> UInt8 { v < 10 ? 48 + v : 87 + v }
}
