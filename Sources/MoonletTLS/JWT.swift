import Crypto
import _CryptoExtras
import NIOConcurrencyHelpers
import MoonletCore
#if canImport(Foundation)
import Foundation
#endif

/// A JWS signature algorithm Moonlet verifies. `none` and the HMAC family are refused:
/// a RequestAuthentication names public keys only.
public enum JWTAlgorithm: String, Sendable, CaseIterable {
    case rs256 = "RS256", rs384 = "RS384", rs512 = "RS512"
    case ps256 = "PS256", ps384 = "PS384", ps512 = "PS512"
    case es256 = "ES256", es384 = "ES384", es512 = "ES512"

    var isRSA: Bool { rawValue.hasPrefix("RS") || rawValue.hasPrefix("PS") }
}

/// One public key of a JWKS.
public struct JWK: Sendable {
    public enum Key: Sendable {
        case rsa(_RSA.Signing.PublicKey)
        case p256(P256.Signing.PublicKey)
        case p384(P384.Signing.PublicKey)
        case p521(P521.Signing.PublicKey)
    }
    public var key: Key
    public var kid: String?
    public var alg: String?

    /// Whether this key can check a signature made with `alg`.
    func fits(_ a: JWTAlgorithm) -> Bool {
        if let alg, alg != a.rawValue { return false }
        switch (key, a) {
        case (.rsa, _): return a.isRSA
        case (.p256, .es256), (.p384, .es384), (.p521, .es512): return true
        default: return false
        }
    }

    func isValid(_ sig: [UInt8], _ input: [UInt8], _ a: JWTAlgorithm) -> Bool {
        switch key {
        case .rsa(let k):
            let s = _RSA.Signing.RSASignature(rawRepresentation: sig)
            let pad: _RSA.Signing.Padding = a.rawValue.hasPrefix("PS") ? .PSS : .insecurePKCS1v1_5
            switch a {
            case .rs256, .ps256: return k.isValidSignature(s, for: SHA256.hash(data: input), padding: pad)
            case .rs384, .ps384: return k.isValidSignature(s, for: SHA384.hash(data: input), padding: pad)
            case .rs512, .ps512: return k.isValidSignature(s, for: SHA512.hash(data: input), padding: pad)
            default: return false
            }
        case .p256(let k):
            guard let s = try? P256.Signing.ECDSASignature(rawRepresentation: sig) else { return false }
            return k.isValidSignature(s, for: SHA256.hash(data: input))
        case .p384(let k):
            guard let s = try? P384.Signing.ECDSASignature(rawRepresentation: sig) else { return false }
            return k.isValidSignature(s, for: SHA384.hash(data: input))
        case .p521(let k):
            guard let s = try? P521.Signing.ECDSASignature(rawRepresentation: sig) else { return false }
            return k.isValidSignature(s, for: SHA512.hash(data: input))
        }
    }
}

/// A parsed JSON Web Key Set (RFC 7517): the RSA and EC signing keys it holds.
public struct JWKSet: Sendable {
    public var keys: [JWK]
    /// Keys left out (unsupported type, `use` other than "sig", bad fields), for logs.
    public var skipped: [String]

    /// Largest JWKS document accepted.
    public static let maxBytes = 1 << 20

    /// Parses a JWKS document. Keys Moonlet cannot use are skipped; a set with no usable
    /// key is an error (Envoy's texts).
    public static func parse<C: Collection>(_ text: C) throws -> JWKSet where C.Element == UInt8 {
        guard let doc = JSONValue.parse(text, limits: .init(maxBytes: maxBytes, maxDepth: 16)) else { throw JWTFailure("Jwks is an invalid JSON") }
        guard let keys = doc["keys"] else { throw JWTFailure("Jwks does not have [keys] field") }
        guard case .array(let list) = keys else { throw JWTFailure("[keys] in Jwks is not an array") }
        var out = JWKSet(keys: [], skipped: [])
        for (i, k) in list.enumerated() {
            do { if let jwk = try key(k) { out.keys.append(jwk) } } catch { out.skipped.append("keys[\(i)]: \(error)") }
        }
        guard !out.keys.isEmpty else { throw JWTFailure("Jwks doesn't have any valid public key" + (out.skipped.isEmpty ? "" : " (\(out.skipped.joined(separator: "; ")))")) }
        return out
    }

