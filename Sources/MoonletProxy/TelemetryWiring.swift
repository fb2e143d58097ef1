import NIOCore
import MoonletCore
import MoonletConfig
import MoonletLua
#if canImport(Foundation)
import Foundation
#endif

/// Access logs and tracing: the Telemetry resources and the mesh config compiled at each
/// config load (TelemetryPolicy) into the builtin istio-accesslog and istio-tracing
/// filters, the per-loop flush of access log lines, and log reopening.
extension ProxyServer {
    /// Compiles the telemetry policy of the workload, keeps it on the snapshot (the
    /// stats filter reads `snapshot.telemetry.metrics`) and adds the builtin filters it
    /// turns on. A LuaPlugin named istio-accesslog or istio-tracing replaces the builtin
    /// (it gets the compiled pluginConfig when it sets none).
    func applyTelemetry(_ snap: ConfigSnapshot, mesh: MeshConfigFile, identity: WorkloadIdentity, into specs: inout [LuaPluginSpec]) -> Result<Void, ConfigErrors> {
        let policy: TelemetryPolicy
        switch TelemetryPolicy.compile(snap.istio, mesh: mesh, workload: identity) {
        case .success(let p): policy = p
        case .failure(let e): return .failure(e)
        }
        for n in policy.notes { logger.notice("\(n)") }
        snap.telemetry = policy
        func add(_ name: String, _ config: ConfigValue) {
            if let i = specs.firstIndex(where: { $0.name == name }) {
                if case .map(let kv) = specs[i].pluginConfig, kv.isEmpty { specs[i].pluginConfig = config }
                return
            }
            specs.append(.builtinTelemetry(name, config))
        }
        // istio-stats is in every chain: its pluginConfig carries the metrics overrides.
        if let i = specs.firstIndex(where: { $0.name == "istio-stats" }),
           case .map(let kv) = specs[i].pluginConfig, kv.isEmpty { specs[i].pluginConfig = policy.statsPluginConfig }
        if policy.accessLogging.enabled { add("istio-accesslog", policy.accessLogPluginConfig) }
        if policy.tracing.enabled {
            let env = ProcessInfo.processInfo.environment
            let podIP = env["INSTANCE_IP"] ?? env["POD_IP"] ?? "127.0.0.1"
            let podName = env["POD_NAME"] ?? ProcessInfo.processInfo.hostName
            add("istio-tracing", policy.tracingPluginConfig(workload: identity, meshID: mesh.tls.trustDomain ?? "cluster.local", appPort: settings.appPort,
                                                            podIP: podIP, podName: podName))
        }
        return .success(())
    }

    /// Every 100 ms each loop hands its buffered access log lines to their writers.
    func startLogFlushing() {
        for c in contexts {
            c.loop.scheduleRepeatedTask(initialDelay: .milliseconds(100), delay: .milliseconds(100)) { _ in c.lua.vm.flushLogs() }
        }
    }

    /// Reopens every access log file (SIGUSR1 and admin POST /reopen_logs, after
    /// logrotate moved them): lines buffered on the loops are handed over first.
    public func reopenAccessLogs() {
        for c in contexts { try? c.loop.submit { c.lua.vm.flushLogs() }.wait() }
        lua.telemetry.reopenLogs()
        logger.info("access log files reopened")
    }
}
