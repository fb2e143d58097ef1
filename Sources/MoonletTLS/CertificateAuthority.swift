import MoonletCore
import X509
import Crypto
import _CryptoExtras
import SwiftASN1
import NIOSSL
import NIOConcurrencyHelpers
#if canImport(Foundation)
import Foundation
#endif

/// An error of the CA or of certificate files, naming the file or the request it came from.
public struct TLSConfigError: Error, CustomStringConvertible {
    public var source: String
    public var message: String
    public init(_ source: String, _ message: String) { self.source = source; self.message = message }
    public var description: String { "\(source): \(message)" }
}

/// Key algorithm of an issued certificate.
public enum KeyType: String, Sendable, CaseIterable {
    /// ECDSA on P-256 (Istio's default for workload certs).
    case ecdsaP256 = "ecdsa-p256"
    /// RSA 2048.
    case rsa2048 = "rsa-2048"

    func makeKey() throws -> Certificate.PrivateKey {
        switch self {
        case .ecdsaP256: return Certificate.PrivateKey(P256.Signing.PrivateKey())
        case .rsa2048: return Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits2048))
        }
    }
}

/// A workload's certificate files under Istio's names.
public struct WorkloadBundle: Sendable {
    public static let certChainFile = "cert-chain.pem"
    public static let keyFile = "key.pem"
    public static let rootCertFile = "root-cert.pem"

    public var certChainPEM: String
    public var keyPEM: String
    public var rootCertPEM: String

    /// The SPIFFE id of the certificate in `dir`'s cert-chain.pem, valid or not (nil when
    /// there is none, or no single SPIFFE URI SAN).
    public static func identity(inDirectory dir: String) -> SpiffeID? {
        let path = (dir as NSString).appendingPathComponent(certChainFile)
        return (try? NIOSSLCertificate.fromPEMFile(path))?.first.flatMap(SpiffeID.of)
    }

    /// Writes the three files; each is written to a temporary name and renamed, so a
    /// sidecar watching the directory never reads half a file. The key is mode 0600
    /// from its first byte (see `writeAtomically`).
    /// `includingRoot`: false leaves root-cert.pem alone (a sidecar's renewal).
    public func write(to dir: String, includingRoot: Bool = true) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try writeAtomically(keyPEM, to: (dir as NSString).appendingPathComponent(Self.keyFile), mode: 0o600)
        try writeAtomically(certChainPEM, to: (dir as NSString).appendingPathComponent(Self.certChainFile), mode: 0o644)
        if includingRoot { try writeAtomically(rootCertPEM, to: (dir as NSString).appendingPathComponent(Self.rootCertFile), mode: 0o644) }
    }
}

/// Writes a PEM file: a new temporary file created with `mode` from its first byte
/// (O_CREAT|O_EXCL: a file that is already there, or a planted link, is never reused),
/// filled, fsynced, then renamed over `path`. The text ends with a newline, so PEM files
/// can be concatenated (root-cert.pem holding two roots during a root switch).
func writeAtomically(_ text: String, to path: String, mode: mode_t) throws {
    let tmp = path + ".tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let fd = try createExclusive(tmp, mode: mode)
    FileCreations.note(tmp, fd: fd)
    var bytes = Array(text.utf8)
    if bytes.last != UInt8(ascii: "\n") { bytes.append(UInt8(ascii: "\n")) }
    var off = 0
    while off < bytes.count {
        let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else {
            let e = errnoText(); close(fd); unlink(tmp)
            throw TLSConfigError(path, "cannot write: \(e)")
        }
        off += n
    }
    guard fsync(fd) == 0 else { let e = errnoText(); close(fd); unlink(tmp); throw TLSConfigError(path, "cannot write: \(e)") }
    close(fd)
    if rename(tmp, path) != 0 {
        let e = errnoText()
        unlink(tmp)
        throw TLSConfigError(path, "cannot write: \(e)")
    }
}

