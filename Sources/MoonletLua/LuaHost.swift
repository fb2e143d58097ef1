import CLua
import MoonletCore
import MoonletConfig
import MoonletTelemetry
import NIOConcurrencyHelpers
import Logging
#if canImport(Foundation)
import Foundation
#endif

/// A plugin's source, read and checked off the hot path.
public struct LuaPluginSource: Sendable {
    public var spec: LuaPluginSpec
    public var source: String
    /// FNV-1a of the source, hex (the "version hash" on /plugins).
    public var hash: String
    public var loadedAt: Date
    /// The arms and shadow of a plugin with `spec.variants` or `spec.shadow`
    /// (Experiments.swift); nil for a plain plugin.
    public var experiment: LuaExperimentSources?
}

/// The state of one plugin as /plugins reports it.
public struct LuaPluginStatus: Sendable {
    public var name: String
    public var path: String
    public var hash: String
    public var loadedAt: Date
    public var lastError: String?
    public var lastErrorAt: Date?
}

/// One validated set of plugins: what every event loop builds its Lua filters from.
public final class LuaPluginGeneration: @unchecked Sendable {
    public let id: Int
    public let plugins: [LuaPluginSource]
    init(id: Int, plugins: [LuaPluginSource]) { self.id = id; self.plugins = plugins }
}

/// Process-wide part of the Lua host: reads and validates plugin files, keeps their
/// status, and owns the settings every per-loop VM shares.
public final class LuaHost: @unchecked Sendable {
    public let logger: Logger
    public let defaultLimits: LuaLimits
    var _pluginDirs: [String]
    /// Directories `require` may load modules from (those of the loaded plugins).
    public var pluginDirs: [String] { lock.withLock { _pluginDirs } }
    let lock = NIOLock()
    var status: [String: LuaPluginStatus] = [:]
    var generationCounter = 0
    var moduleCache: [String: (String, String)] = [:]
    /// Experiments by plugin name (Experiments.swift), under `experimentLock`.
    var experimentStates: [String: ExperimentState] = [:]
    let experimentLock = NIOLock()
    /// Lua metric names admitted so far (bounded by `defaultLimits.maxMetricSeries`).
    var metricSeries: Set<String> = []
    /// Counter of `moonlet.metrics` calls refused because they would add a series past the cap.
    public static let refusedSeriesMetric = "moonlet_metric_series_refused_total"
    /// Access log files and trace exporters of the builtin istio-accesslog and
    /// istio-tracing filters (LogTraceAPI.swift).
    public let telemetry = TelemetryOutputs()

    /// The metrics filters define with moonlet.metrics (capped by `limits.maxMetricSeries`).
    public let userMetrics: UserMetricRegistry
    var _ownWorkload = MeshWorkload(workload: "unknown", namespace: "default", labels: [:], cluster: "Kubernetes", serviceAccount: "default", serial: 0)
    var _trustDomain = "cluster.local"
    /// This sidecar's workload as the istio-stats filter labels it (`moonlet.stats.info`).
    public var ownWorkload: MeshWorkload {
        get { lock.withLock { _ownWorkload } }
        set { lock.withLock { _ownWorkload = newValue } }
    }
    /// The mesh's trust domain, for the principals of the metric labels.
    public var trustDomain: String {
        get { lock.withLock { _trustDomain } }
        set { lock.withLock { _trustDomain = newValue } }
    }

    public init(logger: Logger, limits: LuaLimits = LuaLimits(), pluginDirs: [String] = []) {
        self.logger = logger
        self.defaultLimits = limits
        self._pluginDirs = pluginDirs
        self.userMetrics = UserMetricRegistry(maxSeries: limits.maxMetricSeries)
    }

