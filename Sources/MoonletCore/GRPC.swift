/// gRPC over HTTP/2 as the proxy sees it: which requests are gRPC, how a local reply to
/// one is written (a gRPC error, as Envoy writes it), the `grpc-timeout` header, and the
/// `grpc-status` of a response. Everything here runs off the common path (local replies,
/// the route timeout of a gRPC request, a retry decision) or on a few bytes.
public enum GRPC {
    /// gRPC status codes (grpc/doc/statuscodes.md).
    public enum Code: Int, Sendable, CaseIterable {
        case ok = 0, cancelled = 1, unknown = 2, invalidArgument = 3, deadlineExceeded = 4, notFound = 5
        case alreadyExists = 6, permissionDenied = 7, resourceExhausted = 8, failedPrecondition = 9
        case aborted = 10, outOfRange = 11, unimplemented = 12, internalError = 13, unavailable = 14
        case dataLoss = 15, unauthenticated = 16

        /// The name Envoy's and Istio's retryOn use for the codes they retry on
        /// (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
        /// `unavailable`); nil for the others.
        public var retryOnName: String? {
            switch self {
            case .cancelled: return "cancelled"
            case .deadlineExceeded: return "deadline-exceeded"
            case .internalError: return "internal"
            case .resourceExhausted: return "resource-exhausted"
            case .unavailable: return "unavailable"
            default: return nil
            }
        }
    }

    /// Whether a content-type value is gRPC's: `application/grpc` exactly or followed by
    /// `+` (`application/grpc+proto`), as Envoy's `Grpc::Common::hasGrpcContentType` reads
    /// it: the prefix compared as is (`Application/grpc` is not gRPC to Envoy either), and
    /// `application/grpc-web` is not gRPC.
    public static func isGRPCContentType(_ value: String) -> Bool {
        var v = value
        return v.withUTF8 { p in
            let prefix: StaticString = "application/grpc"
            let n = prefix.utf8CodeUnitCount
            guard p.count >= n, UnsafeBufferPointer(rebasing: p[..<n]).elementsEqual(UnsafeBufferPointer(start: prefix.utf8Start, count: n)) else { return false }
            return p.count == n || p[n] == UInt8(ascii: "+")
        }
    }

    /// Whether a request head is a gRPC request (its content-type).
    public static func isGRPCRequest(_ head: HTTPHead) -> Bool {
        let name: StaticString = "content-type"
        guard let v = head.first(lowercasedASCII: UnsafeRawBufferPointer(start: name.utf8Start, count: name.utf8CodeUnitCount)) else { return false }
        return isGRPCContentType(v)
    }

    /// The gRPC status of an HTTP status, for a reply to a gRPC request that was not
    /// made by a gRPC server: Envoy's `Grpc::Utility::httpToGrpcStatus` (gRPC's
    /// doc/http-grpc-status-mapping.md): 400 INTERNAL, 401 UNAUTHENTICATED, 403
    /// PERMISSION_DENIED, 404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, anything else
    /// UNKNOWN. (A route timeout, 504, is UNAVAILABLE there too; a client with a
    /// deadline reports its own DEADLINE_EXCEEDED when the deadline caused it.)
    public static func status(httpStatus: Int) -> Code {
        switch httpStatus {
        case 400: return .internalError
        case 401: return .unauthenticated
        case 403: return .permissionDenied
        case 404: return .unimplemented
        case 429, 502, 503, 504: return .unavailable
        default: return .unknown
        }
    }

