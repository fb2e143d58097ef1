#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import MoonletCore

/// What an access log line is made from: one finished stream as Envoy's command
/// operators see it. Header names are lowercase; pseudo-headers (`:method`, `:path`,
/// `:authority`, `:scheme`) are answered by `requestHeader` too. nil or "" means "not
/// there" (printed as `-` in text, `null` in JSON, as Envoy does).
public protocol AccessLogRecord {
    func requestHeader(_ name: String) -> String?
    func responseHeader(_ name: String) -> String?
    /// Start of the request, milliseconds since the Unix epoch.
    var startTimeMillis: Int64 { get }
    /// "HTTP/1.1", "HTTP/2".
    var protocolName: String { get }
    var responseCode: Int { get }
    var responseFlags: String { get }
    var responseCodeDetails: String { get }
    var connectionTerminationDetails: String { get }
    var upstreamTransportFailureReason: String { get }
    var bytesReceived: Int64 { get }
    var bytesSent: Int64 { get }
    var durationMillis: Int64 { get }
    var upstreamHost: String { get }
    var upstreamCluster: String { get }
    var upstreamLocalAddress: String { get }
    var downstreamLocalAddress: String { get }
    var downstreamRemoteAddress: String { get }
    var requestedServerName: String { get }
    var routeName: String { get }
    /// Hands the request header's first value (nil or "" = not there: returns false
    /// without calling `body`) to `body` as bytes. A record over a parsed head answers
    /// from the head's bytes without making a String; the default asks `requestHeader`.
    func withRequestHeader(_ name: String, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool
}

extension AccessLogRecord {
    public func withRequestHeader(_ name: String, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
        guard var v = requestHeader(name), !v.isEmpty else { return false }
        v.withUTF8 { body(UnsafeRawBufferPointer($0)) }
        return true
    }
}

/// The second-resolution part of START_TIME (`2026-12-06T04:05:07.`), remembered for
/// the current second: one per event loop (not shared), so a line does not call gmtime.
public final class AccessLogClock {
    var second: Int64 = .min
    var prefix: [UInt8] = []
    public init() {}

    @inline(__always)
    func append(_ ms: Int64, into out: inout [UInt8]) {
        let sec = ms >= 0 ? ms / 1000 : (ms - 999) / 1000
        if sec != second {
            second = sec
            let full = AccessLogFormat.iso8601(sec * 1000)   // "....:07.000Z"
            prefix = Array(full.utf8.dropLast(4))
        }
        out.append(contentsOf: prefix)
        let r = Int(ms - sec * 1000)
        out.append(UInt8(48 + r / 100)); out.append(UInt8(48 + r / 10 % 10)); out.append(UInt8(48 + r % 10))
        out.append(90)   // Z
    }
}

/// An Envoy access log format compiled once (at config load): text with `%OPERATOR%`
/// command operators, or JSON (`labels`) whose values are such texts. Moonlet supports the
/// operators of Istio's default formats and the common ones around them; an unknown
/// operator is an error naming it, never printed literally.
public struct AccessLogFormat: Sendable {
    /// Istio's default text format (meshConfig.accessLogFormat unset): the config layer's
    /// constant (MoonletCore's AccessLogFormatKeys).
    public static var istioText: String { AccessLogFormatKeys.istioText }

    /// Istio's default JSON format (meshConfig.accessLogEncoding: JSON), key by key.
    public static var istioJSONLabels: [(String, String)] { AccessLogFormatKeys.istioJSON }

    enum Op: Sendable, Equatable {
        case literal(String)
        case startTime
        /// Request header, with an alternative and a max length (REQ(X?Y):Z).
        case req(String, String?, Int?)
        case resp(String, String?, Int?)
        case proto, code, flags, details, termination, transportFailure, bytesIn, bytesOut, duration
        case upstreamHost, upstreamCluster, upstreamLocal, downstreamLocal, downstreamLocalNoPort, downstreamRemote, downstreamRemoteNoPort
        case sni, routeName
    }

    enum Shape: Sendable { case text([Op]), json([(String, [Op])]) }
    let shape: Shape

    /// The format prepared for byte output: literals and JSON keys (`{"key":`, `,"key":`)
    /// as bytes, each value's operators; built once with the format.
    struct Part: Sendable {
        /// Written before the value (a literal in text; the key in JSON).
        var head: [UInt8]
        var ops: [Op]
    }
    let parts: [Part]
    let isJSON: Bool

