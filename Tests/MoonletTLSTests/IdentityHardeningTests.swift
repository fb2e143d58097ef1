import XCTest
import X509
import Crypto
import SwiftASN1
import NIOSSL
import NIOConcurrencyHelpers
@testable import MoonletTLS
import MoonletCore

/// Issue 24: private key files, PEM errors, trust domains, single URI SAN, refusal reasons, log escaping.
final class IdentityHardeningTests: XCTestCase {
    var dir: String!
    override func setUp() {
        dir = NSTemporaryDirectory() + "moonlet-id-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func mode(_ path: String) -> mode_t {
        var st = stat()
        return stat(path, &st) == 0 ? st.st_mode & 0o777 : 0
    }

    func nio(_ pem: String) throws -> NIOSSLCertificate { try NIOSSLCertificate(bytes: Array(pem.utf8), format: .pem) }

    /// A certificate signed by `ca` for `id` with `uris` as its URI SANs (in that order).
    func cert(_ ca: MeshCA, uris: [String], usages: [ExtendedKeyUsage.Usage] = [.serverAuth, .clientAuth]) throws -> NIOSSLCertificate {
        let key = P256.Signing.PrivateKey()
        let first = SpiffeID(uri: uris[0]) ?? SpiffeID(trustDomain: "x", namespace: "x", serviceAccount: "x")!
        let extra = uris.dropFirst().map { GeneralName.uniformResourceIdentifier($0) }
        return try nio(ca.sign(publicKey: Certificate.PublicKey(key.publicKey), id: first, ttl: 3600, extraNames: Array(extra), usages: usages).serializeAsPEM().pemString)
    }

    // MARK: 1. key files

    func test_keyFile_isCreatedOwnerOnlyFromItsFirstByte_evenUnderAPermissiveUmask() throws {
        let old = umask(0)
        defer { umask(old) }
        let fd = try createExclusive(dir + "/k.pem", mode: 0o600)
        var st = stat()
        XCTAssertEqual(fstat(fd, &st), 0)
        close(fd)
        XCTAssertEqual(st.st_mode & 0o777, 0o600, "right after creation, before any byte is written")
        XCTAssertThrowsError(try createExclusive(dir + "/k.pem", mode: 0o600), "an existing file (or a planted link) is never reused")
    }

    func test_everyKeyFileCaInitAndCaIssueWrite_isOwnerOnlyFromItsCreation_underUmask0() throws {
        // The writers of `ca init` (MeshCA.write) and `ca issue` (WorkloadBundle.write),
        // each file's mode read back right after it was created.
        let old = umask(0)
        defer { umask(old) }
        let created = try FileCreations.record {
            let ca = try MeshCA.create()
            try ca.write(to: dir + "/ca")
            try ca.issue(try ca.identity(namespace: "default", serviceAccount: "frontend")).write(to: dir + "/w")
        }
        let names = created.map { ($0.path as NSString).lastPathComponent }
        XCTAssertEqual(names.filter { $0.hasPrefix("root-key.pem.tmp-") || $0.hasPrefix("key.pem.tmp-") }.count, 2, "\(names)")
        for (path, mode) in created {
            let isKey = (path as NSString).lastPathComponent.contains("key")
            XCTAssertEqual(String(mode, radix: 8), isKey ? "600" : "644", path)
        }
        XCTAssertEqual(mode(dir + "/ca/root-key.pem"), 0o600)
        XCTAssertEqual(mode(dir + "/w/key.pem"), 0o600)
    }

    func test_caRefusesToStart_whenTheRootKeyIsReadableByGroupOrOthers() throws {
        try MeshCA.create().write(to: dir)
        XCTAssertNoThrow(try MeshCA.load(dir: dir))
        chmod(dir + "/root-key.pem", 0o644)
        XCTAssertThrowsError(try MeshCA.load(dir: dir)) { e in
            XCTAssertTrue("\(e)".contains("root-key.pem: is readable by group or others (mode 644)"), "\(e)")
        }
    }

    // MARK: 2. key material never in an error

