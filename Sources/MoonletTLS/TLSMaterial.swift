import MoonletCore
import NIOCore
import NIOSSL
import X509
import SwiftASN1
import NIOConcurrencyHelpers
#if canImport(Foundation)
import Foundation
#endif

/// A workload's loaded certificate files (cert-chain.pem, key.pem, root-cert.pem) and the
/// TLS contexts built from them once, at load. Immutable: rotation loads a new one and
/// each event loop swaps its reference, so handshakes in flight keep the old contexts.
public final class TLSMaterial: @unchecked Sendable {
    /// ALPN the inbound side accepts, in preference order: HTTP/2 when the peer offers
    /// it, then HTTP/1.1, then Istio's own values (served as HTTP/1.1 or h2 by the preface):
    /// its HTTP ones before its TCP ones, so that a connection negotiates "istio" or
    /// "istio-peer-exchange" only when its client offered nothing HTTP, which an
    /// intercepted inbound connection then takes as TCP (Istio's TCP ALPN).
    public static let serverALPN = ["h2", "http/1.1", "istio-http/1.1", "istio-http/1.0", "istio-h2", "istio-peer-exchange", "istio"]
    /// ALPN an outbound mTLS connection offers: Istio's values first (so an Envoy
    /// sidecar selects its mTLS filter chain), then HTTP/1.1.
    public static let clientALPN = ["istio-peer-exchange", "istio", "http/1.1"]
    /// The same with h2 before HTTP/1.1, for connections that ask the peer sidecar for
    /// HTTP/2 (UpstreamProtocol): a peer that speaks it chooses h2.
    public static let clientALPNWithH2 = ["istio-peer-exchange", "istio", "h2", "http/1.1"]
    /// ALPN of a proxied TCP connection to a peer sidecar (Istio's TCP values): the peer's
    /// inbound side serves it as TCP without waiting for bytes (server-first protocols).
    public static let clientALPNTCP = ["istio-peer-exchange", "istio"]
    /// Negotiated ALPN values that mean "TCP" on the inbound side.
    public static func isTCPALPN(_ proto: String?) -> Bool { proto == "istio" || proto == "istio-peer-exchange" }
    /// Key exchange groups of mesh mTLS: Envoy's default set (X25519, then P-256).
    /// BoringSSL would also offer the post-quantum hybrid X25519MLKEM768, which a
    /// profile of sidecar-to-sidecar handshakes showed costing a fifth of the handshake
    /// CPU; Istio enables it only on request, and so would Moonlet (not configurable yet).
    public static let meshCurves: [NIOTLSCurve] = [.x25519, .secp256r1]

    public let directory: String
    public let identity: SpiffeID
    public let notBefore: Date
    public let notAfter: Date
    /// Inbound: presents the workload cert, requires a client cert chaining to the root.
    public let serverContext: NIOSSLContext
    /// Outbound ISTIO_MUTUAL: presents the workload cert, verifies the server against the root.
    public let clientContext: NIOSSLContext
    /// As `clientContext`, offering h2 too.
    public let clientContextH2: NIOSSLContext
    /// As `clientContext`, offering Istio's TCP ALPN only (proxied TCP).
    public let clientContextTCP: NIOSSLContext
    /// File sizes and modification times when loaded (rotation compares them).
    public let fingerprint: String
    /// The trust domains whose identities peers may present (see TrustDomains).
    public let trustDomains: TrustDomains

    init(directory: String, identity: SpiffeID, notBefore: Date, notAfter: Date, serverContext: NIOSSLContext, clientContext: NIOSSLContext,
         clientContextH2: NIOSSLContext, clientContextTCP: NIOSSLContext, fingerprint: String, trustDomains: TrustDomains) {
        self.directory = directory; self.identity = identity; self.notBefore = notBefore; self.notAfter = notAfter
        self.serverContext = serverContext; self.clientContext = clientContext; self.clientContextH2 = clientContextH2; self.clientContextTCP = clientContextTCP; self.fingerprint = fingerprint
        self.trustDomains = trustDomains
    }

    /// When a renewal is due: half the certificate's lifetime (Istio's default grace).
    public var renewAt: Date { notBefore.addingTimeInterval(notAfter.timeIntervalSince(notBefore) / 2) }

