import Yams
import MoonletCore
import MoonletHTTP
#if canImport(Foundation)
import Foundation
#endif

/// Istio's MeshConfig (`moonlet run --mesh-config FILE`): the keys Moonlet applies are
/// `trustDomain`, `trustDomainAliases`, `caCertificates` (`pem`, `trustDomains`) and
/// `meshMTLS` (`minProtocolVersion`, `cipherSuites`), `rootNamespace` and
/// `pathNormalization.normalization` (kept on each ConfigSnapshot for the request path).
/// `outboundTrafficPolicy.mode` and `protocolDetectionTimeout` are applied to intercepted
/// traffic (docs/deploy.md); `extensionProviders` envoyExtAuthzHttp to AuthorizationPolicy
/// CUSTOM; the access log keys, `enableTracing` and `defaultConfig.tracing` apply through
/// TelemetryPolicy (the builtin istio-accesslog and istio-tracing filters). Every key not applied is
/// listed in `notApplied`, for a note whenever the file is (re)loaded. The file is either
/// the MeshConfig itself or the `istio` ConfigMap holding it under `data.mesh`, as Istio
/// keeps it. The proxy re-reads it on change, SIGHUP and POST /reload (docs/configuration.md).
public struct MeshConfigFile: Sendable, Equatable {
    public var tls = MeshTLSSettings()
    /// `pathNormalization.normalization`: BASE unless set (Istio's DEFAULT is BASE).
    public var pathNormalization: PathNormalization = .base
    /// `rootNamespace`: policies in it apply mesh-wide (Istio's default istio-system).
    public var rootNamespace: String = "istio-system"
    /// `extensionProviders`, in file order (access log and tracing ones apply through Telemetry).
    public var extensionProviders: [MeshExtensionProvider] = []
    /// Access log, tracing (applied) and outbound policy (not yet) keys.
    public var telemetry = MeshTelemetrySettings()
    /// Keys present but not applied by Moonlet (dotted paths).
    public var notApplied: [String] = []

    public init() {}

    /// The mesh config path from the environment: `MESH_CONFIG_FILE` (as Istio's
    /// components name it) or `MOONLET_MESH_CONFIG`; nil when neither is set. One place for
    /// `moonlet run` and `moonlet ca serve`.
    public static func pathFromEnvironment(_ env: [String: String] = ProcessInfo.processInfo.environment) -> String? {
        for name in ["MESH_CONFIG_FILE", "MOONLET_MESH_CONFIG"] { if let v = env[name], !v.isEmpty { return v } }
        return nil
    }

    /// Reads `path`; errors carry file:line:col.
    public static func load(path: String) throws -> MeshConfigFile {
        guard let d = FileManager.default.contents(atPath: path), let text = String(data: d, encoding: .utf8) else {
            throw ConfigErrors([ConfigError(file: path, line: 0, column: 0, message: "cannot read the mesh config file")])
        }
        return try parse(text, file: path)
    }