    /// `grpc-message` percent-encoding (gRPC's PROTOCOL-HTTP2.md, Envoy's
    /// `PercentEncoding::encode`): bytes outside 0x20-0x7E and `%` become `%XX`.
    public static func percentEncode(_ message: String) -> String {
        let bytes = Array(message.utf8)
        guard bytes.contains(where: { $0 < 0x20 || $0 > 0x7e || $0 == 0x25 }) else { return message }
        let hex = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count + 16)
        for b in bytes {
            if b < 0x20 || b > 0x7e || b == 0x25 {
                out.append(0x25); out.append(hex[Int(b >> 4)]); out.append(hex[Int(b & 0xf)])
            } else {
                out.append(b)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// A local reply to a gRPC request in gRPC's form, as Envoy's `sendLocalReply` writes
    /// it for a gRPC request: HTTP 200, `content-type: application/grpc`, `grpc-status`
    /// from the HTTP status (kept when the reply already carries one), `grpc-message`
    /// the body (percent-encoded, its trailing newline dropped; kept when the reply
    /// carries one), no body: a trailers-only response (on HTTP/2 one HEADERS frame with
    /// END_STREAM). The reply's other headers are kept.
    public static func localReply(_ r: LocalReply) -> LocalReply {
        var headers: [(name: String, value: String)] = []
        headers.reserveCapacity(r.headers.count + 3)
        var hasStatus = false, hasMessage = false
        for h in r.headers {
            switch h.name.lowercased() {
            case "content-type": continue
            case "grpc-status": hasStatus = true
            case "grpc-message": hasMessage = true
            default: break
            }
            headers.append(h)
        }
        headers.insert((name: "content-type", value: "application/grpc"), at: 0)
        if !hasStatus { headers.append((name: "grpc-status", value: String(status(httpStatus: r.status).rawValue))) }
        if !hasMessage {
            var body = Substring(r.body)
            if body.last == "\n" { body = body.dropLast() }
            if !body.isEmpty { headers.append((name: "grpc-message", value: percentEncode(String(body)))) }
        }
        return LocalReply(status: 200, body: "", headers: headers)
    }

    /// `r` in gRPC's trailers-only form (`localReply`), recorded as the stream's local
    /// reply, so the response filters and the log phase see HTTP 200 and the grpc-status.
    /// A reply already in that form (a filter's own gRPC answer) is left as it is. The
    /// proxy's and the filter harness's local reply both call this.
    public static func replaceLocalReply(of s: ProxyStream, _ r: LocalReply) -> LocalReply {
        if isTrailersOnly(r) && r.headers.contains(where: { $0.name.lowercased() == "content-type" }) { return r }
        let g = localReply(r)
        s.localReply = g
        return g
    }

    /// Whether a local reply is already in gRPC's trailers-only form (what `localReply`
    /// returns): status 200, a grpc-status, no body.
    public static func isTrailersOnly(_ r: LocalReply) -> Bool {
        r.status == 200 && r.body.isEmpty && r.headers.contains { $0.name.lowercased() == "grpc-status" }
    }

    /// The `grpc-timeout` header in milliseconds (gRPC's PROTOCOL-HTTP2.md: at most 8
    /// digits and a unit, H hours, M minutes, S seconds, m milliseconds, u micro, n
    /// nanoseconds), rounded up to a whole millisecond (so a sub-millisecond deadline
    /// is not read as none); nil when the value does not parse (Envoy then ignores the
    /// header). 0 is returned as 0, which `effectiveTimeoutMs` reads as no timeout, as
    /// Envoy does.
    public static func timeoutMs(_ value: String) -> Int? {
        let u = Array(value.utf8)
        guard u.count >= 2, u.count <= 9 else { return nil }
        var n = 0
        for c in u.dropLast() {
            guard c >= 0x30 && c <= 0x39 else { return nil }
            n = n * 10 + Int(c - 0x30)
        }
        switch u.last! {
        case UInt8(ascii: "H"): return n * 3_600_000
        case UInt8(ascii: "M"): return n * 60_000
        case UInt8(ascii: "S"): return n * 1000
        case UInt8(ascii: "m"): return n
        case UInt8(ascii: "u"): return (n + 999) / 1000
        case UInt8(ascii: "n"): return (n + 999_999) / 1_000_000
        default: return nil
        }
    }

    /// The route timeout of a gRPC request with `grpc-timeout` (Envoy with the route's
    /// `max_grpc_timeout` set, as Istio sets it to the route's timeout): the header's
    /// value capped at the route's timeout, 0 meaning none on either side.
    public static func effectiveTimeoutMs(routeMs: Int, grpcTimeoutMs: Int?) -> Int {
        guard let g = grpcTimeoutMs, g > 0 else { return routeMs }
        return routeMs > 0 ? min(routeMs, g) : g
    }

    /// A grpc-status value (0-16) as a code; nil when it is not one.
    public static func code(_ value: String) -> Code? {
        guard let v = Int(value) else { return nil }
        return Code(rawValue: v)
    }
}