    /// A fingerprint of the three files (size and mtime), to notice a rotation on disk.
    public static func fingerprint(dir: String) -> String {
        FileStamp.fingerprint([WorkloadBundle.certChainFile, WorkloadBundle.keyFile, WorkloadBundle.rootCertFile].map { (dir as NSString).appendingPathComponent($0) })
    }

    /// Loads and checks `dir`: every file parses, the key matches the leaf, the chain
    /// verifies up to a root of root-cert.pem, the leaf is within its validity and carries
    /// exactly one URI SAN, a SPIFFE id. Each error names the file it is about and never
    /// quotes a key. `mesh`: the trust domains and the TLS policy (mesh config).
    public static func load(dir: String, now: Date = Date(), mesh: MeshTLSSettings = MeshTLSSettings()) throws -> TLSMaterial {
        let fp = fingerprint(dir: dir)
        let chainPath = (dir as NSString).appendingPathComponent(WorkloadBundle.certChainFile)
        let keyPath = (dir as NSString).appendingPathComponent(WorkloadBundle.keyFile)
        let rootPath = (dir as NSString).appendingPathComponent(WorkloadBundle.rootCertFile)
        // Each file is read once: what is checked is exactly what the contexts load,
        // even if a rotation rewrites the files meanwhile.
        let chainText = try readText(chainPath), rootText = try readText(rootPath), keyText = try readText(keyPath)
        let chainX = try parseCertificates(chainText, path: chainPath)
        let rootsX = try parseCertificates(rootText, path: rootPath)
        let keyX = try parsePrivateKey(keyText, path: keyPath)
        let leaf = chainX[0]
        guard keyX.publicKey == leaf.publicKey else { throw TLSConfigError(keyPath, "does not match the certificate in \(chainPath)") }
        try verifyChain(chainX, roots: rootsX, chainPath: chainPath, rootPath: rootPath)
        if leaf.notValidAfter <= now { throw TLSConfigError(chainPath, "certificate expired at \(leaf.notValidAfter)") }
        if leaf.notValidBefore > now.addingTimeInterval(300) { throw TLSConfigError(chainPath, "certificate is not valid before \(leaf.notValidBefore)") }
        var uris: [String] = []
        if let sans = try? leaf.extensions.subjectAlternativeNames {
            for san in sans { if case .uniformResourceIdentifier(let u) = san { uris.append(u) } }
        }
        if uris.count > 1 { throw TLSConfigError(chainPath, "certificate carries \(uris.count) URI SANs; a SPIFFE certificate has exactly one") }
        guard let u = uris.first, let identity = SpiffeID(uri: u) else {
            throw TLSConfigError(chainPath, "certificate has no SPIFFE URI SAN (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")
        }

        // Roots the mesh config names for given trust domains (caCertificates): trusted
        // too, each only for its trust domains (see TrustDomains).
        var named: [(root: Certificate, trustDomains: [String])] = []
        var roots: [NIOSSLCertificate] = []
        for entry in mesh.caCertificates {
            for c in try parseCertificates(entry.pem, path: entry.source) { named.append((c, entry.trustDomains)) }
            do { roots += try NIOSSLCertificate.fromPEMBytes(Array(entry.pem.utf8)) } catch { throw TLSConfigError(entry.source, "BoringSSL cannot load it") }
        }
        let chain: [NIOSSLCertificateSource], key: NIOSSLPrivateKey
        do { chain = try NIOSSLCertificate.fromPEMBytes(Array(chainText.utf8)).map { .certificate($0) } } catch { throw TLSConfigError(chainPath, "BoringSSL cannot load it") }
        do { roots = try NIOSSLCertificate.fromPEMBytes(Array(rootText.utf8)) + roots } catch { throw TLSConfigError(rootPath, "BoringSSL cannot load it") }
        do { key = try NIOSSLPrivateKey(bytes: Array(keyText.utf8), format: .pem) } catch { throw TLSConfigError(keyPath, pemProblem(keyText, kind: "PRIVATE KEY")) }
        // Both sides present the workload certificate and verify the peer against the
        // mesh root (no host names in mesh identities), with the mesh TLS policy.
        func meshConfiguration(_ base: TLSConfiguration, alpn: [String]) -> TLSConfiguration {
            var c = base
            c.certificateChain = chain
            c.privateKey = .privateKey(key)
            c.certificateVerification = .noHostnameVerification
            c.trustRoots = .certificates(roots)
            c.applicationProtocols = alpn
            c.curves = meshCurves
            applyPolicy(mesh, to: &c)
            return c
        }
        let sc = meshConfiguration(TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key)), alpn: serverALPN)
        let cc = meshConfiguration(TLSConfiguration.makeClientConfiguration(), alpn: clientALPN)
        let cc2 = meshConfiguration(TLSConfiguration.makeClientConfiguration(), alpn: clientALPNWithH2)
        let cc3 = meshConfiguration(TLSConfiguration.makeClientConfiguration(), alpn: clientALPNTCP)
        let domains = TrustDomains(mesh: mesh.trustDomain ?? identity.trustDomain, aliases: mesh.trustDomainAliases, roots: rootsX, named: named)
        do {
            return TLSMaterial(directory: dir, identity: identity, notBefore: leaf.notValidBefore, notAfter: leaf.notValidAfter,
                               serverContext: try NIOSSLContext(configuration: sc), clientContext: try NIOSSLContext(configuration: cc),
                               clientContextH2: try NIOSSLContext(configuration: cc2), clientContextTCP: try NIOSSLContext(configuration: cc3),
                               fingerprint: fp, trustDomains: domains)
        } catch {
            throw TLSConfigError(dir, "TLS contexts cannot be built with these files and the mesh TLS policy (\(mesh.minProtocolVersion.rawValue), \(mesh.cipherSuites.joined(separator: ":")))")
        }
    }

    /// The mesh TLS policy on a configuration: minimum version and TLS 1.2 cipher suites.
    public static func applyPolicy(_ p: MeshTLSSettings, to c: inout TLSConfiguration) {
        c.minimumTLSVersion = p.minProtocolVersion == .tls13 ? .tlsv13 : .tlsv12
        c.cipherSuites = p.cipherSuites.joined(separator: ":")
    }

    static func parseCertificates(_ text: String, path: String) throws -> [Certificate] {
        let docs: [PEMDocument]
        do { docs = try PEMDocument.parseMultiple(pemString: text) } catch { throw TLSConfigError(path, pemProblem(text, kind: "CERTIFICATE")) }
        var out: [Certificate] = []
        for (i, d) in docs.enumerated() where d.discriminator == "CERTIFICATE" {
            do { out.append(try Certificate(pemDocument: d)) } catch { throw TLSConfigError(path, "certificate #\(i + 1) is not a valid X.509 certificate") }
        }
        if out.isEmpty { throw TLSConfigError(path, pemProblem(text, kind: "CERTIFICATE")) }
        return out
    }

    /// Each certificate is signed by the next one, and the last by a root.
    static func verifyChain(_ chain: [Certificate], roots: [Certificate], chainPath: String, rootPath: String) throws {
        for (i, c) in chain.enumerated() {
            let signers = i + 1 < chain.count ? [chain[i + 1]] : roots.filter { $0.subject == c.issuer }
            if !signers.contains(where: { $0.publicKey.isValidSignature(c.signature, for: c) }) {
                throw TLSConfigError(chainPath, "certificate #\(i + 1) (issuer \(c.issuer)) is not signed by \(i + 1 < chain.count ? "the next certificate of the chain" : "a root of \(rootPath)")")
            }
        }
    }

    /// A client context for DestinationRule SIMPLE / MUTUAL with the files it names.
    public static func clientContext(caCertificates: String?, clientCertificate: String?, privateKey: String?,
                                     verifyHostname: Bool, alpn: [String] = ["http/1.1"]) throws -> NIOSSLContext {
        var cc = TLSConfiguration.makeClientConfiguration()
        cc.minimumTLSVersion = .tlsv12
        cc.applicationProtocols = alpn
        cc.certificateVerification = verifyHostname ? .fullVerification : .noHostnameVerification
        if let ca = caCertificates, !ca.isEmpty {
            do { cc.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca)) } catch { throw TLSConfigError(ca, "caCertificates: \(fileProblem(ca, kind: "CERTIFICATE"))") }
        }
        if let c = clientCertificate, !c.isEmpty {
            do { cc.certificateChain = try NIOSSLCertificate.fromPEMFile(c).map { .certificate($0) } } catch { throw TLSConfigError(c, "clientCertificate: \(fileProblem(c, kind: "CERTIFICATE"))") }
        }
        if let k = privateKey, !k.isEmpty {
            do { cc.privateKey = .privateKey(try NIOSSLPrivateKey(file: k, format: .pem)) } catch { throw TLSConfigError(k, "privateKey: \(fileProblem(k, kind: "PRIVATE KEY"))") }
        }
        do { return try NIOSSLContext(configuration: cc) } catch { throw TLSConfigError("DestinationRule tls", "the TLS context cannot be built from these files (does the key match the certificate?)") }
    }

    /// What is wrong with a PEM file given by path: missing, unreadable, or its PEM problem.
    static func fileProblem(_ path: String, kind: String) -> String {
        do { return pemProblem(try readText(path), kind: kind) } catch let e as TLSConfigError { return e.message } catch { return "cannot read" }
    }
}

