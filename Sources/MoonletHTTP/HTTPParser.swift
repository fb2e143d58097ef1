import NIOCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Limits the parser enforces while it reads a head. Defaults follow Envoy's
/// (60 KiB of headers, 100 headers).
public struct HTTPParserLimits: Sendable {
    /// Largest head (start line + headers) accepted; beyond it: 431.
    public var maxHeadBytes: Int = 60 * 1024
    /// Most header lines accepted; beyond it: 431.
    public var maxHeaderCount: Int = 100
    public init(maxHeadBytes: Int = 60 * 1024, maxHeaderCount: Int = 100) {
        self.maxHeadBytes = maxHeadBytes; self.maxHeaderCount = maxHeaderCount
    }
}

/// Result of offering buffered bytes to the head parser.
public enum HeadParseResult: Sendable {
    /// The head is not complete yet; call again with more bytes.
    case needMore
    /// A complete head; `consumed` bytes of the input belong to it.
    case complete(HTTPHead, consumed: Int)
    case error(HTTPParseError)
}

/// A strict RFC 9112 head parser working in place on a ByteBuffer. It refuses what
/// request smuggling needs: bare LF, obs-fold, whitespace before a colon, CR/LF/NUL
/// in values, Content-Length with Transfer-Encoding, bad Content-Length, Transfer-Encoding
/// other than a final "chunked", Transfer-Encoding on HTTP/1.0.
public struct HTTPHeadParser: Sendable {
    public var limits: HTTPParserLimits
    /// Where the search for the end of the head resumes, so a head that arrives in
    /// many reads is scanned once.
    private var scanned = 0

    public init(limits: HTTPParserLimits = .init()) { self.limits = limits }

    public mutating func reset() { scanned = 0 }

    /// Looks for a complete request head at the reader index of `buffer`.
    public mutating func parseRequest(_ buffer: ByteBuffer) -> HeadParseResult {
        parse(buffer, isRequest: true, requestWasHead: false)
    }

    /// Looks for a complete response head. `requestWasHead` selects HEAD framing (no body).
    public mutating func parseResponse(_ buffer: ByteBuffer, requestWasHead: Bool) -> HeadParseResult {
        parse(buffer, isRequest: false, requestWasHead: requestWasHead)
    }

    private mutating func parse(_ buffer: ByteBuffer, isRequest: Bool, requestWasHead: Bool) -> HeadParseResult {
        // Find CRLFCRLF, jumping from LF to LF with memchr (SIMD in libc); a lone LF is
        // an error. Every other byte (NUL, CR without LF, controls) is checked by
        // parseHead, which looks at each byte of the head once.
        let readable = buffer.readableBytes
        let end = buffer.withUnsafeReadableBytes { raw -> Int in
            guard let base = raw.baseAddress else { return -1 }
            var i = scanned
            let n = raw.count
            while i < n, let hit = memchr(base + i, 10, n - i) {
                let j = base.distance(to: UnsafeRawPointer(hit))
                if j == 0 || raw[j - 1] != 13 { return -2 }
                if j >= 3 && raw[j - 2] == 10 && raw[j - 3] == 13 { return j + 1 }
                i = j + 1
            }
            return -1
        }
        if end == -2 { return .error(HTTPParseError(400, "bare LF in head")) }
        if end < 0 {
            scanned = max(0, readable - 3)
            if readable > limits.maxHeadBytes { return .error(HTTPParseError(431, "head larger than \(limits.maxHeadBytes) bytes")) }
            return .needMore
        }
        scanned = 0
        if end > limits.maxHeadBytes { return .error(HTTPParseError(431, "head larger than \(limits.maxHeadBytes) bytes")) }
        let slice = buffer.getSlice(at: buffer.readerIndex, length: end)!
        var head = HTTPHead(bytes: slice, isRequest: isRequest)
        if let err = Self.parseHead(&head, limits: limits, requestWasHead: requestWasHead) { return .error(err) }
        return .complete(head, consumed: end)
    }

    // MARK: - Head

