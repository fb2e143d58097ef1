import MoonletCore

/// PeerAuthentication mtls modes.
public enum MTLSMode: String, Sendable {
    /// Inherit from the parent policy (workload -> namespace -> mesh).
    case unset = "UNSET"
    /// Plaintext only.
    case disable = "DISABLE"
    /// mTLS and plaintext on the same port (Istio's default).
    case permissive = "PERMISSIVE"
    /// mTLS only: plaintext and clients without a mesh certificate are refused.
    case strict = "STRICT"
}

/// The mTLS mode in force for a workload port, and the policy that set it.
public struct EffectiveMTLS: Sendable, Equatable {
    public var mode: MTLSMode
    /// "PeerAuthentication ns/name" (with ":port" for a portLevelMtls entry), or "default".
    public var source: String
    public init(mode: MTLSMode, source: String) { self.mode = mode; self.source = source }
}

/// Istio's PeerAuthentication resolution: the most specific policy wins (workload
/// selector, then namespace, then the root namespace for the mesh); UNSET inherits from
/// the next level; port-level settings of the workload policy override its mode. Among
/// policies of one level the first loaded wins (Istio takes the oldest). With no policy
/// the mode is PERMISSIVE.
public enum PeerAuthenticationResolver {
    public static func resolve(_ resources: [IstioResource], workload: WorkloadIdentity, port: Int) -> EffectiveMTLS {
        let pas = resources.filter { $0.kind == "PeerAuthentication" }
        func ns(_ r: IstioResource) -> String { r.namespace.isEmpty ? "default" : r.namespace }
        func selector(_ r: IstioResource) -> [String: String]? {
            guard let m = r.spec["selector"]?["matchLabels"], case .map(let entries) = m, !entries.isEmpty else { return nil }
            var out: [String: String] = [:]
            for (k, v) in entries { out[k] = v.stringValue ?? "" }
            return out
        }
        func mode(_ v: ConfigValue?) -> MTLSMode { v?["mode"]?.stringValue.flatMap(MTLSMode.init(rawValue:)) ?? .unset }
        let mesh = pas.first { ns($0) == workload.rootNamespace && selector($0) == nil }
        let namespace = pas.first { ns($0) == workload.namespace && selector($0) == nil && workload.namespace != workload.rootNamespace }
        let wl = pas.first { r in
            guard ns(r) == workload.namespace, let sel = selector(r) else { return false }
            return sel.allSatisfy { workload.labels[$0.key] == $0.value }
        }
        var out = EffectiveMTLS(mode: .permissive, source: "default")
        for r in [mesh, namespace, wl].compactMap({ $0 }) {
            let m = mode(r.spec["mtls"])
            if m != .unset { out = EffectiveMTLS(mode: m, source: "PeerAuthentication \(ns(r))/\(r.name)") }
        }
        if let wl, let plm = wl.spec["portLevelMtls"]?[String(port)] {
            let m = mode(plm)
            if m != .unset { out = EffectiveMTLS(mode: m, source: "PeerAuthentication \(ns(wl))/\(wl.name):\(port)") }
        }
        return out
    }
}

/// DestinationRule `trafficPolicy.tls`, decoded.
public struct ClientTLSSettings: Sendable, Equatable {
    public var mode: UpstreamTLS.Mode
    public var clientCertificate: String?
    public var privateKey: String?
    public var caCertificates: String?
    public var subjectAltNames: [String] = []
    public var sni: String?
    public var insecureSkipVerify = false

    static func from(_ v: ConfigValue) -> ClientTLSSettings? {
        guard let m = v["mode"]?.stringValue.flatMap(UpstreamTLS.Mode.init(rawValue:)) else { return nil }
        var t = ClientTLSSettings(mode: m)
        t.clientCertificate = v["clientCertificate"]?.stringValue
        t.privateKey = v["privateKey"]?.stringValue
        t.caCertificates = v["caCertificates"]?.stringValue
        if case .array(let l)? = v["subjectAltNames"] { t.subjectAltNames = l.compactMap(\.stringValue) }
        t.sni = v["sni"]?.stringValue
        if case .bool(let b)? = v["insecureSkipVerify"] { t.insecureSkipVerify = b }
        return t
    }
}