/// Why a peer's certificate was refused after the chain verified.
public struct PeerIdentityError: Error, CustomStringConvertible {
    public var description: String
}

/// Which peer identities a sidecar accepts, as Istio's SPIFFE validator does: exactly one
/// URI SAN, a SPIFFE id whose trust domain is the mesh's or one of its aliases, and a
/// validated chain (leaf, intermediates, root) that ends at a root trusted for that trust
/// domain. Every root of root-cert.pem is trusted for the mesh's trust domain and its
/// aliases; mesh config `caCertificates[].trustDomains` names roots for given trust
/// domains: such a root validates only those, and those are validated only by their own
/// roots. A root's subject (its O=) is never read.
public struct TrustDomains: Sendable {
    /// The mesh's trust domain.
    public let mesh: String
    /// The mesh's, then its aliases.
    public let accepted: [String]
    /// Each trusted root (DER) -> the trust domains it validates.
    let domainsByRoot: [[UInt8]: Set<String>]

    /// `roots`: root-cert.pem; `named`: roots with the trust domains they validate (empty: the mesh's).
    public init(mesh: String, aliases: [String] = [], roots: [Certificate], named: [(root: Certificate, trustDomains: [String])] = []) {
        self.mesh = mesh
        accepted = [mesh] + aliases.filter { $0 != mesh }
        let explicit = Set(named.flatMap(\.trustDomains))
        let meshDomains = Set(accepted).subtracting(explicit)
        var by: [[UInt8]: Set<String>] = [:]
        func der(_ c: Certificate) -> [UInt8]? {
            var s = DER.Serializer()
            return (try? s.serialize(c)).map { s.serializedBytes }
        }
        let namedDER = Set(named.filter { !$0.trustDomains.isEmpty }.compactMap { der($0.root) })
        for r in roots + named.filter({ $0.trustDomains.isEmpty }).map(\.root) {
            if let d = der(r), !namedDER.contains(d) { by[d, default: []].formUnion(meshDomains) }
        }
        for n in named where !n.trustDomains.isEmpty { if let d = der(n.root) { by[d, default: []].formUnion(n.trustDomains) } }
        domainsByRoot = by
    }

