import NIOCore
import MoonletCore
import MoonletConfig
import MoonletTLS
import Logging
#if canImport(Foundation)
import Foundation
#endif

/// The mesh config in force and the one a reload is applying. Guarded by ProxyServer.lock.
final class MeshConfigState {
    /// The last mesh config applied (nil before the first reload).
    var applied: MeshConfigFile?
    /// The mesh config of the reload under way (reloads are serialized by reloadLock);
    /// nil outside a reload.
    var loading: MeshConfigFile?
}

/// Istio's MeshConfig, watched and applied hot (`--mesh-config`, MESH_CONFIG_FILE):
/// every reload (file watcher, SIGHUP, POST /reload) re-reads the file first. A file
/// that does not parse rejects the reload: the last good mesh config and snapshot keep
/// serving and the error (file:line) is logged and shown by the admin API, as config
/// errors are. What applies hot:
/// - `rootNamespace`: ConfigLoader, RequestAuthentication, PeerAuthentication and the
///   authorization compiler use the workload identity with the current root namespace;
/// - `trustDomain`, `trustDomainAliases`, `caCertificates`, `meshMTLS`: the authorization
///   trust-domain expansion, and the workload certificate's TLS contexts and peer checks,
///   rebuilt with the new settings: connections already up keep their contexts, new
///   handshakes use the new ones;
/// - `pathNormalization.normalization`: on each ConfigSnapshot (`pathNormalization`).
/// `--trust-domain` / TRUST_DOMAIN, when given, wins over the file's trustDomain at every reload.
extension ProxyServer {
    /// The mesh config in force: the file's last good version, or (without
    /// --mesh-config) the settings the proxy started with.
    public var currentMeshConfig: MeshConfigFile {
        lock.withLock { meshState.loading ?? meshState.applied } ?? startMeshConfig
    }

    /// Mesh TLS settings of the workload certificate's contexts: the applied mesh
    /// config's, never those of a reload under way (which may still be refused). A
    /// certificate rotation during a reload uses them; the reload then installs contexts
    /// built with its own settings, and should those come from files older than the
    /// rotation, the certificate watcher sees the fingerprint differ and reloads the files
    /// with the applied settings a second later.
    var currentMeshTLS: MeshTLSSettings { (lock.withLock { meshState.applied } ?? startMeshConfig).tls }

    /// The workload identity with the current mesh config's root namespace.
    var meshIdentity: WorkloadIdentity {
        var id = settings.identity
        id.rootNamespace = currentMeshConfig.rootNamespace
        return id
    }

    /// The mesh config from the start-time settings (no file, or before the first read).
    var startMeshConfig: MeshConfigFile {
        var m = MeshConfigFile()
        m.tls = settings.meshTLS
        m.rootNamespace = settings.identity.rootNamespace
        m.notApplied = settings.meshConfigNotApplied
        return m
    }

    /// Step one of a reload: reads the mesh config file (when there is one) and, when its
    /// TLS settings differ from the certificate's, builds the new TLS contexts. On error
    /// nothing changes and the reload is refused.
    func beginMeshConfigReload(reason: String) -> Result<TLSMaterial?, ReloadError> {
        var mesh = startMeshConfig
        if let path = settings.meshConfigPath {
            do { mesh = try MeshConfigFile.load(path: path) } catch {
                let text = "\(error)"
                lock.withLock { lastReloadError = text; meshState.loading = nil }
                logger.error("mesh config rejected (\(reason)); keeping the last good mesh config and snapshot:\n\(text)")
                return .failure(ReloadError(message: text))
            }
            if let td = settings.trustDomainOverride { mesh.tls.trustDomain = td }
        }
        var material: TLSMaterial?
        let previous = lock.withLock { meshState.applied } ?? startMeshConfig
        if mesh.tls != previous.tls, let dir = settings.certsDirectory, currentTLS != nil {
            do { material = try TLSMaterial.load(dir: dir, mesh: mesh.tls) } catch {
                let text = "\(settings.meshConfigPath ?? "mesh config"): the TLS settings cannot be applied: \(error)"
                lock.withLock { lastReloadError = text; meshState.loading = nil }
                logger.error("mesh config rejected (\(reason)); keeping the last good mesh config and snapshot:\n\(text)")
                return .failure(ReloadError(message: text))
            }
        }
        lock.withLock { meshState.loading = mesh }
        return .success(material)
    }

    /// Ends a reload: on success the loading mesh config becomes the applied one (and new
    /// TLS contexts, if any, are installed); on failure it is dropped.
    func endMeshConfigReload(applied ok: Bool, material: TLSMaterial?, reason: String) {
        let (mesh, previous) = lock.withLock { () -> (MeshConfigFile?, MeshConfigFile?) in
            defer { meshState.loading = nil }
            guard ok, let m = meshState.loading else { return (nil, nil) }
            let p = meshState.applied
            meshState.applied = m
            return (m, p)
        }
        guard let mesh else { return }
        if let material { install(material, reason: "mesh config changed (\(reason))") }
        if mesh != previous {
            if previous != nil {
                logger.info("mesh config applied (\(reason))", metadata: ["trust_domain": "\(mesh.tls.trustDomain ?? "-")", "root_namespace": "\(mesh.rootNamespace)",
                                                                          "path_normalization": "\(mesh.pathNormalization.rawValue)"])
            }
            if !mesh.notApplied.isEmpty {
                logger.notice("mesh config: not applied by Moonlet: \(mesh.notApplied.joined(separator: ", "))")
            }
        }
    }
}
