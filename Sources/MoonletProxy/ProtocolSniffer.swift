import NIOCore

/// Istio's protocol detection on the first bytes of an intercepted connection (Envoy's
/// http_inspector and tls_inspector): an HTTP/1.x request line, the HTTP/2 (h2c)
/// preface, a TLS ClientHello (its SNI read), anything else TCP. Pure: the
/// InterceptionHandler feeds it what has arrived so far.
enum ProtocolSniffer {
    enum Result: Equatable {
        /// Not decided yet: more bytes are needed.
        case needMore
        case http1
        case http2
        /// A TLS ClientHello: passed through untouched as TCP; `sni` is its server name
        /// (nil when it has none).
        case tls(sni: String?)
        case tcp
    }

    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    /// Bytes looked at, at most: a request line or ClientHello longer than this is served
    /// as TCP (a ClientHello) or TCP (no request line in sight).
    static let maxBytes = 16 * 1024 + 5

    /// Classifies `b` (the connection's bytes so far, from its start).
    static func classify(_ b: ByteBufferView) -> Result {
        guard let first = b.first else { return .needMore }
        if first == 0x16 { return classifyTLS(b) }
        if first == UInt8(ascii: "P") {
            // The h2c preface, or a request line starting with P (POST, PUT, PATCH, PRI).
            var i = b.startIndex, k = 0
            while i < b.endIndex && k < preface.count && b[i] == preface[k] { i = b.index(after: i); k += 1 }
            if k == preface.count { return .http2 }
            if i == b.endIndex { return .needMore }
        }
        return classifyHTTP1(b)
    }

    /// "METHOD SP target SP HTTP/1.x CRLF": a token of letters (Envoy's parser accepts
    /// the registered methods; any upper-case token is allowed here), a target without
    /// spaces or controls, the version. Anything that cannot become one is TCP.
    static func classifyHTTP1(_ b: ByteBufferView) -> Result {
        var phase = 0  // 0 method, 1 target, 2 version
        var n = 0
        var version: [UInt8] = []
        for c in b {
            n += 1
            if n > 8192 { return .tcp }
            switch phase {
            case 0:
                if c == UInt8(ascii: " ") { if n == 1 { return .tcp }; phase = 1; continue }
                if !(c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z")) && c != UInt8(ascii: "-") && c != UInt8(ascii: "_") { return .tcp }
                if n > 32 { return .tcp }
            case 1:
                if c == UInt8(ascii: " ") { phase = 2; continue }
                if c < 0x21 || c == 0x7F { return .tcp }
            default:
                if c == UInt8(ascii: "\r") || c == UInt8(ascii: "\n") {
                    return version == Array("HTTP/1.1".utf8) || version == Array("HTTP/1.0".utf8) ? .http1 : .tcp
                }
                version.append(c)
                let want = Array("HTTP/1.".utf8)
                if version.count <= want.count ? !want.starts(with: version) : version.count > 8 { return .tcp }
            }
        }
        return .needMore
    }

    /// A TLS handshake record holding a ClientHello: waits for the whole record (up to
    /// 16 KB), then reads the server_name extension.
    static func classifyTLS(_ v: ByteBufferView) -> Result {
        let b = Array(v.prefix(maxBytes))
        guard b.count >= 6 else { return b.count >= 2 && b[1] != 0x03 ? .tcp : .needMore }
        guard b[1] == 0x03, b[5] == 0x01 else { return .tcp }  // TLS record version 3.x, ClientHello
        let recordLength = Int(b[3]) << 8 | Int(b[4])
        guard b.count >= 5 + recordLength else { return b.count >= maxBytes ? .tls(sni: nil) : .needMore }
        return .tls(sni: serverName(Array(b[5..<(5 + recordLength)])))
    }

    /// The host_name of a ClientHello's server_name extension (RFC 6066), nil without one.
    static func serverName(_ h: [UInt8]) -> String? {
        // Handshake header (4), version (2), random (32).
        var i = 4 + 2 + 32
        func u8() -> Int? { guard i < h.count else { return nil }; defer { i += 1 }; return Int(h[i]) }
        func u16() -> Int? { guard i + 1 < h.count else { return nil }; defer { i += 2 }; return Int(h[i]) << 8 | Int(h[i + 1]) }
        guard let sid = u8() else { return nil }
        i += sid
        guard let suites = u16() else { return nil }
        i += suites
        guard let comp = u8() else { return nil }
        i += comp
        guard let extLen = u16() else { return nil }
        let end = min(h.count, i + extLen)
        while i + 4 <= end {
            guard let type = u16(), let len = u16() else { return nil }
            if type == 0 {
                // server_name_list: length (2), then entries of type (1), length (2), name.
                var j = i + 2
                while j + 3 <= i + len && j + 3 <= h.count {
                    let nameType = h[j], nameLen = Int(h[j + 1]) << 8 | Int(h[j + 2])
                    j += 3
                    guard j + nameLen <= h.count else { return nil }
                    if nameType == 0 { return String(decoding: h[j..<(j + nameLen)], as: UTF8.self).lowercased() }
                    j += nameLen
                }
                return nil
            }
            i += len
        }
        return nil
    }
}
