import MoonletCore

/// The trace a request belongs to, as the headers that arrived with it say (B3 or W3C
/// Trace Context), or as the first sidecar starts it.
///
/// `spanID` is the span of the caller: a sidecar that creates its own span makes it a
/// child with `child(newSpanID:)` and propagates that one.
public struct TraceContext: Sendable, Equatable {
    /// High 64 bits of a 128-bit trace id (0 for a 64-bit B3 trace id).
    public var traceIDHigh: UInt64
    public var traceIDLow: UInt64
    /// Whether the trace id is 128 bits (W3C always; B3 when 32 hex digits arrived).
    public var is128Bit: Bool
    public var spanID: UInt64
    /// The caller's parent span (B3 x-b3-parentspanid), when given.
    public var parentSpanID: UInt64?
    /// The caller's sampling decision; nil when it left it to this sidecar.
    public var sampled: Bool?
    /// B3 debug (x-b3-flags: 1 or "d"): sampled and forced.
    public var debug: Bool
    /// W3C tracestate, passed on unchanged.
    public var traceState: String?

    public init(traceIDHigh: UInt64, traceIDLow: UInt64, is128Bit: Bool = true, spanID: UInt64, parentSpanID: UInt64? = nil,
                sampled: Bool? = nil, debug: Bool = false, traceState: String? = nil) {
        self.traceIDHigh = traceIDHigh; self.traceIDLow = traceIDLow; self.is128Bit = is128Bit
        self.spanID = spanID; self.parentSpanID = parentSpanID; self.sampled = sampled; self.debug = debug; self.traceState = traceState
    }

    /// The trace id as lowercase hex: 32 digits for a 128-bit id, 16 for a 64-bit one.
    public var traceIDHex: String { is128Bit ? TraceHex.hex(traceIDHigh) + TraceHex.hex(traceIDLow) : TraceHex.hex(traceIDLow) }
    public var spanIDHex: String { TraceHex.hex(spanID) }

    /// The same trace with `newSpanID` as the current span and this context's span as
    /// its parent: what a sidecar propagates after starting its own span.
    public func child(newSpanID: UInt64) -> TraceContext {
        var c = self
        c.parentSpanID = spanID
        c.spanID = newSpanID == 0 ? 1 : newSpanID
        return c
    }

    /// Whether the trace is recorded: debug, or sampled.
    public var isSampled: Bool { debug || sampled == true }
}

/// Reading and writing the trace headers Istio's sidecars propagate: B3 multi-header
/// (x-b3-traceid, x-b3-spanid, x-b3-parentspanid, x-b3-sampled, x-b3-flags), B3 single
/// (`b3`) and W3C Trace Context (traceparent, tracestate).
public enum TracePropagation {
    /// Every header name this module reads or writes (lowercase).
    public static let headerNames = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"]
    /// `headerNames` as bytes (for comparing with a parsed head's names).
    public static let headerNameBytes: [[UInt8]] = headerNames.map { Array($0.utf8) }

    /// `00-TRACEID-SPANID-FLAGS` for a 128-bit trace id (the first sidecar's new trace;
    /// the tracing filter adds it as `HeaderLine(_:traceparent:_:span:sampled:)`, written
    /// out where the head is).
    public static func traceparent(_ hi: UInt64, _ lo: UInt64, _ span: UInt64, sampled: Bool) -> String {
        HeaderLine("traceparent", traceparent: hi, lo, span: span, sampled: sampled).value
    }

    /// The context the headers carry, looked up with `header` (lowercase names, first
    /// value). B3 single wins over B3 multi, which wins over W3C, as Envoy's Zipkin
    /// tracer reads them; a malformed header is ignored (a new trace starts), never an error.
    /// A sampling-only B3 header ("0", "1", "d", or x-b3-sampled alone) gives a context
    /// with a zero trace id: `start` keeps its decision.
    public static func extract(_ header: (String) -> String?) -> TraceContext? {
        if let b3 = header("b3"), let c = parseB3Single(b3) { return c }
        if let c = parseB3Multi(header) { return c }
        if let tp = header("traceparent"), var c = parseTraceparent(tp) {
            if let ts = header("tracestate"), !ts.isEmpty { c.traceState = ts }
            return c
        }
        return nil
    }

