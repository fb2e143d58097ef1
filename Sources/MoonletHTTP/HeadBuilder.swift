import NIOCore

/// Builds an `HTTPHead` from parts that are already known and checked (an HTTP/2
/// request's HPACK fields, a local reply), without running the parser: the head's bytes
/// are written once as HTTP/1.1 lines (what `HeadWriter` copies verbatim when the head
/// goes on), and each field's offsets and kind are recorded as it is written. The caller
/// has validated names and values (HTTP/2: RFC 9113 §8.2; local replies: LocalReplyCheck)
/// and sets what the parser would have derived from them (framing, hostIndex, ...).
public struct HTTPHeadBuilder {
    public private(set) var head: HTTPHead

    /// A request head `METHOD SP target SP HTTP/1.1 CRLF`; `buffer` is empty (reader index 0).
    public init(method: String, target: String, buffer: ByteBuffer) {
        var m = method, t = target
        self = m.withUTF8 { mp in t.withUTF8 { tp in
            HTTPHeadBuilder(method: UnsafeRawBufferPointer(mp), target: UnsafeRawBufferPointer(tp), buffer: buffer)
        } }
    }

    /// The same from bytes (an HTTP/2 request's `:method` and `:path` as HPACK decoded them).
    /// (`buffer` is consumed: written in place, never copied on write.)
    public init(method: UnsafeRawBufferPointer, target: UnsafeRawBufferPointer, buffer: consuming ByteBuffer) {
        // Moved, not copied: a copy would share the storage with `buffer` (alive to the end
        // of the scope) and the first write would copy it.
        var b = consume buffer
        // The request line in one reservation (method SP target " HTTP/1.1" CRLF).
        let m = method.count, t = target.count
        let version: StaticString = " HTTP/1.1\r\n"
        b.writeWithUnsafeMutableBytes(minimumWritableBytes: m + t + 12) { p in
            let d = p.baseAddress!
            if m > 0 { d.copyMemory(from: method.baseAddress!, byteCount: m) }
            d.storeBytes(of: 32, toByteOffset: m, as: UInt8.self)
            if t > 0 { (d + m + 1).copyMemory(from: target.baseAddress!, byteCount: t) }
            (d + m + 1 + t).copyMemory(from: version.utf8Start, byteCount: 11)
            return m + t + 12
        }
        let methodEnd = m, targetEnd = m + 1 + t
        head = HTTPHead(bytes: b, isRequest: true)
        head.methodRange = 0..<methodEnd
        head.targetRange = (methodEnd + 1)..<targetEnd
        head.isHead = method.count == 4 && method.elementsEqual("HEAD".utf8)
        head.fields.reserveCapacity(16)
    }

    /// A response head: `HTTP/1.1 NNN reason CRLF` with the status's standard reason
    /// (`status` is 100...999); `buffer` is empty (reader index 0).
    public init(status: Int, buffer: consuming ByteBuffer) {
        var b = consume buffer
        if status == 200 {
            b.writeStaticString("HTTP/1.1 200 OK\r\n")
        } else {
            HeadWriter.writeStatusLine(status, reason: nil, into: &b)
        }
        head = HTTPHead(bytes: b, isRequest: false)
        head.status = status
        head.reasonRange = 13..<(b.writerIndex - 2)
        head.fields.reserveCapacity(16)
    }

    /// Appends the line `name: value` and records it as a field of `kind`. Returns its
    /// index in `fields`.
    @discardableResult
    public mutating func add(_ name: String, _ value: String, kind: KnownHeader) -> Int {
        var n = name, v = value
        return n.withUTF8 { np in v.withUTF8 { vp in add(name: UnsafeRawBufferPointer(np), value: UnsafeRawBufferPointer(vp), kind: kind) } }
    }