    static func key(_ k: JSONValue) throws -> JWK? {
        guard case .object = k else { throw JWTFailure("not an object") }
        if let use = k["use"]?.stringValue, use != "sig" { return nil }
        let kid = k["kid"]?.stringValue
        let alg = k["alg"]?.stringValue
        func b64(_ name: String, _ missing: String) throws -> [UInt8] {
            guard let s = k[name]?.stringValue, let v = Base64.decode(Array(s.utf8), alphabet: .url), !v.isEmpty else { throw JWTFailure(missing) }
            return v
        }
        switch k["kty"]?.stringValue {
        case "RSA":
            if let alg, !(alg.hasPrefix("RS") || alg.hasPrefix("PS")) { throw JWTFailure("[alg] is not started with [RS] or [PS] for an RSA key") }
            let n = try b64("n", "[n] field is missing for a RSA key"), e = try b64("e", "[e] field is missing for a RSA key")
            do { return JWK(key: .rsa(try _RSA.Signing.PublicKey(n: n, e: e)), kid: kid, alg: alg) } catch {
                throw JWTFailure("Jwks RSA [n] or [e] field is missing or has a parse error (keys under 2048 bits are refused)")
            }
        case "EC":
            if let alg, !alg.hasPrefix("ES") { throw JWTFailure("[alg] is not started with [ES] for an EC key") }
            let x = try b64("x", "[x] field is missing for an EC key"), y = try b64("y", "[y] field is missing for an EC key")
            let point = [0x04] + x + y
            do {
                switch k["crv"]?.stringValue {
                case "P-256": return JWK(key: .p256(try P256.Signing.PublicKey(x963Representation: point)), kid: kid, alg: alg)
                case "P-384": return JWK(key: .p384(try P384.Signing.PublicKey(x963Representation: point)), kid: kid, alg: alg)
                case "P-521": return JWK(key: .p521(try P521.Signing.PublicKey(x963Representation: point)), kid: kid, alg: alg)
                default: throw JWTFailure("[crv] or [alg] field is not supported for an EC key")
                }
            } catch let e as JWTFailure { throw e } catch { throw JWTFailure("Jwks EC [x] and [y] fields have a parse error.") }
        case nil: throw JWTFailure("[kty] is missing in [keys]")
        default: throw JWTFailure("[kty] is not supported in [keys]")
        }
    }
}

/// The keys of one JWKS source (inline or fetched from a jwksUri), shared by the
/// providers that use it. Swapped whole by the fetcher; a failed fetch keeps the last
/// good set.
public final class JWKSHolder: @unchecked Sendable {
    let lock = NIOLock()
    var _keys: JWKSet?
    var _lastError: String?
    var _fetchedAt: Date?
    var _generation = 0
    public init(keys: JWKSet? = nil) { _keys = keys }

    /// The current keys (nil until a first fetch succeeded).
    public var keys: JWKSet? { lock.withLock { _keys } }
    /// The keys and how many times they were replaced (verified-token caches key on it).
    var current: (JWKSet?, Int) { lock.withLock { (_keys, _generation) } }
    /// The last fetch error (nil after a success).
    public var lastError: String? { lock.withLock { _lastError } }
    public var fetchedAt: Date? { lock.withLock { _fetchedAt } }

    public func update(_ keys: JWKSet) { lock.withLock { _keys = keys; _generation += 1; _lastError = nil; _fetchedAt = Date() } }
    public func failed(_ why: String) { lock.withLock { _lastError = why } }
}

/// A JWT issuer as one RequestAuthentication jwtRule configures it.
public final class JWTProvider: JWTVerifying, @unchecked Sendable {
    public let issuer: String
    /// Accepted `aud` values; empty: any audience (what Istio configures Envoy with).
    public let audiences: [String]
    /// Claims whose string value is split on spaces into a list (Istio: scope,
    /// permission, plus the rule's spaceDelimitedClaims).
    public let spaceDelimitedClaims: Set<String>
    public let keys: JWKSHolder
    /// Longest token verified (longer ones are refused as malformed).
    public static let maxTokenBytes = 8 * 1024
    /// Allowed clock skew on exp and nbf (Envoy's default).
    public static let clockSkewSeconds: Double = 60

    public init(issuer: String, audiences: [String], keys: JWKSHolder, spaceDelimitedClaims: [String] = []) {
        self.issuer = issuer; self.audiences = audiences; self.keys = keys
        self.spaceDelimitedClaims = Set(["scope", "permission"] + spaceDelimitedClaims)
    }

    static let segmentLimits = JSONValue.Limits(maxBytes: maxTokenBytes, maxDepth: 16)

    /// Tokens that verified, with their exp/nbf and the key generation they verified
    /// against (Envoy caches verified JWTs too): a repeated token skips parsing and the
    /// signature check while its time window holds and the keys are the same.
    struct Cached { var result: RequestAuthResult; var exp: Double?; var nbf: Double?; var generation: Int }
    let cacheLock = NIOLock()
    var cache: [String: Cached] = [:]
    /// Most tokens cached per provider (the cache is emptied when full).
    public static let cacheCapacity = 512

