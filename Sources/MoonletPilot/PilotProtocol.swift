import MoonletCore
import MoonletConfig
import Crypto
#if canImport(Foundation)
import Foundation
#endif

/// The wire protocol between `moonlet pilot` and the sidecars (docs/operations.md, "Pilot"):
///
/// - `GET /v1/config?node=ID&namespace=NS&service_account=SA&labels=k=v,k2=v2&version=N&hash=H&applied_version=A&applied_hash=AH&timeout=S`
///   long-polls: pilot answers at once with the resource set when its version or hash
///   differs from the sidecar's last received (`version`, `hash`), otherwise holds the
///   request until one does or `timeout` seconds pass (then `304 Not Modified`).
///   `applied_*` is what the sidecar serves now (shown on `/status`).
/// - `POST /v1/ack` with a `PilotAck` body: the sidecar applied (ACK) or refused (NACK,
///   with the error) a version.
/// - `GET /status`: the served version, the last validation error and every sidecar.
public enum PilotProtocol {
    public static let configPath = "/v1/config"
    public static let ackPath = "/v1/ack"
    public static let statusPath = "/status"
    public static let readyPath = "/healthz/ready"
    /// Default long-poll hold, in seconds (a sidecar asks for it; pilot caps it at `maxPollSeconds`).
    public static let defaultPollSeconds = 30
    public static let maxPollSeconds = 300
    /// Pilot's default port (Istio's istiod serves plaintext xDS on 15010).
    public static let defaultPort = 15010
    /// The SPIFFE identity a sidecar expects pilot to present by default (in the mesh's trust domain).
    public static func defaultIdentity(trustDomain: String) -> String { "spiffe://\(trustDomain)/ns/istio-system/sa/moonlet-pilot" }
}

/// One file of a pushed resource set: its path relative to pilot's config directory and its text.
public struct PilotFile: Codable, Sendable, Equatable {
    public var path: String
    public var content: String
    public init(path: String, content: String) { self.path = path; self.content = content }
}

/// A versioned, validated resource set as pilot serves it: the YAML files of its config
/// directory and the Lua files their LuaPlugins name, with a content hash.
public struct PilotConfigSet: Codable, Sendable, Equatable {
    /// Increases by one each time the validated content changes (restarts at 1 when pilot
    /// restarts; the hash says whether the content is the same).
    public var version: Int
    /// SHA-256 (hex) of the files, in path order.
    public var hash: String
    public var files: [PilotFile]
    public init(version: Int, files: [PilotFile]) {
        self.version = version
        self.files = files.sorted { $0.path < $1.path }
        self.hash = Self.hash(of: self.files)
    }

    /// SHA-256 over each file's path and content, lengths included (no two sets collide by concatenation).
    public static func hash(of files: [PilotFile]) -> String {
        var h = SHA256()
        for f in files.sorted(by: { $0.path < $1.path }) {
            let p = Array(f.path.utf8), c = Array(f.content.utf8)
            h.update(data: Array("\(p.count):".utf8) + p + Array("\(c.count):".utf8) + c)
        }
        return h.finalize().map { String(format: "%02x", $0) }.joined()
    }

    /// Reads and validates `dir` (the Galley role: what `moonlet validate` checks). The set
    /// holds every YAML file under `dir` and the Lua file of every LuaPlugin, which must lie
    /// under `dir` and be named relative to its YAML (`url: filter.lua`): a sidecar gets
    /// the files, not pilot's paths.
    public static func load(dir: String, version: Int) -> Result<PilotConfigSet, ConfigErrors> {
        var notes: [String] = []
        return load(dir: dir, version: version, notes: &notes)
    }

