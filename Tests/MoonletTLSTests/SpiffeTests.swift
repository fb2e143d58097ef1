import XCTest
import Foundation
import X509
import Crypto
import _CryptoExtras
import NIOSSL
@testable import MoonletTLS
import MoonletCore

final class SpiffeTests: XCTestCase {
    func test_spiffeID_parsesIstiosURIAndPrincipalForms_andRejectsOtherShapes() {
        let id = SpiffeID(uri: "spiffe://cluster.local/ns/default/sa/frontend")
        XCTAssertEqual(id?.namespace, "default")
        XCTAssertEqual(id?.serviceAccount, "frontend")
        XCTAssertEqual(id?.principal, "cluster.local/ns/default/sa/frontend")
        XCTAssertEqual(SpiffeID(principal: "cluster.local/ns/default/sa/frontend"), id)
        for bad in ["http://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a", "spiffe://cluster.local/ns//sa/b",
                    "spiffe://cluster.local/ns/a/sa/b/c", "spiffe://cluster.local/sa/a/ns/b", "spiffe:///ns/a/sa/b"] {
            XCTAssertNil(SpiffeID(uri: bad), bad)
        }
    }

    func test_ttl_parsesIstioDurations() {
        XCTAssertEqual(parseTTL("24h"), 86400)
        XCTAssertEqual(parseTTL("1h30m"), 5400)
        XCTAssertEqual(parseTTL("90s"), 90)
        XCTAssertNil(parseTTL("24"))
        XCTAssertNil(parseTTL("h"))
        XCTAssertNil(parseTTL("0s"))
        XCTAssertNil(parseTTL("5x"))
    }
}

final class CertificateAuthorityTests: XCTestCase {
    var dir: String!
    override func setUp() { dir = NSTemporaryDirectory() + "moonlet-ca-\(UUID().uuidString)" }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func test_issuedWorkloadCertificate_carriesTheSpiffeIDAsItsOnlyURISAN_withTheRequestedKeyAndLifetime() throws {
        let ca = try MeshCA.create(trustDomain: "example.org")
        try ca.write(to: dir + "/ca")
        let loaded = try MeshCA.load(dir: dir + "/ca")
        XCTAssertEqual(loaded.trustDomain, "example.org")
        for kt in KeyType.allCases {
            let b = try loaded.issue(try loaded.identity(namespace: "default", serviceAccount: "frontend"), keyType: kt, ttl: 3600)
            let cert = try Certificate(pemEncoded: b.certChainPEM)
            let sans = try cert.extensions.subjectAlternativeNames.map(Array.init) ?? []
            XCTAssertEqual(sans, [.uniformResourceIdentifier("spiffe://example.org/ns/default/sa/frontend")])
            XCTAssertEqual(cert.notValidAfter.timeIntervalSince(cert.notValidBefore), 3600 + 60, accuracy: 2)
            XCTAssertEqual(try Certificate.PrivateKey(pemEncoded: b.keyPEM).publicKey, cert.publicKey)
            XCTAssertTrue(loaded.rootCertificate.publicKey.isValidSignature(cert.signature, for: cert))
            XCTAssertEqual(try cert.extensions.basicConstraints, .notCertificateAuthority)
            switch kt {
            case .ecdsaP256: XCTAssertNotNil(P256.Signing.PublicKey(cert.publicKey))
            case .rsa2048: XCTAssertEqual(_RSA.Signing.PublicKey(cert.publicKey)?.keySizeInBits, 2048)
            }
        }
    }

    func test_caInit_neverOverwritesAnExistingRootKey() throws {
        try MeshCA.create().write(to: dir)
        let before = try String(contentsOfFile: dir + "/root-key.pem", encoding: .utf8)
        XCTAssertThrowsError(try MeshCA.create().write(to: dir)) { e in
            XCTAssertTrue("\(e)".contains("root-key.pem: exists; refusing to overwrite"), "\(e)")
        }
        XCTAssertEqual(try String(contentsOfFile: dir + "/root-key.pem", encoding: .utf8), before)
    }