    /// Reads every applicable plugin and compiles it in a scratch VM (module code run
    /// once under the plugin's budget, `configure` called). Errors name the plugin,
    /// the file and the line; a generation is returned only when every plugin is good.
    public func prepare(_ specs: [LuaPluginSpec]) -> Result<LuaPluginGeneration, LuaPrepareError> {
        var out: [LuaPluginSource] = []
        var errors: [String] = []
        let paths = specs.flatMap { [$0.path] + $0.variants.map(\.path) + ($0.shadow.map { [$0.path] } ?? []) }
        let dirs = Array(Set(paths.filter { !$0.hasPrefix("builtin://") }.map { ($0 as NSString).deletingLastPathComponent } + self.pluginDirs)).sorted()
        lock.withLock { _pluginDirs = dirs; moduleCache = [:] }
        let scratch = LuaVM(host: self, metrics: nil)
        for spec in specs {
            if !spec.variants.isEmpty || spec.shadow != nil {
                do { out.append(try prepareExperiment(spec, scratch: scratch)) } catch { errors.append("plugin \(spec.name): \(error)") }
                continue
            }
            let text: String
            if spec.path.hasPrefix("builtin://"), let b = BuiltinPlugins.source(String(spec.path.dropFirst(10))) {
                text = b
            } else if let data = FileManager.default.contents(atPath: spec.path), let t = String(data: data, encoding: .utf8) {
                text = t
            } else {
                errors.append("plugin \(spec.name): \(spec.path): cannot read file")
                continue
            }
            let src = LuaPluginSource(spec: spec, source: text, hash: Self.fnv(text), loadedAt: Date())
            do {
                let inst = try LuaPluginInstance(vm: scratch, source: src)
                inst.release()
                out.append(src)
            } catch {
                errors.append("plugin \(spec.name): \(error)")
            }
        }
        if !errors.isEmpty {
            let now = Date()
            lock.withLock {
                for e in errors {
                    let name = e.dropFirst("plugin ".count).split(separator: ":").first.map(String.init) ?? ""
                    status[name, default: LuaPluginStatus(name: name, path: "", hash: "", loadedAt: now)].lastError = e
                    status[name]!.lastErrorAt = now
                }
            }
            return .failure(LuaPrepareError(messages: errors))
        }
        return .success(lock.withLock {
            generationCounter += 1
            for p in out {
                let old = status[p.spec.name]
                var st = LuaPluginStatus(name: p.spec.name, path: p.spec.path, hash: p.hash, loadedAt: p.loadedAt)
                if old?.hash == p.hash { st.loadedAt = old!.loadedAt }
                st.lastError = nil
                status[p.spec.name] = st
            }
            let names = Set(out.map(\.spec.name))
            commitExperiments(out)
            status = status.filter { names.contains($0.key) || $0.value.hash.isEmpty }
            return LuaPluginGeneration(id: generationCounter, plugins: out)
        })
    }

    /// Admits Lua metric `name` as a series: true when it is known or there is room.
    func admitMetricSeries(_ name: String) -> Bool {
        lock.withLock {
            if metricSeries.contains(name) { return true }
            guard metricSeries.count < defaultLimits.maxMetricSeries else { return false }
            metricSeries.insert(name)
            return true
        }
    }

    /// Records a runtime error of a plugin (shown on /plugins).
    public func recordError(plugin: String, _ message: String) {
        lock.withLock {
            status[plugin]?.lastError = message
            status[plugin]?.lastErrorAt = Date()
        }
    }

    public func statuses() -> [LuaPluginStatus] {
        lock.withLock { status.values.sorted { $0.name < $1.name } }
    }

    /// Finds `rel` ("a/b.lua") in the plugin directories, cached per generation; a
    /// module found in none of them may be a builtin filter ("istio-router.lua"), so a
    /// fork can `require` the original whether or not it was exported next to it.
    func findModule(_ rel: String) -> (String, String)? {
        lock.withLock {
            if let c = moduleCache[rel] { return c }
            for d in _pluginDirs {
                let p = (d as NSString).appendingPathComponent(rel)
                if let data = FileManager.default.contents(atPath: p), let t = String(data: data, encoding: .utf8) {
                    moduleCache[rel] = (p, t)
                    return (p, t)
                }
            }
            if rel.hasSuffix(".lua"), let b = BuiltinPlugins.source(String(rel.dropLast(4))) {
                let found = ("builtin://" + rel.dropLast(4), b)
                moduleCache[rel] = found
                return found
            }
            return nil
        }
    }

    static func fnv(_ s: String) -> String {
        var h: UInt64 = 0xcbf29ce484222325
        for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100000001b3 }
        let hex = String(h, radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }
}

public struct LuaPrepareError: Error, CustomStringConvertible, Sendable {
    public var messages: [String]
    public var description: String { messages.joined(separator: "\n") }
}

