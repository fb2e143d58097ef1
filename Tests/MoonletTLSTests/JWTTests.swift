import XCTest
import Crypto
import _CryptoExtras
import MoonletCore
@testable import MoonletTLS

/// JWT verification as a RequestAuthentication jwtRule configures it, with keys made
/// by the test (RSA 2048, P-256, P-384).
final class JWTTests: XCTestCase {
    static let rsa = try! JWTSigner(.rs256, kid: "rsa-1")
    static let otherRSA = try! JWTSigner(.rs256, kid: "rsa-2")
    static let p256 = try! JWTSigner(.es256, kid: "ec-256")
    static let p384 = try! JWTSigner(.es384, kid: "ec-384")
    let issuer = "https://issuer.example"
    let now = 1_800_000_000.0

    func provider(_ signers: [JWTSigner], audiences: [String] = [], issuer: String? = nil) throws -> JWTProvider {
        JWTProvider(issuer: issuer ?? self.issuer, audiences: audiences, keys: JWKSHolder(keys: try JWKSet.parse(Array(JWTSigner.jwks(signers).utf8))))
    }

    func claims(iss: String? = nil, sub: String = "alice", aud: String = "\"orders\"", exp: Double? = nil, nbf: Double? = nil, extra: String = "") -> String {
        var parts = ["\"iss\":\"\(iss ?? issuer)\"", "\"sub\":\"\(sub)\"", "\"aud\":\(aud)", "\"exp\":\(Int(exp ?? now + 3600))"]
        if let nbf { parts.append("\"nbf\":\(Int(nbf))") }
        if !extra.isEmpty { parts.append(extra) }
        return "{" + parts.joined(separator: ",") + "}"
    }

    func failure(_ r: Result<RequestAuthResult, JWTFailure>) -> JWTFailure? {
        if case .failure(let f) = r { return f }
        return nil
    }

    func test_validTokens_ofEveryKeyType_verify_andGiveThePrincipalAndClaims() throws {
        for s in [Self.rsa, Self.rsa.with(algorithm: .rs384), Self.rsa.with(algorithm: .rs512), Self.rsa.with(algorithm: .ps256),
                  Self.rsa.with(algorithm: .ps384), Self.p256, Self.p384] {
            let p = try provider([s])
            let token = try s.sign(claims: claims(extra: "\"azp\":\"web\",\"scope\":\"read write\",\"groups\":[\"a\",\"b\"],\"org\":{\"id\":7}"))
            let a = try p.verify(token, now: now).get()
            XCTAssertEqual(a.principal, "https://issuer.example/alice", s.algorithm.rawValue)
            XCTAssertEqual(a.audiences, ["orders"])
            XCTAssertEqual(a.presenter, "web")
            XCTAssertEqual(a.claims["scope"], .array([.string("read"), .string("write")]), "scope is space-delimited, as Istio splits it")
            XCTAssertEqual(a.claims["org"]?["id"], .int(7))
        }
    }

    func test_expiredToken_isRefused_butTheClockSkewOf60sIsAllowed() throws {
        let p = try provider([Self.p256])
        XCTAssertEqual(failure(p.verify(try Self.p256.sign(claims: claims(exp: now - 61)), now: now)), .expired)
        XCTAssertNil(failure(p.verify(try Self.p256.sign(claims: claims(exp: now - 30)), now: now)))
    }

    func test_tokenNotYetValid_isRefused() throws {
        let p = try provider([Self.p256])
        XCTAssertEqual(failure(p.verify(try Self.p256.sign(claims: claims(nbf: now + 120)), now: now)), .notYetValid)
        XCTAssertNil(failure(p.verify(try Self.p256.sign(claims: claims(nbf: now + 30)), now: now)))
    }

    func test_tokenSignedByAnotherKey_failsVerification() throws {
        let p = try provider([Self.rsa])
        // Same kid as the configured key, different key: the signature does not verify.
        let forged = try Self.otherRSA.with(kid: "rsa-1").sign(claims: claims())
        XCTAssertEqual(failure(p.verify(forged, now: now)), .verificationFails)
        // An EC key's token against an RSA-only set: no key fits.
        XCTAssertEqual(failure(p.verify(try Self.p256.with(kid: .some(nil)).sign(claims: claims()), now: now)), .kidAlgMismatch)
    }