    /// Compiles a text format; throws naming the first unsupported operator.
    public init(text: String) throws {
        let ops = try Self.compile(text)
        shape = .text(ops)
        isJSON = false
        parts = ops.map { o -> Part in
            if case .literal(let l) = o { return Part(head: Array(l.utf8), ops: []) }
            return Part(head: [], ops: [o])
        }
    }

    /// Compiles a JSON format (one object per line, keys in the given order).
    public init(json labels: [(String, String)]) throws {
        let fields = try labels.map { ($0.0, try Self.compile($0.1)) }
        shape = .json(fields)
        isJSON = true
        parts = fields.enumerated().map { i, f in Part(head: Array(((i == 0 ? "{" : ",") + JSON.quote(f.0) + ":").utf8), ops: f.1) }
    }

    static func compile(_ f: String) throws -> [Op] {
        var ops: [Op] = []
        var lit = ""
        var i = f.startIndex
        while i < f.endIndex {
            let c = f[i]
            guard c == "%" else { lit.append(c); i = f.index(after: i); continue }
            let next = f.index(after: i)
            guard let end = f[next...].firstIndex(of: "%") else { throw AccessLogFormatError(message: "unterminated operator at \"\(f[i...].prefix(30))\"") }
            if end == next { lit.append("%"); i = f.index(after: end); continue }   // %% is a literal %
            if !lit.isEmpty { ops.append(.literal(lit)); lit = "" }
            ops.append(try op(String(f[next..<end])))
            i = f.index(after: end)
        }
        if !lit.isEmpty { ops.append(.literal(lit)) }
        return ops
    }

    static func op(_ s: String) throws -> Op {
        switch s {
        case "START_TIME": return .startTime
        case "PROTOCOL": return .proto
        case "RESPONSE_CODE": return .code
        case "RESPONSE_FLAGS": return .flags
        case "RESPONSE_CODE_DETAILS": return .details
        case "CONNECTION_TERMINATION_DETAILS": return .termination
        case "UPSTREAM_TRANSPORT_FAILURE_REASON": return .transportFailure
        case "BYTES_RECEIVED": return .bytesIn
        case "BYTES_SENT": return .bytesOut
        case "DURATION": return .duration
        case "UPSTREAM_HOST": return .upstreamHost
        case "UPSTREAM_CLUSTER", "UPSTREAM_CLUSTER_RAW": return .upstreamCluster
        case "UPSTREAM_LOCAL_ADDRESS": return .upstreamLocal
        case "DOWNSTREAM_LOCAL_ADDRESS": return .downstreamLocal
        case "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": return .downstreamLocalNoPort
        case "DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_PEER_ADDRESS": return .downstreamRemote
        case "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": return .downstreamRemoteNoPort
        case "REQUESTED_SERVER_NAME": return .sni
        case "ROUTE_NAME": return .routeName
        default: break
        }
        for (prefix, isReq) in [("REQ(", true), ("RESP(", false)] where s.hasPrefix(prefix) {
            guard let close = s.lastIndex(of: ")") else { break }
            let inner = s[s.index(s.startIndex, offsetBy: prefix.count)..<close]
            let parts = inner.split(separator: "?", maxSplits: 1).map { String($0).lowercased() }
            guard let name = parts.first, !name.isEmpty else { break }
            var maxLen: Int? = nil
            let rest = s[s.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":"), let n = Int(rest.dropFirst()), n > 0 else { throw AccessLogFormatError(message: "%\(s)%: the length after ':' must be a positive integer") }
                maxLen = n
            }
            let alt = parts.count > 1 ? parts[1] : nil
            return isReq ? .req(name, alt, maxLen) : .resp(name, alt, maxLen)
        }
        throw AccessLogFormatError(message: "%\(s)% is not an access log operator Moonlet supports")
    }

    /// The line for `r` (text formats end with what the format ends with; JSON gets a newline).
    public func render<R: AccessLogRecord>(_ r: R) -> String {
        var out: [UInt8] = []
        render(r, into: &out, clock: AccessLogClock())
        return String(decoding: out, as: UTF8.self)
    }

