/// The mesh-wide identity and TLS settings of Istio's MeshConfig that Moonlet applies:
/// `trustDomain`, `trustDomainAliases`, `caCertificates` (pem, trustDomains) and
/// `meshMTLS` (minProtocolVersion, cipherSuites).
/// MoonletConfig reads them from a mesh config file; MoonletTLS applies them to every
/// mesh mTLS context (inbound and outbound) and to peer identity checks.
public struct MeshTLSSettings: Sendable, Equatable {
    /// The mesh's trust domain; nil: the trust domain of the workload certificate.
    public var trustDomain: String?
    /// Other trust domains whose identities are accepted as the mesh's (Istio's
    /// `trustDomainAliases`, e.g. during a trust domain migration).
    public var trustDomainAliases: [String]
    /// Roots named for given trust domains (Istio's `caCertificates[].trustDomains`): such a
    /// root validates only identities of those trust domains, and a trust domain named here
    /// is validated only by its roots. Without this, every root of root-cert.pem is a root
    /// of the mesh trust domain and its aliases.
    public var caCertificates: [CACertificate]
    public var minProtocolVersion: MinimumVersion

    /// One `caCertificates` entry: PEM root(s), the trust domains they validate (empty: the
    /// mesh's and its aliases), and where it was written (file and field, for errors).
    public struct CACertificate: Sendable, Equatable {
        public var pem: String
        public var trustDomains: [String]
        public var source: String
        public init(pem: String, trustDomains: [String], source: String) { self.pem = pem; self.trustDomains = trustDomains; self.source = source }
    }
    /// OpenSSL names of the TLS 1.2 cipher suites, in preference order (TLS 1.3 suites
    /// are not configurable, as in Envoy).
    public var cipherSuites: [String]

    public enum MinimumVersion: String, Sendable, Equatable {
        case tls12 = "TLSV1_2"
        case tls13 = "TLSV1_3"
    }

    public init(trustDomain: String? = nil, trustDomainAliases: [String] = [], caCertificates: [CACertificate] = [],
                minProtocolVersion: MinimumVersion = .tls12, cipherSuites: [String] = MeshTLSSettings.defaultCipherSuites) {
        self.trustDomain = trustDomain; self.trustDomainAliases = trustDomainAliases; self.caCertificates = caCertificates
        self.minProtocolVersion = minProtocolVersion; self.cipherSuites = cipherSuites
    }

    /// Istio's default for mesh mTLS: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305
    /// (no CBC, no static RSA key exchange).
    public static let defaultCipherSuites = [
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    ]

    /// The TLS 1.2 cipher suite names Envoy (BoringSSL) accepts; any other is refused.
    public static let knownCipherSuites: Set<String> = Set(defaultCipherSuites).union([
        "ECDHE-PSK-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA", "ECDHE-PSK-AES128-CBC-SHA",
        "ECDHE-ECDSA-AES256-SHA", "ECDHE-RSA-AES256-SHA", "ECDHE-PSK-AES256-CBC-SHA", "AES128-GCM-SHA256",
        "AES256-GCM-SHA384", "AES128-SHA", "AES256-SHA", "PSK-AES128-CBC-SHA", "PSK-AES256-CBC-SHA", "DES-CBC3-SHA",
    ])
}
