import MoonletCore
import MoonletHTTP
import Yams
#if canImport(Foundation)
import Foundation
#endif

/// The identity of the workload this sidecar serves; selects which policies apply.
public struct WorkloadIdentity: Sendable, Equatable {
    public var namespace: String
    public var serviceAccount: String
    public var labels: [String: String]
    /// Istio's root namespace: policies there apply mesh-wide.
    public var rootNamespace: String
    /// Istio's WORKLOAD_NAME (`--workload-name`); "" means the default: the `app` label,
    /// else the service account (see `effectiveWorkloadName`).
    public var workloadName: String = ""
    /// Istio's CLUSTER_ID (`--cluster-id`), "Kubernetes" by default as in Istio.
    public var clusterID: String = "Kubernetes"
    /// The pod (or VM) name, for the peer metadata's NAME and node id.
    public var podName: String = ""
    /// The pod's IP (env INSTANCE_IP), for the peer metadata's node id; "" means the bind address.
    public var instanceIP: String = ""
    public init(namespace: String = "default", serviceAccount: String = "default", labels: [String: String] = [:], rootNamespace: String = "istio-system") {
        self.namespace = namespace; self.serviceAccount = serviceAccount; self.labels = labels; self.rootNamespace = rootNamespace
    }

    /// The workload name metrics and peer metadata carry: `workloadName`, else the `app`
    /// label, else the service account.
    public var effectiveWorkloadName: String { workloadName.isEmpty ? (labels["app"] ?? serviceAccount) : workloadName }

    /// Parses "k=v,k2=v2".
    public static func parseLabels(_ s: String) throws -> [String: String] {
        var out: [String: String] = [:]
        for part in s.split(separator: ",") where !part.isEmpty {
            let kv = part.split(separator: "=", maxSplits: 1)
            guard kv.count == 2, !kv[0].isEmpty else { throw ConfigError(file: "--labels", line: 0, column: 0, message: "expected k=v, got \"\(part)\"") }
            out[String(kv[0]).trimmingCharacters(in: .whitespaces)] = String(kv[1]).trimmingCharacters(in: .whitespaces)
        }
        return out
    }
}

/// What a filter does when it fails (Lua error, budget exceeded): Istio's WasmPlugin
/// failStrategy, plus FAIL_RELOAD.
public enum FailStrategy: String, Sendable {
    /// Answer 500 (the default, as authorization needs).
    case failClose = "FAIL_CLOSE"
    /// Skip the filter and go on.
    case failOpen = "FAIL_OPEN"
    /// Reload the VM state of the plugin and retry the phase once, then fail closed.
    case failReload = "FAIL_RELOAD"
}

/// A `LuaPlugin` resource (moonlet.io/v1alpha1), shaped like Istio's WasmPlugin.
public struct LuaPluginSpec: Sendable {
    public var name: String
    public var namespace: String
    /// Absolute path of the Lua file.
    public var path: String
    public var phase: String
    public var priority: Int
    public var pluginConfig: ConfigValue
    public var failStrategy: FailStrategy
    /// selector.matchLabels; empty = every workload of the namespace.
    public var matchLabels: [String: String]
    /// Per-call limits (defaults in LuaLimits).
    public var maxInstructions: Int?
    public var maxMemoryBytes: Int?
    public var timeoutMs: Int?
    /// Where it was declared.
    public var file: String
    public var line: Int
    /// `spec.variants`: the arms of an A/B experiment (empty: no experiment; `path`
    /// and `pluginConfig` are then the first arm's). Weights sum to 100.
    public var variants: [LuaPluginVariant] = []
    /// `spec.stickyBy`: what a stream's arm is chosen by (random by default).
    public var stickyBy: StickyKey = .random
    /// `spec.shadow`: a candidate run on a copy of each stream, never enforced.
    public var shadow: LuaPluginShadow?
    /// `spec.guardrail`: when a candidate arm is rolled back to weight 0.
    public var guardrail: LuaPluginGuardrail?

    public init(name: String, namespace: String, path: String, phase: String, priority: Int, pluginConfig: ConfigValue,
                failStrategy: FailStrategy, matchLabels: [String: String], maxInstructions: Int?, maxMemoryBytes: Int?,
                timeoutMs: Int?, file: String, line: Int) {
        self.name = name; self.namespace = namespace; self.path = path; self.phase = phase; self.priority = priority
        self.pluginConfig = pluginConfig; self.failStrategy = failStrategy; self.matchLabels = matchLabels
        self.maxInstructions = maxInstructions; self.maxMemoryBytes = maxMemoryBytes; self.timeoutMs = timeoutMs
        self.file = file; self.line = line
    }

    public func applies(to w: WorkloadIdentity) -> Bool { w.isSelected(namespace: namespace, matchLabels: matchLabels) }

