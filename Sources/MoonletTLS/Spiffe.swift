import NIOSSL
import MoonletCore

/// A SPIFFE workload identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
/// as Istio puts it in a workload certificate's URI SAN.
public struct SpiffeID: Hashable, Sendable, CustomStringConvertible {
    public var trustDomain: String
    public var namespace: String
    public var serviceAccount: String

    /// Builds an identity; nil when a part is empty or holds a "/" (it would not round-trip).
    public init?(trustDomain: String, namespace: String, serviceAccount: String) {
        for p in [trustDomain, namespace, serviceAccount] where !MeshIdentity.isValidPart(p) { return nil }
        self.trustDomain = trustDomain; self.namespace = namespace; self.serviceAccount = serviceAccount
    }

    /// Parses `spiffe://td/ns/NS/sa/SA`; nil for any other shape.
    public init?(uri: String) {
        guard uri.hasPrefix("spiffe://") else { return nil }
        let parts = uri.dropFirst(9).split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 5, parts[1] == "ns", parts[3] == "sa" else { return nil }
        self.init(trustDomain: String(parts[0]), namespace: String(parts[2]), serviceAccount: String(parts[4]))
    }

    /// Parses Istio's principal form `td/ns/NS/sa/SA`.
    public init?(principal: String) { self.init(uri: "spiffe://" + principal) }

    public var uri: String { "spiffe://\(trustDomain)/ns/\(namespace)/sa/\(serviceAccount)" }
    /// Istio's principal form, as AuthorizationPolicy and `source.principal` use it.
    public var principal: String { "\(trustDomain)/ns/\(namespace)/sa/\(serviceAccount)" }
    public var description: String { uri }

    /// The SPIFFE id of a certificate: its only URI SAN. nil when it has none, when that
    /// one is not a SPIFFE id, or when it has more than one (the SPIFFE X.509-SVID spec
    /// allows exactly one: a second could ride in front of the real identity).
    public static func of(_ cert: NIOSSLCertificate) -> SpiffeID? {
        let uris = uriSANs(cert)
        return uris.count == 1 ? SpiffeID(uri: uris[0]) : nil
    }

    /// A certificate's URI SANs, in order.
    public static func uriSANs(_ cert: NIOSSLCertificate) -> [String] {
        cert._subjectAlternativeNames().compactMap { san in
            san.nameType == .uri ? san.contents.withUnsafeBufferPointer { String(decoding: $0, as: UTF8.self) } : nil
        }
    }

    /// Why a certificate has no SPIFFE id (nil when it has one), in words. Raw peer text:
    /// escape it (LogText.escape) where it is logged.
    public static func whyNoIdentity(_ cert: NIOSSLCertificate) -> String? {
        let uris = uriSANs(cert)
        if uris.count > 1 { return "certificate carries \(uris.count) URI SANs \(uris); a SPIFFE certificate has exactly one" }
        if uris.count == 1, SpiffeID(uri: uris[0]) != nil { return nil }
        return "certificate has no SPIFFE id (SANs: \(subjectAltNames(cert)))"
    }

    /// Every URI and DNS SAN of a certificate, for logs and for SAN matching.
    public static func subjectAltNames(_ cert: NIOSSLCertificate) -> [String] {
        cert._subjectAlternativeNames().compactMap { san in
            guard san.nameType == .uri || san.nameType == .dnsName else { return nil }
            return san.contents.withUnsafeBufferPointer { String(decoding: $0, as: UTF8.self) }
        }
    }
}