    public func verify(_ token: String, now: Double) -> Result<RequestAuthResult, JWTFailure> {
        let (set, generation) = keys.current
        if let c = cacheLock.withLock({ cache[token] }), c.generation == generation,
           c.exp.map({ now - Self.clockSkewSeconds < $0 }) ?? true, c.nbf.map({ now + Self.clockSkewSeconds >= $0 }) ?? true {
            return .success(c.result)
        }
        let r = verifyUncached(token, now: now, keys: set)
        if case .success(let (result, exp, nbf)) = r {
            cacheLock.withLock {
                if cache.count >= Self.cacheCapacity { cache.removeAll(keepingCapacity: true) }
                cache[token] = Cached(result: result, exp: exp, nbf: nbf, generation: generation)
            }
        }
        return r.map(\.0)
    }

    func verifyUncached(_ token: String, now: Double, keys set: JWKSet?) -> Result<(RequestAuthResult, Double?, Double?), JWTFailure> {
        let t = Array(token.utf8)
        guard t.count <= Self.maxTokenBytes else { return .failure(.badFormat) }
        let parts = t.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, !parts[1].isEmpty else { return .failure(.badFormat) }
        guard let hb = Base64.decode(parts[0], alphabet: .url) else { return .failure(.headerBadBase64) }
        guard let header = JSONValue.parse(hb, limits: Self.segmentLimits), case .object = header else { return .failure(.headerBadJSON) }
        guard let algName = header["alg"]?.stringValue else { return .failure(.headerBadAlg) }
        guard let alg = JWTAlgorithm(rawValue: algName) else { return .failure(.algNotImplemented) }
        var kid: String?
        if let k = header["kid"] { guard let s = k.stringValue else { return .failure(.headerBadKid) }; kid = s }
        guard let pb = Base64.decode(parts[1], alphabet: .url) else { return .failure(.payloadBadBase64) }
        guard let payload = JSONValue.parse(pb, limits: Self.segmentLimits), case .object(let members) = payload else { return .failure(.payloadBadJSON) }
        var iss = "", sub = ""
        if let v = payload["iss"] { guard let s = v.stringValue else { return .failure(.issNotString) }; iss = s }
        if let v = payload["sub"] { guard let s = v.stringValue else { return .failure(.subNotString) }; sub = s }
        var aud: [String] = []
        switch payload["aud"] {
        case nil: break
        case .string(let s)?: aud = [s]
        case .array(let l)?:
            for a in l { guard let s = a.stringValue else { return .failure(.audNotString) }; aud.append(s) }
        default: return .failure(.audNotString)
        }
        var exp: Double?, nbf: Double?
        if let v = payload["exp"] { guard let d = v.numberValue else { return .failure(.expNotInteger) }; exp = d }
        if let v = payload["nbf"] { guard let d = v.numberValue else { return .failure(.nbfNotInteger) }; nbf = d }
        // Envoy's order: issuer, time, audiences, then the signature.
        guard iss == issuer else { return .failure(.unknownIssuer) }
        if let nbf, now + Self.clockSkewSeconds < nbf { return .failure(.notYetValid) }
        if let exp, now - Self.clockSkewSeconds >= exp { return .failure(.expired) }
        if !audiences.isEmpty && !aud.contains(where: { audiences.contains($0) }) { return .failure(.audienceNotAllowed) }
        guard let sig = Base64.decode(parts[2], alphabet: .url), !sig.isEmpty else { return .failure(.signatureBadBase64) }
        guard let set else { return .failure(.jwksFetchFailed) }
        // Envoy: a key without a kid is tried for any token, a token without one tries every key.
        let candidates = set.keys.filter { $0.fits(alg) && (kid == nil || $0.kid == nil || $0.kid == kid) }
        guard !candidates.isEmpty else { return .failure(.kidAlgMismatch) }
        let input = Array(t[0..<(parts[0].count + 1 + parts[1].count)])
        guard candidates.contains(where: { $0.isValid(sig, input, alg) }) else { return .failure(.verificationFails) }
        let claims = JSONValue.object(members.map { m -> (String, JSONValue) in
            if spaceDelimitedClaims.contains(m.0), case .string(let s) = m.1 {
                return (m.0, JSONValue.array(s.split(separator: " ").map { JSONValue.string(String($0)) }))
            }
            return m
        })
        return .success((RequestAuthResult(principal: "\(iss)/\(sub)", issuer: iss, subject: sub, audiences: aud,
                                           presenter: payload["azp"]?.stringValue ?? "", claims: claims), exp, nbf))
    }
}