    func test_kidSelectsTheKey_andWithoutKidEveryKeyOfTheRightTypeIsTried() throws {
        let p = try provider([Self.otherRSA, Self.rsa, Self.p256])
        XCTAssertNil(failure(p.verify(try Self.rsa.sign(claims: claims()), now: now)))
        XCTAssertNil(failure(p.verify(try Self.rsa.with(kid: .some(nil)).sign(claims: claims()), now: now)))
        XCTAssertEqual(failure(p.verify(try Self.rsa.with(kid: "unknown").sign(claims: claims()), now: now)), .kidAlgMismatch)
    }

    func test_keyWithoutKid_isTriedForATokenWithAKid_asEnvoyDoes() throws {
        let p = try provider([Self.otherRSA, Self.rsa.with(kid: .some(nil))])
        XCTAssertNil(failure(p.verify(try Self.rsa.sign(claims: claims()), now: now)), "the kid-less key verifies a token with kid rsa-1")
        XCTAssertNil(failure(p.verify(try Self.rsa.with(kid: "unknown").sign(claims: claims()), now: now)))
        // An EC token: the kid-less key is RSA and the other key has another kid, so none fits;
        // another RSA key's token under kid rsa-1 is tried against the kid-less key only, and fails.
        XCTAssertEqual(failure(p.verify(try Self.p256.sign(claims: claims()), now: now)), .kidAlgMismatch)
        XCTAssertEqual(failure(p.verify(try Self.otherRSA.with(kid: "rsa-1").sign(claims: claims()), now: now)), .verificationFails)
    }

    func test_wrongIssuer_isNotConfigured() throws {
        let p = try provider([Self.p256])
        XCTAssertEqual(failure(p.verify(try Self.p256.sign(claims: claims(iss: "https://evil.example")), now: now)), .unknownIssuer)
    }

    func test_audiences_areChecked_whenConfigured_andAnyAudiencePassesWhenNone() throws {
        let strict = try provider([Self.p256], audiences: ["orders", "billing"])
        XCTAssertNil(failure(strict.verify(try Self.p256.sign(claims: claims(aud: "[\"x\",\"billing\"]")), now: now)))
        let wrong = failure(strict.verify(try Self.p256.sign(claims: claims(aud: "\"inventory\"")), now: now))
        XCTAssertEqual(wrong, .audienceNotAllowed)
        XCTAssertEqual(wrong?.status, 403, "Envoy answers 403 for a disallowed audience")
        XCTAssertNil(failure(try provider([Self.p256]).verify(try Self.p256.sign(claims: claims(aud: "\"inventory\"")), now: now)))
    }

