import MoonletCore
import NIOCore
import NIOSSL
import X509
import SwiftASN1
#if canImport(Foundation)
import Foundation
#endif

/// A workload's loaded certificate files (cert-chain.pem, key.pem, root-cert.pem) and the
/// TLS contexts built from them once, at load. Immutable: rotation loads a new one and
/// each event loop swaps its reference, so handshakes in flight keep the old contexts.
public final class TLSMaterial: @unchecked Sendable {
    /// ALPN the inbound side accepts, in preference order: HTTP/2 when the peer offers
    /// it, then HTTP/1.1, then Istio's own values (served as HTTP/1.1 or h2 by the preface).
    public static let serverALPN = ["h2", "http/1.1", "istio-peer-exchange", "istio", "istio-http/1.1", "istio-http/1.0", "istio-h2"]
    /// ALPN an outbound mTLS connection offers: Istio's values first (so an Envoy
    /// sidecar selects its mTLS filter chain), then HTTP/1.1.
    public static let clientALPN = ["istio-peer-exchange", "istio", "http/1.1"]
    /// The same with h2 before HTTP/1.1, for connections that ask the peer sidecar for
    /// HTTP/2 (UpstreamProtocol): a peer that speaks it chooses h2.
    public static let clientALPNWithH2 = ["istio-peer-exchange", "istio", "h2", "http/1.1"]
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
    /// File sizes and modification times when loaded (rotation compares them).
    public let fingerprint: String

    init(directory: String, identity: SpiffeID, notBefore: Date, notAfter: Date, serverContext: NIOSSLContext, clientContext: NIOSSLContext,
         clientContextH2: NIOSSLContext, fingerprint: String) {
        self.directory = directory; self.identity = identity; self.notBefore = notBefore; self.notAfter = notAfter
        self.serverContext = serverContext; self.clientContext = clientContext; self.clientContextH2 = clientContextH2; self.fingerprint = fingerprint
    }

    /// When a renewal is due: half the certificate's lifetime (Istio's default grace).
    public var renewAt: Date { notBefore.addingTimeInterval(notAfter.timeIntervalSince(notBefore) / 2) }

    /// A fingerprint of the three files (size and mtime), to notice a rotation on disk.
    public static func fingerprint(dir: String) -> String {
        [WorkloadBundle.certChainFile, WorkloadBundle.keyFile, WorkloadBundle.rootCertFile].map { f -> String in
            let p = (dir as NSString).appendingPathComponent(f)
            guard let a = try? FileManager.default.attributesOfItem(atPath: p) else { return "\(f):missing" }
            return "\(f):\((a[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0):\((a[.size] as? NSNumber)?.intValue ?? 0)"
        }.joined(separator: "|")
    }

