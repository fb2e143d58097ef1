import MoonletCore
import MoonletConfig
#if canImport(Foundation)
import Foundation
#endif

extension ProxyServer {
    /// Called before `start()` when configuration comes from pilot: /healthz/ready answers
    /// 503 until the first pushed version is applied (as Istio's sidecar is not ready before
    /// its first configuration), so Kubernetes sends no traffic to a sidecar that knows no
    /// routes yet. The listeners serve meanwhile, with the `--config` files if any.
    public func expectPushedConfig() { awaitingFirstPush = true }

    /// Applies a configuration pushed by pilot (`moonlet run --pilot`): `files` (paths
    /// relative to pilot's config directory, with their text) were written in `directory`,
    /// where a LuaPlugin's relative `url` is found. Its YAML files replace the previously
    /// pushed ones beside the `--config` paths through `apply(sources:)`, the incremental
    /// path a file change takes: each is named `pilot/PATH` whatever the version's
    /// directory, so a push parses and decodes only the documents that changed since the
    /// last one. On failure the last good snapshot and the previous push stay in force.
    public func applyPushedConfig(files: [(path: String, text: String)], directory: String, reason: String) -> Result<Int, ReloadError> {
        var sources: [ConfigLoader.Source] = []
        for f in files where (f.path.hasSuffix(".yaml") || f.path.hasSuffix(".yml")) && !f.path.split(separator: "/").contains(where: { $0.hasPrefix("..") }) {
            let full = (directory as NSString).appendingPathComponent(f.path)
            sources.append(ConfigLoader.Source(name: "pilot/" + f.path, text: f.text, baseDir: (full as NSString).deletingLastPathComponent))
        }
        let result = apply(sources: sources, reason: reason)
        if case .success = result { awaitingFirstPush = false }
        return result
    }

    /// `applyPushedConfig(files:directory:reason:)` with the YAML files found in `directory`.
    public func applyPushedConfig(directory: String, reason: String) -> Result<Int, ReloadError> {
        var files: [(path: String, text: String)] = []
        let root = (directory as NSString).standardizingPath
        for file in ConfigLoader.yamlFiles(at: root) {
            guard let data = FileManager.default.contents(atPath: file), let text = String(data: data, encoding: .utf8) else {
                return .failure(ReloadError(message: "\(file): cannot read file as UTF-8"))
            }
            files.append((String(file.dropFirst(root.count + 1)), text))
        }
        return applyPushedConfig(files: files, directory: root, reason: reason)
    }
}
