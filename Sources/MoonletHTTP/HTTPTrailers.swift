import NIOCore

/// The trailer fields of a message (RFC 9110 §6.5): an HTTP/1.1 chunked body's trailer
/// section, or HTTP/2's HEADERS frame after the DATA. Names are kept lowercased, in
/// arrival order; a name may repeat. Fields that must not be trailers (framing,
/// routing, hop-by-hop, pseudo-headers: see `isAllowed`) are dropped on the way in, as
/// Envoy's codecs do, so no hop ever forwards them.
///
/// A message without trailers has none of this (the stream's `requestTrailers` and
/// `responseTrailers` stay nil): nothing is allocated on the common path.
public struct HTTPTrailers: Sendable {
    public private(set) var fields: [HeaderLine] = []

    public init() {}

    public var isEmpty: Bool { fields.isEmpty }
    public var count: Int { fields.count }

    /// Whether `lowercased` may be a trailer: not a pseudo-header, not framing or
    /// hop-by-hop (ManagedHeaders.isFramingOrHopByHop: each hop frames its own message),
    /// not Host (RFC 9110 §6.5.1: no routing field in trailers).
    public static func isAllowed(_ lowercased: String) -> Bool {
        guard let first = lowercased.utf8.first, first != UInt8(ascii: ":") else { return false }
        return !ManagedHeaders.isFramingOrHopByHop(lowercased) && lowercased != "host"
    }

    /// The first value of `name` (lowercased), nil when absent.
    public func first(_ name: String) -> String? {
        for f in fields where f.name == name { return f.value }
        return nil
    }

    /// Every value of `name` (lowercased).
    public func all(_ name: String) -> [String] { fields.filter { $0.name == name }.map(\.value) }

    /// Appends a field (the caller checked it: `add(checking:)` for input from the wire).
    public mutating func append(_ name: String, _ value: String) { fields.append(HeaderLine(name, value)) }

    /// Replaces every field named `name` with one of `value` (appended when absent).
    public mutating func set(_ name: String, _ value: String) {
        if let i = fields.firstIndex(where: { $0.name == name }) {
            fields[i].value = value
            var j = i + 1
            while j < fields.count { if fields[j].name == name { fields.remove(at: j) } else { j += 1 } }
        } else {
            fields.append(HeaderLine(name, value))
        }
    }

    /// Removes every field named `name`.
    public mutating func remove(_ name: String) { fields.removeAll { $0.name == name } }

    /// A field received from a peer: its name lowercased and checked (a token), its value
    /// a field value (no control byte but HTAB), both bounded by the caller. Returns false
    /// for a malformed field; a well-formed one that may not be a trailer is dropped.
    @discardableResult
    public mutating func add(checking name: String, _ value: String) -> Bool {
        guard !name.isEmpty, name.utf8.allSatisfy({ HeaderValidation.isTchar($0) }), HeaderValidation.isFieldValue(value) else { return false }
        let lower = name.lowercased()
        if Self.isAllowed(lower) { fields.append(HeaderLine(lower, value)) }
        return true
    }

    /// Fields added by `other` that are not named here already (upstream trailers under
    /// those a filter set before they arrived).
    public mutating func merge(under other: HTTPTrailers) {
        for f in other.fields where first(f.name) == nil { fields.append(f) }
    }

    /// Parses an HTTP/1.1 trailer section (its lines, each ending in CRLF, without the
    /// empty line that ends it). Throws HTTPParseError(400) on a malformed line.
    public static func parse(http1 bytes: [UInt8]) throws -> HTTPTrailers {
        var t = HTTPTrailers()
        var i = 0
        while i < bytes.count {
            var end = i
            while end < bytes.count && bytes[end] != 13 { end += 1 }
            let line = bytes[i..<end]
            i = end + 2
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")) else { throw HTTPParseError(400, "trailer line without a colon") }
            let name = String(decoding: line[line.startIndex..<colon], as: UTF8.self)
            var vs = colon + 1, ve = line.endIndex
            while vs < ve && (line[vs] == 32 || line[vs] == 9) { vs += 1 }
            while ve > vs && (line[ve - 1] == 32 || line[ve - 1] == 9) { ve -= 1 }
            let value = String(decoding: line[vs..<ve], as: UTF8.self)
            guard t.add(checking: name, value) else { throw HTTPParseError(400, "bad trailer field") }
        }
        return t
    }

    /// The trailer section as HTTP/1.1 lines ("name: value" CRLF each), without the
    /// final empty line.
    public func writeHTTP1(into out: inout ByteBuffer) {
        for f in fields {
            out.writeString(f.name)
            out.writeStaticString(": ")
            out.writeString(f.value)
            out.writeStaticString("\r\n")
        }
    }
}

extension ChunkedEncoder {
    /// The last chunk with `trailers` (RFC 9112 §7.1.2), or the bare last chunk.
    public static func writeLastChunk(trailers: HTTPTrailers?, into out: inout ByteBuffer) {
        guard let t = trailers, !t.isEmpty else { out.writeStaticString(Self.lastChunk); return }
        out.writeStaticString("0\r\n")
        t.writeHTTP1(into: &out)
        out.writeStaticString("\r\n")
    }

    /// The last chunk with `trailers` as a buffer of its own.
    public static func lastChunk(trailers: HTTPTrailers?) -> ByteBuffer {
        guard let t = trailers, !t.isEmpty else { return ByteBuffer(staticString: Self.lastChunk) }
        var b = ByteBuffer()
        writeLastChunk(trailers: t, into: &b)
        return b
    }
}
