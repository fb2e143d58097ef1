import MoonletCore

/// One finished span of a sidecar: CLIENT on the outbound listener, SERVER on the
/// inbound one. Encoded as Zipkin v2 JSON or OTLP/HTTP JSON for export.
public struct Span: Sendable, Equatable {
    public enum Kind: String, Sendable { case client = "CLIENT", server = "SERVER" }
    public var traceIDHigh: UInt64
    public var traceIDLow: UInt64
    public var is128Bit: Bool
    public var id: UInt64
    public var parentID: UInt64?
    /// Istio names spans `<authority><path>` style operations; Envoy uses the route name or
    /// `host:port/*`. Moonlet uses `<destination service>:<port>/*` like Istio's sidecars.
    public var name: String
    public var kind: Kind
    /// Start, microseconds since the Unix epoch.
    public var timestampMicros: UInt64
    public var durationMicros: UInt64
    /// The service this sidecar reports for: `<app>.<namespace>` as Istio names it.
    public var localService: String
    public var localIP: String
    public var remoteIP: String?
    public var remotePort: Int?
    /// Tags in the order added (Zipkin takes a map; the order only keeps the JSON stable).
    public var tags: [(String, String)]
    public var debug: Bool

    public init(traceIDHigh: UInt64, traceIDLow: UInt64, is128Bit: Bool = true, id: UInt64, parentID: UInt64?, name: String, kind: Kind,
                timestampMicros: UInt64, durationMicros: UInt64, localService: String, localIP: String = "",
                remoteIP: String? = nil, remotePort: Int? = nil, tags: [(String, String)] = [], debug: Bool = false) {
        self.traceIDHigh = traceIDHigh; self.traceIDLow = traceIDLow; self.is128Bit = is128Bit; self.id = id; self.parentID = parentID
        self.name = name; self.kind = kind; self.timestampMicros = timestampMicros; self.durationMicros = durationMicros
        self.localService = localService; self.localIP = localIP; self.remoteIP = remoteIP; self.remotePort = remotePort
        self.tags = tags; self.debug = debug
    }

    public static func == (a: Span, b: Span) -> Bool {
        a.traceIDHigh == b.traceIDHigh && a.traceIDLow == b.traceIDLow && a.id == b.id && a.parentID == b.parentID && a.name == b.name
            && a.kind == b.kind && a.timestampMicros == b.timestampMicros && a.durationMicros == b.durationMicros
            && a.localService == b.localService && a.tags.map { $0.0 + "=" + $0.1 } == b.tags.map { $0.0 + "=" + $0.1 }
    }

    var traceIDHex: String { is128Bit ? TraceHex.hex(traceIDHigh) + TraceHex.hex(traceIDLow) : TraceHex.hex(traceIDLow) }
}

/// Span encodings for the collectors Istio supports.
public enum SpanEncoding {
    /// Zipkin API v2 JSON (`POST /api/v2/spans`): an array of span objects.
    public static func zipkinV2(_ spans: [Span]) -> String { String(decoding: zipkinV2Bytes(spans), as: UTF8.self) }