    /// The peer's identity from its leaf alone (SANs and trust domain), or why it is refused
    /// (peer text escaped for logs). `check(_:chain:)` also checks the root.
    public func identify(_ cert: NIOSSLCertificate) -> Result<SpiffeID, PeerIdentityError> {
        // One pass over the SANs on the accepted path; the reason is worked out on refusal only.
        let uris = SpiffeID.uriSANs(cert)
        guard uris.count == 1, let id = SpiffeID(uri: uris[0]) else {
            return .failure(PeerIdentityError(description: LogText.escape(SpiffeID.whyNoIdentity(cert) ?? "certificate has no SPIFFE id")))
        }
        guard accepted.contains(id.trustDomain) else {
            let aliases = accepted.count > 1 ? " nor one of its aliases (\(accepted.dropFirst().joined(separator: ", ")))" : ""
            return .failure(PeerIdentityError(description: LogText.escape("trust domain of \(id.uri) is not the mesh's (\(mesh))\(aliases)")))
        }
        return .success(id)
    }

    /// The peer's identity when `chain` (the chain TLS validated: leaf first, its root
    /// last) ends at a root trusted for the leaf's trust domain.
    public func check(_ leaf: NIOSSLCertificate, chain: [NIOSSLCertificate]) -> Result<SpiffeID, PeerIdentityError> {
        let r = identify(leaf)
        guard case .success(let id) = r else { return r }
        guard let top = chain.last, let der = try? top.toDERBytes(), domainsByRoot[der]?.contains(id.trustDomain) == true else {
            return .failure(PeerIdentityError(description: LogText.escape("certificate of \(id.uri) does not chain to a root trusted for its trust domain \(id.trustDomain)")))
        }
        return .success(id)
    }

