/// A JSON value as JWT headers, claims and JWKS documents carry them. Objects keep
/// their members in document order.
public indirect enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    /// An integral number that fits in 64 bits.
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case (.bool(let x), .bool(let y)): return x == y
        case (.int(let x), .int(let y)): return x == y
        case (.double(let x), .double(let y)): return x == y
        case (.string(let x), .string(let y)): return x == y
        case (.array(let x), .array(let y)): return x == y
        case (.object(let x), .object(let y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    /// The member `key` of an object (the last one when a key repeats, as most parsers do).
    public subscript(key: String) -> JSONValue? {
        guard case .object(let m) = self else { return nil }
        return m.last { $0.0 == key }?.1
    }

    public var stringValue: String? { if case .string(let s) = self { return s }; return nil }

    /// A number as seconds (JWT NumericDate): integral or not.
    public var numberValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }

    /// Limits of `parse`: input bytes and nesting depth.
    public struct Limits: Sendable {
        public var maxBytes: Int
        public var maxDepth: Int
        public init(maxBytes: Int = 64 * 1024, maxDepth: Int = 32) { self.maxBytes = maxBytes; self.maxDepth = maxDepth }
    }

    /// Parses RFC 8259 JSON, bounded by `limits`; nil for anything else (never traps).
    public static func parse<C: Collection>(_ bytes: C, limits: Limits = Limits()) -> JSONValue? where C.Element == UInt8 {
        guard bytes.count <= limits.maxBytes else { return nil }
        var p = JSONParser(bytes: Array(bytes), maxDepth: limits.maxDepth)
        p.skipSpace()
        guard let v = p.value(depth: 0) else { return nil }
        p.skipSpace()
        return p.i == p.b.count ? v : nil
    }

    /// Compact JSON text of the value.
    public var json: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int(let i): return String(i)
        case .double(let d): return d.isFinite ? "\(d)" : "null"
        case .string(let s): return JSON.quote(s)
        case .array(let a): return "[" + a.map(\.json).joined(separator: ",") + "]"
        case .object(let m): return "{" + m.map { JSON.quote($0.0) + ":" + $0.1.json }.joined(separator: ",") + "}"
        }
    }
}

struct JSONParser {
    let b: [UInt8]
    let maxDepth: Int
    var i = 0
    init(bytes: [UInt8], maxDepth: Int) { b = bytes; self.maxDepth = maxDepth }

    mutating func skipSpace() { while i < b.count, b[i] == 0x20 || b[i] == 0x0A || b[i] == 0x0D || b[i] == 0x09 { i += 1 } }

    mutating func literal(_ s: StaticString) -> Bool {
        let n = s.utf8CodeUnitCount
        guard i + n <= b.count else { return false }
        for k in 0..<n where b[i + k] != s.utf8Start[k] { return false }
        i += n
        return true
    }

