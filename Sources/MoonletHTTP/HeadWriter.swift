import NIOCore

/// The header names the proxy owns, in one place for the parser side, the Lua binding,
/// the local-reply check and the underscore-header rule.
public enum ManagedHeaders {
    /// Framing and hop-by-hop headers (RFC 9110 §7.6.1, with Expect and Trailer, which
    /// only the proxy's framing may answer or announce): each hop gets its own, so
    /// neither a filter nor a local reply may set them.
    public static func isFramingOrHopByHop(_ lowercased: String) -> Bool {
        switch lowercased {
        case "content-length", "transfer-encoding", "connection", "te", "upgrade", "expect", "keep-alive",
             "proxy-connection", "trailer":
            return true
        default:
            return false
        }
    }

    /// The hop-by-hop fields `stripHopByHop` removes from every received head: the
    /// hop-by-hop ones above, and Proxy-Authenticate/Proxy-Authorization (credentials for
    /// this hop only). Content-Length, Expect and Trailer stay: the proxy reads and
    /// rewrites them itself.
    @inline(__always)
    public static func isHopByHop(_ kind: KnownHeader) -> Bool {
        switch kind {
        case .connection, .keepAlive, .te, .upgrade, .proxyConnection, .proxyAuthenticate, .proxyAuthorization, .transferEncoding:
            return true
        default:
            return false
        }
    }

    /// Headers the proxy sets or trusts from itself (Envoy's x-forwarded-*, x-request-id,
    /// x-envoy-*, and the tracing headers).
    public static func isProxySet(_ lowercased: String) -> Bool {
        lowercased.hasPrefix("x-forwarded-") || lowercased == "x-request-id" || lowercased.hasPrefix("x-envoy-")
            || lowercased.hasPrefix("x-b3-") || lowercased == "x-ot-span-context" || lowercased == "x-client-trace-id"
    }
}

extension HTTPHead {
    /// Marks hop-by-hop fields removed (RFC 9110 §7.6.1): Connection and every header it
    /// names, Keep-Alive, TE, Upgrade, Proxy-Connection, Proxy-Authenticate,
    /// Proxy-Authorization, and Transfer-Encoding (the proxy frames each hop itself).
    public mutating func stripHopByHop() {
        for i in 0..<fields.count where ManagedHeaders.isHopByHop(fields[i].kind) {
            // `TE: trailers` goes on (Envoy keeps that value): gRPC servers require it.
            if fields[i].kind == .te && isTETrailers(i) { continue }
            fields[i].removed = true
        }
        for t in connectionTokens {
            // Connection must not remove end-to-end framing or routing headers (nor the
            // `TE: trailers` kept above, which an HTTP/1.1 client lists there).
            if t == "host" || t == "content-length" || t == "te" { continue }
            var n = t
            n.withUTF8 { p in
                let raw = UnsafeRawBufferPointer(p)
                for i in 0..<fields.count where !fields[i].removed && nameEquals(i, lowercased: raw) { fields[i].removed = true }
            }
        }
    }

    /// Whether field `i` is a TE field of value "trailers" (any case).
    public func isTETrailers(_ i: Int) -> Bool {
        fields[i].valueLength == 8 && value(at: i).lowercased() == "trailers"
    }

    /// Index of the first live field of a known kind.
    public func firstIndex(of kind: KnownHeader) -> Int? {
        for i in 0..<fields.count where fields[i].kind == kind && !fields[i].removed { return i }
        return nil
    }

    public mutating func removeAll(of kind: KnownHeader) {
        for i in 0..<fields.count where fields[i].kind == kind { fields[i].removed = true }
    }
}

/// Serializes heads for the next hop: the original bytes of every kept line are copied
/// in runs, removed lines are skipped, added lines are appended. Nothing is re-parsed.
public enum HeadWriter {
    /// Writes a request head as HTTP/1.1. `extra` appends further header lines
    /// (already formatted, each ending in CRLF) before the blank line.
    public static func writeRequest(_ head: HTTPHead, into out: inout ByteBuffer, extra: (inout ByteBuffer) -> Void) {
        out.reserveCapacity(minimumWritableBytes: head.bytes.readableBytes + 256)
        if head.targetOverride == nil && head.versionMinor == 1 {
            let startEnd = head.fields.first.map { Int($0.lineStart) } ?? (head.bytes.readableBytes - 2)
            out.writeBytes(head.bytes.readableBytesView[head.methodRange.lowerBound..<startEnd])
        } else {
            out.writeBytes(head.bytes.readableBytesView[head.methodRange])
            out.writeInteger(UInt8(32))
            if let t = head.targetOverride { out.writeString(t) } else { out.writeBytes(head.bytes.readableBytesView[head.targetRange]) }
            out.writeStaticString(" HTTP/1.1\r\n")
        }
        writeFields(head, into: &out)
        extra(&out)
        out.writeInteger(UInt16(0x0D0A))
    }