    static func parseHead(_ head: inout HTTPHead, limits: HTTPParserLimits, requestWasHead: Bool) -> HTTPParseError? {
        head.bytes.withUnsafeReadableBytes { raw -> HTTPParseError? in
            let n = raw.count
            var p = 0
            // Leading CRLFs before a request line are ignored (RFC 9112 §2.2).
            if head.isRequest { while p + 1 < n && raw[p] == 13 && raw[p + 1] == 10 { p += 2 } }
            if p + 2 >= n { return HTTPParseError(400, "empty start line") }
            // Start line ends at the first CRLF.
            var lineEnd = p
            while raw[lineEnd] != 13 { lineEnd += 1 }
            // The scan for the end of the head found an LF after this line; it must follow the CR.
            if raw[lineEnd + 1] != 10 { return HTTPParseError(head.isRequest ? 400 : 502, "CR without LF in start line") }
            if head.isRequest {
                let mStart = p
                while p < lineEnd && HeaderValidation.isTchar(raw[p]) { p += 1 }
                if p == mStart || p >= lineEnd || raw[p] != 32 { return HTTPParseError(400, "bad request method") }
                head.methodRange = mStart..<p
                p += 1
                let tStart = p
                // "#" stops the scan: a fragment is never sent (RFC 9112 §3.2), and one
                // would get past a route's path match (Envoy refuses it too).
                while p < lineEnd && raw[p] > 32 && raw[p] < 127 && raw[p] != 35 { p += 1 }
                if p == tStart || p >= lineEnd || raw[p] != 32 {
                    return HTTPParseError(400, p < lineEnd && raw[p] == 35 ? "fragment in request target" : "bad request target")
                }
                head.targetRange = tStart..<p
                // Origin-form costs one byte compare; the other forms are checked apart.
                if raw[tStart] != 47 {
                    switch Self.classifyTarget(raw, target: head.targetRange, method: head.methodRange) {
                    case .failure(let err): return err
                    case .success(let t):
                        head.targetForm = t.form
                        head.targetAuthorityRange = t.authority
                        head.targetPathRange = t.path
                    }
                } else if head.methodRange.count == 7 && raw[mStart] == 67 && Self.equals(raw, head.methodRange, "CONNECT") {
                    return HTTPParseError(400, "CONNECT needs an authority-form target (host:port)")
                }
                p += 1
                guard lineEnd - p == 8, let minor = version(raw, p) else {
                    return HTTPParseError(lineEnd - p == 8 && raw[p] == 72 ? 505 : 400, "bad HTTP version")
                }
                head.versionMinor = minor
                head.isHead = head.methodRange.count == 4 && raw[mStart] == 72 && raw[mStart + 1] == 69 && raw[mStart + 2] == 65 && raw[mStart + 3] == 68
            } else {
                guard lineEnd - p >= 12, let minor = version(raw, p), raw[p + 8] == 32 else {
                    return HTTPParseError(502, "bad status line from upstream")
                }
                head.versionMinor = minor
                var st = 0
                for k in 9..<12 {
                    let d = raw[p + k]
                    guard d >= 48 && d <= 57 else { return HTTPParseError(502, "bad status code from upstream") }
                    st = st * 10 + Int(d - 48)
                }
                guard st >= 100 else { return HTTPParseError(502, "bad status code from upstream") }
                head.status = st
                if lineEnd - p > 12 {
                    guard raw[p + 12] == 32 else { return HTTPParseError(502, "bad status line from upstream") }
                    head.reasonRange = (p + 13)..<lineEnd
                    for k in (p + 13)..<lineEnd where raw[k] < 32 && raw[k] != 9 || raw[k] == 127 {
                        return HTTPParseError(502, "control character in reason phrase")
                    }
                } else {
                    head.reasonRange = lineEnd..<lineEnd
                }
            }
            p = lineEnd + 2
            // Header lines.
            var fields: [HTTPField] = []
            fields.reserveCapacity(16)
            var contentLength: Int64? = nil
            var sawTE = false
            var teChunkedLast = false
            var keepAliveToken = false
            var closeToken = false
            var hostCount = 0
            var underscore = false
            while p < n - 2 {
                if fields.count >= limits.maxHeaderCount { return HTTPParseError(431, "more than \(limits.maxHeaderCount) headers") }
                let lineStart = p
                let c0 = raw[p]
                if c0 == 32 || c0 == 9 { return HTTPParseError(400, "obsolete line folding") }
                let nStart = p
                while p < n {
                    let c = raw[p]
                    guard HeaderValidation.isTchar(c) else { break }
                    underscore = underscore || c == 95
                    p += 1
                }
                if p == nStart || raw[p] != 58 {
                    return HTTPParseError(400, p < n && (raw[p] == 32 || raw[p] == 9) ? "whitespace before colon in header" : "bad header name")
                }
                let nEnd = p
                p += 1
                while raw[p] == 32 || raw[p] == 9 { p += 1 }
                let vStart = p
                while true {
                    // Eight bytes at a time while none is a control or DEL (the head ends
                    // in CRLFCRLF, so the CR that ends this value is ahead). Spaces stay
                    // in the fast loop: dates, user agents and lists have many.
                    while p + 8 <= n {
                        let w = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: p, as: UInt64.self))
                        let below20 = (w &- 0x2020_2020_2020_2020) & ~w & 0x8080_8080_8080_8080
                        let x = w ^ 0x7F7F_7F7F_7F7F_7F7F
                        let del = (x &- 0x0101_0101_0101_0101) & ~x & 0x8080_8080_8080_8080
                        if below20 | del != 0 { break }
                        p += 8
                    }
                    let c = raw[p]
                    if c < 32 || c == 127 {
                        // The rare bytes: CR ends the value, HTAB is allowed, the other
                        // controls are not.
                        if c == 13 { break }
                        if c != 9 { return HTTPParseError(400, "control character in header value") }
                    }
                    p += 1
                }
                // Trailing blanks are not part of the value.
                var vEnd = p
                while vEnd > vStart && (raw[vEnd - 1] == 32 || raw[vEnd - 1] == 9) { vEnd -= 1 }
                // raw[p] == 13; the scan in parse() guaranteed raw[p+1] == 10.
                if raw[p + 1] != 10 { return HTTPParseError(400, "CR without LF in header") }
                p += 2
                let kind = classify(raw, nStart, nEnd - nStart)
                let field = HTTPField(nameStart: Int32(nStart), nameLength: Int32(nEnd - nStart),
                                      valueStart: Int32(vStart), valueLength: Int32(vEnd - vStart),
                                      lineStart: Int32(lineStart), lineEnd: Int32(p), kind: kind)
                switch kind {
                case .contentLength:
                    guard let v = parseContentLength(raw, vStart, vEnd) else { return HTTPParseError(400, "bad content-length") }
                    if let cl = contentLength, cl != v { return HTTPParseError(400, "conflicting content-length headers") }
                    contentLength = v
                case .transferEncoding:
                    // Every coding list must end in chunked, and only chunked is supported.
                    // Tokens are compared in place; a String is made only for an error.
                    sawTE = true
                    var count = 0
                    var unsupported: (Int, Int)?
                    forEachToken(raw, vStart, vEnd) { ts, te in
                        count += 1
                        if unsupported == nil && !(te - ts == 7 && lowerEquals(raw, ts, "chunked")) { unsupported = (ts, te) }
                    }
                    if count == 0 { return HTTPParseError(400, "empty transfer-encoding") }
                    if let (ts, te) = unsupported {
                        return HTTPParseError(head.isRequest ? 501 : 502, "unsupported transfer-encoding \(lowercasedString(raw, ts, te))")
                    }
                    if teChunkedLast || count > 1 { return HTTPParseError(400, "chunked applied more than once") }
                    teChunkedLast = true
                case .connection:
                    // close and keep-alive are recognised in place; other tokens (names of
                    // hop-by-hop headers) are kept as lowercase strings.
                    forEachToken(raw, vStart, vEnd) { ts, te in
                        if te - ts == 5 && lowerEquals(raw, ts, "close") { closeToken = true }
                        else if te - ts == 10 && lowerEquals(raw, ts, "keep-alive") { keepAliveToken = true }
                        else { head.connectionTokens.append(lowercasedString(raw, ts, te)) }
                    }
                case .host:
                    hostCount += 1
                    head.hostIndex = fields.count
                case .expect:
                    if vEnd - vStart == 12 && lowerEquals(raw, vStart, "100-continue") { head.expectContinue = true }
                default: break
                }
                fields.append(field)
            }
            head.fields = fields
            head.underscoreInName = underscore
            head.keepAlive = head.versionMinor == 1 ? !closeToken : (keepAliveToken && !closeToken)
            if head.isRequest {
                if head.hostIndex >= 0 {
                    let f = fields[head.hostIndex]
                    let s = Int(f.valueStart), e = s + Int(f.valueLength)
                    if e > s && !Self.isValidAuthority(raw, s, e, requirePort: false) { return HTTPParseError(400, "invalid host header") }
                }
                if head.versionMinor == 1 && hostCount != 1 {
                    return HTTPParseError(400, hostCount == 0 ? "missing host header" : "more than one host header")
                }
                if hostCount > 1 { return HTTPParseError(400, "more than one host header") }
                if sawTE {
                    if head.versionMinor == 0 { return HTTPParseError(400, "transfer-encoding in an HTTP/1.0 request") }
                    if contentLength != nil { return HTTPParseError(400, "both content-length and transfer-encoding") }
                    head.framing = .chunked
                } else if let cl = contentLength {
                    head.framing = cl == 0 ? .none : .contentLength(cl)
                } else {
                    head.framing = .none
                }
            } else {
                let st = head.status
                if requestWasHead || (st >= 100 && st < 200) || st == 204 || st == 304 {
                    head.framing = .none
                } else if sawTE {
                    if contentLength != nil { return HTTPParseError(502, "both content-length and transfer-encoding from upstream") }
                    head.framing = head.versionMinor == 1 ? .chunked : .untilClose
                } else if let cl = contentLength {
                    head.framing = cl == 0 ? .none : .contentLength(cl)
                } else {
                    head.framing = .untilClose
                }
            }
            return nil
        }
    }

    /// A request target that does not start with "/": absolute-form (http or https, an
    /// authority without userinfo), `*` for OPTIONS, or authority-form for CONNECT; any
    /// other target is refused (RFC 9112 §3.2). CONNECT takes only authority-form.
    static func classifyTarget(_ raw: UnsafeRawBufferPointer, target: Range<Int>, method: Range<Int>)
        -> Result<(form: RequestTargetForm, authority: Range<Int>, path: Range<Int>), HTTPParseError> {
        let s = target.lowerBound, e = target.upperBound
        let bad = HTTPParseError(400, "request target is not origin-form, absolute-form, * (OPTIONS) or authority-form (CONNECT)")
        if equals(raw, method, "CONNECT") {
            guard isValidAuthority(raw, s, e, requirePort: true) else { return .failure(bad) }
            // No tunnels: Envoy without a CONNECT upgrade config refuses them with 403.
            return .failure(HTTPParseError(403, "CONNECT is not supported"))
        }
        if e - s == 1 && raw[s] == 42 {
            guard equals(raw, method, "OPTIONS") else { return .failure(bad) }
            return .success((.asterisk, 0..<0, 0..<0))
        }
        // scheme "://" authority path-abempty [ "?" query ]
        var k = s
        while k < e && raw[k] != 58 && raw[k] != 47 { k += 1 }
        let schemeLength = k - s
        guard k + 2 < e, raw[k] == 58, raw[k + 1] == 47, raw[k + 2] == 47 else { return .failure(bad) }
        guard (schemeLength == 4 && lowerEquals(raw, s, "http")) || (schemeLength == 5 && lowerEquals(raw, s, "https")) else {
            return .failure(HTTPParseError(400, "request target scheme is not http or https"))
        }
        let aStart = k + 3
        var aEnd = aStart
        while aEnd < e && raw[aEnd] != 47 && raw[aEnd] != 63 { aEnd += 1 }
        guard isValidAuthority(raw, aStart, aEnd, requirePort: false) else {
            return .failure(HTTPParseError(400, "invalid authority in request target"))
        }
        return .success((.absolute, aStart..<aEnd, aEnd..<e))
    }

    /// Whether `v` is a Host value the parser accepts (`host[:port]`, isValidAuthority):
    /// for values filters set, so the upstream never gets one the edge refuses.
    public static func isValidHost(_ v: UnsafeRawBufferPointer) -> Bool {
        isValidAuthority(v, 0, v.count, requirePort: false)
    }

    /// Whether `v` is an origin-form target the parser accepts: "/", then visible ASCII
    /// without "#".
    public static func isOriginForm(_ v: UnsafeRawBufferPointer) -> Bool {
        guard v.first == 47 else { return false }
        for c in v where c <= 32 || c >= 127 || c == 35 { return false }
        return true
    }

    /// Whether the bytes in `r` are exactly `lit` (case-sensitive, as methods are).
    static func equals(_ raw: UnsafeRawBufferPointer, _ r: Range<Int>, _ lit: StaticString) -> Bool {
        guard r.count == lit.utf8CodeUnitCount else { return false }
        let p = lit.utf8Start
        for k in 0..<r.count where raw[r.lowerBound + k] != p[k] { return false }
        return true
    }

    /// Whether `raw[s..<e]` is `host[:port]` (RFC 3986 §3.2.2-3): a reg-name or IPv4
    /// address of unreserved, pct-encoded and sub-delim bytes other than "," (a list is
    /// not a host), or an IP literal in brackets; a port of 1 to 5 digits up to 65535
    /// (required with `requirePort`). No userinfo ("@"), no blank, nothing empty.
    static func isValidAuthority(_ raw: UnsafeRawBufferPointer, _ s: Int, _ e: Int, requirePort: Bool) -> Bool {
        guard e > s else { return false }
        var k = s
        if raw[k] == 91 { // "[" IP-literal "]"
            k += 1
            let inner = k
            while k < e && raw[k] != 93 {
                let c = raw[k]
                guard (c >= 48 && c <= 58) || (c | 0x20 >= 97 && c | 0x20 <= 102) || c == 46 || c == 118 || c == 86 else { return false }
                k += 1
            }
            guard k < e, k > inner else { return false }
            k += 1
        } else {
            while k < e && raw[k] != 58 {
                guard isRegNameByte(raw[k]) else { return false }
                k += 1
            }
            guard k > s else { return false }
        }
        if k == e { return !requirePort }
        guard raw[k] == 58, e - k - 1 >= 1, e - k - 1 <= 5 else { return false }
        var port = 0
        for j in (k + 1)..<e {
            let d = raw[j]
            guard d >= 48 && d <= 57 else { return false }
            port = port * 10 + Int(d - 48)
        }
        return port <= 65535
    }

    /// unreserved / "%" / sub-delims other than ",": ALPHA DIGIT - . _ ~ % ! $ & ' ( ) * + ; =
    /// Two 64-bit masks for bytes 0-63 and 64-127, as HeaderValidation.isTchar.
    @inline(__always)
    static func isRegNameByte(_ c: UInt8) -> Bool {
        c < 64 ? (0x2bff_6ff2_0000_0000 as UInt64) >> UInt64(c) & 1 != 0
               : c < 128 && (0x47ff_fffe_87ff_fffe as UInt64) >> UInt64(c &- 64) & 1 != 0
    }

    @inline(__always)
    static func version(_ raw: UnsafeRawBufferPointer, _ p: Int) -> Int? {
        // "HTTP/1.x"
        guard raw[p] == 72, raw[p + 1] == 84, raw[p + 2] == 84, raw[p + 3] == 80, raw[p + 4] == 47,
              raw[p + 5] == 49, raw[p + 6] == 46 else { return nil }
        switch raw[p + 7] { case 48: return 0; case 49: return 1; default: return nil }
    }

    /// A content-length value by the parser's rule (1-18 ASCII digits, nothing else: no
    /// sign, no space, no list), for the fields that do not come through the parser (HTTP/2).
    public static func parseContentLength(_ value: String) -> Int64? {
        var v = value
        return v.withUTF8 { p in parseContentLength(UnsafeRawBufferPointer(p), 0, p.count) }
    }

    static func parseContentLength(_ raw: UnsafeRawBufferPointer, _ s: Int, _ e: Int) -> Int64? {
        if s == e || e - s > 18 { return nil }
        var v: Int64 = 0
        for k in s..<e {
            let d = raw[k]
            guard d >= 48 && d <= 57 else { return nil }
            v = v * 10 + Int64(d - 48)
        }
        return v
    }

    static func lowerEquals(_ raw: UnsafeRawBufferPointer, _ s: Int, _ lit: StaticString) -> Bool {
        let p = lit.utf8Start
        for k in 0..<lit.utf8CodeUnitCount {
            var c = raw[s + k]
            if c >= 65 && c <= 90 { c |= 0x20 }
            if c != p[k] { return false }
        }
        return true
    }

    /// Splits a comma-separated token list, lowercased, OWS trimmed, empties dropped.
    /// Calls `body` with the start and end of each token of a comma-separated list,
    /// blanks trimmed, empty elements skipped, without allocating.
    @inline(__always)
    static func forEachToken(_ raw: UnsafeRawBufferPointer, _ s: Int, _ e: Int, _ body: (Int, Int) -> Void) {
        var k = s
        while k < e {
            while k < e && (raw[k] == 32 || raw[k] == 9 || raw[k] == 44) { k += 1 }
            let ts = k
            while k < e && raw[k] != 44 { k += 1 }
            var te = k
            while te > ts && (raw[te - 1] == 32 || raw[te - 1] == 9) { te -= 1 }
            if te > ts { body(ts, te) }
        }
    }

    static func lowercasedString(_ raw: UnsafeRawBufferPointer, _ s: Int, _ e: Int) -> String {
        // Straight into the String's storage, without an intermediate array.
        String(unsafeUninitializedCapacity: e - s) { out in
            for j in 0..<(e - s) {
                let c = raw[s + j]
                out[j] = c >= 65 && c <= 90 ? c | 0x20 : c
            }
            return e - s
        }
    }

    /// The tokens of a comma-separated list, lowercased (tests and rare paths).
    static func splitTokens(_ raw: UnsafeRawBufferPointer, _ s: Int, _ e: Int) -> [String] {
        var out: [String] = []
        forEachToken(raw, s, e) { ts, te in out.append(lowercasedString(raw, ts, te)) }
        return out
    }

    @inline(__always)
    static func classify(_ raw: UnsafeRawBufferPointer, _ s: Int, _ len: Int) -> KnownHeader {
        var c0 = raw[s]; if c0 >= 65 && c0 <= 90 { c0 |= 0x20 }
        return classify(length: len, first: c0) { lowerEquals(raw, s, $0) }
    }

    /// The known names by length and first byte (lowercase); `equals` compares the name
    /// with one (folding case or not, as the caller's bytes need).
    @inline(__always)
    static func classify(length len: Int, first c0: UInt8, _ equals: (StaticString) -> Bool) -> KnownHeader {
        switch (len, c0) {
        case (2, 116): return equals("te") ? .te : .other
        case (4, 104): return equals("host") ? .host : .other
        case (6, 101): return equals("expect") ? .expect : .other
        case (6, 115): return equals("server") ? .server : .other
        case (7, 117): return equals("upgrade") ? .upgrade : .other
        case (7, 116): return equals("trailer") ? .trailer : .other
        case (10, 99): return equals("connection") ? .connection : .other
        case (10, 107): return equals("keep-alive") ? .keepAlive : .other
        case (12, 120): return equals("x-request-id") ? .xRequestID : .other
        case (14, 99): return equals("content-length") ? .contentLength : .other
        case (15, 120): return equals("x-forwarded-for") ? .xForwardedFor : .other
        case (16, 112): return equals("proxy-connection") ? .proxyConnection : .other
        case (17, 116): return equals("transfer-encoding") ? .transferEncoding : .other
        case (17, 120): return equals("x-forwarded-proto") ? .xForwardedProto : .other
        case (23, 120): return equals("x-forwarded-client-cert") ? .xForwardedClientCert : .other
        case (18, 112): return equals("proxy-authenticate") ? .proxyAuthenticate : .other
        case (19, 112): return equals("proxy-authorization") ? .proxyAuthorization : .other
        default: return .other
        }
    }
}