    /// Loads and checks `dir`: every file parses, the key matches the leaf, the chain
    /// verifies up to a root of root-cert.pem, the leaf is within its validity and carries
    /// a SPIFFE id. Each error names the file it is about.
    public static func load(dir: String, now: Date = Date()) throws -> TLSMaterial {
        let fp = fingerprint(dir: dir)
        let chainPath = (dir as NSString).appendingPathComponent(WorkloadBundle.certChainFile)
        let keyPath = (dir as NSString).appendingPathComponent(WorkloadBundle.keyFile)
        let rootPath = (dir as NSString).appendingPathComponent(WorkloadBundle.rootCertFile)
        // Each file is read once: what is checked is exactly what the contexts load,
        // even if a rotation rewrites the files meanwhile.
        let chainText = try readText(chainPath), rootText = try readText(rootPath), keyText = try readText(keyPath)
        let chainX = try parseCertificates(chainText, path: chainPath)
        let rootsX = try parseCertificates(rootText, path: rootPath)
        let keyX: Certificate.PrivateKey
        do { keyX = try Certificate.PrivateKey(pemEncoded: keyText) } catch {
            throw TLSConfigError(keyPath, "not a PEM private key: \(error)")
        }
        let leaf = chainX[0]
        guard keyX.publicKey == leaf.publicKey else { throw TLSConfigError(keyPath, "does not match the certificate in \(chainPath)") }
        try verifyChain(chainX, roots: rootsX, chainPath: chainPath, rootPath: rootPath)
        if leaf.notValidAfter <= now { throw TLSConfigError(chainPath, "certificate expired at \(leaf.notValidAfter)") }
        if leaf.notValidBefore > now.addingTimeInterval(300) { throw TLSConfigError(chainPath, "certificate is not valid before \(leaf.notValidBefore)") }
        var id: SpiffeID?
        if let sans = try? leaf.extensions.subjectAlternativeNames {
            for san in sans { if case .uniformResourceIdentifier(let u) = san, let s = SpiffeID(uri: u) { id = s; break } }
        }
        guard let identity = id else { throw TLSConfigError(chainPath, "certificate has no SPIFFE URI SAN (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)") }

        let chain = try NIOSSLCertificate.fromPEMBytes(Array(chainText.utf8)).map { NIOSSLCertificateSource.certificate($0) }
        let roots = try NIOSSLCertificate.fromPEMBytes(Array(rootText.utf8))
        let key = try NIOSSLPrivateKey(bytes: Array(keyText.utf8), format: .pem)
        // Both sides present the workload certificate and verify the peer against the
        // mesh root (no host names in mesh identities).
        func mesh(_ base: TLSConfiguration, alpn: [String]) -> TLSConfiguration {
            var c = base
            c.certificateChain = chain
            c.privateKey = .privateKey(key)
            c.certificateVerification = .noHostnameVerification
            c.trustRoots = .certificates(roots)
            c.minimumTLSVersion = .tlsv12
            c.applicationProtocols = alpn
            c.curves = meshCurves
            return c
        }
        let sc = mesh(TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key)), alpn: serverALPN)
        let cc = mesh(TLSConfiguration.makeClientConfiguration(), alpn: clientALPN)
        let cc2 = mesh(TLSConfiguration.makeClientConfiguration(), alpn: clientALPNWithH2)
        return TLSMaterial(directory: dir, identity: identity, notBefore: leaf.notValidBefore, notAfter: leaf.notValidAfter,
                           serverContext: try NIOSSLContext(configuration: sc), clientContext: try NIOSSLContext(configuration: cc),
                           clientContextH2: try NIOSSLContext(configuration: cc2),
                           fingerprint: fp)
    }

    static func parseCertificates(_ text: String, path: String) throws -> [Certificate] {
        let docs: [PEMDocument]
        do { docs = try PEMDocument.parseMultiple(pemString: text) } catch { throw TLSConfigError(path, "not PEM: \(error)") }
        var out: [Certificate] = []
        for (i, d) in docs.enumerated() where d.discriminator == "CERTIFICATE" {
            do { out.append(try Certificate(pemDocument: d)) } catch { throw TLSConfigError(path, "certificate #\(i + 1) does not parse: \(error)") }
        }
        if out.isEmpty { throw TLSConfigError(path, "holds no certificate") }
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
            do { cc.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca)) } catch { throw TLSConfigError(ca, "caCertificates: \(error)") }
        }
        if let c = clientCertificate, !c.isEmpty {
            do { cc.certificateChain = try NIOSSLCertificate.fromPEMFile(c).map { .certificate($0) } } catch { throw TLSConfigError(c, "clientCertificate: \(error)") }
        }
        if let k = privateKey, !k.isEmpty {
            do { cc.privateKey = .privateKey(try NIOSSLPrivateKey(file: k, format: .pem)) } catch { throw TLSConfigError(k, "privateKey: \(error)") }
        }
        do { return try NIOSSLContext(configuration: cc) } catch { throw TLSConfigError("DestinationRule tls", "\(error)") }
    }
}

/// Why a peer's certificate was refused after the chain verified.
public struct PeerIdentityError: Error, CustomStringConvertible {
    public var description: String
}

extension TLSMaterial {
    /// An inbound TLS handler: BoringSSL verifies the chain and dates; then the peer must
    /// carry a SPIFFE id, which `onPeer` receives before any application byte is read.
    public func makeServerHandler(onPeer: @escaping (SpiffeID) -> Void) -> NIOSSLServerHandler {
        NIOSSLServerHandler._makeSSLServerHandler(context: serverContext) { cert, channel in
            guard let id = SpiffeID.of(cert) else {
                return channel.eventLoop.makeFailedFuture(PeerIdentityError(description: "peer certificate has no SPIFFE id (SANs: \(SpiffeID.subjectAltNames(cert)))"))
            }
            onPeer(id)
            return channel.eventLoop.makeSucceededFuture(())
        }
    }