    public static func parse(_ text: String, file: String) throws -> MeshConfigFile {
        var errors: [ConfigError] = []
        func err(_ n: Node?, _ field: String, _ msg: String) {
            errors.append(ConfigError(file: file, line: n?.mark?.line ?? 0, column: n?.mark?.column ?? 0, field: field, message: msg))
        }
        var root: Node?
        do { root = try Yams.compose(yaml: text) } catch {
            throw ConfigErrors([ConfigError(file: file, line: 0, column: 0, message: "not YAML: \(error)")])
        }
        // The istio ConfigMap: its data.mesh holds the MeshConfig as text.
        if let r = root, r["kind"]?.string == "ConfigMap" {
            guard let mesh = r["data"]?["mesh"]?.string else {
                throw ConfigErrors([ConfigError(file: file, line: r.mark?.line ?? 0, column: r.mark?.column ?? 0, field: "data.mesh", message: "missing (the ConfigMap holds no MeshConfig)")])
            }
            do { root = try Yams.compose(yaml: mesh) } catch {
                throw ConfigErrors([ConfigError(file: file, line: 0, column: 0, field: "data.mesh", message: "not YAML: \(error)")])
            }
        }
        var out = MeshConfigFile()
        var notes: [String] = []
        guard let r = root else { return out }
        guard case .mapping(let top) = r else { throw ConfigErrors([ConfigError(file: file, line: r.mark?.line ?? 0, column: r.mark?.column ?? 0, message: "the mesh config is not a mapping")]) }
        func trustDomainName(_ n: Node, _ field: String) -> String? {
            guard let s = n.string, MeshIdentity.isValidPart(s) else {
                err(n, field, "not a trust domain (a name like cluster.local)"); return nil
            }
            return s
        }
        let keys = MeshConfigKeysParser(err: err, note: { notes.append($0) })
        for (k, v) in top {
            let key = k.string ?? ""
            switch key {
            case "extensionProviders":
                out.extensionProviders = keys.extensionProviders(v)
            case "rootNamespace":
                guard let ns = v.string, TrafficDecoder.isDNS1123Label(ns) else { err(v, key, "expected a namespace name (DNS-1123 label)"); continue }
                out.rootNamespace = ns
            case "trustDomain":
                out.tls.trustDomain = trustDomainName(v, key)
            case "trustDomainAliases":
                guard case .sequence(let seq) = v else { err(v, key, "expected a list of trust domains"); continue }
                out.tls.trustDomainAliases = seq.enumerated().compactMap { trustDomainName($0.element, "\(key)[\($0.offset)]") }
            case "caCertificates":
                guard case .sequence(let seq) = v else { err(v, key, "expected a list of {pem, trustDomains}"); continue }
                for (i, e) in seq.enumerated() {
                    let field = "\(key)[\(i)]"
                    guard case .mapping(let m) = e else { err(e, field, "expected a mapping with pem and trustDomains"); continue }
                    var pem: String?, domains: [String] = []
                    for (ek, ev) in m {
                        switch ek.string ?? "" {
                        case "pem":
                            guard let t = ev.string, t.contains("-----BEGIN CERTIFICATE-----") else { err(ev, "\(field).pem", "expected PEM certificates (-----BEGIN CERTIFICATE-----)"); continue }
                            pem = t
                        case "trustDomains":
                            guard case .sequence(let tds) = ev else { err(ev, "\(field).trustDomains", "expected a list of trust domains"); continue }
                            domains = tds.enumerated().compactMap { trustDomainName($0.element, "\(field).trustDomains[\($0.offset)]") }
                        default:
                            // spiffeBundleUrl, certSigners: Istio fetches or selects roots; Moonlet does not.
                            notes.append("\(field).\(ek.string ?? "")")
                        }
                    }
                    if let pem { out.tls.caCertificates.append(.init(pem: pem, trustDomains: domains, source: "\(file): \(field).pem")) }
                }
            case "meshMTLS":
                guard case .mapping(let m) = v else { err(v, key, "expected a mapping"); continue }
                for (mk, mv) in m {
                    let field = "meshMTLS.\(mk.string ?? "")"
                    switch mk.string ?? "" {
                    case "minProtocolVersion":
                        switch mv.string ?? "" {
                        case "TLS_AUTO", "TLSV1_2": out.tls.minProtocolVersion = .tls12
                        case "TLSV1_3": out.tls.minProtocolVersion = .tls13
                        case "TLSV1_0", "TLSV1_1": err(mv, field, "\(mv.string!) is not allowed for mesh mTLS (Istio's minimum is TLSV1_2)")
                        default: err(mv, field, "unknown value \"\(mv.string ?? "")\" (TLS_AUTO, TLSV1_2 or TLSV1_3)")
                        }
                    case "cipherSuites":
                        guard case .sequence(let seq) = mv else { err(mv, field, "expected a list of cipher suite names"); continue }
                        var suites: [String] = []
                        for (i, n) in seq.enumerated() {
                            guard let name = n.string, MeshTLSSettings.knownCipherSuites.contains(name) else {
                                err(n, "\(field)[\(i)]", "unknown cipher suite \"\(n.string ?? "")\""); continue
                            }
                            suites.append(name)
                        }
                        if !suites.isEmpty { out.tls.cipherSuites = suites }
                    default:
                        notes.append(field)
                    }
                }
            case "pathNormalization":
                guard case .mapping(let m) = v else { err(v, key, "expected a mapping with normalization"); continue }
                for (mk, mv) in m {
                    let field = "pathNormalization.\(mk.string ?? "")"
                    guard mk.string == "normalization" else { notes.append(field); continue }
                    let name = mv.string ?? ""
                    if name == "DEFAULT" { out.pathNormalization = .base }
                    else if let mode = PathNormalization(rawValue: name) { out.pathNormalization = mode }
                    else { err(mv, field, "unknown mode \"\(name)\" (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES or DEFAULT)") }
                    // Checked, but the request path is not normalized yet (docs/path-normalization.md):
                    // said at start rather than taken silently.
                    notes.append("\(field) (checked; requests are not normalized yet)")
                }
            default:
                if !keys.telemetryKey(key, v, into: &out.telemetry) { notes.append(key) }
            }
        }
        out.notApplied = notes
        if !errors.isEmpty { throw ConfigErrors(errors) }
        return out
    }
}
