/// Base64 (RFC 4648) for the JWT verifier (base64url, unpadded) and Istio's peer metadata
/// header (standard, padded; either alphabet read). One decoder: "=" only at the end, and a
/// leftover single symbol (6 bits, never valid) refused.
public enum Base64 {
    public enum Alphabet: Sendable {
        /// `+` and `/` (§4).
        case standard
        /// `-` and `_` (§5), as JWS uses it.
        case url
        /// Decoding only: either pair.
        case either
    }

    static let standardChars = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    static let urlChars = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)
    /// Symbol → value per alphabet (-1: not a symbol of it).
    static let tables: (standard: [Int8], url: [Int8], either: [Int8]) = {
        var s = [Int8](repeating: -1, count: 256), u = s, e = s
        for (i, c) in standardChars.enumerated() { s[Int(c)] = Int8(i); e[Int(c)] = Int8(i) }
        for (i, c) in urlChars.enumerated() { u[Int(c)] = Int8(i); e[Int(c)] = Int8(i) }
        return (s, u, e)
    }()

    /// Encodes `bytes`; `padded` adds "=" up to a multiple of four symbols.
    public static func encode<C: Collection>(_ bytes: C, alphabet: Alphabet = .standard, padded: Bool = true) -> String where C.Element == UInt8 {
        let chars = alphabet == .url ? urlChars : standardChars
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var acc: UInt32 = 0, bits = 0
        for b in bytes {
            acc = acc << 8 | UInt32(b); bits += 8
            while bits >= 6 { bits -= 6; out.append(chars[Int((acc >> UInt32(bits)) & 63)]) }
        }
        if bits > 0 { out.append(chars[Int((acc << UInt32(6 - bits)) & 63)]) }
        if padded { while out.count % 4 != 0 { out.append(UInt8(ascii: "=")) } }
        return String(decoding: out, as: UTF8.self)
    }

    /// Decodes base64 text of `alphabet`, padded or not; nil on any other byte, on a
    /// symbol after "=", or on a single leftover symbol.
    public static func decode<C: Collection>(_ text: C, alphabet: Alphabet) -> [UInt8]? where C.Element == UInt8 {
        let table: [Int8]
        switch alphabet { case .standard: table = tables.standard; case .url: table = tables.url; case .either: table = tables.either }
        var out: [UInt8] = []
        out.reserveCapacity(text.count * 3 / 4)
        var acc: UInt32 = 0, bits = 0, padding = false
        for c in text {
            if c == UInt8(ascii: "=") { padding = true; continue }
            if padding { return nil }
            let v = table[Int(c)]
            if v < 0 { return nil }
            acc = acc << 6 | UInt32(v); bits += 6
            if bits >= 8 { bits -= 8; out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits))) }
        }
        if bits >= 6 { return nil }
        return out
    }

    /// base64url without padding, as JWS writes it.
    public static func encodeURL<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 { encode(bytes, alphabet: .url, padded: false) }

    /// `decode` of a String.
    public static func decode(_ text: String, alphabet: Alphabet = .either) -> [UInt8]? { decode(Array(text.utf8), alphabet: alphabet) }
}