    /// An outbound handler for ISTIO_MUTUAL: the server's chain must verify against the
    /// root and its SPIFFE id must be one of `expected` (any mesh identity when empty).
    /// `offerH2`: ALPN offers h2 before HTTP/1.1.
    public func makeClientHandler(serverName: String?, expected: [String], offerH2: Bool = false) throws -> NIOSSLClientHandler {
        try Self.makeClientHandler(context: offerH2 ? clientContextH2 : clientContext, serverName: serverName, expected: expected)
    }

    /// SPIFFE ids formed in the default trust domain, moved into this workload's own
    /// (the mesh's, as Istio forms them from meshConfig.trustDomain); unchanged when the
    /// two are the same or an id is not in the default domain.
    public func inOwnTrustDomain(_ ids: [String], defaultDomain: String = MeshIdentity.trustDomain) -> [String] {
        guard identity.trustDomain != defaultDomain else { return ids }
        let from = "spiffe://\(defaultDomain)/", to = "spiffe://\(identity.trustDomain)/"
        return ids.map { $0.hasPrefix(from) ? to + $0.dropFirst(from.count) : $0 }
    }

    /// A client handler over `context` that checks the server's URI or DNS SANs against
    /// `expected` (exact match; no check when empty).
    public static func makeClientHandler(context: NIOSSLContext, serverName: String?, expected: [String]) throws -> NIOSSLClientHandler {
        let sni = serverName.flatMap { n -> String? in
            // SNI carries host names only; an IP address is sent without SNI.
            n.isEmpty || n.allSatisfy({ $0.isNumber || $0 == "." || $0 == ":" }) ? nil : n
        }
        return try NIOSSLClientHandler._makeSSLClientHandler(context: context, serverHostname: sni) { cert, channel in
            if expected.isEmpty { return channel.eventLoop.makeSucceededFuture(()) }
            let sans = SpiffeID.subjectAltNames(cert)
            if sans.contains(where: { expected.contains($0) }) { return channel.eventLoop.makeSucceededFuture(()) }
            return channel.eventLoop.makeFailedFuture(PeerIdentityError(description: "server identity \(sans) does not match the expected \(expected)"))
        }
    }
}

extension TLSMaterial {
    /// A readable reason for a refused inbound handshake, naming the peer's identity
    /// when it presented a certificate: expired, not yet valid, not from the mesh root,
    /// no certificate, plaintext on an mTLS port, or the TLS error itself.
    public static func refusalReason(_ error: Error, peerCertificate: NIOSSLCertificate?, now: Date = Date()) -> String {
        if let e = error as? PeerIdentityError { return e.description }
        let text = "\(error)"
        if let pc = peerCertificate, let der = try? pc.toDERBytes(), let cert = try? Certificate(derEncoded: der) {
            let who = SpiffeID.of(pc)?.uri ?? "subject \(cert.subject)"
            if cert.notValidAfter < now { return "certificate of \(who) expired at \(cert.notValidAfter)" }
            if cert.notValidBefore > now { return "certificate of \(who) is not valid before \(cert.notValidBefore)" }
            if text.contains("CERTIFICATE_VERIFY_FAILED") { return "certificate of \(who) (issuer \(cert.issuer)) does not chain to the mesh root" }
        }
        if text.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") { return "the client presented no certificate" }
        if text.contains("WRONG_VERSION_NUMBER") || text.contains("HTTP_REQUEST") || text.contains("UNKNOWN_PROTOCOL") {
            return "not TLS (plaintext on an mTLS port)"
        }
        if text.contains("EOF during handshake") || text.contains("uncleanShutdown") {
            return "the client closed during the handshake (does it trust this sidecar's certificate?)"
        }
        if text.contains("CERTIFICATE_VERIFY_FAILED") { return "the client certificate does not verify against the mesh root" }
        return text
    }
}