    /// The same from bytes (an HTTP/2 field as HPACK decoded it): the line is written
    /// with one bounds check.
    @discardableResult
    public mutating func add(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer, kind: KnownHeader) -> Int {
        let lineStart = head.bytes.writerIndex
        let n = name.count, v = value.count
        head.bytes.writeWithUnsafeMutableBytes(minimumWritableBytes: n + v + 4) { p in
            let d = p.baseAddress!
            if n > 0 { d.copyMemory(from: name.baseAddress!, byteCount: n) }
            d.storeBytes(of: 0x3A, toByteOffset: n, as: UInt8.self) // ": "
            d.storeBytes(of: 0x20, toByteOffset: n + 1, as: UInt8.self)
            if v > 0 { (d + n + 2).copyMemory(from: value.baseAddress!, byteCount: v) }
            d.storeBytes(of: 0x0D, toByteOffset: n + v + 2, as: UInt8.self)
            d.storeBytes(of: 0x0A, toByteOffset: n + v + 3, as: UInt8.self)
            return n + v + 4
        }
        head.fields.append(HTTPField(nameStart: Int32(lineStart), nameLength: Int32(n),
                                     valueStart: Int32(lineStart + n + 2), valueLength: Int32(v),
                                     lineStart: Int32(lineStart), lineEnd: Int32(head.bytes.writerIndex), kind: kind))
        if kind == .host && head.hostIndex < 0 { head.hostIndex = head.fields.count - 1 }
        return head.fields.count - 1
    }

    /// Appends a field whose kind is found from its name (any case), as the parser does.
    @discardableResult
    public mutating func add(_ name: String, _ value: String) -> Int {
        add(name, value, kind: KnownHeader(name: name))
    }

    /// Sets what the parser derives from the whole head.
    public mutating func set(framing: BodyFraming) { head.framing = framing }
    public mutating func set(expectContinue: Bool) { head.expectContinue = expectContinue }
    public mutating func set(underscoreInName: Bool) { head.underscoreInName = underscoreInName }
    public mutating func set(targetForm: RequestTargetForm) { head.targetForm = targetForm }

    /// Ends the header section (the empty line) and returns the head.
    public mutating func finish() -> HTTPHead {
        head.bytes.writeInteger(UInt16(0x0D0A))
        return head
    }

    /// The same, the builder consumed: its head is moved out, not copied (an HTTP/2
    /// request's head on its way to the stream's handler).
    public consuming func finished() -> HTTPHead {
        head.bytes.writeWithUnsafeMutableBytes(minimumWritableBytes: 2) { p in
            p.storeBytes(of: UInt16(0x0A0D).littleEndian, as: UInt16.self) // CR LF in memory on any byte order
            return 2
        }
        return head
    }
}

extension KnownHeader {
    /// The kind of a header name (any case), as the parser classifies it.
    public init(name: String) {
        var n = name
        self = n.withUTF8 { KnownHeader(name: UnsafeRawBufferPointer($0)) }
    }

    /// The same from the name's bytes.
    public init(name: UnsafeRawBufferPointer) {
        self = name.isEmpty ? .other : HTTPHeadParser.classify(name, 0, name.count)
    }

    /// The kind of a name known to be lowercase (an HTTP/2 field name, checked): the
    /// parser's classification with the bytes compared eight at a time, not folded one
    /// by one.
    @inline(__always)
    public init(lowercaseName n: UnsafeRawBufferPointer) {
        guard let p = n.baseAddress, n.count > 1 else { self = .other; return }
        @inline(__always) func equals(_ lit: StaticString) -> Bool {
            let l = UnsafeRawPointer(lit.utf8Start), count = lit.utf8CodeUnitCount
            var i = 0
            while i + 8 <= count {
                if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) != l.loadUnaligned(fromByteOffset: i, as: UInt64.self) { return false }
                i += 8
            }
            while i < count {
                if p.load(fromByteOffset: i, as: UInt8.self) != l.load(fromByteOffset: i, as: UInt8.self) { return false }
                i += 1
            }
            return true
        }
        self = HTTPHeadParser.classify(length: n.count, first: p.load(as: UInt8.self), equals)
    }
}

extension HTTPHeadParser {
    /// A content-length value by the parser's rule, from its bytes (an HTTP/2 field).
    public static func parseContentLength(_ value: UnsafeRawBufferPointer) -> Int64? {
        parseContentLength(value, 0, value.count)
    }
}