    /// The configuration a builtin would have had (a fork that replaces it): taken as
    /// the pluginConfig of the plugin, of each variant and of the shadow that gives
    /// none (absent or `{}`).
    public mutating func inheritPluginConfig(_ conf: ConfigValue) {
        func unset(_ v: ConfigValue) -> Bool { v == .null || v == .map([]) }
        if unset(pluginConfig) { pluginConfig = conf }
        for i in variants.indices where unset(variants[i].pluginConfig) { variants[i].pluginConfig = conf }
        if let s = shadow, unset(s.pluginConfig) { shadow?.pluginConfig = conf }
    }
}

/// One arm of a LuaPlugin experiment (`spec.variants[]`).
public struct LuaPluginVariant: Sendable, Equatable {
    public var name: String
    /// Absolute path of the arm's Lua file.
    public var path: String
    /// Percent of streams (0...100; the arms sum to 100).
    public var weight: Int
    /// The arm's pluginConfig (the plugin's `spec.pluginConfig` when the arm has none).
    public var pluginConfig: ConfigValue
    public init(name: String, path: String, weight: Int, pluginConfig: ConfigValue) {
        self.name = name; self.path = path; self.weight = weight; self.pluginConfig = pluginConfig
    }
}

/// What picks a stream's experiment arm (`spec.stickyBy`). The key is hashed with the
/// plugin's name, so one user gets the same arm on every sidecar.
public enum StickyKey: Sendable, Equatable, CustomStringConvertible {
    /// A request header (lowercased name).
    case header(String)
    /// A cookie of the Cookie header.
    case cookie(String)
    /// The mTLS peer's principal.
    case principal
    /// The downstream address without its port.
    case sourceIP
    /// No key: each stream draws its arm.
    case random

    /// Parses `header:NAME | cookie:NAME | principal | source-ip | random`.
    public init?(_ s: String) {
        if s.hasPrefix("header:"), s.count > 7 { self = .header(String(s.dropFirst(7)).lowercased()) }
        else if s.hasPrefix("cookie:"), s.count > 7 { self = .cookie(String(s.dropFirst(7))) }
        else if s == "principal" { self = .principal }
        else if s == "source-ip" { self = .sourceIP }
        else if s == "random" { self = .random }
        else { return nil }
    }

    public var description: String {
        switch self {
        case .header(let n): return "header:" + n
        case .cookie(let n): return "cookie:" + n
        case .principal: return "principal"
        case .sourceIP: return "source-ip"
        case .random: return "random"
        }
    }
}

/// `spec.shadow`: a candidate filter run after the enforced one on a copy of the stream.
public struct LuaPluginShadow: Sendable, Equatable {
    /// Absolute path of the candidate's Lua file.
    public var path: String
    public var pluginConfig: ConfigValue
    public init(path: String, pluginConfig: ConfigValue) { self.path = path; self.pluginConfig = pluginConfig }
}

/// `spec.guardrail`: rolls a candidate arm back to weight 0 once it has `minRequests`
/// and its error rate (5xx share) exceeds the control's by more than `maxIncrease` with
/// a "worse" verdict at 95%.
public struct LuaPluginGuardrail: Sendable, Equatable {
    public var metric = "error_rate"
    public var maxIncrease = 0.01
    public var minRequests = 500
    public var action = "rollback"
    public init() {}
}

extension WorkloadIdentity {
    /// Istio's scope of a policy in `namespace` with `selector.matchLabels`: the root
    /// namespace applies mesh-wide, otherwise the policy's own namespace ("" counts as the
    /// workload's); every selector label must be the workload's.
    public func isSelected(namespace ns: String, matchLabels: [String: String]) -> Bool {
        if !ns.isEmpty && ns != namespace && ns != rootNamespace { return false }
        return matchLabels.allSatisfy { labels[$0.key] == $0.value }
    }
}

/// An Istio resource as read. Kinds decoded into typed specs at load (VirtualService,
/// DestinationRule, ServiceEntry, WorkloadEntry, Sidecar) keep only their document's
/// text (shared with the loader's cache), and `spec` parses it again when asked
/// (/config_dump): a mesh of thousands of services does not hold a tree of values per
/// resource. The other kinds keep `spec` as a value (policies read it at every reload).
public struct IstioResource: Sendable {
    public var apiVersion: String
    public var kind: String
    public var name: String
    public var namespace: String
    var storedSpec: ConfigValue?
    /// The YAML document the resource came from, when `spec` is not kept.
    var source: String?
    /// Which document of `source` it is.
    var sourceIndex = 0
    public var file: String
    public var line: Int
    /// metadata.annotations (e.g. `istio.io/dry-run`).
    public var annotations: [String: String] = [:]