    /// Appends the line for `r` to `out` (the per-request path: no String is made for
    /// what the record holds as bytes or numbers). Same text as `renderString`.
    public func render<R: AccessLogRecord>(_ r: R, into out: inout [UInt8], clock: AccessLogClock) {
        if !isJSON {
            for p in parts {
                if p.ops.isEmpty { out.append(contentsOf: p.head); continue }
                if !Self.emit(p.ops[0], r, &out, json: false, clock: clock) { out.append(45) }   // "-"
            }
            return
        }
        for p in parts {
            out.append(contentsOf: p.head)
            if p.ops.count == 1 {
                // One operator: its own type (numbers stay numbers, nothing is null).
                let o = p.ops[0]
                if Self.isNumeric(o) {
                    _ = Self.emit(o, r, &out, json: true, clock: clock)
                } else {
                    let mark = out.count
                    out.append(34)
                    if Self.emit(o, r, &out, json: true, clock: clock) { out.append(34) } else {
                        out.removeSubrange(mark...)
                        out.append(contentsOf: Self.null)
                    }
                }
            } else {
                out.append(34)
                for o in p.ops where !Self.emit(o, r, &out, json: true, clock: clock) { out.append(45) }
                out.append(34)
            }
        }
        out.append(125); out.append(10)   // "}\n"
    }

    static let null: [UInt8] = Array("null".utf8)

    /// Appends bytes, JSON-escaped when `json` (as `JSON.quote` escapes, without quotes).
    @inline(__always)
    static func put(_ b: UnsafeRawBufferPointer, _ out: inout [UInt8], json: Bool) {
        if !json || !b.contains(where: { $0 < 0x20 || $0 == 34 || $0 == 92 }) { out.append(contentsOf: b); return }
        for c in b {
            switch c {
            case 34: out.append(92); out.append(34)
            case 92: out.append(92); out.append(92)
            case 10: out.append(92); out.append(110)
            case 13: out.append(92); out.append(114)
            case 9: out.append(92); out.append(116)
            case 0..<0x20:
                let hex: [UInt8] = Array("0123456789abcdef".utf8)
                out.append(contentsOf: [92, 117, 48, 48, hex[Int(c >> 4)], hex[Int(c & 15)]])
            default: out.append(c)
            }
        }
    }

    /// Appends a String value; false (nothing written) when it is empty.
    @inline(__always)
    static func put(_ s: String, _ out: inout [UInt8], json: Bool) -> Bool {
        if s.isEmpty { return false }
        var v = s
        v.withUTF8 { put(UnsafeRawBufferPointer($0), &out, json: json) }
        return true
    }

    @inline(__always)
    static func putInt(_ v: Int64, _ out: inout [UInt8]) {
        if v < 0 { out.append(45) }
        var m = v.magnitude
        if m < 10 { out.append(UInt8(48 + m)); return }
        var tmp: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                  UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var n = 0
        withUnsafeMutableBytes(of: &tmp) { t in
            while m > 0 { t[19 - n] = UInt8(48 + m % 10); m /= 10; n += 1 }
            out.append(contentsOf: UnsafeRawBufferPointer(rebasing: t[(20 - n)...]))
        }
    }

    /// Appends the value of one operator; false (nothing written) when it has none.
    static func emit<R: AccessLogRecord>(_ o: Op, _ r: R, _ out: inout [UInt8], json: Bool, clock: AccessLogClock) -> Bool {
        switch o {
        case .literal(let s): return put(s, &out, json: json)
        case .startTime: clock.append(r.startTimeMillis, into: &out); return true
        case .req(let n, let alt, let max):
            if max != nil { return put(value(o, r) ?? "", &out, json: json) }
            if r.withRequestHeader(n, { put($0, &out, json: json) }) { return true }
            if let alt { return r.withRequestHeader(alt, { put($0, &out, json: json) }) }
            return false
        case .resp: return put(value(o, r) ?? "", &out, json: json)
        case .code: putInt(Int64(r.responseCode), &out); return true
        case .bytesIn: putInt(r.bytesReceived, &out); return true
        case .bytesOut: putInt(r.bytesSent, &out); return true
        case .duration: putInt(r.durationMillis, &out); return true
        case .proto: return put(r.protocolName, &out, json: json)
        case .flags: return put(r.responseFlags, &out, json: json)
        case .details: return put(r.responseCodeDetails, &out, json: json)
        case .termination: return put(r.connectionTerminationDetails, &out, json: json)
        case .transportFailure: return put(r.upstreamTransportFailureReason, &out, json: json)
        case .upstreamHost: return put(r.upstreamHost, &out, json: json)
        case .upstreamCluster: return put(r.upstreamCluster, &out, json: json)
        case .upstreamLocal: return put(r.upstreamLocalAddress, &out, json: json)
        case .downstreamLocal: return put(r.downstreamLocalAddress, &out, json: json)
        case .downstreamRemote: return put(r.downstreamRemoteAddress, &out, json: json)
        case .sni: return put(r.requestedServerName, &out, json: json)
        case .routeName: return put(r.routeName, &out, json: json)
        case .downstreamLocalNoPort, .downstreamRemoteNoPort: return put(value(o, r) ?? "", &out, json: json)
        }
    }

