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
    public static func zipkinV2(_ spans: [Span]) -> String {
        var out = "["
        out.reserveCapacity(spans.count * 1024)
        for (i, s) in spans.enumerated() {
            if i > 0 { out += "," }
            out += "{\"traceId\":\"\(s.traceIDHex)\",\"id\":\"\(TraceHex.hex(s.id))\""
            if let p = s.parentID { out += ",\"parentId\":\"\(TraceHex.hex(p))\"" }
            out += ",\"kind\":\"\(s.kind.rawValue)\",\"name\":\(JSON.quote(s.name)),\"timestamp\":\(s.timestampMicros),\"duration\":\(max(1, s.durationMicros))"
            out += ",\"localEndpoint\":{\"serviceName\":\(JSON.quote(s.localService))"
            if let ip = ipField(s.localIP) { out += ",\"\(ip.0)\":\(JSON.quote(ip.1))" }
            out += "}"
            if let rip = s.remoteIP, let ip = ipField(rip) {
                out += ",\"remoteEndpoint\":{\"\(ip.0)\":\(JSON.quote(ip.1))"
                if let p = s.remotePort { out += ",\"port\":\(p)" }
                out += "}"
            }
            if s.debug { out += ",\"debug\":true" }
            if !s.tags.isEmpty {
                out += ",\"tags\":{"
                var seen = Set<String>()
                var first = true
                for (k, v) in s.tags where seen.insert(k).inserted {
                    if !first { out += "," }
                    first = false
                    out += JSON.quote(k) + ":" + JSON.quote(v)
                }
                out += "}"
            }
            out += "}"
        }
        return out + "]"
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
        return a.contains(":") ? ("ipv6", a) : ("ipv4", a)
    }
}