    /// The identity of a resumed TLS session's peer certificate (no chain is verified on
    /// resumption; it was when the session was made): its SPIFFE id as `identify` checks
    /// it, and the certificate must still be within its validity.
    public func resumed(_ cert: NIOSSLCertificate, now: Date = Date()) -> Result<SpiffeID, PeerIdentityError> {
        let r = identify(cert)
        guard case .success(let id) = r else { return r }
        let t = now.timeIntervalSince1970
        guard Double(cert.notValidBefore) <= t + 300, t < Double(cert.notValidAfter) else {
            return .failure(PeerIdentityError(description: LogText.escape("certificate of \(id.uri) is outside its validity (a resumed TLS session)")))
        }
        return r
    }

    /// Whether `cert` is signed directly by a trusted root.
    func signedByTrustedRoot(_ cert: Certificate) -> Bool {
        domainsByRoot.keys.contains { d in
            guard let root = try? Certificate(derEncoded: d) else { return false }
            return root.subject == cert.issuer && root.publicKey.isValidSignature(cert.signature, for: cert)
        }
    }

    /// `ids` (SPIFFE ids formed in the default trust domain from service accounts) in
    /// every accepted trust domain, the mesh's first; others unchanged.
    public func expand(_ ids: [String], defaultDomain: String = MeshIdentity.trustDomain) -> [String] {
        let from = "spiffe://\(defaultDomain)/"
        var out: [String] = []
        for id in ids {
            guard id.hasPrefix(from) else { out.append(id); continue }
            for td in accepted { out.append("spiffe://\(td)/" + id.dropFirst(from.count)) }
        }
        return out
    }
}

extension TLSMaterial {
    /// An inbound TLS handler: BoringSSL verifies the chain, dates and usage; then the peer
    /// must carry one SPIFFE id of an accepted trust domain, and the chain BoringSSL
    /// validated must end at a root trusted for that domain. `onPeer` receives the id
    /// before any application byte is read.
    public func makeServerHandler(onPeer: @escaping (SpiffeID) -> Void) throws -> NIOSSLServerHandler {
        let domains = trustDomains
        let box = ValidatedChain()
        let h = try Self.serverHandler(context: serverContext, callback: box.callback { leaf, chain in
            switch domains.check(leaf, chain: chain) {
            case .success(let id): onPeer(id); return nil
            case .failure(let e): return e
            }
        })
        box.handler = h
        return h
    }

    /// An outbound handler for ISTIO_MUTUAL: the server's chain must verify against a root
    /// trusted for its trust domain, it must carry one SPIFFE id of an accepted trust
    /// domain, and that id must be one of `expected` (any accepted mesh identity when empty).
    /// `offerH2`: ALPN offers h2 before HTTP/1.1.
    public func makeClientHandler(serverName: String?, expected: [String], offerH2: Bool = false, tcp: Bool = false) throws -> NIOSSLClientHandler {
        let domains = trustDomains
        let box = ValidatedChain()
        let h = try Self.clientHandler(context: tcp ? clientContextTCP : offerH2 ? clientContextH2 : clientContext, serverName: Self.sni(serverName), callback: box.callback { leaf, chain in
            if case .failure(let e) = domains.check(leaf, chain: chain) { return e }
            return Self.mismatch(leaf, expected: expected)
        })
        box.handler = h
        return h
    }
    /// SPIFFE ids formed in the default trust domain, moved into the mesh's (as Istio
    /// forms them from meshConfig.trustDomain) and into each of its aliases.
    public func inOwnTrustDomain(_ ids: [String], defaultDomain: String = MeshIdentity.trustDomain) -> [String] {
        trustDomains.expand(ids, defaultDomain: defaultDomain)
    }

    /// A client handler over `context` that checks the server's URI or DNS SANs against
    /// `expected` (exact match; no check when empty).
    public static func makeClientHandler(context: NIOSSLContext, serverName: String?, expected: [String]) throws -> NIOSSLClientHandler {
        let box = ValidatedChain()
        let h = try clientHandler(context: context, serverName: sni(serverName), callback: box.callback { leaf, _ in mismatch(leaf, expected: expected) })
        box.handler = h
        return h
    }