    /// Writes a response head. The status line is copied when it is already HTTP/1.1
    /// with the head's status, otherwise rebuilt as HTTP/1.1 with the code (and the
    /// received reason, or the standard one when a filter changed the code).
    public static func writeResponse(_ head: HTTPHead, into out: inout ByteBuffer, extra: (inout ByteBuffer) -> Void) {
        out.reserveCapacity(minimumWritableBytes: head.bytes.readableBytes + 256)
        if !statusLineMatches(head) {
            writeStatusLine(head.status, reason: nil, into: &out)
        } else if head.versionMinor == 1 {
            let startEnd = head.fields.first.map { Int($0.lineStart) } ?? (head.bytes.readableBytes - 2)
            out.writeBytes(head.bytes.readableBytesView[0..<startEnd])
        } else {
            writeStatusLine(head.status, reason: head.reason, into: &out)
        }
        writeFields(head, into: &out)
        extra(&out)
        out.writeInteger(UInt16(0x0D0A))
    }

    /// Whether the received status line ("HTTP/1.x NNN") still carries `head.status`
    /// (a filter may have changed it: Envoy scripts' `:status` in the response phase).
    @inline(__always)
    static func statusLineMatches(_ head: HTTPHead) -> Bool {
        let at = head.bytes.readerIndex + 9
        guard let d0 = head.bytes.getInteger(at: at, as: UInt8.self), let d1 = head.bytes.getInteger(at: at + 1, as: UInt8.self),
              let d2 = head.bytes.getInteger(at: at + 2, as: UInt8.self) else { return false }
        return Int(d0 &- 48) * 100 + Int(d1 &- 48) * 10 + Int(d2 &- 48) == head.status
    }

    public static func writeStatusLine(_ status: Int, reason: String?, into out: inout ByteBuffer) {
        out.writeStaticString("HTTP/1.1 ")
        out.writeString(String(status))
        out.writeInteger(UInt8(32))
        out.writeString(reason ?? HTTPStatus.reason(status))
        out.writeInteger(UInt16(0x0D0A))
    }

    @inline(__always)
    static func writeFields(_ head: HTTPHead, into out: inout ByteBuffer) {
        let view = head.bytes.readableBytesView
        var runStart = -1
        var runEnd = -1
        for i in 0..<head.fields.count {
            let f = head.fields[i]
            if f.removed {
                if runStart >= 0 { out.writeBytes(view[runStart..<runEnd]); runStart = -1 }
                continue
            }
            if runStart < 0 { runStart = Int(f.lineStart) }
            runEnd = Int(f.lineEnd)
        }
        if runStart >= 0 { out.writeBytes(view[runStart..<runEnd]) }
        if !head.added.isEmpty { writeAdded(head.added, into: &out) }
    }