    /// The incoming context, or a new trace (128-bit ids from `random`) when there is
    /// none or it carried only a sampling decision. `sample` decides when no caller did.
    public static func start(_ incoming: TraceContext?, random: () -> UInt64, sample: () -> Bool) -> TraceContext {
        if var c = incoming, c.traceIDLow != 0 || c.traceIDHigh != 0 {
            if c.sampled == nil && !c.debug { c.sampled = sample() }
            return c
        }
        let hi = random()
        var lo = random(), span = random()
        if lo == 0 && hi == 0 { lo = 1 }
        if span == 0 { span = 1 }
        let decided = incoming?.sampled ?? (incoming?.debug == true ? true : sample())
        return TraceContext(traceIDHigh: hi, traceIDLow: lo, is128Bit: true, spanID: span, sampled: decided, debug: incoming?.debug ?? false)
    }

    /// The headers that carry `c` on to the next hop: B3 multi-header and W3C
    /// traceparent (plus tracestate when one arrived), as Istio's sidecars send them.
    public static func headers(_ c: TraceContext) -> [(String, String)] {
        var out: [(String, String)] = [
            ("x-b3-traceid", c.traceIDHex),
            ("x-b3-spanid", c.spanIDHex),
        ]
        if let p = c.parentSpanID { out.append(("x-b3-parentspanid", TraceHex.hex(p))) }
        if c.debug { out.append(("x-b3-flags", "1")) } else { out.append(("x-b3-sampled", c.isSampled ? "1" : "0")) }
        // W3C needs a 128-bit trace id: a 64-bit B3 id is left-padded with zeros.
        out.append(("traceparent", "00-\(TraceHex.hex(c.is128Bit ? c.traceIDHigh : 0))\(TraceHex.hex(c.traceIDLow))-\(c.spanIDHex)-\(c.isSampled ? "01" : "00")"))
        if let ts = c.traceState { out.append(("tracestate", ts)) }
        return out
    }

    /// W3C traceparent: `VERSION-TRACEID(32)-PARENTID(16)-FLAGS(2)`. Version ff is
    /// invalid; a higher version than 00 is read by its first four fields, as the spec asks.
    public static func parseTraceparent(_ v: String) -> TraceContext? {
        let parts = v.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 4, parts[0].utf8.count == 2, let version = TraceHex.parse(parts[0]), version != 0xff else { return nil }
        if version == 0 && parts.count != 4 { return nil }
        guard parts[1].utf8.count == 32, parts[2].utf8.count == 16, parts[3].utf8.count == 2,
              let hi = TraceHex.parse(parts[1].prefix(16)), let lo = TraceHex.parse(parts[1].suffix(16)),
              let span = TraceHex.parse(parts[2]), let flags = TraceHex.parse(parts[3]) else { return nil }
        guard hi != 0 || lo != 0, span != 0 else { return nil }
        return TraceContext(traceIDHigh: hi, traceIDLow: lo, is128Bit: true, spanID: span, sampled: flags & 1 == 1)
    }

    /// B3 single header: `TRACEID-SPANID[-SAMPLING[-PARENTSPANID]]`, or a sampling
    /// state alone (`0`, `1`, `d`).
    public static func parseB3Single(_ v: String) -> TraceContext? {
        let parts = v.split(separator: "-", omittingEmptySubsequences: false)
        if parts.count == 1 {
            guard let s = sampling(parts[0]) else { return nil }
            return TraceContext(traceIDHigh: 0, traceIDLow: 0, spanID: 0, sampled: s.sampled, debug: s.debug)
        }
        guard parts.count >= 2, parts.count <= 4, let (hi, lo, is128) = traceID(parts[0]),
              parts[1].utf8.count == 16, let span = TraceHex.parse(parts[1]), span != 0 else { return nil }
        var c = TraceContext(traceIDHigh: hi, traceIDLow: lo, is128Bit: is128, spanID: span)
        if parts.count >= 3 {
            guard let s = sampling(parts[2]) else { return nil }
            c.sampled = s.sampled; c.debug = s.debug
        }
        if parts.count == 4 {
            guard parts[3].utf8.count == 16, let p = TraceHex.parse(parts[3]) else { return nil }
            c.parentSpanID = p
        }
        return c
    }

