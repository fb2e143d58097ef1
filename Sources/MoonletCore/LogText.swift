/// Text from a peer (certificate subjects and SANs, header values, paths) made safe for
/// a log line: control characters are written as escapes, so a value holding a newline
/// cannot start a forged log line of its own, and a backslash is doubled, so a literal
/// "\n" from a peer is told apart from an escaped newline. Text is escaped once, where
/// the peer's text enters the message.
public enum LogText {
    /// `s` with every control character (C0, DEL, C1, and the Unicode line and
    /// paragraph separators) written as `\n`, `\r`, `\t` or `\u{XX}`, and `\` as `\\`;
    /// unchanged (no copy) when it holds none of them.
    public static func escape(_ s: String) -> String {
        guard s.unicodeScalars.contains(where: needsEscape) else { return s }
        var out = ""
        out.reserveCapacity(s.utf8.count + 8)
        for u in s.unicodeScalars {
            guard needsEscape(u) else { out.unicodeScalars.append(u); continue }
            switch u {
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default: out += "\\u{" + String(u.value, radix: 16) + "}"
            }
        }
        return out
    }

    static func needsEscape(_ u: Unicode.Scalar) -> Bool {
        u.value < 0x20 || (0x7F...0x9F).contains(u.value) || u.value == 0x2028 || u.value == 0x2029 || u == "\\"
    }
}