/// Signs JWTs with a key made here: for tests and local tooling (a development issuer
/// whose `jwks` goes into a RequestAuthentication). Not a production issuer.
public struct JWTSigner: Sendable {
    enum Private: Sendable {
        case rsa(_RSA.Signing.PrivateKey)
        case p256(P256.Signing.PrivateKey)
        case p384(P384.Signing.PrivateKey)
    }
    let key: Private
    public let algorithm: JWTAlgorithm
    public let kid: String?

    /// A new key for `algorithm` (RS*/PS*: RSA 2048; ES256: P-256; ES384: P-384).
    public init(_ algorithm: JWTAlgorithm, kid: String? = nil) throws {
        self.algorithm = algorithm; self.kid = kid
        switch algorithm {
        case .es256: key = .p256(P256.Signing.PrivateKey())
        case .es384: key = .p384(P384.Signing.PrivateKey())
        case .es512: throw JWTFailure("ES512 signing is not offered")
        default: key = .rsa(try _RSA.Signing.PrivateKey(keySize: .bits2048))
        }
    }

    init(key: Private, algorithm: JWTAlgorithm, kid: String?) { self.key = key; self.algorithm = algorithm; self.kid = kid }

    /// The same key presented for another algorithm or kid (to test mismatches).
    public func with(algorithm: JWTAlgorithm? = nil, kid: String?? = nil) -> JWTSigner {
        JWTSigner(key: key, algorithm: algorithm ?? self.algorithm, kid: kid ?? self.kid)
    }

    /// The public key as one JWK object (JSON text).
    public var jwk: String {
        var fields: [String] = []
        switch key {
        case .rsa(let k):
            let p = try! k.publicKey.getKeyPrimitives()
            fields = ["\"kty\":\"RSA\"", "\"n\":\"\(Base64.encodeURL(p.modulus))\"", "\"e\":\"\(Base64.encodeURL(p.publicExponent))\""]
        case .p256(let k):
            let raw = Array(k.publicKey.x963Representation.dropFirst())
            fields = ["\"kty\":\"EC\"", "\"crv\":\"P-256\"", "\"x\":\"\(Base64.encodeURL(raw[0..<32]))\"", "\"y\":\"\(Base64.encodeURL(raw[32...]))\""]
        case .p384(let k):
            let raw = Array(k.publicKey.x963Representation.dropFirst())
            fields = ["\"kty\":\"EC\"", "\"crv\":\"P-384\"", "\"x\":\"\(Base64.encodeURL(raw[0..<48]))\"", "\"y\":\"\(Base64.encodeURL(raw[48...]))\""]
        }
        if let kid { fields.append("\"kid\":\(JSON.quote(kid))") }
        fields.append("\"use\":\"sig\"")
        return "{" + fields.joined(separator: ",") + "}"
    }

    /// A JWKS document holding `signers`' public keys.
    public static func jwks(_ signers: [JWTSigner]) -> String { "{\"keys\":[" + signers.map(\.jwk).joined(separator: ",") + "]}" }

    /// A compact JWS of `claims` (JSON object text); `header` replaces the default header.
    public func sign(claims: String, header: String? = nil) throws -> String {
        let h = header ?? "{\"alg\":\"\(algorithm.rawValue)\",\"typ\":\"JWT\"" + (kid.map { ",\"kid\":\(JSON.quote($0))" } ?? "") + "}"
        let input = Base64.encodeURL(Array(h.utf8)) + "." + Base64.encodeURL(Array(claims.utf8))
        let data = Array(input.utf8)
        let sig: [UInt8]
        switch (key, algorithm) {
        case (.rsa(let k), let a) where a.isRSA:
            let pad: _RSA.Signing.Padding = a.rawValue.hasPrefix("PS") ? .PSS : .insecurePKCS1v1_5
            switch a {
            case .rs384, .ps384: sig = Array(try k.signature(for: SHA384.hash(data: data), padding: pad).rawRepresentation)
            case .rs512, .ps512: sig = Array(try k.signature(for: SHA512.hash(data: data), padding: pad).rawRepresentation)
            default: sig = Array(try k.signature(for: SHA256.hash(data: data), padding: pad).rawRepresentation)
            }
        case (.p256(let k), _): sig = Array(try k.signature(for: SHA256.hash(data: data)).rawRepresentation)
        case (.p384(let k), _): sig = Array(try k.signature(for: SHA384.hash(data: data)).rawRepresentation)
        default: throw JWTFailure("key does not fit \(algorithm.rawValue)")
        }
        return input + "." + Base64.encodeURL(sig)
    }
}