    /// The added lines (`name: value` CRLF each) in one write of the buffer: their size
    /// summed first, then every name and value copied in place (read where they are, no
    /// String copies). Line by line cost about 340 instructions a line; this under 100.
    /// Names and text values that are small ASCII Strings (`InlineUTF8`: all the names
    /// the proxy and the telemetry filters add) are stored as their two words, 16 bytes
    /// whatever their length (the room asked for has 16 bytes to spare; what a later
    /// write does not cover lies past the written count).
    @inline(__always)
    static func writeAdded(_ added: [HeaderLine], into out: inout ByteBuffer) {
        let textAt = HeaderLine.inlineTextOffset
        if textAt < 0 {
            var total = 0
            for i in added.indices { total &+= added[i].name.utf8.count &+ added[i].valueByteCount &+ 4 }
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: total) { p in
                var at = p.baseAddress!
                added.withUnsafeBufferPointer { a in for i in 0..<a.count { at = putLine(a[i], at: at) } }
                return total
            }
            return
        }
        added.withUnsafeBufferPointer { a in
            // Read where the lines are (no copy of a line: a copy retains its Strings).
            let base = UnsafeRawPointer(a.baseAddress!)
            let stride = MemoryLayout<HeaderLine>.stride
            var total = 0
            for i in 0..<a.count {
                let line = base + i &* stride
                var n = InlineUTF8.count(InlineUTF8.words(at: line).1)
                if n < 0 { n = a[i].name.utf8.count }
                if a[i].isText {
                    var v = InlineUTF8.count(InlineUTF8.words(at: line + textAt).1)
                    if v < 0 { v = a[i].valueByteCount }
                    n &+= v
                } else {
                    n &+= a[i].valueByteCount
                }
                total &+= n &+ 4
            }
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: total &+ 16) { p in
                var at = p.baseAddress!
                for i in 0..<a.count { at = putLine(a, i, base + i &* stride, textAt: textAt, at: at) }
                return total
            }
        }
    }

    /// `name: value` CRLF at `at` (room made by the caller); returns the byte after it.
    @inline(__always)
    static func putLine(_ name: String, _ value: String, at: UnsafeMutableRawPointer) -> UnsafeMutableRawPointer {
        var at = copyUTF8(name, to: at)
        at.storeBytes(of: UInt16(0x203A).littleEndian, as: UInt16.self)   // ": "
        at = copyUTF8(value, to: at + 2)
        at.storeBytes(of: UInt16(0x0A0D).littleEndian, as: UInt16.self)   // CRLF
        return at + 2
    }

    /// `name: value` CRLF of an added line at `at` (its value read in place, a shared run
    /// too); returns the byte after it.
    @inline(__always)
    static func putLine(_ line: HeaderLine, at: UnsafeMutableRawPointer) -> UnsafeMutableRawPointer {
        var at = copyUTF8(line.name, to: at)
        at.storeBytes(of: UInt16(0x203A).littleEndian, as: UInt16.self)   // ": "
        at += 2
        if case .text(let v) = line.storage { at = copyUTF8(v, to: at) } else { at += line.writeValue(to: at) }
        at.storeBytes(of: UInt16(0x0A0D).littleEndian, as: UInt16.self)   // CRLF
        return at + 2
    }

    /// `putLine(_:at:)` for line `i` of `a`, stored at `line` (`HeaderLine.inlineNames`:
    /// its name is its first field; a text value's String at `textAt`), with 16 bytes of
    /// room past the line: a small name, and a small text value, stored as two words,
    /// read in place (the line is not copied).
    @inline(__always)
    static func putLine(_ a: UnsafeBufferPointer<HeaderLine>, _ i: Int, _ line: UnsafeRawPointer, textAt: Int, at: UnsafeMutableRawPointer) -> UnsafeMutableRawPointer {
        var at = InlineUTF8.store(from: line, to: at) ?? copyUTF8(a[i].name, to: at)
        at.storeBytes(of: UInt16(0x203A).littleEndian, as: UInt16.self)   // ": "
        at += 2
        if a[i].isText {
            at = InlineUTF8.store(from: line + textAt, to: at) ?? copyUTF8(a[i].value, to: at)
        } else {
            at += a[i].writeValue(to: at)
        }
        at.storeBytes(of: UInt16(0x0A0D).littleEndian, as: UInt16.self)   // CRLF
        return at + 2
    }

    /// Copies `s`'s UTF-8 to `to`; returns the byte after it.
    @inline(__always)
    static func copyUTF8(_ s: String, to: UnsafeMutableRawPointer) -> UnsafeMutableRawPointer {
        let n = s.utf8.count
        if n == 0 { return to }
        if s.utf8.withContiguousStorageIfAvailable({ copyBytes(to, UnsafeRawPointer($0.baseAddress!), n) }) == nil {
            var c = s
            c.withUTF8 { copyBytes(to, UnsafeRawPointer($0.baseAddress!), n) }
        }
        return to + n
    }

    /// `n` bytes from `src` to `dst`: up to 16 with two (overlapping) word moves, longer
    /// ones with copyMemory (header names and short values are mostly under 16 bytes).
    @inline(__always)
    static func copyBytes(_ dst: UnsafeMutableRawPointer, _ src: UnsafeRawPointer, _ n: Int) {
        if n >= 8 && n <= 16 {
            let a = src.loadUnaligned(as: UInt64.self), b = src.loadUnaligned(fromByteOffset: n &- 8, as: UInt64.self)
            dst.storeBytes(of: a, as: UInt64.self); dst.storeBytes(of: b, toByteOffset: n &- 8, as: UInt64.self)
        } else if n >= 4 && n < 8 {
            let a = src.loadUnaligned(as: UInt32.self), b = src.loadUnaligned(fromByteOffset: n &- 4, as: UInt32.self)
            dst.storeBytes(of: a, as: UInt32.self); dst.storeBytes(of: b, toByteOffset: n &- 4, as: UInt32.self)
        } else {
            dst.copyMemory(from: src, byteCount: n)
        }
    }

    /// `name: value` CRLF, in one write of the buffer (four writes cost about 450
    /// instructions a line; this about a quarter of that).
    @inline(__always)
    public static func writeField(_ name: String, _ value: String, into out: inout ByteBuffer) {
        let total = name.utf8.count + value.utf8.count + 4
        out.writeWithUnsafeMutableBytes(minimumWritableBytes: total) { p in
            _ = putLine(name, value, at: p.baseAddress!)
            return total
        }
    }
}

/// Reason phrases for the statuses a proxy produces itself.
public enum HTTPStatus {
    public static func reason(_ status: Int) -> String {
        switch status {
        case 100: return "Continue"
        case 200: return "OK"
        case 201: return "Created"
        case 204: return "No Content"
        case 301: return "Moved Permanently"
        case 302: return "Found"
        case 304: return "Not Modified"
        case 307: return "Temporary Redirect"
        case 308: return "Permanent Redirect"
        case 400: return "Bad Request"
        case 401: return "Unauthorized"
        case 403: return "Forbidden"
        case 404: return "Not Found"
        case 405: return "Method Not Allowed"
        case 408: return "Request Timeout"
        case 413: return "Payload Too Large"
        case 429: return "Too Many Requests"
        case 431: return "Request Header Fields Too Large"
        case 500: return "Internal Server Error"
        case 501: return "Not Implemented"
        case 502: return "Bad Gateway"
        case 503: return "Service Unavailable"
        case 504: return "Gateway Timeout"
        case 505: return "HTTP Version Not Supported"
        default: return "Unknown"
        }
    }
}