/// Creates `path`, which must not exist, with exactly `mode`: the mode is given to
/// open(2), so the umask can only remove bits, and fchmod then makes it exact. A key
/// file created this way is never readable by group or others, not even for an instant.
func createExclusive(_ path: String, mode: mode_t) throws -> Int32 {
    let fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, mode)
    guard fd >= 0 else { throw TLSConfigError(path, "cannot create: \(errnoText())") }
    guard fchmod(fd, mode) == 0 else {
        let e = errnoText(); close(fd); unlink(path)
        throw TLSConfigError(path, "cannot set mode \(String(mode, radix: 8)): \(e)")
    }
    return fd
}

/// The files `writeAtomically` creates (every key and certificate file Moonlet writes),
/// each with its mode read back from the descriptor right after creation, before any
/// byte is written. Recorded only while `record` runs: it lets tests check the real
/// writers (ca init, ca issue, a sidecar's renewal) for a key file that exists, even for
/// an instant, with group or other permissions.
public enum FileCreations {
    static let recording = NIOLockedValueBox<[(path: String, mode: mode_t)]?>(nil)

    public static func record(_ body: () throws -> Void) rethrows -> [(path: String, mode: mode_t)] {
        recording.withLockedValue { $0 = [] }
        defer { recording.withLockedValue { $0 = nil } }
        try body()
        return recording.withLockedValue { $0 ?? [] }
    }

    static func note(_ path: String, fd: Int32) {
        recording.withLockedValue { r in
            guard r != nil else { return }
            var st = stat()
            r!.append((path, fstat(fd, &st) == 0 ? st.st_mode & 0o777 : 0o7777))
        }
    }
}

func errnoText() -> String { String(cString: strerror(errno)) }

/// What is wrong with a PEM file, in words. It never quotes the file or the parser's
/// error (which may hold the file's bytes): a private key must not reach a log line.
func pemProblem(_ text: String, kind: String) -> String {
    let begins = text.components(separatedBy: "-----BEGIN ").count - 1
    let ends = text.components(separatedBy: "-----END ").count - 1
    if begins == 0 { return "holds no PEM block (expected \"-----BEGIN \(kind)-----\")" }
    if ends < begins { return "a PEM block has no END line (truncated file?)" }
    return "is not a valid \(kind) in PEM form"
}

/// Parses a PEM private key; an error names `path` and never quotes the key.
func parsePrivateKey(_ text: String, path: String) throws -> Certificate.PrivateKey {
    do { return try Certificate.PrivateKey(pemEncoded: text) } catch {
        throw TLSConfigError(path, pemProblem(text, kind: "PRIVATE KEY"))
    }
}

/// Citadel's role at small scale: a self-signed mesh root that issues SPIFFE workload
/// certificates (`moonlet ca init`, `moonlet ca issue`, and the CSR signer of `moonlet ca serve`).
public struct MeshCA: Sendable {
    public static let rootCertFile = "root-cert.pem"
    public static let rootKeyFile = "root-key.pem"

    public let rootCertificate: Certificate
    let rootKey: Certificate.PrivateKey
    public let trustDomain: String
    public let rootCertPEM: String
    /// Certificates between an issued leaf and the root, PEM (an intermediate CA, as
    /// Istio's plug-in CAs); empty for a root CA. `issue` appends them to cert-chain.pem.
    public var intermediatesPEM = ""

    init(rootCertificate: Certificate, rootKey: Certificate.PrivateKey, trustDomain: String, rootCertPEM: String) {
        self.rootCertificate = rootCertificate; self.rootKey = rootKey; self.trustDomain = trustDomain; self.rootCertPEM = rootCertPEM
    }