extension LuaPluginSpec {
    /// A builtin filter (BuiltinPlugins) as a plugin: phase unset, placed after every
    /// user filter of that phase.
    public static func builtin(_ name: String) -> LuaPluginSpec {
        LuaPluginSpec(name: name, namespace: "", path: "builtin://\(name)", phase: "UNSPECIFIED_PHASE", priority: Int(Int32.min),
                      pluginConfig: .map([]), failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil,
                      timeoutMs: nil, file: "builtin", line: 0)
    }

    /// The builtin Istio metrics filter (plugins/istio-stats.lua): phase STATS, last in
    /// it; records Istio's standard request metrics in on_log. Fails open (a metrics
    /// failure never fails a request).
    public static var builtinStats: LuaPluginSpec {
        var s = builtin("istio-stats")
        s.phase = "STATS"
        s.failStrategy = .failOpen
        return s
    }

    /// A builtin of phase STATS, last in it, that fails open (a telemetry filter never
    /// fails a request): istio-accesslog and istio-tracing, configured at config load
    /// (TelemetryPolicy).
    public static func builtinTelemetry(_ name: String, _ config: ConfigValue) -> LuaPluginSpec {
        LuaPluginSpec(name: name, namespace: "", path: "builtin://\(name)", phase: "STATS", priority: Int(Int32.min),
                      pluginConfig: config, failStrategy: .failOpen, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil,
                      timeoutMs: nil, file: "builtin", line: 0)
    }

    /// The builtin Istio router (plugins/istio-router.lua).
    public static var builtinRouter: LuaPluginSpec { builtin("istio-router") }

    /// The built-in AuthorizationPolicy filter (plugins/istio-authz.lua), phase AUTHZ and
    /// last in it (Istio runs WasmPlugins of the AUTHZ phase before its RBAC filters),
    /// configured with `AuthorizationCompiler.compile`'s tables. Fails closed.
    public static func builtinAuthz(_ compiled: ConfigValue) -> LuaPluginSpec {
        LuaPluginSpec(name: "istio-authz", namespace: "", path: "builtin://istio-authz", phase: "AUTHZ", priority: Int(Int32.min),
                      pluginConfig: compiled, failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil,
                      timeoutMs: nil, file: "builtin", line: 0)
    }
}

/// The Lua side of one event loop: its VM and the filters built from the current
/// plugin generation. Used only on that loop's thread.
public final class LuaLoopRuntime {
    public let vm: LuaVM
    public init(host: LuaHost, metrics: MetricsShard?) {
        vm = LuaVM(host: host, metrics: metrics)
    }

    /// Builds this loop's filters for a generation. A plugin that fails here (it passed
    /// validation, so only a load-order effect can cause it) is reported and left out.
    public func filters(for gen: LuaPluginGeneration) -> [Filter] {
        var out: [Filter] = []
        for src in gen.plugins {
            do {
                if let e = src.experiment { out.append(try ExperimentFilter(vm: vm, sources: e)); continue }
                out.append(try LuaPluginInstance(vm: vm, source: src))
            } catch {
                vm.logger.error("plugin \(src.spec.name): \(error)")
                vm.host.recordError(plugin: src.spec.name, "\(error)")
            }
        }
        // A reload: the timers of the plugins this generation replaces stop.
        // (An experiment's arms and shadow are instances of their own: their timers live.)
        var owners = Set<ObjectIdentifier>()
        for f in out {
            owners.insert(ObjectIdentifier(f as AnyObject))
            if let e = f as? ExperimentFilter {
                for arm in e.arms { owners.insert(ObjectIdentifier(arm)) }
                if let sh = e.shadow { owners.insert(ObjectIdentifier(sh)) }
            }
        }
        vm.stopTimers(except: owners)
        return out
    }

    /// Frees a stream's Lua state; call after on_log. A span `trace.start` recorded and
    /// no `trace.finish` ended is ended here (istio-tracing has no on_log of its own, so
    /// an unsampled stream costs no Lua call at its end).
    public func endStream(_ s: ProxyStream) {
        if !vm.logTrace.pending.isEmpty { _ = vm.logTrace.finish(s) }
        vm.endStream(s)
    }
}
