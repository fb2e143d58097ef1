import NIOCore
import NIOSSL
import MoonletCore
import MoonletConfig
import MoonletTLS
import Logging
#if canImport(Foundation)
import Foundation
#endif

/// The sidecar's workload certificate: loaded from --certs at start, reloaded when the
/// files change (polled every second) and, with --ca-address, renewed from the CA at half
/// its lifetime. Each load builds new TLS contexts off the event loops, then every loop
/// swaps its reference; connections already up keep theirs, nothing is dropped.
extension ProxyServer {
    var currentTLS: TLSMaterial? { lock.withLock { tlsMaterial } }

    func startCertificates() throws {
        guard let dir = settings.certsDirectory else { return }
        var m: TLSMaterial
        do { m = try TLSMaterial.load(dir: dir, mesh: currentMeshTLS) } catch {
            // With a CA, a missing, expired or otherwise unusable certificate is replaced
            // before serving (by the bootstrap token when the certificate cannot prove who
            // this is): the listeners open once the sidecar has a certificate.
            guard let ca = settings.caAddress else { throw ReloadError(message: "workload certificate rejected: \(error)") }
            if FileManager.default.fileExists(atPath: (dir as NSString).appendingPathComponent(WorkloadBundle.certChainFile)) {
                logger.warning("workload certificate unusable (\(error)); asking \(ca) for a new one")
            }
            try requestCertificate(ca: ca, dir: dir)
            do { m = try TLSMaterial.load(dir: dir, mesh: currentMeshTLS) } catch {
                throw ReloadError(message: "workload certificate rejected: \(error)")
            }
        }
        install(m, reason: "start")
        let t = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "moonlet.cert-watch"))
        t.schedule(deadline: .now() + .seconds(1), repeating: .seconds(1))
        t.setEventHandler { [weak self] in self?.checkCertificates() }
        t.resume()
        certTimer = t
    }

    func install(_ m: TLSMaterial, reason: String) {
        lock.withLock { tlsMaterial = m; lastCertError = nil }
        let fs = contexts.map { c in c.loop.submit { c.tls = m } }
        for f in fs { try? f.wait() }
        logger.info("workload certificate loaded (\(reason))", metadata: [
            "identity": "\(m.identity.uri)", "not_after": "\(m.notAfter)", "renew_at": "\(m.renewAt)"])
    }

    /// Reloads the files when they changed; renews from the CA when due.
    func checkCertificates() {
        guard let dir = settings.certsDirectory, let current = currentTLS else { return }
        if let ca = settings.caAddress, Date() >= current.renewAt {
            do { try requestCertificate(ca: ca, dir: dir) } catch {
                reportCertError("certificate renewal from \(ca) failed: \(error)", "keeping the current certificate until \(current.notAfter)")
            }
        }
        let fp = TLSMaterial.fingerprint(dir: dir)
        guard fp != current.fingerprint else { return }
        do {
            install(try TLSMaterial.load(dir: dir, mesh: currentMeshTLS), reason: "files changed")
        } catch {
            // Half-written or mismatched files: keep serving with the last good certificate.
            reportCertError("new workload certificate rejected: \(error)", "keeping the current one")
        }
    }

    /// Keeps `message` for inspection and logs it once, not every second while it lasts.
    func reportCertError(_ message: String, _ consequence: String) {
        let repeated = lock.withLock { () -> Bool in
            defer { lastCertError = message }
            return lastCertError == message
        }
        if !repeated { logger.error("\(message); \(consequence)") }
    }

    /// Builds the client TLS context of each DestinationRule SIMPLE/MUTUAL setting once,
    /// before the snapshot reaches the loops; a bad file is reported per request as UF.
    func buildUpstreamTLSContexts(_ snap: ConfigSnapshot) {
        for svc in snap.routes.services.values {
            for cl in svc.clusters.values {
                for t in cl.tlsSettings where (t.mode == .simple || t.mode == .mutual) && t.context == nil && t.contextError == nil {
                    do {
                        t.context = try TLSMaterial.clientContext(caCertificates: t.caCertificates, clientCertificate: t.clientCertificate,
                                                                  privateKey: t.privateKey, verifyHostname: t.verifyHostname)
                    } catch {
                        t.contextError = "\(error)"
                        logger.error("\(cl.name): DestinationRule tls \(t.mode.rawValue): \(error)")
                    }
                }
            }
        }
    }
}

extension ProxyServer {
    /// Gets a new certificate from `moonlet ca serve` and writes it into `dir` (the
    /// rotation watcher then loads it). root-cert.pem must already be in `dir`: it is how
    /// the sidecar knows it talks to the mesh's CA (Istio mounts it from a ConfigMap).
    /// The trust domain to ask the CA in: the mesh's (--trust-domain or mesh config
    /// trustDomain), else the current certificate's, else that of the certificate on disk
    /// even when it is expired or otherwise unusable, else cluster.local.
    func requestTrustDomain(dir: String) -> String {
        currentMeshTLS.trustDomain ?? currentTLS?.identity.trustDomain
            ?? WorkloadBundle.identity(inDirectory: dir)?.trustDomain ?? MeshIdentity.trustDomain
    }

    func requestCertificate(ca: String, dir: String) throws {
        let td = requestTrustDomain(dir: dir)
        let id = try SpiffeID(trustDomain: td, namespace: settings.identity.namespace,
                              serviceAccount: settings.identity.serviceAccount)
            .orThrow(TLSConfigError("--namespace/--service-account", "not a valid identity"))
        let token = try settings.caTokenFile.map { try String(contentsOfFile: $0, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) }
        let hasCert = FileManager.default.fileExists(atPath: (dir as NSString).appendingPathComponent(WorkloadBundle.certChainFile))
        let bundle = try CAClient.requestBundle(caAddress: ca, rootCertPath: (dir as NSString).appendingPathComponent(WorkloadBundle.rootCertFile),
                                                identity: id, token: token, currentCertDir: hasCert ? dir : nil,
                                                keyType: KeyType(rawValue: settings.csrKeyType) ?? .ecdsaP256,
                                                caIdentity: settings.caIdentity.map { [$0] }, policy: currentMeshTLS, group: group)
        // Key and chain only: root-cert.pem is the operator's (a root switch may edit it
        // meanwhile; it may be a read-only mount).
        try bundle.write(to: dir, includingRoot: false)
        logger.info("workload certificate issued by \(ca) for \(id.uri)")
    }
}