    /// SNI carries host names only; an IP address is sent without SNI.
    static func sni(_ serverName: String?) -> String? {
        serverName.flatMap { n -> String? in n.isEmpty || n.allSatisfy({ $0.isNumber || $0 == "." || $0 == ":" }) ? nil : n }
    }

    /// Why the server's SANs do not match `expected` (nil: they do, or nothing is expected).
    static func mismatch(_ cert: NIOSSLCertificate, expected: [String]) -> PeerIdentityError? {
        if expected.isEmpty { return nil }
        let sans = SpiffeID.subjectAltNames(cert)
        if sans.contains(where: { expected.contains($0) }) { return nil }
        let shown = sans.isEmpty ? "none" : sans.joined(separator: ", ")
        return PeerIdentityError(description: LogText.escape("server identity \(shown) does not match the expected \(expected.joined(separator: " or "))"))
    }

    // BoringSSL's per-certificate verify callback is what sees the chain it validated;
    // NIOSSL offers it only through these deprecated initializers.
    @available(*, deprecated)
    static func serverHandler(context: NIOSSLContext, callback: @escaping NIOSSLVerificationCallback) throws -> NIOSSLServerHandler {
        try NIOSSLServerHandler(context: context, verificationCallback: callback)
    }
    @available(*, deprecated)
    static func clientHandler(context: NIOSSLContext, serverName: String?, callback: @escaping NIOSSLVerificationCallback) throws -> NIOSSLClientHandler {
        try NIOSSLClientHandler(context: context, serverHostname: serverName, verificationCallback: callback)
    }

    /// Why the handshake of `handler` was refused after BoringSSL's own checks passed
    /// (identity, trust domain, root, expected SAN); taken once.
    public static func identityRefusal(of handler: NIOSSLHandler?) -> PeerIdentityError? {
        guard let handler else { return nil }
        return ValidatedChain.refusals.withLockedValue { r in
            r.removeValue(forKey: ObjectIdentifier(handler))?.error
        }
    }
}

/// The chain BoringSSL validated for one handshake: its verify callback runs once per
/// certificate of that chain, root first and the peer's leaf last; at the leaf, `decide`
/// sees the whole chain (leaf first). A refusal is kept for `identityRefusal(of:)`.
/// A certificate BoringSSL already refused stays refused.
final class ValidatedChain: @unchecked Sendable {
    weak var handler: NIOSSLHandler?
    var chain: [NIOSSLCertificate] = []
    static let refusals = NIOLockedValueBox<[ObjectIdentifier: (handler: WeakHandler, error: PeerIdentityError)]>([:])

    struct WeakHandler { weak var handler: NIOSSLHandler? }

    func callback(_ decide: @escaping (NIOSSLCertificate, [NIOSSLCertificate]) -> PeerIdentityError?) -> NIOSSLVerificationCallback {
        { [self] result, cert in
            guard result == .certificateVerified, let h = handler, let leaf = h.peerCertificate else { return .failed }
            chain.insert(cert, at: 0)
            guard cert == leaf else { return .certificateVerified }
            guard let e = decide(leaf, chain) else { return .certificateVerified }
            Self.refusals.withLockedValue { r in
                r = r.filter { $0.value.handler.handler != nil }
                r[ObjectIdentifier(h)] = (WeakHandler(handler: h), e)
            }
            return .failed
        }
    }
}

extension TLSMaterial {
    /// A readable reason for a refused inbound handshake, naming the peer's identity
    /// when it presented a certificate: expired, not yet valid, wrong extended key usage,
    /// not from the mesh root, no certificate, plaintext on an mTLS port. Text from the
    /// peer is escaped (no control characters reach the log).
    public static func refusalReason(_ error: Error, peerCertificate: NIOSSLCertificate?, now: Date = Date(), trust: TrustDomains? = nil) -> String {
        // A PeerIdentityError's description is escaped already (once: see LogText).
        if let e = error as? PeerIdentityError { return e.description }
        return LogText.escape(reason(error, peerCertificate: peerCertificate, now: now, peer: "client", usage: .clientAuth, roots: trust.map { .mesh($0) } ?? .mesh(nil)))
    }