    /// A new self-signed root: Subject O=<trust domain> (as Istio's self-signed CA), 10 years.
    /// `organization`: another O= ("" for none; peers never read it, see TrustDomains).
    public static func create(trustDomain: String = MeshIdentity.trustDomain, keyType: KeyType = .ecdsaP256,
                              validity: TimeInterval = 10 * 365 * 86400, now: Date = Date(), organization: String? = nil) throws -> MeshCA {
        guard isTrustDomain(trustDomain) else { throw TLSConfigError("--trust-domain", "invalid trust domain \"\(trustDomain)\"") }
        let key = try keyType.makeKey()
        let cert = try caCertificate(key: key, subject: try subject(organization ?? trustDomain, common: "moonlet mesh root"), issuer: nil, validity: validity, now: now)
        return MeshCA(rootCertificate: cert, rootKey: key, trustDomain: trustDomain, rootCertPEM: try cert.serializeAsPEM().pemString + "\n")
    }

    /// An intermediate CA signed by this one (as an Istio plug-in CA below a root): it
    /// issues in the same trust domain, and its certificates chain through it.
    public func intermediate(organization: String = "Istio", validity: TimeInterval = 365 * 86400, now: Date = Date()) throws -> MeshCA {
        let key = try KeyType.ecdsaP256.makeKey()
        let cert = try Self.caCertificate(key: key, subject: try Self.subject(organization, common: "moonlet intermediate CA"), issuer: self, validity: validity, now: now)
        var ca = MeshCA(rootCertificate: cert, rootKey: key, trustDomain: trustDomain, rootCertPEM: rootCertPEM)
        ca.intermediatesPEM = try cert.serializeAsPEM().pemString + "\n" + intermediatesPEM
        return ca
    }

    static func subject(_ organization: String, common: String) throws -> DistinguishedName {
        organization.isEmpty ? try DistinguishedName { CommonName(common) } : try DistinguishedName { OrganizationName(organization) }
    }