    init(apiVersion: String, kind: String, name: String, namespace: String, spec: ConfigValue?, source: String? = nil, sourceIndex: Int = 0, file: String, line: Int,
         annotations: [String: String] = [:]) {
        self.apiVersion = apiVersion; self.kind = kind; self.name = name; self.namespace = namespace
        self.storedSpec = spec; self.source = source; self.sourceIndex = sourceIndex; self.file = file; self.line = line; self.annotations = annotations
    }

    /// The resource's `spec` as a value (parsed from its document when not kept).
    public var spec: ConfigValue {
        get {
            if let storedSpec { return storedSpec }
            guard let source, let docs = try? YAMLReader.documents(source), sourceIndex < docs.count else { return .null }
            let doc = docs[sourceIndex]
            return PositionedNode(node: doc, file: file).child("spec")?.value ?? .null
        }
        set { storedSpec = newValue }
    }
}

/// An immutable, validated configuration. Swapped whole; a stream keeps the snapshot
/// it started with.
public final class ConfigSnapshot: @unchecked Sendable {
    public let version: Int
    public let plugins: [LuaPluginSpec]
    public let istio: [IstioResource]
    /// Kinds that were read but are not supported ("file:line: Gateway bookinfo-gateway: not supported, skipped").
    public let skipped: [String]
    public let files: [String]
    /// VirtualServices, DestinationRules, ServiceEntries and WorkloadEntries compiled for routing.
    public let routes: RouteTable
    /// The mesh config's `pathNormalization.normalization` in force with this snapshot
    /// (set by the proxy before the snapshot reaches the loops; BASE by default). A
    /// request reads it from the snapshot it started with (`LoopContext.snapshot`), so a
    /// mesh config change applies to the requests that start after it. The request path
    /// does not normalize with it yet (docs/path-normalization.md).
    public var pathNormalization: PathNormalization = .base
    /// The Telemetry resources and mesh config telemetry keys compiled for this workload
    /// (set by the proxy at each config load): access log and tracing (applied by the
    /// builtin istio-accesslog and istio-tracing filters) and the metric overrides the
    /// stats filter reads (`telemetry.metrics`).
    public var telemetry = TelemetryPolicy()

    public init(version: Int, plugins: [LuaPluginSpec], istio: [IstioResource], skipped: [String], files: [String], routes: RouteTable = .empty) {
        self.version = version; self.plugins = plugins; self.istio = istio; self.skipped = skipped; self.files = files; self.routes = routes
    }

    public static let empty = ConfigSnapshot(version: 0, plugins: [], istio: [], skipped: [], files: [])

    /// JSON for /config_dump.
    public var json: String {
        var parts: [String] = []
        parts.append("\"version\":\(version)")
        parts.append("\"files\":[" + files.map(JSON.quote).joined(separator: ",") + "]")
        parts.append("\"lua_plugins\":[" + plugins.map { p in
            var experiment = ""
            if !p.variants.isEmpty {
                experiment += ",\"variants\":[" + p.variants.map { v in
                    "{\"name\":\(JSON.quote(v.name)),\"path\":\(JSON.quote(v.path)),\"weight\":\(v.weight),\"pluginConfig\":\(v.pluginConfig.json)}"
                }.joined(separator: ",") + "],\"stickyBy\":\(JSON.quote(p.stickyBy.description))"
            }
            if let sh = p.shadow { experiment += ",\"shadow\":{\"path\":\(JSON.quote(sh.path)),\"pluginConfig\":\(sh.pluginConfig.json)}" }
            if let g = p.guardrail { experiment += ",\"guardrail\":{\"metric\":\(JSON.quote(g.metric)),\"maxIncrease\":\(g.maxIncrease),\"minRequests\":\(g.minRequests),\"action\":\(JSON.quote(g.action))}" }
            return "{\"name\":\(JSON.quote(p.name)),\"namespace\":\(JSON.quote(p.namespace)),\"path\":\(JSON.quote(p.path)),\"phase\":\(JSON.quote(p.phase)),\"priority\":\(p.priority),\"failStrategy\":\(JSON.quote(p.failStrategy.rawValue)),\"pluginConfig\":\(p.pluginConfig.json)\(experiment)}"
        }.joined(separator: ",") + "]")
        parts.append("\"istio\":[" + istio.map { r in
            "{\"apiVersion\":\(JSON.quote(r.apiVersion)),\"kind\":\(JSON.quote(r.kind)),\"name\":\(JSON.quote(r.name)),\"namespace\":\(JSON.quote(r.namespace)),\"spec\":\(r.spec.json)}"
        }.joined(separator: ",") + "]")
        parts.append("\"skipped\":[" + skipped.map(JSON.quote).joined(separator: ",") + "]")
        return "{" + parts.joined(separator: ",") + "}"
    }
}