    func test_truncatedOrBrokenKey_errorNamesTheFileAndWhatIsWrong_andNeverQuotesTheKey() throws {
        let ca = try MeshCA.create()
        let b = try ca.issue(try ca.identity(namespace: "prod", serviceAccount: "orders"))
        try b.write(to: dir + "/w")
        let keyLines = b.keyPEM.split(separator: "\n").filter { !$0.hasPrefix("-----") }
        XCTAssertFalse(keyLines.isEmpty)
        func assertClean(_ e: Error, _ expected: String, file: StaticString = #filePath, line: UInt = #line) {
            let text = "\(e)"
            XCTAssertTrue(text.contains(expected), text, file: file, line: line)
            for l in keyLines { XCTAssertFalse(text.contains(l), "the error quotes the key: \(text)", file: file, line: line) }
            XCTAssertFalse(text.contains(String(keyLines[0].prefix(16))), text, file: file, line: line)
        }
        // The workload key without its END line (the sidecar at start and on rotation).
        let truncated = b.keyPEM.split(separator: "\n").filter { !$0.hasPrefix("-----END") }.joined(separator: "\n")
        try truncated.write(toFile: dir + "/w/key.pem", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/w")) { assertClean($0, "key.pem: a PEM block has no END line") }
        // Base64 damaged inside an otherwise complete block.
        try b.keyPEM.replacingOccurrences(of: String(keyLines[0].prefix(8)), with: "!!!!!!!!").write(toFile: dir + "/w/key.pem", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/w")) { assertClean($0, "key.pem: is not a valid PRIVATE KEY in PEM form") }
        // The CA's root key (ca issue, ca serve).
        try ca.write(to: dir + "/ca")
        let rootKey = try String(contentsOfFile: dir + "/ca/root-key.pem", encoding: .utf8)
        let rootLines = rootKey.split(separator: "\n").filter { !$0.hasPrefix("-----") }
        try rootKey.split(separator: "\n").dropLast().joined(separator: "\n").write(toFile: dir + "/ca/root-key.pem", atomically: false, encoding: .utf8)
        chmod(dir + "/ca/root-key.pem", 0o600)
        XCTAssertThrowsError(try MeshCA.load(dir: dir + "/ca")) { e in
            XCTAssertTrue("\(e)".contains("root-key.pem: a PEM block has no END line"), "\(e)")
            for l in rootLines { XCTAssertFalse("\(e)".contains(l), "\(e)") }
        }
    }

    // MARK: 3. PEM files end with a newline; two roots concatenated load

    func test_pemFilesEndWithANewline_soTwoConcatenatedRootsLoad_andEveryLoadErrorNamesItsFile() throws {
        let old = try MeshCA.create(), new = try MeshCA.create()
        try old.write(to: dir + "/old")
        try new.write(to: dir + "/new")
        for f in ["/old/root-cert.pem", "/old/root-key.pem"] {
            XCTAssertTrue(try String(contentsOfFile: dir + f, encoding: .utf8).hasSuffix("-----\n"), f)
        }
        // The documented root switch: `cat old/root-cert.pem new/root-cert.pem > root-cert.pem`.
        let both = try String(contentsOfFile: dir + "/old/root-cert.pem", encoding: .utf8) + String(contentsOfFile: dir + "/new/root-cert.pem", encoding: .utf8)
        for (name, ca) in [("a", old), ("b", new)] {
            var b = try ca.issue(try ca.identity(namespace: "prod", serviceAccount: "orders"))
            b.rootCertPEM = both
            try b.write(to: dir + "/" + name)
            XCTAssertTrue(try String(contentsOfFile: dir + "/\(name)/cert-chain.pem", encoding: .utf8).hasSuffix("\n"))
            XCTAssertEqual(try TLSMaterial.load(dir: dir + "/" + name).identity.serviceAccount, "orders")
        }
        try "-----BEGIN CERTIFICATE-----\nAAAA\n".write(toFile: dir + "/a/root-cert.pem", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/a")) { XCTAssertTrue("\($0)".contains("/a/root-cert.pem: a PEM block has no END line"), "\($0)") }
        try "hello".write(toFile: dir + "/a/root-cert.pem", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/a")) { XCTAssertTrue("\($0)".contains("/a/root-cert.pem: holds no PEM block"), "\($0)") }
    }

    // MARK: 8. trust domains

    /// The chain TLS validated for a leaf of `ca`: the leaf, `ca`'s intermediates, its root.
    func chain(_ ca: MeshCA, uris: [String]) throws -> [NIOSSLCertificate] {
        let leaf = try cert(ca, uris: uris)
        return [leaf] + (try NIOSSLCertificate.fromPEMBytes(Array((ca.intermediatesPEM + ca.rootCertPEM).utf8)))
    }
    func accepted(_ t: TrustDomains, _ c: [NIOSSLCertificate]) -> String? {
        if case .success(let id) = t.check(c[0], chain: c) { return id.principal }
        return nil
    }
    func refusal(_ t: TrustDomains, _ c: [NIOSSLCertificate]) -> String {
        if case .failure(let e) = t.check(c[0], chain: c) { return e.description }
        return "accepted"
    }

    func test_peerIdentity_isAcceptedOnlyInTheMeshTrustDomainOrAnAlias_andEveryRootOfRootCertIsTheMeshsByDefault() throws {
        let mesh = try MeshCA.create(trustDomain: "cluster.local")
        let partner = try MeshCA.create(trustDomain: "partner.local")
        let strict = TrustDomains(mesh: "cluster.local", roots: [mesh.rootCertificate, partner.rootCertificate])
        XCTAssertEqual(accepted(strict, try chain(mesh, uris: ["spiffe://cluster.local/ns/default/sa/frontend"])), "cluster.local/ns/default/sa/frontend")
        XCTAssertEqual(refusal(strict, try chain(partner, uris: ["spiffe://partner.local/ns/istio-system/sa/admin"])),
                       "trust domain of spiffe://partner.local/ns/istio-system/sa/admin is not the mesh's (cluster.local)")
        XCTAssertTrue(refusal(strict, try chain(mesh, uris: ["spiffe://evil.local/ns/istio-system/sa/admin"])).contains("is not the mesh's (cluster.local)"))
        let withAlias = TrustDomains(mesh: "cluster.local", aliases: ["partner.local"], roots: [mesh.rootCertificate])
        XCTAssertTrue(refusal(withAlias, try chain(mesh, uris: ["spiffe://evil.local/ns/a/sa/b"])).contains("nor one of its aliases (partner.local)"))
        // Without a mapping every root of root-cert.pem is a mesh root (the root switch):
        // an alias (a trust domain migration) is signed by them too.
        XCTAssertEqual(accepted(withAlias, try chain(mesh, uris: ["spiffe://partner.local/ns/a/sa/b"])), "partner.local/ns/a/sa/b")
        // A root that is not in root-cert.pem signs nothing.
        XCTAssertTrue(refusal(withAlias, try chain(partner, uris: ["spiffe://partner.local/ns/a/sa/b"])).contains("does not chain to a root trusted for its trust domain partner.local"))
        // Expected server identities move into every accepted domain.
        XCTAssertEqual(withAlias.expand(["spiffe://cluster.local/ns/p/sa/o", "dns.example"]),
                       ["spiffe://cluster.local/ns/p/sa/o", "spiffe://partner.local/ns/p/sa/o", "dns.example"])
    }

    func test_aRootNamedForATrustDomain_validatesOnlyThatDomain_whateverItsSubjectSays_throughIntermediatesToo() throws {
        let mesh = try MeshCA.create(trustDomain: "cluster.local")
        // Partner roots whose O= is the mesh's trust domain, or empty.
        for partner in [try MeshCA.create(trustDomain: "partner.local", organization: "cluster.local"),
                        try MeshCA.create(trustDomain: "partner.local", organization: "")] {
            let t = TrustDomains(mesh: "cluster.local", aliases: ["partner.local"], roots: [mesh.rootCertificate, partner.rootCertificate],
                                 named: [(partner.rootCertificate, ["partner.local"])])
            let admin = "spiffe://cluster.local/ns/istio-system/sa/admin"
            XCTAssertEqual(refusal(t, try chain(partner, uris: [admin])), "certificate of \(admin) does not chain to a root trusted for its trust domain cluster.local")
            XCTAssertEqual(refusal(t, try chain(partner.intermediate(organization: "cluster.local"), uris: [admin])),
                           "certificate of \(admin) does not chain to a root trusted for its trust domain cluster.local")
            XCTAssertEqual(accepted(t, try chain(partner, uris: ["spiffe://partner.local/ns/a/sa/b"])), "partner.local/ns/a/sa/b")
            // partner.local is now validated only by its own root.
            XCTAssertTrue(refusal(t, try chain(mesh, uris: ["spiffe://partner.local/ns/a/sa/b"])).contains("does not chain to a root trusted for its trust domain partner.local"))
            XCTAssertEqual(accepted(t, try chain(mesh.intermediate(), uris: ["spiffe://cluster.local/ns/a/sa/b"])), "cluster.local/ns/a/sa/b")
        }
    }

    func test_aResumedSessionsCertificate_mustStillBeValid() throws {
        let ca = try MeshCA.create()
        let t = TrustDomains(mesh: "cluster.local", roots: [ca.rootCertificate])
        let c = try cert(ca, uris: ["spiffe://cluster.local/ns/a/sa/b"])
        if case .failure(let e) = t.resumed(c) { XCTFail(e.description) }
        guard case .failure(let e) = t.resumed(c, now: Date().addingTimeInterval(7200)) else { return XCTFail("an expired certificate resumed") }
        XCTAssertEqual(e.description, "certificate of spiffe://cluster.local/ns/a/sa/b is outside its validity (a resumed TLS session)")
    }

    func test_aMeshConfigRootThatDoesNotParse_isAnErrorNamingTheMeshConfigField() throws {
        let ca = try MeshCA.create()
        try ca.issue(try ca.identity(namespace: "a", serviceAccount: "b")).write(to: dir + "/w")
        let bad = MeshTLSSettings(caCertificates: [.init(pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", trustDomains: ["p.local"],
                                                         source: "mesh.yaml: caCertificates[0].pem")])
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/w", mesh: bad)) { e in
            XCTAssertTrue("\(e)".hasPrefix("mesh.yaml: caCertificates[0].pem: "), "\(e)")
        }
    }

    func test_aRootSwitchToAPlugInRootWithAnotherSubject_acceptsChainsThroughIntermediatesOfBothRoots() throws {
        // Istio's self-signed root (O=cluster.local) and a plug-in root (O=Istio) with an
        // intermediate, both in root-cert.pem.
        let old = try MeshCA.create(trustDomain: "cluster.local")
        let plugIn = try MeshCA.create(trustDomain: "cluster.local", organization: "Istio").intermediate(organization: "Istio")
        let t = TrustDomains(mesh: "cluster.local", roots: [old.rootCertificate, try Certificate(pemEncoded: plugIn.rootCertPEM)])
        XCTAssertEqual(accepted(t, try chain(old, uris: ["spiffe://cluster.local/ns/a/sa/old"])), "cluster.local/ns/a/sa/old")
        XCTAssertEqual(accepted(t, try chain(plugIn, uris: ["spiffe://cluster.local/ns/a/sa/new"])), "cluster.local/ns/a/sa/new")
    }

    // MARK: 9. exactly one URI SAN

    func test_aCertificateWithMoreThanOneURISAN_hasNoIdentity() throws {
        let ca = try MeshCA.create()
        let two = try cert(ca, uris: ["spiffe://cluster.local/ns/istio-system/sa/admin", "spiffe://cluster.local/ns/default/sa/frontend"])
        XCTAssertNil(SpiffeID.of(two))
        XCTAssertTrue(SpiffeID.whyNoIdentity(two)?.contains("carries 2 URI SANs") == true, SpiffeID.whyNoIdentity(two) ?? "")
        if case .success(let id) = TrustDomains(mesh: "cluster.local", roots: [ca.rootCertificate]).check(two, chain: [two, try nio(ca.rootCertPEM)]) { XCTFail("accepted as \(id)") }
        let one = try cert(ca, uris: ["spiffe://cluster.local/ns/default/sa/frontend"])
        XCTAssertEqual(SpiffeID.of(one)?.serviceAccount, "frontend")
        // The sidecar's own files too.
        let key = P256.Signing.PrivateKey()
        let leaf = try ca.sign(publicKey: Certificate.PublicKey(key.publicKey), id: try ca.identity(namespace: "a", serviceAccount: "b"), ttl: 3600,
                               extraNames: [.uniformResourceIdentifier("spiffe://cluster.local/ns/c/sa/d")])
        try WorkloadBundle(certChainPEM: try leaf.serializeAsPEM().pemString, keyPEM: try Certificate.PrivateKey(key).serializeAsPEM().pemString,
                           rootCertPEM: ca.rootCertPEM).write(to: dir + "/two")
        XCTAssertThrowsError(try TLSMaterial.load(dir: dir + "/two")) { XCTAssertTrue("\($0)".contains("cert-chain.pem: certificate carries 2 URI SANs"), "\($0)") }
    }

    // MARK: 11, 12. refusal reasons, escaped

    struct TLSFailure: Error, CustomStringConvertible { var description: String }
    let verifyFailed = TLSFailure(description: "handshakeFailed(sslError([error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED]))")

    func test_wrongExtendedKeyUsage_isExplainedAsSuch_notAsAChainFailure() throws {
        let ca = try MeshCA.create()
        let serverOnly = try cert(ca, uris: ["spiffe://cluster.local/ns/default/sa/web"], usages: [.serverAuth])
        XCTAssertEqual(TLSMaterial.refusalReason(verifyFailed, peerCertificate: serverOnly),
                       "certificate of spiffe://cluster.local/ns/default/sa/web lacks the extended key usage clientAuth (TLS client)")
        let clientOnly = try cert(ca, uris: ["spiffe://cluster.local/ns/default/sa/web"], usages: [.clientAuth])
        XCTAssertTrue(TLSMaterial.upstreamRefusalReason(verifyFailed, peerCertificate: clientOnly).hasSuffix("lacks the extended key usage serverAuth (TLS server)"))
        // A certificate from a foreign root that also lacks the usage: the chain is the reason.
        let trust = TrustDomains(mesh: "cluster.local", roots: [ca.rootCertificate])
        let foreignServerOnly = try cert(MeshCA.create(), uris: ["spiffe://cluster.local/ns/default/sa/web"], usages: [.serverAuth])
        XCTAssertTrue(TLSMaterial.refusalReason(verifyFailed, peerCertificate: foreignServerOnly, trust: trust).hasSuffix("does not chain to the mesh root"))
        XCTAssertEqual(TLSMaterial.refusalReason(verifyFailed, peerCertificate: serverOnly, trust: trust),
                       "certificate of spiffe://cluster.local/ns/default/sa/web lacks the extended key usage clientAuth (TLS client)")
        // A DestinationRule SIMPLE/MUTUAL upstream is not checked against the mesh root.
        let web = try nio(try MeshCA.create().issue(try ca.identity(namespace: "default", serviceAccount: "web")).certChainPEM)
        XCTAssertTrue(TLSMaterial.upstreamRefusalReason(verifyFailed, peerCertificate: web, mesh: false)
            .hasSuffix("does not chain to the DestinationRule's caCertificates (or the system roots)"))
        // A foreign chain with the right usage is still a chain failure.
        XCTAssertTrue(TLSMaterial.refusalReason(verifyFailed, peerCertificate: try cert(MeshCA.create(), uris: ["spiffe://cluster.local/ns/a/sa/b"])).hasSuffix("does not chain to the mesh root"))
    }

    func test_peerTextInRefusalReasons_cannotForgeALogLine() throws {
        let ca = try MeshCA.create()
        // A subject with a newline and a fake log line, and no SPIFFE id.
        let key = P256.Signing.PrivateKey()
        let forged = "x\n2026-12-06T00:00:00 info moonlet : admin login accepted"
        let c = try Certificate(version: .v3, serialNumber: .init(), publicKey: .init(key.publicKey),
                                notValidBefore: Date().addingTimeInterval(-60), notValidAfter: Date().addingTimeInterval(3600),
                                issuer: ca.rootCertificate.subject, subject: try DistinguishedName { CommonName(forged) },
                                extensions: try Certificate.Extensions { SubjectAlternativeNames([.uniformResourceIdentifier("urn:a\nfake line"), .dnsName("b\r\nc")]) },
                                issuerPrivateKey: .init(P256.Signing.PrivateKey()))
        let nc = try nio(try c.serializeAsPEM().pemString)
        let reason = TLSMaterial.refusalReason(verifyFailed, peerCertificate: nc)
        XCTAssertFalse(reason.contains("\n"), reason)
        XCTAssertTrue(reason.contains("\\n2026-12-06"), reason)
        let why = SpiffeID.whyNoIdentity(nc) ?? ""
        XCTAssertFalse(why.contains("\n") || why.contains("\r"), why)
        XCTAssertEqual(LogText.escape("a\u{1b}[31mb\u{2028}c\td"), "a\\u{1b}[31mb\\u{2028}c\\td")
        XCTAssertEqual(LogText.escape("plain text / ok"), "plain text / ok")
        // A literal backslash-n from a peer is not an escaped newline.
        XCTAssertEqual(LogText.escape("a\\nb"), "a\\\\nb")
        XCTAssertNotEqual(LogText.escape("a\\nb"), LogText.escape("a\nb"))
    }

    func test_upstreamRefusalReasons_areWords_withoutLibraryDumps() throws {
        let ca = try MeshCA.create()
        let expired = try nio(ca.issue(try ca.identity(namespace: "p", serviceAccount: "orders"), ttl: 60, now: Date().addingTimeInterval(-3600)).certChainPEM)
        XCTAssertTrue(TLSMaterial.upstreamRefusalReason(verifyFailed, peerCertificate: expired).hasPrefix("certificate of spiffe://cluster.local/ns/p/sa/orders expired at"))
        XCTAssertEqual(TLSMaterial.upstreamRefusalReason(verifyFailed, peerCertificate: nil), "the server's certificate does not verify against the trusted roots")
        let alert = TLSFailure(description: "handshakeFailed(sslError([error:10000410:SSL routines:OPENSSL_internal:SSLV3_ALERT_HANDSHAKE_FAILURE]))")
        XCTAssertEqual(TLSMaterial.upstreamRefusalReason(alert, peerCertificate: nil), "the server refused the handshake (TLS alert: handshake failure)")
        XCTAssertEqual(TLSMaterial.upstreamRefusalReason(TLSFailure(description: "something else"), peerCertificate: nil), "the TLS handshake with the server failed")
    }

    // MARK: CA log budgets (review item 7)

    func test_caLogBudgets_arePerKindOfLine_andSuppressedLinesAreCountedAndReported() throws {
        let lines = NIOLockedValueBox<[String]>([])
        let svc = CAService(ca: try MeshCA.create(), tokens: [:]) { l in lines.withLockedValue { $0.append(l) } }
        // A flood of refused signing requests (one caller, say) is limited...
        for _ in 0..<50 { _ = svc.handle(method: .GET, uri: "/v1/sign", authorization: nil, peer: nil, from: "10.0.0.9:1", body: Data()) }
        // ...and neither hides the other kinds of line nor goes uncounted.
        for i in 0..<30 { svc.logLimited(.refusal, "ca: connection from 10.0.0.9:\(i) refused: cap") }
        svc.logLimited(.handshake, "ca: TLS handshake with 10.0.0.7:1 failed: not TLS")
        let logged = lines.withLockedValue { $0 }
        let decisions = logged.filter { $0.contains("refused /v1/sign") }.count
        XCTAssertLessThanOrEqual(decisions, 2 * CAService.linesPerSecond, "one budget a second (the loop may straddle two)")
        XCTAssertGreaterThan(decisions, 0)
        XCTAssertTrue(logged.contains("ca: TLS handshake with 10.0.0.7:1 failed: not TLS"), "\(logged)")
        svc.reportSuppressed()
        let report = lines.withLockedValue { $0 }.filter { $0.contains("lines suppressed") }
        XCTAssertTrue(report.contains { $0.hasPrefix("ca: \(50 - decisions) signing decision lines suppressed") }, "\(report)")
        XCTAssertTrue(report.contains { $0.contains("connection refusal lines suppressed") }, "\(report)")
        // Reported once: the counts start again.
        svc.reportSuppressed()
        XCTAssertEqual(lines.withLockedValue { $0 }.filter { $0.contains("lines suppressed") }.count, report.count)
    }
}