    func test_csrSigning_givesTheCallerOnlyItsOwnIdentity() throws {
        let ca = try MeshCA.create()
        let me = try ca.identity(namespace: "default", serviceAccount: "frontend")
        let other = try ca.identity(namespace: "default", serviceAccount: "admin")
        let (csr, key) = try MeshCA.makeCSR(for: me)
        let pem = try ca.signCSR(pem: csr, allowed: me, ttl: 600)
        let cert = try Certificate(pemEncoded: pem)
        XCTAssertEqual(cert.publicKey, try Certificate.PrivateKey(pemEncoded: key).publicKey)
        XCTAssertThrowsError(try ca.signCSR(pem: csr, allowed: other, ttl: 600)) { e in
            XCTAssertTrue("\(e)".contains("may only get spiffe://cluster.local/ns/default/sa/admin"), "\(e)")
        }
        XCTAssertThrowsError(try ca.signCSR(pem: "garbage", allowed: me, ttl: 600)) { e in XCTAssertTrue("\(e)".hasPrefix("CSR: not a PEM")) }
    }

    func test_workloadFiles_loadWithTheirIdentity_andEachBadFileIsNamedInTheError() throws {
        let ca = try MeshCA.create()
        let id = try ca.identity(namespace: "prod", serviceAccount: "orders")
        try ca.issue(id).write(to: dir + "/ok")
        let m = try TLSMaterial.load(dir: dir + "/ok")
        XCTAssertEqual(m.identity, id)
        XCTAssertGreaterThan(m.renewAt, Date().addingTimeInterval(11 * 3600))

        // Missing file.
        try FileManager.default.createDirectory(atPath: dir + "/empty", withIntermediateDirectories: true)
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/empty")) { XCTAssertTrue("\($0)".hasSuffix("cert-chain.pem: no such file"), "\($0)") }
        // Key of another certificate.
        try ca.issue(id).write(to: dir + "/mismatch")
        try FileManager.default.removeItem(atPath: dir + "/mismatch/key.pem")
        try FileManager.default.copyItem(atPath: dir + "/ok/key.pem", toPath: dir + "/mismatch/key.pem")
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/mismatch")) { XCTAssertTrue("\($0)".contains("key.pem: does not match the certificate"), "\($0)") }
        // Issued by another root.
        var foreign = try MeshCA.create().issue(id)
        foreign.rootCertPEM = ca.rootCertPEM
        try foreign.write(to: dir + "/foreign")
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/foreign")) { XCTAssertTrue("\($0)".contains("is not signed by a root of"), "\($0)") }
        // Expired.
        try ca.issue(id, ttl: 60, now: Date().addingTimeInterval(-3600)).write(to: dir + "/expired")
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/expired")) { XCTAssertTrue("\($0)".contains("cert-chain.pem: certificate expired at"), "\($0)") }
        // Not PEM.
        try ca.issue(id).write(to: dir + "/garbage")
        try "not a certificate".write(toFile: dir + "/garbage/cert-chain.pem", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/garbage")) { XCTAssertTrue("\($0)".contains("cert-chain.pem:"), "\($0)") }
    }

    func test_tokenFile_mapsEachTokenToOneIdentity_andRejectsMalformedLinesWithTheirLineNumber() throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "# tokens\nabc default/frontend\n\nxyz prod/orders\n".write(toFile: dir + "/t", atomically: true, encoding: .utf8)
        let t = try CAService.loadTokens(dir + "/t", trustDomain: "cluster.local")
        XCTAssertEqual(t["abc"]?.uri, "spiffe://cluster.local/ns/default/sa/frontend")
        XCTAssertEqual(t.count, 2)
        try "abc default\n".write(toFile: dir + "/bad", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try CAService.loadTokens(dir + "/bad", trustDomain: "cluster.local")) { XCTAssertTrue("\($0)".contains("/bad:1:"), "\($0)") }
    }