    func test_algNone_andHMAC_areRefused() throws {
        let p = try provider([Self.rsa])
        let body = Base64.encodeURL(Array(claims().utf8))
        let none = Base64.encodeURL(Array("{\"alg\":\"none\"}".utf8)) + "." + body + "."
        XCTAssertEqual(failure(p.verify(none, now: now)), .algNotImplemented)
        let input = Base64.encodeURL(Array("{\"alg\":\"HS256\",\"kid\":\"rsa-1\"}".utf8)) + "." + body
        // HMAC keyed with the RSA public key's bytes: the classic key-confusion attack.
        let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: Array(Self.rsa.jwk.utf8)))
        XCTAssertEqual(failure(p.verify(input + "." + Base64.encodeURL(Array(mac)), now: now)), .algNotImplemented)
    }

    func test_malformedTokens_areRefusedWithEnvoysMessages_neverCrash() throws {
        let p = try provider([Self.p256])
        let good = try Self.p256.sign(claims: claims())
        let parts = good.split(separator: ".").map(String.init)
        XCTAssertEqual(failure(p.verify("abc", now: now)), .badFormat)
        XCTAssertEqual(failure(p.verify("a.b.c.d", now: now)), .badFormat)
        XCTAssertEqual(failure(p.verify("!!!." + parts[1] + "." + parts[2], now: now)), .headerBadBase64)
        XCTAssertEqual(failure(p.verify(Base64.encodeURL(Array("{".utf8)) + "." + parts[1] + "." + parts[2], now: now)), .headerBadJSON)
        XCTAssertEqual(failure(p.verify(parts[0] + "." + Base64.encodeURL(Array("[1]".utf8)) + "." + parts[2], now: now)), .payloadBadJSON)
        XCTAssertEqual(failure(p.verify(parts[0] + "." + parts[1] + ".@@", now: now)), .signatureBadBase64)
        XCTAssertEqual(failure(p.verify(parts[0] + "." + parts[1] + "." + parts[2] + "AA", now: now)), .verificationFails)
        XCTAssertEqual(failure(p.verify(String(repeating: "a", count: 9000) + ".b.c", now: now)), .badFormat)
        let deep = String(repeating: "[", count: 5000) + String(repeating: "]", count: 5000)
        XCTAssertEqual(failure(p.verify(parts[0] + "." + Base64.encodeURL(Array(deep.utf8).prefix(6000)) + "." + parts[2], now: now)), .payloadBadJSON, "5000 levels of nesting stop at the depth limit")
        XCTAssertEqual(failure(p.verify(parts[0] + "." + Base64.encodeURL(Array(String(repeating: "[", count: 100).utf8)) + "." + parts[2], now: now)), .payloadBadJSON)
        XCTAssertEqual(failure(p.verify(try Self.p256.sign(claims: "{\"iss\":7}"), now: now)), .issNotString)
        XCTAssertEqual(failure(p.verify(try Self.p256.sign(claims: "{\"iss\":\"\(issuer)\",\"exp\":\"soon\"}"), now: now)), .expNotInteger)
        // Random bytes and random segment mixes: an answer every time.
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let len = Int.random(in: 0..<300, using: &rng)
            let bytes = (0..<len).map { _ in UInt8.random(in: 0...255, using: &rng) }
            _ = p.verify(String(decoding: bytes, as: UTF8.self), now: now)
            let mixed = [parts[0], parts[1], parts[2], Base64.encodeURL(bytes)].shuffled().prefix(3).joined(separator: ".")
            _ = p.verify(mixed, now: now)
        }
    }

    func test_verifiedTokenCache_expiresWithTheToken_andIsDroppedWhenTheKeysChange() throws {
        let holder = JWKSHolder(keys: try JWKSet.parse(Array(JWTSigner.jwks([Self.p256]).utf8)))
        let p = JWTProvider(issuer: issuer, audiences: [], keys: holder)
        let t = try Self.p256.sign(claims: claims(exp: now + 100))
        XCTAssertNil(failure(p.verify(t, now: now)))
        XCTAssertNil(failure(p.verify(t, now: now)), "from the cache")
        XCTAssertEqual(failure(p.verify(t, now: now + 200)), .expired, "a cached token still expires")
        holder.update(try JWKSet.parse(Array(JWTSigner.jwks([Self.p384]).utf8)))
        XCTAssertEqual(failure(p.verify(t, now: now)), .kidAlgMismatch, "a key removed from the JWKS stops verifying its tokens, cached or not")
    }

    func test_providerWithoutKeysYet_refusesTokens() throws {
        let p = JWTProvider(issuer: issuer, audiences: [], keys: JWKSHolder())
        XCTAssertEqual(failure(p.verify(try Self.p256.sign(claims: claims()), now: now)), .jwksFetchFailed)
    }

    func test_jwksParsing_skipsUnusableKeys_andRefusesASetWithoutAny() throws {
        let set = try JWKSet.parse(Array("{\"keys\":[{\"kty\":\"oct\",\"k\":\"AAAA\"},{\"kty\":\"RSA\",\"n\":\"AQAB\",\"e\":\"AQAB\"},\(Self.p256.jwk),{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AA\",\"y\":\"AA\"},{\"kty\":\"EC\",\"use\":\"enc\"}]}".utf8))
        XCTAssertEqual(set.keys.count, 1)
        XCTAssertEqual(set.keys.first?.kid, "ec-256")
        XCTAssertEqual(set.skipped.count, 3)
        for bad in ["", "{", "[]", "{\"keys\":{}}", "{\"keys\":[]}", "{\"keys\":[{\"kty\":\"RSA\"}]}"] {
            XCTAssertThrowsError(try JWKSet.parse(Array(bad.utf8)), bad)
        }
    }

    func test_jsonParser_boundsDepthAndSize_andReadsEscapes() {
        XCTAssertEqual(JSONValue.parse(Array("{\"a\":\"\\u00e9\\ud83d\\ude00\\n\",\"b\":[1,-2.5e1,true,null]}".utf8)),
                       .object([("a", .string("é😀\n")), ("b", .array([.int(1), .double(-25), .bool(true), .null]))]))
        XCTAssertNil(JSONValue.parse(Array((String(repeating: "[", count: 40) + String(repeating: "]", count: 40)).utf8)))
        XCTAssertNil(JSONValue.parse(Array("{\"a\":1}".utf8), limits: .init(maxBytes: 3, maxDepth: 4)))
        for bad in ["01", "1.", "\"\\x\"", "\"\\ud800\"", "[1,]", "{\"a\"}", "tru", "\"a", "1 2"] { XCTAssertNil(JSONValue.parse(Array(bad.utf8)), bad) }
    }
}