    mutating func value(depth: Int) -> JSONValue? {
        guard i < b.count, depth <= maxDepth else { return nil }
        switch b[i] {
        case UInt8(ascii: "{"):
            i += 1
            var members: [(String, JSONValue)] = []
            skipSpace()
            if i < b.count, b[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
            while true {
                skipSpace()
                guard i < b.count, b[i] == UInt8(ascii: "\""), let k = string() else { return nil }
                skipSpace()
                guard i < b.count, b[i] == UInt8(ascii: ":") else { return nil }
                i += 1
                skipSpace()
                guard let v = value(depth: depth + 1) else { return nil }
                members.append((k, v))
                skipSpace()
                guard i < b.count else { return nil }
                if b[i] == UInt8(ascii: ",") { i += 1; continue }
                if b[i] == UInt8(ascii: "}") { i += 1; return .object(members) }
                return nil
            }
        case UInt8(ascii: "["):
            i += 1
            var items: [JSONValue] = []
            skipSpace()
            if i < b.count, b[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
            while true {
                skipSpace()
                guard let v = value(depth: depth + 1) else { return nil }
                items.append(v)
                skipSpace()
                guard i < b.count else { return nil }
                if b[i] == UInt8(ascii: ",") { i += 1; continue }
                if b[i] == UInt8(ascii: "]") { i += 1; return .array(items) }
                return nil
            }
        case UInt8(ascii: "\""): return string().map { .string($0) }
        case UInt8(ascii: "t"): return literal("true") ? .bool(true) : nil
        case UInt8(ascii: "f"): return literal("false") ? .bool(false) : nil
        case UInt8(ascii: "n"): return literal("null") ? .null : nil
        default: return number()
        }
    }

    mutating func hex4() -> UInt32? {
        guard i + 4 <= b.count else { return nil }
        var v: UInt32 = 0
        for k in 0..<4 {
            let c = b[i + k]
            let d: UInt32
            switch c {
            case 48...57: d = UInt32(c - 48)
            case 65...70: d = UInt32(c - 55)
            case 97...102: d = UInt32(c - 87)
            default: return nil
            }
            v = v << 4 | d
        }
        i += 4
        return v
    }

    mutating func string() -> String? {
        i += 1 // opening quote
        var out: [UInt8] = []
        while i < b.count {
            let c = b[i]
            if c == UInt8(ascii: "\"") {
                i += 1
                guard let s = String(validating: out, as: UTF8.self) else { return nil }
                return s
            }
            if c < 0x20 { return nil }
            if c != UInt8(ascii: "\\") { out.append(c); i += 1; continue }
            i += 1
            guard i < b.count else { return nil }
            let e = b[i]; i += 1
            switch e {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                guard var cp = hex4() else { return nil }
                if (0xD800...0xDBFF).contains(cp) {
                    guard i + 2 <= b.count, b[i] == UInt8(ascii: "\\"), b[i + 1] == UInt8(ascii: "u") else { return nil }
                    i += 2
                    guard let lo = hex4(), (0xDC00...0xDFFF).contains(lo) else { return nil }
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                } else if (0xDC00...0xDFFF).contains(cp) { return nil }
                guard let scalar = Unicode.Scalar(cp) else { return nil }
                out.append(contentsOf: Array(String(Character(scalar)).utf8))
            default: return nil
            }
        }
        return nil
    }

    mutating func number() -> JSONValue? {
        let start = i
        if i < b.count, b[i] == UInt8(ascii: "-") { i += 1 }
        var digits = 0
        while i < b.count, b[i] >= 48, b[i] <= 57 { i += 1; digits += 1 }
        guard digits > 0 else { return nil }
        if digits > 1 && b[start + (b[start] == UInt8(ascii: "-") ? 1 : 0)] == 48 { return nil }
        var integral = true
        if i < b.count, b[i] == UInt8(ascii: ".") {
            integral = false; i += 1
            var f = 0
            while i < b.count, b[i] >= 48, b[i] <= 57 { i += 1; f += 1 }
            guard f > 0 else { return nil }
        }
        if i < b.count, b[i] == UInt8(ascii: "e") || b[i] == UInt8(ascii: "E") {
            integral = false; i += 1
            if i < b.count, b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-") { i += 1 }
            var e = 0
            while i < b.count, b[i] >= 48, b[i] <= 57 { i += 1; e += 1 }
            guard e > 0 else { return nil }
        }
        let text = String(decoding: b[start..<i], as: UTF8.self)
        if integral, let v = Int64(text) { return .int(v) }
        guard let d = Double(text), d.isFinite else { return nil }
        return .double(d)
    }
}

/// What a verified JWT says about the request: written natively by the JWT
/// authentication primitive only (a filter cannot set it), read by filters as `s.auth`.
public struct RequestAuthResult: Sendable {
    /// Istio's request principal: "iss/sub".
    public var principal: String
    public var issuer: String
    public var subject: String
    /// The token's `aud` (a string becomes a list of one).
    public var audiences: [String]
    /// The token's `azp` (authorized presenter), or "".
    public var presenter: String
    /// Every claim of the payload (space-delimited claims such as `scope` split into lists).
    public var claims: JSONValue
    public init(principal: String, issuer: String, subject: String, audiences: [String], presenter: String, claims: JSONValue) {
        self.principal = principal; self.issuer = issuer; self.subject = subject
        self.audiences = audiences; self.presenter = presenter; self.claims = claims
    }
}

/// Why a token was refused, with Envoy's jwt_authn status text (the body of the 401/403).
public struct JWTFailure: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    /// The HTTP status Envoy answers with: 403 for a disallowed audience, else 401.
    public var status: Int
    public init(_ message: String, status: Int = 401) { self.message = message; self.status = status }
    public var description: String { message }

    public static let missing = JWTFailure("Jwt is missing")
    public static let expired = JWTFailure("Jwt is expired")
    public static let notYetValid = JWTFailure("Jwt not yet valid")
    public static let badFormat = JWTFailure("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")
    public static let headerBadBase64 = JWTFailure("Jwt header is an invalid Base64url encoded")
    public static let headerBadJSON = JWTFailure("Jwt header is an invalid JSON")
    public static let headerBadAlg = JWTFailure("Jwt header [alg] field is required and must be a string")
    public static let algNotImplemented = JWTFailure("Jwt header [alg] is not supported")
    public static let headerBadKid = JWTFailure("Jwt header [kid] field is not a string")
    public static let payloadBadBase64 = JWTFailure("Jwt payload is an invalid Base64url encoded")
    public static let payloadBadJSON = JWTFailure("Jwt payload is an invalid JSON")
    public static let issNotString = JWTFailure("Jwt payload [iss] field is not a string")
    public static let subNotString = JWTFailure("Jwt payload [sub] field is not a string")
    public static let expNotInteger = JWTFailure("Jwt payload [exp] field is not an integer")
    public static let nbfNotInteger = JWTFailure("Jwt payload [nbf] field is not an integer")
    public static let audNotString = JWTFailure("Jwt payload [aud] field is not a string or string list")
    public static let signatureBadBase64 = JWTFailure("Jwt signature is an invalid Base64url encoded")
    public static let unknownIssuer = JWTFailure("Jwt issuer is not configured")
    public static let audienceNotAllowed = JWTFailure("Audiences in Jwt are not allowed", status: 403)
    public static let verificationFails = JWTFailure("Jwt verification fails")
    public static let kidAlgMismatch = JWTFailure("Jwks doesn't have key to match kid or alg from Jwt")
    public static let jwksFetchFailed = JWTFailure("Jwks remote fetch is failed")
}

/// One JWT issuer as a RequestAuthentication rule configures it (issuer, audiences,
/// keys). Implemented natively (MoonletTLS); used from any event loop.
public protocol JWTVerifying: AnyObject, Sendable {
    /// The issuer tokens must carry in `iss`.
    var issuer: String { get }
    /// Verifies `token` at `now` (Unix seconds): format, algorithm, signature against
    /// the current keys, issuer, audiences, exp and nbf.
    func verify(_ token: String, now: Double) -> Result<RequestAuthResult, JWTFailure>
}