    func test_caService_refusesCallersWithoutProof_andCallersAskingForAnotherIdentity() throws {
        let ca = try MeshCA.create()
        let me = try ca.identity(namespace: "default", serviceAccount: "frontend")
        let svc = CAService(ca: ca, tokens: ["tok": me])
        let (csr, _) = try MeshCA.makeCSR(for: me)
        func body(_ sa: String) -> Data { Data("{\"csr\":\(JSON.quote(csr)),\"namespace\":\"default\",\"service_account\":\"\(sa)\"}".utf8) }
        XCTAssertEqual(svc.handle(method: .POST, uri: "/v1/sign", authorization: nil, peer: nil, body: body("frontend")).0, .unauthorized)
        XCTAssertEqual(svc.handle(method: .POST, uri: "/v1/sign", authorization: "Bearer nope", peer: nil, body: body("frontend")).0, .unauthorized)
        XCTAssertEqual(svc.handle(method: .POST, uri: "/v1/sign", authorization: "Bearer tok", peer: nil, body: body("admin")).0, .forbidden)
        XCTAssertEqual(svc.handle(method: .POST, uri: "/v1/sign", authorization: nil, peer: me, body: body("frontend")).0, .ok)
        let ok = svc.handle(method: .POST, uri: "/v1/sign", authorization: "Bearer tok", peer: nil, body: body("frontend"))
        XCTAssertEqual(ok.0, .ok)
        XCTAssertTrue(ok.1.contains("BEGIN CERTIFICATE"))
        XCTAssertEqual(svc.handle(method: .POST, uri: "/v1/sign", authorization: "Bearer tok", peer: nil, body: Data("{".utf8)).0, .badRequest)
        XCTAssertEqual(JSON.quote("a\"\u{1}\n"), "\"a\\\"\\u0001\\n\"")
    }

    func test_JSONQuote_escapesQuotesBackslashesAndControlBytes_andKeepsUTF8AsItIs() {
        XCTAssertEqual(JSON.quote(""), "\"\"")
        XCTAssertEqual(JSON.quote("plain ascii"), "\"plain ascii\"")
        XCTAssertEqual(JSON.quote("é→😀"), "\"é→😀\"")
        XCTAssertEqual(JSON.quote("\\\r\t\u{1f}\u{0}x\u{7f}"), "\"\\\\\\r\\t\\u001f\\u0000x\u{7f}\"")
        // Every control byte: parsed back by Foundation's JSON reader to the same string.
        let all = String(decoding: (0..<128).map { UInt8($0) }, as: UTF8.self) + "ü"
        let back = try? JSONSerialization.jsonObject(with: Data(JSON.quote(all).utf8), options: [.fragmentsAllowed]) as? String
        XCTAssertEqual(back, all)
    }

    func test_refusedHandshakes_areExplainedWithThePeersIdentity() throws {
        struct TLSFailure: Error, CustomStringConvertible { var description: String }
        let ca = try MeshCA.create()
        let verifyFailed = TLSFailure(description: "handshakeFailed(sslError([error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED]))")
        func cert(_ b: WorkloadBundle) throws -> NIOSSLCertificate { try NIOSSLCertificate(bytes: Array(b.certChainPEM.utf8), format: .pem) }
        let id = try ca.identity(namespace: "default", serviceAccount: "old")
        let expired = try cert(ca.issue(id, ttl: 60, now: Date().addingTimeInterval(-3600)))
        XCTAssertTrue(TLSMaterial.refusalReason(verifyFailed, peerCertificate: expired).hasPrefix("certificate of spiffe://cluster.local/ns/default/sa/old expired at"))
        let foreign = try cert(MeshCA.create().issue(id))
        XCTAssertTrue(TLSMaterial.refusalReason(verifyFailed, peerCertificate: foreign).hasSuffix("does not chain to the mesh root"))
        XCTAssertEqual(TLSMaterial.refusalReason(TLSFailure(description: "PEER_DID_NOT_RETURN_A_CERTIFICATE"), peerCertificate: nil), "the client presented no certificate")
        XCTAssertEqual(TLSMaterial.refusalReason(TLSFailure(description: "WRONG_VERSION_NUMBER"), peerCertificate: nil), "not TLS (plaintext on an mTLS port)")
    }
}