    /// The same for an upstream server refused by this sidecar, or that refused it: in
    /// words (no library dump, no file path), for the log and the 503 body. `mesh`: an
    /// ISTIO_MUTUAL connection (checked against the mesh roots), else a DestinationRule
    /// SIMPLE/MUTUAL one (checked against its caCertificates or the system roots).
    public static func upstreamRefusalReason(_ error: Error, peerCertificate: NIOSSLCertificate?, now: Date = Date(), mesh: Bool = true,
                                             trust: TrustDomains? = nil) -> String {
        if let e = error as? PeerIdentityError { return e.description }
        return LogText.escape(reason(error, peerCertificate: peerCertificate, now: now, peer: "server", usage: .serverAuth, roots: mesh ? .mesh(trust) : .destinationRule))
    }

    /// Which roots a peer was checked against, for the wording of a refusal.
    enum Roots { case mesh(TrustDomains?), destinationRule }

    static func reason(_ error: Error, peerCertificate: NIOSSLCertificate?, now: Date, peer: String, usage: ExtendedKeyUsage.Usage, roots: Roots) -> String {
        if let e = error as? NIOSSLExtraError, e == .failedToValidateHostname { return "the \(peer)'s certificate does not name the host it was reached by" }
        let text = "\(error)"
        let verifyFailed = text.contains("CERTIFICATE_VERIFY_FAILED")
        if let pc = peerCertificate, let der = try? pc.toDERBytes(), let cert = try? Certificate(derEncoded: der) {
            let who = SpiffeID.of(pc)?.uri ?? "subject \(cert.subject)"
            if cert.notValidAfter < now { return "certificate of \(who) expired at \(cert.notValidAfter)" }
            if cert.notValidBefore > now { return "certificate of \(who) is not valid before \(cert.notValidBefore)" }
            // A missing usage is the reason only for a certificate from a trusted root; from
            // any other signer, that it does not chain is what matters.
            var fromTrustedRoot = true
            if case .mesh(let t?) = roots { fromTrustedRoot = t.signedByTrustedRoot(cert) }
            if fromTrustedRoot, let eku = try? cert.extensions.extendedKeyUsage, !eku.contains(usage), !eku.contains(.any) {
                let name = usage == .clientAuth ? "clientAuth (TLS client)" : "serverAuth (TLS server)"
                return "certificate of \(who) lacks the extended key usage \(name)"
            }
            if verifyFailed {
                switch roots {
                case .mesh: return "certificate of \(who) (issuer \(cert.issuer)) does not chain to the mesh root"
                case .destinationRule: return "certificate of \(who) (issuer \(cert.issuer)) does not chain to the DestinationRule's caCertificates (or the system roots)"
                }
            }
        }
        if text.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") { return "the \(peer) presented no certificate" }
        if text.contains("WRONG_VERSION_NUMBER") || text.contains("HTTP_REQUEST") || text.contains("UNKNOWN_PROTOCOL") {
            return peer == "client" ? "not TLS (plaintext on an mTLS port)" : "the server did not answer with TLS (a plaintext server?)"
        }
        if text.contains("EOF during handshake") || text.contains("uncleanShutdown") {
            return peer == "client" ? "the client closed during the handshake (does it trust this sidecar's certificate?)"
                : "the server closed the connection during the TLS handshake (is it a TLS server, and does it accept this sidecar's certificate?)"
        }
        if verifyFailed { return "the \(peer)'s certificate does not verify against the trusted roots" }
        if text.contains("NO_SHARED_CIPHER") || text.contains("UNSUPPORTED_PROTOCOL") || text.contains("PROTOCOL_VERSION") || text.contains("NO_CIPHERS_AVAILABLE") {
            return "no TLS version or cipher suite in common with the \(peer) (mesh TLS policy: TLS 1.2 or later, ECDHE with AES-GCM or ChaCha20)"
        }
        if let alert = text.range(of: "TLSV1_ALERT_") ?? text.range(of: "SSLV3_ALERT_") {
            let name = text[alert.upperBound...].prefix { $0.isLetter || $0 == "_" }
            return "the \(peer) refused the handshake (TLS alert: \(name.lowercased().replacingOccurrences(of: "_", with: " ")))"
        }
        if let r = text.range(of: "OPENSSL_internal:") {
            let name = text[r.upperBound...].prefix { $0.isLetter || $0.isNumber || $0 == "_" }
            return "the TLS handshake with the \(peer) failed (\(name.lowercased().replacingOccurrences(of: "_", with: " ")))"
        }
        return "the TLS handshake with the \(peer) failed"
    }
}