    /// A CA certificate for `key`, self-signed when `issuer` is nil.
    static func caCertificate(key: Certificate.PrivateKey, subject: DistinguishedName, issuer: MeshCA?, validity: TimeInterval, now: Date) throws -> Certificate {
        try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: key.publicKey,
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: now.addingTimeInterval(validity),
            issuer: issuer?.rootCertificate.subject ?? subject, subject: subject,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
                Critical(KeyUsage(digitalSignature: true, keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: key.publicKey)
                if let issuer { AuthorityKeyIdentifier(keyIdentifier: try issuer.rootCertificate.extensions.subjectKeyIdentifier?.keyIdentifier) }
            },
            issuerPrivateKey: issuer?.rootKey ?? key)
    }

    /// A trust domain is a non-empty name without "/" or white space (it goes into SPIFFE ids).
    static func isTrustDomain(_ td: String) -> Bool { MeshIdentity.isValidPart(td) }

    /// Reads root-cert.pem and root-key.pem from `dir`; the trust domain is the root's O=
    /// (as `create` writes it), which must be a valid trust domain.
    public static func load(dir: String) throws -> MeshCA {
        let certPath = (dir as NSString).appendingPathComponent(rootCertFile)
        let keyPath = (dir as NSString).appendingPathComponent(rootKeyFile)
        let certPEM = try readText(certPath)
        let cert: Certificate
        do { cert = try Certificate(pemEncoded: certPEM) } catch { throw TLSConfigError(certPath, pemProblem(certPEM, kind: "CERTIFICATE")) }
        let key = try parsePrivateKey(try readOwnerOnly(keyPath), path: keyPath)
        guard key.publicKey == cert.publicKey else { throw TLSConfigError(keyPath, "does not match the public key of \(certPath)") }
        var td = ""
        for rdn in cert.subject { for a in rdn where a.type == .RDNAttributeType.organizationName { td = "\(a.value)" } }
        if td.isEmpty { td = MeshIdentity.trustDomain }
        guard isTrustDomain(td) else {
            throw TLSConfigError(certPath, LogText.escape("the root's subject O= \"\(td)\" is not a trust domain (a name without \"/\" or spaces); the CA names its identities after it"))
        }
        return MeshCA(rootCertificate: cert, rootKey: key, trustDomain: td, rootCertPEM: certPEM)
    }

    /// Writes root-cert.pem and root-key.pem into `dir`. An existing root key is never
    /// overwritten: losing it would orphan every certificate it issued.
    public func write(to dir: String) throws {
        let keyPath = (dir as NSString).appendingPathComponent(Self.rootKeyFile)
        if FileManager.default.fileExists(atPath: keyPath) {
            throw TLSConfigError(keyPath, "exists; refusing to overwrite a CA key (remove it first to start a new mesh root)")
        }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try writeAtomically(try rootKey.serializeAsPEM().pemString, to: keyPath, mode: 0o600)
        try writeAtomically(rootCertPEM, to: (dir as NSString).appendingPathComponent(Self.rootCertFile), mode: 0o644)
    }

    /// The identity in this CA's trust domain.
    public func identity(namespace: String, serviceAccount: String) throws -> SpiffeID {
        guard let id = SpiffeID(trustDomain: trustDomain, namespace: namespace, serviceAccount: serviceAccount) else {
            throw TLSConfigError("identity", "invalid namespace \"\(namespace)\" or service account \"\(serviceAccount)\"")
        }
        return id
    }

    /// Issues a workload key and certificate for `id` (a new key of `keyType`).
    /// `extraURIs`: more URI SANs after the id, `usages`: other extended key usages (only
    /// to test that peers refuse them).
    public func issue(_ id: SpiffeID, keyType: KeyType = .ecdsaP256, ttl: TimeInterval = 86400, now: Date = Date(),
                      extraURIs: [String] = [], usages: [ExtendedKeyUsage.Usage] = [.serverAuth, .clientAuth]) throws -> WorkloadBundle {
        let key = try keyType.makeKey()
        let cert = try sign(publicKey: key.publicKey, id: id, ttl: ttl, now: now, extraNames: extraURIs.map { .uniformResourceIdentifier($0) }, usages: usages)
        return WorkloadBundle(certChainPEM: try cert.serializeAsPEM().pemString + "\n" + intermediatesPEM, keyPEM: try key.serializeAsPEM().pemString, rootCertPEM: rootCertPEM)
    }

    /// Signs a certificate for `publicKey` carrying `id` as its only (critical) URI SAN,
    /// usable as TLS client and server, valid for `ttl` (back-dated a little for clock skew).
    /// `extraNames`: more SANs after the SPIFFE id (DNS names of a server); `usages`: the
    /// extended key usages (a workload is both TLS client and server).
    public func sign(publicKey: Certificate.PublicKey, id: SpiffeID, ttl: TimeInterval, now: Date = Date(),
                     extraNames: [GeneralName] = [], usages: [ExtendedKeyUsage.Usage] = [.serverAuth, .clientAuth]) throws -> Certificate {
        guard ttl > 0 else { throw TLSConfigError("--ttl", "must be positive") }
        let notAfter = min(now.addingTimeInterval(ttl), rootCertificate.notValidAfter)
        // Back-dated for clock skew, by at most a tenth of the lifetime so that renewal at
        // half the lifetime stays ahead of issuance for short-lived certificates.
        let skew = min(60, ttl / 10)
        return try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: publicKey,
            notValidBefore: now.addingTimeInterval(-skew), notValidAfter: notAfter,
            issuer: rootCertificate.subject, subject: DistinguishedName(),
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true, keyEncipherment: true))
                try ExtendedKeyUsage(usages)
                AuthorityKeyIdentifier(keyIdentifier: try rootCertificate.extensions.subjectKeyIdentifier?.keyIdentifier)
                Critical(SubjectAlternativeNames([.uniformResourceIdentifier(id.uri)] + extraNames))
            },
            issuerPrivateKey: rootKey)
    }

    /// Istio's CSR flow: checks the CSR's signature and that the identity it asks for
    /// (its URI SAN, if any) is `allowed`, then signs it. Returns the certificate PEM.
    public func signCSR(pem: String, allowed: SpiffeID, ttl: TimeInterval, now: Date = Date()) throws -> String {
        let csr: CertificateSigningRequest
        do { csr = try CertificateSigningRequest(pemEncoded: pem) } catch { throw TLSConfigError("CSR", "not a PEM certificate signing request: \(error)") }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else { throw TLSConfigError("CSR", "signature does not verify") }
        if let ext = try? csr.attributes.extensionRequest, let sans = try? ext.extensions.subjectAlternativeNames {
            for san in sans {
                guard case .uniformResourceIdentifier(let u) = san, SpiffeID(uri: u) == allowed else {
                    throw TLSConfigError("CSR", "asks for \(san), but the caller may only get \(allowed.uri)")
                }
            }
        }
        return try sign(publicKey: csr.publicKey, id: allowed, ttl: ttl, now: now).serializeAsPEM().pemString
    }

    /// A new key and a CSR for `id` (what a sidecar sends to `moonlet ca serve`).
    public static func makeCSR(for id: SpiffeID, keyType: KeyType = .ecdsaP256) throws -> (csrPEM: String, keyPEM: String) {
        let key = try keyType.makeKey()
        let ext = try Certificate.Extensions { SubjectAlternativeNames([.uniformResourceIdentifier(id.uri)]) }
        let csr = try CertificateSigningRequest(
            version: .v1, subject: DistinguishedName(), privateKey: key,
            attributes: try CertificateSigningRequest.Attributes([.init(ExtensionRequest(extensions: ext))]),
            signatureAlgorithm: keyType == .ecdsaP256 ? .ecdsaWithSHA256 : .sha256WithRSAEncryption)
        return (try csr.serializeAsPEM().pemString, try key.serializeAsPEM().pemString)
    }
}