    /// The line for `r` as a String, by the String path (reference for `render(_:into:)`).
    public func renderString(_ r: AccessLogRecord) -> String {
        switch shape {
        case .text(let ops):
            var out = ""
            for o in ops { out += Self.value(o, r) ?? "-" }
            return out
        case .json(let fields):
            var out = "{"
            for (i, (k, ops)) in fields.enumerated() {
                if i > 0 { out += "," }
                out += JSON.quote(k) + ":"
                if ops.count == 1 {
                    // One operator: its own type (numbers stay numbers, nothing is null).
                    guard let v = Self.value(ops[0], r) else { out += "null"; continue }
                    out += Self.isNumeric(ops[0]) ? v : JSON.quote(v)
                } else {
                    out += JSON.quote(ops.map { Self.value($0, r) ?? "-" }.joined())
                }
            }
            return out + "}\n"
        }
    }

    static func isNumeric(_ o: Op) -> Bool {
        switch o { case .code, .bytesIn, .bytesOut, .duration: return true; default: return false }
    }

    static func value(_ o: Op, _ r: AccessLogRecord) -> String? {
        func nz(_ s: String) -> String? { s.isEmpty ? nil : s }
        switch o {
        case .literal(let s): return s
        case .startTime: return iso8601(r.startTimeMillis)
        case .req(let n, let alt, let max): return clip(r.requestHeader(n).flatMap(nz) ?? alt.flatMap { r.requestHeader($0) }.flatMap(nz), max)
        case .resp(let n, let alt, let max): return clip(r.responseHeader(n).flatMap(nz) ?? alt.flatMap { r.responseHeader($0) }.flatMap(nz), max)
        case .proto: return nz(r.protocolName)
        case .code: return String(r.responseCode)
        case .flags: return nz(r.responseFlags)
        case .details: return nz(r.responseCodeDetails)
        case .termination: return nz(r.connectionTerminationDetails)
        case .transportFailure: return nz(r.upstreamTransportFailureReason)
        case .bytesIn: return String(r.bytesReceived)
        case .bytesOut: return String(r.bytesSent)
        case .duration: return String(r.durationMillis)
        case .upstreamHost: return nz(r.upstreamHost)
        case .upstreamCluster: return nz(r.upstreamCluster)
        case .upstreamLocal: return nz(r.upstreamLocalAddress)
        case .downstreamLocal: return nz(r.downstreamLocalAddress)
        case .downstreamLocalNoPort: return nz(withoutPort(r.downstreamLocalAddress))
        case .downstreamRemote: return nz(r.downstreamRemoteAddress)
        case .downstreamRemoteNoPort: return nz(withoutPort(r.downstreamRemoteAddress))
        case .sni: return nz(r.requestedServerName)
        case .routeName: return nz(r.routeName)
        }
    }

    static func clip(_ s: String?, _ max: Int?) -> String? {
        guard let s, let max, s.count > max else { return s }
        return String(s.prefix(max))
    }

    static func withoutPort(_ a: String) -> String {
        if a.hasPrefix("["), let end = a.firstIndex(of: "]") { return String(a[a.index(after: a.startIndex)..<end]) }
        guard let colon = a.lastIndex(of: ":"), a.firstIndex(of: ":") == colon else { return a }
        return String(a[..<colon])
    }

    /// Envoy's default START_TIME: `2026-12-06T04:05:07.123Z`.
    public static func iso8601(_ ms: Int64) -> String {
        var t = time_t(ms / 1000)
        var tm = tm()
        gmtime_r(&t, &tm)
        func d(_ v: Int32, _ w: Int) -> String { let s = String(v); return String(repeating: "0", count: max(0, w - s.count)) + s }
        return "\(d(tm.tm_year + 1900, 4))-\(d(tm.tm_mon + 1, 2))-\(d(tm.tm_mday, 2))T\(d(tm.tm_hour, 2)):\(d(tm.tm_min, 2)):\(d(tm.tm_sec, 2)).\(d(Int32(ms % 1000), 3))Z"
    }
}

public struct AccessLogFormatError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}