    /// `load(dir:version:)`, with the loader's notes (what is valid but not applied, such
    /// as a `Sidecar` resource) in `notes`.
    public static func load(dir: String, version: Int, notes: inout [String]) -> Result<PilotConfigSet, ConfigErrors> {
        let root = (dir as NSString).standardizingPath
        let snap: ConfigSnapshot
        switch ConfigLoader().load(paths: [root], securityScope: .anyWorkload) {
        case .success(let s): snap = s
        case .failure(let e): return .failure(e)
        }
        notes = snap.skipped
        var errors: [ConfigError] = []
        var paths = ConfigLoader.yamlFiles(at: root)
        for p in snap.plugins {
            let full = (p.path as NSString).standardizingPath
            guard full.hasPrefix(root + "/") else {
                errors.append(ConfigError(file: p.file, line: p.line, column: 1, resource: "LuaPlugin/\(p.name)", field: "spec.url",
                                          message: "\(full) is outside the pushed directory \(root): pilot pushes only files under it; put the .lua there"))
                continue
            }
            if let text = try? String(contentsOfFile: p.file, encoding: .utf8), text.contains("file://" + (root as String)) || text.contains("url: " + root) {
                errors.append(ConfigError(file: p.file, line: p.line, column: 1, resource: "LuaPlugin/\(p.name)", field: "spec.url",
                                          message: "names its .lua by an absolute path; a pushed LuaPlugin names it relative to its YAML (url: \((full as NSString).lastPathComponent))"))
                continue
            }
            paths.append(full)
        }
        var files: [PilotFile] = []
        for path in Set(paths).sorted() {
            guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
                errors.append(ConfigError(file: path, line: 0, column: 0, message: "cannot read file as UTF-8"))
                continue
            }
            files.append(PilotFile(path: String(path.dropFirst(root.count + 1)), content: text))
        }
        if !errors.isEmpty { return .failure(ConfigErrors(errors)) }
        return .success(PilotConfigSet(version: version, files: files))
    }

    /// Writes the files under `dir` (created), refusing a path that would leave it.
    public func write(to dir: String) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for f in files {
            let parts = f.path.split(separator: "/")
            guard !f.path.hasPrefix("/"), !parts.isEmpty, !parts.contains(".."), !parts.contains(".") else {
                throw PilotError("pushed file \"\(LogText.escape(f.path))\" is not a relative path inside the config directory")
            }
            let full = (dir as NSString).appendingPathComponent(f.path)
            try fm.createDirectory(atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try f.content.write(toFile: full, atomically: true, encoding: .utf8)
        }
    }
}

/// Who is asking: a sidecar's node id and workload.
public struct PilotNode: Sendable, Equatable {
    public var id: String
    public var namespace: String
    public var serviceAccount: String
    public var labels: [String: String]
    public init(id: String, namespace: String = "default", serviceAccount: String = "default", labels: [String: String] = [:]) {
        self.id = id; self.namespace = namespace; self.serviceAccount = serviceAccount; self.labels = labels
    }
    public var workload: String { "\(namespace)/\(serviceAccount)" }
}

/// A sidecar's answer to a pushed version: `error` nil is an ACK, otherwise a NACK with
/// the reason (the sidecar keeps serving its last good version).
public struct PilotAck: Codable, Sendable, Equatable {
    public var node: String
    public var version: Int
    public var hash: String
    public var error: String?
    public init(node: String, version: Int, hash: String, error: String?) {
        self.node = node; self.version = version; self.hash = hash; self.error = error
    }
}

public struct PilotError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ d: String) { description = d }
}

/// Percent-encoding of query values (RFC 3986 unreserved characters kept).
enum Query {
    static let unreserved = CharacterSet(charactersIn: "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    static func encode(_ s: String) -> String { s.addingPercentEncoding(withAllowedCharacters: unreserved) ?? "" }
    static func build(_ items: [(String, String)]) -> String { items.map { "\($0.0)=\(encode($0.1))" }.joined(separator: "&") }
    /// path and decoded query items of a request target.
    static func parse(_ uri: String) -> (path: String, items: [String: String]) {
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        var items: [String: String] = [:]
        if parts.count == 2 {
            for kv in parts[1].split(separator: "&") {
                let p = kv.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                let k = String(p[0]).removingPercentEncoding ?? String(p[0])
                let v = p.count == 2 ? (String(p[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? "") : ""
                items[k] = v
            }
        }
        return (String(parts.first ?? ""), items)
    }
}