/// Reads a private key file that must be readable by its owner only: the mode is checked
/// on the descriptor that is read (open, fstat, read), so the file cannot be swapped
/// between the check and the read.
func readOwnerOnly(_ path: String) throws -> String {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw TLSConfigError(path, errno == ENOENT ? "no such file" : "cannot read: \(errnoText())") }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw TLSConfigError(path, "cannot read: \(errnoText())") }
    // The mesh root key signs every identity: refuse to use it while others can read it.
    if st.st_mode & 0o077 != 0 {
        throw TLSConfigError(path, "is readable by group or others (mode \(String(st.st_mode & 0o777, radix: 8))); the mesh root key must be mode 0600 (chmod 600 it, and consider the key exposed)")
    }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 16384)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n >= 0 else { throw TLSConfigError(path, "cannot read: \(errnoText())") }
        if n == 0 { break }
        bytes += buf[0..<n]
        if bytes.count > 1 << 20 { throw TLSConfigError(path, "is larger than 1 MiB; not a private key") }
    }
    guard let s = String(validatingUTF8: bytes.map { CChar(bitPattern: $0) } + [0]) else { throw TLSConfigError(path, "is not text (a PEM private key)") }
    return s
}

func readText(_ path: String) throws -> String {
    guard FileManager.default.fileExists(atPath: path) else { throw TLSConfigError(path, "no such file") }
    guard let d = FileManager.default.contents(atPath: path), let s = String(data: d, encoding: .utf8) else { throw TLSConfigError(path, "cannot read") }
    return s
}

/// Parses a duration like Istio's ("24h", "90m", "3600s", "1h30m"); nil when malformed.
public func parseTTL(_ s: String) -> TimeInterval? {
    var total: TimeInterval = 0
    var num = ""
    var any = false
    for c in s {
        if c.isNumber || c == "." { num.append(c); continue }
        guard let v = Double(num) else { return nil }
        switch c {
        case "h": total += v * 3600
        case "m": total += v * 60
        case "s": total += v
        case "d": total += v * 86400
        default: return nil
        }
        num = ""; any = true
    }
    return any && num.isEmpty && total > 0 ? total : nil
}