    /// B3 multi-header. x-b3-traceid and x-b3-spanid go together; x-b3-sampled or
    /// x-b3-flags alone give a sampling-only context.
    public static func parseB3Multi(_ header: (String) -> String?) -> TraceContext? {
        let debug = header("x-b3-flags") == "1"
        var sampled: Bool? = nil
        if let s = header("x-b3-sampled") {
            switch s.lowercased() { case "1", "true": sampled = true; case "0", "false": sampled = false; default: break }
        }
        guard let t = header("x-b3-traceid"), let s = header("x-b3-spanid") else {
            if debug || sampled != nil { return TraceContext(traceIDHigh: 0, traceIDLow: 0, spanID: 0, sampled: debug ? true : sampled, debug: debug) }
            return nil
        }
        guard let (hi, lo, is128) = traceID(Substring(t)), s.utf8.count == 16, let span = TraceHex.parse(Substring(s)), span != 0 else { return nil }
        var c = TraceContext(traceIDHigh: hi, traceIDLow: lo, is128Bit: is128, spanID: span, sampled: debug ? true : sampled, debug: debug)
        if let p = header("x-b3-parentspanid") {
            guard p.utf8.count == 16, let v = TraceHex.parse(Substring(p)) else { return nil }
            c.parentSpanID = v
        }
        return c
    }

    static func traceID(_ s: Substring) -> (UInt64, UInt64, Bool)? {
        switch s.utf8.count {
        case 16:
            guard let lo = TraceHex.parse(s), lo != 0 else { return nil }
            return (0, lo, false)
        case 32:
            guard let hi = TraceHex.parse(s.prefix(16)), let lo = TraceHex.parse(s.suffix(16)), hi != 0 || lo != 0 else { return nil }
            return (hi, lo, true)
        default: return nil
        }
    }

    static func sampling(_ s: Substring) -> (sampled: Bool, debug: Bool)? {
        switch s {
        case "1": return (true, false)
        case "0": return (false, false)
        case "d": return (true, true)
        default: return nil
        }
    }
}

/// Lowercase fixed-width hex for trace and span ids.
public enum TraceHex {
    /// 16 lowercase hex digits.
    public static func hex(_ v: UInt64) -> String {
        String(unsafeUninitializedCapacity: 16) { out in
            write(v, into: out, at: 0)
            return 16
        }
    }

    /// 32 lowercase hex digits of a 128-bit id.
    public static func hex(_ hi: UInt64, _ lo: UInt64) -> String {
        String(unsafeUninitializedCapacity: 32) { out in
            write(hi, into: out, at: 0); write(lo, into: out, at: 16)
            return 32
        }
    }

    /// Writes `v` as 16 hex digits at `at`.
    @inline(__always)
    public static func write(_ v: UInt64, into out: UnsafeMutableBufferPointer<UInt8>, at: Int) {
        Hex.write16(v, to: UnsafeMutableRawPointer(out.baseAddress! + at))
    }

    /// Parses 1 to 16 hex digits (either case); nil for anything else.
    public static func parse(_ s: Substring) -> UInt64? {
        let u = s.utf8
        guard !u.isEmpty, u.count <= 16 else { return nil }
        var v: UInt64 = 0
        for c in u {
            let d: UInt8
            switch c {
            case 48...57: d = c - 48
            case 97...102: d = c - 87
            case 65...70: d = c - 55
            default: return nil
            }
            v = v << 4 | UInt64(d)
        }
        return v
    }
}