    /// `zipkinV2` as the UTF-8 bytes the exporter posts: written straight into one array
    /// (no string interpolation, no set per span: a tag key seen before in the span is
    /// found by a scan of the earlier keys, as spans carry a few dozen tags at most).
    public static func zipkinV2Bytes(_ spans: [Span]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(spans.count * 1024 + 2)
        out.append(UInt8(ascii: "["))
        for (i, s) in spans.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            put(&out, "{\"traceId\":\"")
            if s.is128Bit { putHex(&out, s.traceIDHigh) }
            putHex(&out, s.traceIDLow)
            put(&out, "\",\"id\":\""); putHex(&out, s.id)
            if let p = s.parentID { put(&out, "\",\"parentId\":\""); putHex(&out, p) }
            put(&out, s.kind == .client ? "\",\"kind\":\"CLIENT\",\"name\":" : "\",\"kind\":\"SERVER\",\"name\":")
            JSON.appendQuoted(s.name, to: &out)
            put(&out, ",\"timestamp\":"); putDecimal(&out, s.timestampMicros)
            put(&out, ",\"duration\":"); putDecimal(&out, max(1, s.durationMicros))
            put(&out, ",\"localEndpoint\":{\"serviceName\":")
            JSON.appendQuoted(s.localService, to: &out)
            if let ip = ipField(s.localIP) { putIP(&out, ip) }
            out.append(UInt8(ascii: "}"))
            if let rip = s.remoteIP, let ip = ipField(rip) {
                put(&out, ",\"remoteEndpoint\":{")
                putIP(&out, ip, first: true)
                if let p = s.remotePort { put(&out, ",\"port\":"); putDecimal(&out, UInt64(max(0, p))) }
                out.append(UInt8(ascii: "}"))
            }
            if s.debug { put(&out, ",\"debug\":true") }
            if !s.tags.isEmpty {
                put(&out, ",\"tags\":{")
                var first = true
                for j in s.tags.indices {
                    let k = s.tags[j].0
                    let n = k.utf8.count
                    var seen = false
                    for e in 0..<j where s.tags[e].0.utf8.count == n && s.tags[e].0 == k { seen = true; break }
                    if seen { continue }
                    if !first { out.append(UInt8(ascii: ",")) }
                    first = false
                    JSON.appendQuoted(k, to: &out)
                    out.append(UInt8(ascii: ":"))
                    JSON.appendQuoted(s.tags[j].1, to: &out)
                }
                out.append(UInt8(ascii: "}"))
            }
            out.append(UInt8(ascii: "}"))
        }
        out.append(UInt8(ascii: "]"))
        return out
    }

    @inline(__always)
    static func put(_ out: inout [UInt8], _ s: StaticString) {
        out.append(contentsOf: UnsafeBufferPointer(start: s.utf8Start, count: s.utf8CodeUnitCount))
    }

    static func putHex(_ out: inout [UInt8], _ v: UInt64) {
        withUnsafeTemporaryAllocation(byteCount: 16, alignment: 8) { b in
            Hex.write16(v, to: b.baseAddress!)
            out.append(contentsOf: UnsafeRawBufferPointer(b))
        }
    }

    static func putDecimal(_ out: inout [UInt8], _ v: UInt64) {
        if v < 10 { out.append(48 + UInt8(v)); return }
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 20) { d in
            var n = 0, x = v
            while x > 0 { d[n] = 48 + UInt8(x % 10); x /= 10; n += 1 }
            while n > 0 { n -= 1; out.append(d[n]) }
        }
    }

    /// `,"ipv4":"..."` (or ipv6; without the comma when `first`).
    static func putIP(_ out: inout [UInt8], _ ip: (String, String), first: Bool = false) {
        if !first { out.append(UInt8(ascii: ",")) }
        put(&out, ip.0 == "ipv6" ? "\"ipv6\":" : "\"ipv4\":")
        JSON.appendQuoted(ip.1, to: &out)
    }

    /// OTLP/HTTP JSON (`POST /v1/traces`): one resource per local service, span ids as
    /// hex, times as decimal strings of Unix nanoseconds, kind 2 SERVER / 3 CLIENT, and
    /// status ERROR when the span has `error=true`.
    public static func otlpJSON(_ spans: [Span]) -> String {
        var byService: [String: [Span]] = [:]
        var order: [String] = []
        for s in spans {
            if byService[s.localService] == nil { order.append(s.localService) }
            byService[s.localService, default: []].append(s)
        }
        var out = "{\"resourceSpans\":["
        for (ri, svc) in order.enumerated() {
            if ri > 0 { out += "," }
            out += "{\"resource\":{\"attributes\":[\(attr("service.name", svc))]},\"scopeSpans\":[{\"scope\":{\"name\":\"moonlet\"},\"spans\":["
            for (i, s) in byService[svc]!.enumerated() {
                if i > 0 { out += "," }
                // OTLP trace ids are always 128 bits: a 64-bit id is left-padded.
                out += "{\"traceId\":\"\(TraceHex.hex(s.is128Bit ? s.traceIDHigh : 0))\(TraceHex.hex(s.traceIDLow))\",\"spanId\":\"\(TraceHex.hex(s.id))\""
                if let p = s.parentID { out += ",\"parentSpanId\":\"\(TraceHex.hex(p))\"" }
                let start = s.timestampMicros &* 1000
                out += ",\"name\":\(JSON.quote(s.name)),\"kind\":\(s.kind == .server ? 2 : 3)"
                out += ",\"startTimeUnixNano\":\"\(start)\",\"endTimeUnixNano\":\"\(start &+ max(1, s.durationMicros) &* 1000)\""
                var attrs: [String] = []
                var seen = Set<String>()
                for (k, v) in s.tags where seen.insert(k).inserted { attrs.append(attr(k, v)) }
                if let rip = s.remoteIP { attrs.append(attr("net.peer.ip", rip)) }
                out += ",\"attributes\":[\(attrs.joined(separator: ","))]"
                let isError = s.tags.contains { $0.0 == "error" && $0.1 == "true" }
                out += ",\"status\":{\"code\":\(isError ? 2 : 0)}}"
            }
            out += "]}]}"
        }
        return out + "]}"
    }

    static func attr(_ k: String, _ v: String) -> String { "{\"key\":\(JSON.quote(k)),\"value\":{\"stringValue\":\(JSON.quote(v))}}" }

    /// Zipkin's endpoint field for an address: ipv4, ipv6, or nothing for an empty one.
    static func ipField(_ address: String) -> (String, String)? {
        if address.isEmpty { return nil }
        var a = address
        if a.hasPrefix("[") , let end = a.firstIndex(of: "]") { a = String(a[a.index(after: a.startIndex)..<end]) }
        return a.utf8.contains(58) ? ("ipv6", a) : ("ipv4", a)   // ":"; not Foundation's substring search
    }
}
