import MoonletCore
import ArgumentParser
import Logging
import MoonletConfig
import MoonletProxy
import MoonletLua
import MoonletTLS
import MoonletTelemetry
import NIOCore
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet`: argument parsing and composition only.
struct Moonlet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "moonlet",
        abstract: "A service-mesh sidecar proxy with Lua filters that reads Istio's YAML.",
        subcommands: [Run.self, Validate.self, Demo.self, CA.self, Pilot.self, Iptables.self, Inject.self, Plugins.self, FilterCommand.self]
    )
}

/// Options shared by `run` and `demo`. Each flag can also come from the environment
/// variable named in its help (Istio's names where Istio has one).
struct SidecarOptions: ParsableArguments {
    @Option(help: "YAML configuration directory or file (watched). Env: MOONLET_CONFIG") var config: [String] = []
    @Option(help: "Inbound listener port (mesh -> app; default: 15006). Env: MOONLET_INBOUND_PORT") var inboundPort: Int?
    @Option(help: "Outbound listener port (app -> mesh; default: 15001). Env: MOONLET_OUTBOUND_PORT") var outboundPort: Int?
    @Option(help: "Admin port (default: 15000, on loopback; see --admin-bind). Env: MOONLET_ADMIN_PORT") var adminPort: Int?
    @Option(help: "Prometheus port (default: 15090; 0 = off). Env: MOONLET_PROMETHEUS_PORT") var prometheusPort: Int?
    @Option(help: "Health port (default: 15021; 0 = off). Env: MOONLET_HEALTH_PORT") var healthPort: Int?
    @Option(help: "Application port the inbound listener forwards to on 127.0.0.1 (default: 8080). Env: MOONLET_APP_PORT") var appPort: Int?
    @Option(help: "How iptables sends inbound connections: REDIRECT (original destination by SO_ORIGINAL_DST) or TPROXY (the local address; the listener is made transparent). Default REDIRECT. Env: INBOUND_INTERCEPTION_MODE") var inboundInterceptionMode: String?
    @Option(help: "Address the listeners and the Prometheus and health ports bind to (default: 127.0.0.1). Env: MOONLET_BIND") var bind: String?
    @Option(help: "Address the admin API binds to (default: 127.0.0.1; another address exposes config and reload to that network). Env: MOONLET_ADMIN_BIND") var adminBind: String?
    @Option(help: "Event loops (default: cores). Env: ISTIO_META_CONCURRENCY / MOONLET_CONCURRENCY") var concurrency: Int?
    @Option(help: "Workload namespace. Env: POD_NAMESPACE") var namespace: String?
    @Option(help: "Workload service account. Env: SERVICE_ACCOUNT") var serviceAccount: String?
    @Option(help: "Workload labels k=v,k2=v2. Env: ISTIO_METAJSON_LABELS-style MOONLET_LABELS") var labels: String?
    @Option(help: "Workload name in metrics and peer metadata (default: the app label, else the service account). Env: ISTIO_META_WORKLOAD_NAME") var workloadName: String?
    @Option(help: "Cluster id in metrics and peer metadata (default: Kubernetes). Env: ISTIO_META_CLUSTER_ID") var clusterId: String?
    @Option(help: "trace, debug, info, notice, warning, error, critical. Env: MOONLET_LOG_LEVEL") var logLevel: String?
    @Option(help: "Per-stream timeout in ms (0 = none, Istio's default). Env: MOONLET_STREAM_TIMEOUT_MS") var streamTimeoutMs: Int?
    @Option(help: "Request body idle timeout in ms: 408 when a body stalls this long (default: 15000; 0 = none). Env: MOONLET_REQUEST_BODY_IDLE_TIMEOUT_MS") var requestBodyIdleTimeoutMs: Int?
    @Option(help: "Time in ms for a whole request to arrive once its head was read: 408 beyond, however steadily the body trickles (default: 300000; 0 = none). Env: MOONLET_REQUEST_TIMEOUT_MS") var requestTimeoutMs: Int?
    @Option(help: "Request header names with an underscore: drop, reject (400) or allow (default: drop; allow still drops names that fold onto x-forwarded-*, x-request-id, x-envoy-*, x-b3-*). Env: MOONLET_HEADERS_WITH_UNDERSCORES") var headersWithUnderscores: String?
    @Option(help: "Directory with cert-chain.pem, key.pem, root-cert.pem (watched; enables mTLS). Env: MOONLET_CERTS") var certs: String?
    @Option(help: "CA address host:port (moonlet ca serve): get and renew the certificate into --certs. Env: CA_ADDR") var caAddress: String?
    @Option(help: "Bootstrap token file for the CA. Env: MOONLET_CA_TOKEN_FILE") var caTokenFile: String?
    @Option(help: "SAN the CA must present (default: spiffe://<trust-domain>/ns/istio-system/sa/moonlet-ca, or the --ca-address host name). Env: MOONLET_CA_IDENTITY") var caIdentity: String?
    @Option(help: "The mesh's trust domain (default: mesh config trustDomain, else the certificate's, else cluster.local). Env: TRUST_DOMAIN") var trustDomain: String?
    @Option(help: "Istio MeshConfig file (trustDomain, trustDomainAliases, caCertificates, meshMTLS, rootNamespace, ...), watched and applied on change. Env: MESH_CONFIG_FILE or MOONLET_MESH_CONFIG") var meshConfig: String?
    @Option(help: "Bytes one moonlet.shared dict may hold (default 4194304). Env: MOONLET_LUA_SHARED_DICT_BYTES") var luaSharedDictBytes: Int?
    @Option(help: "Metric names Lua may create (default 1000). Env: MOONLET_LUA_MAX_METRIC_SERIES") var luaMaxMetricSeries: Int?

    /// Longest millisecond timeout a flag takes (30 days): deadlines are kept in nanoseconds,
    /// and a larger value would overflow them.
    static let maxTimeoutMs = 30 * 86_400 * 1000

    /// A millisecond timeout from its flag or environment variable: 0 (none) up to 30 days.
    func timeoutMs(_ flag: Int?, _ name: String, _ envName: String, default value: Int) throws -> Int {
        var v = flag
        if v == nil, let text = env(envName) {
            guard let n = Int(text) else { throw ValidationError("\(envName): a number of milliseconds, got \"\(text)\"") }
            v = n
        }
        guard let v else { return value }
        guard (0...Self.maxTimeoutMs).contains(v) else { throw ValidationError("\(name): 0 (none) to \(Self.maxTimeoutMs) ms (30 days), got \(v)") }
        return v
    }

    func env(_ names: String...) -> String? {
        for n in names { if let v = ProcessInfo.processInfo.environment[n], !v.isEmpty { return v } }
        return nil
    }

    func settings() throws -> ProxySettings {
        var s = ProxySettings()
        let cfg = config.isEmpty ? (env("MOONLET_CONFIG").map { [$0] } ?? []) : config
        s.configPaths = cfg
        s.inboundPort = inboundPort ?? env("MOONLET_INBOUND_PORT").flatMap(Int.init) ?? 15006
        s.outboundPort = outboundPort ?? env("MOONLET_OUTBOUND_PORT").flatMap(Int.init) ?? 15001
        s.adminPort = adminPort ?? env("MOONLET_ADMIN_PORT").flatMap(Int.init) ?? 15000
        s.prometheusPort = prometheusPort ?? env("MOONLET_PROMETHEUS_PORT").flatMap(Int.init) ?? 15090
        s.healthPort = healthPort ?? env("MOONLET_HEALTH_PORT").flatMap(Int.init) ?? 15021
        s.appPort = appPort ?? env("MOONLET_APP_PORT").flatMap(Int.init) ?? 8080
        s.bindAddress = bind ?? env("MOONLET_BIND") ?? "127.0.0.1"
        switch (inboundInterceptionMode ?? env("INBOUND_INTERCEPTION_MODE") ?? "REDIRECT").uppercased() {
        case "REDIRECT": s.inboundTPROXY = false
        case "TPROXY": s.inboundTPROXY = true
        case let other: throw ValidationError("--inbound-interception-mode: REDIRECT or TPROXY, got \"\(other)\"")
        }
        s.adminBindAddress = adminBind ?? env("MOONLET_ADMIN_BIND") ?? "127.0.0.1"
        s.concurrency = concurrency ?? env("MOONLET_CONCURRENCY", "ISTIO_META_CONCURRENCY").flatMap(Int.init) ?? System.coreCount
        if s.concurrency <= 0 { s.concurrency = System.coreCount }
        s.identity.namespace = namespace ?? env("POD_NAMESPACE") ?? "default"
        s.identity.serviceAccount = serviceAccount ?? env("SERVICE_ACCOUNT") ?? "default"
        s.identity.labels = try WorkloadIdentity.parseLabels(labels ?? env("MOONLET_LABELS") ?? "")
        s.identity.workloadName = workloadName ?? env("ISTIO_META_WORKLOAD_NAME") ?? ""
        s.identity.clusterID = clusterId ?? env("ISTIO_META_CLUSTER_ID") ?? "Kubernetes"
        s.identity.podName = env("POD_NAME") ?? ProcessInfo.processInfo.hostName
        s.identity.instanceIP = env("INSTANCE_IP") ?? ""
        s.limits.streamTimeoutMs = try timeoutMs(streamTimeoutMs, "--stream-timeout-ms", "MOONLET_STREAM_TIMEOUT_MS", default: 0)
        s.limits.requestBodyIdleTimeoutMs = try timeoutMs(requestBodyIdleTimeoutMs, "--request-body-idle-timeout-ms", "MOONLET_REQUEST_BODY_IDLE_TIMEOUT_MS",
                                                          default: s.limits.requestBodyIdleTimeoutMs)
        s.limits.requestTimeoutMs = try timeoutMs(requestTimeoutMs, "--request-timeout-ms", "MOONLET_REQUEST_TIMEOUT_MS", default: s.limits.requestTimeoutMs)
        if let v = headersWithUnderscores ?? env("MOONLET_HEADERS_WITH_UNDERSCORES") {
            guard let a = UnderscoreHeaderAction(rawValue: v) else { throw ValidationError("--headers-with-underscores must be allow, drop or reject, got \(v)") }
            s.limits.headersWithUnderscores = a
        }
        s.certsDirectory = certs ?? env("MOONLET_CERTS")
        s.caAddress = caAddress ?? env("CA_ADDR")
        s.caTokenFile = caTokenFile ?? env("MOONLET_CA_TOKEN_FILE")
        s.caIdentity = caIdentity ?? env("MOONLET_CA_IDENTITY")
        if let path = meshConfig ?? MeshConfigFile.pathFromEnvironment() {
            do {
                let mesh = try MeshConfigFile.load(path: path)
                s.meshTLS = mesh.tls
                s.identity.rootNamespace = mesh.rootNamespace
                s.meshConfigNotApplied = mesh.notApplied
                s.meshConfigPath = path
            } catch { throw ValidationError("--mesh-config: \(error)") }
        }
        if let v = luaSharedDictBytes ?? env("MOONLET_LUA_SHARED_DICT_BYTES").flatMap(Int.init) {
            guard v > 0 else { throw ValidationError("--lua-shared-dict-bytes must be positive, got \(v)") }
            s.luaLimits.sharedDictMaxBytes = v
        }
        if let v = luaMaxMetricSeries ?? env("MOONLET_LUA_MAX_METRIC_SERIES").flatMap(Int.init) {
            guard v >= 0 else { throw ValidationError("--lua-max-metric-series must be 0 or more, got \(v)") }
            s.luaLimits.maxMetricSeries = v
        }
        if let td = trustDomain ?? env("TRUST_DOMAIN") {
            guard SpiffeID(trustDomain: td, namespace: "a", serviceAccount: "b") != nil else { throw ValidationError("--trust-domain: \"\(td)\" is not a trust domain") }
            s.meshTLS.trustDomain = td
            s.trustDomainOverride = td
        }
        if s.caAddress != nil && s.certsDirectory == nil { throw ValidationError("--ca-address needs --certs (where the certificate is written, with root-cert.pem in it)") }
        return s
    }

    func logger() -> Logger {
        let level = Logger.Level(rawValue: logLevel ?? env("MOONLET_LOG_LEVEL") ?? "info") ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        return Logger(label: "moonlet")
    }
}

/// Installs SIGTERM (drain, exit 0), SIGINT (stop), SIGHUP (reload) and SIGUSR1
/// (reopen the access log files, as Envoy does for logrotate).
/// `beforeExit` runs after the drain (the demo removes its files there).
func installSignals(_ server: ProxyServer, beforeExit: @escaping () -> Void = {}) -> [DispatchSourceSignal] {
    var sources: [DispatchSourceSignal] = []
    // A log reader gone (stdout piped to a process that exited) must not kill the proxy:
    // writes get EPIPE instead, as Envoy ignores SIGPIPE.
    signal(SIGPIPE, SIG_IGN)
    for sig in [SIGTERM, SIGINT, SIGHUP, SIGUSR1] {
        signal(sig, SIG_IGN)
        let src = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        src.setEventHandler {
            if sig == SIGHUP { server.reload(reason: "SIGHUP"); return }
            if sig == SIGUSR1 { server.reopenAccessLogs(); return }
            server.drainAndStop()
            beforeExit()
            exit(0)
        }
        src.resume()
        sources.append(src)
    }
    return sources
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the sidecar.")
    @OptionGroup var options: SidecarOptions
    @OptionGroup var pilot: PilotSubscribeOptions

    func run() throws {
        let logger = options.logger()
        let server = ProxyServer(settings: try options.settings(), logger: logger)
        if pilot.enabled { server.expectPushedConfig() }
        do { try server.start() } catch {
            logger.critical("cannot start: \(error)")
            throw ExitCode(1)
        }
        let subscription = try pilot.start(server: server, logger: logger)
        let signals = installSignals(server)
        _ = (signals, subscription)
        dispatchMain()
    }
}

struct Validate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Validate YAML configuration offline (Galley's role). Exit 0 when valid, 1 otherwise.")
    @Argument(help: "Files or directories") var paths: [String]
    @Option(help: "text or json") var output: String = "text"
    @Option(help: "Istio MeshConfig file: AuthorizationPolicy CUSTOM providers are checked against its extensionProviders. Env: MESH_CONFIG_FILE or MOONLET_MESH_CONFIG") var meshConfig: String?

    func run() throws {
        var providers: [MeshExtensionProvider]? = nil
        var mesh = MeshConfigFile()
        if let path = meshConfig ?? MeshConfigFile.pathFromEnvironment() {
            do { mesh = try MeshConfigFile.load(path: path); providers = mesh.extensionProviders } catch { throw ValidationError("--mesh-config: \(error)") }
        }
        switch ConfigLoader().load(paths: paths, securityScope: .anyWorkload) {
        case .success(let snap):
            // Telemetry is compiled as a sidecar compiles it (`moonlet run` refuses what
            // fails here): each resource for a workload it selects.
            var (telemetryErrors, telemetryNotes, outputs) = TelemetryPolicy.validate(snap.istio, mesh: mesh)
            // Each access log format is compiled as the sidecar compiles it.
            for o in outputs {
                do {
                    if let labels = o.labels { _ = try AccessLogFormat(json: labels) } else { _ = try AccessLogFormat(text: o.text ?? AccessLogFormatKeys.istioText) }
                } catch {
                    let source = o.provider == "envoy" ? "mesh config" : "mesh config extensionProviders \"\(o.provider)\""
                    telemetryErrors.append(ConfigError(file: meshConfig ?? "mesh config", line: 0, column: 0, field: o.provider == "envoy" ? "accessLogFormat" : "logFormat",
                                                       message: "\(source): \(error)"))
                }
            }
            if !telemetryErrors.isEmpty {
                if output == "json" {
                    let errs = telemetryErrors.map { "{\"file\":\(JSON.quote($0.file)),\"line\":\($0.line),\"column\":\($0.column),\"resource\":\(JSON.quote($0.resource)),\"field\":\(JSON.quote($0.field)),\"message\":\(JSON.quote($0.message))}" }
                    print("{\"valid\":false,\"errors\":[\(errs.joined(separator: ","))]}")
                } else {
                    for x in telemetryErrors { FileHandle.standardError.write((x.description + "\n").data(using: .utf8)!) }
                }
                throw ExitCode(1)
            }
            // CUSTOM policies: with a mesh config, a provider it lacks is an error (the
            // sidecar fails closed); without one, a note.
            let custom = AuthorizationCompiler.customProviderProblems(snap.istio, providers: providers)
            if providers != nil && !custom.isEmpty {
                if output == "json" {
                    let errs = custom.map { "{\"file\":\(JSON.quote($0.file)),\"line\":\($0.line),\"column\":0,\"resource\":\"AuthorizationPolicy\",\"field\":\"spec.provider.name\",\"message\":\(JSON.quote($0.message))}" }
                    print("{\"valid\":false,\"errors\":[\(errs.joined(separator: ","))]}")
                } else {
                    for c in custom { FileHandle.standardError.write("\(c.file):\(c.line): \(c.message)\n".data(using: .utf8)!) }
                }
                throw ExitCode(1)
            }
            let notes = snap.skipped + telemetryNotes + (providers == nil ? custom.map { "\($0.file):\($0.line): \($0.message)" } : [])
            if output == "json" {
                print("{\"valid\":true,\"resources\":\(snap.istio.count + snap.plugins.count),\"skipped\":[\(notes.map(JSON.quote).joined(separator: ","))],\"errors\":[]}")
            } else {
                for s in notes { print("note: \(s)") }
                print("valid: \(snap.istio.count + snap.plugins.count) resources in \(snap.files.count) files")
            }
            // The process ends here: freeing a large mesh's snapshot object by object
            // would only add to the time `validate` takes (exit flushes stdout).
            #if canImport(Glibc)
            Glibc.exit(0)
            #else
            Darwin.exit(0)
            #endif
        case .failure(let e):
            if output == "json" {
                let errs = e.errors.map { "{\"file\":\(JSON.quote($0.file)),\"line\":\($0.line),\"column\":\($0.column),\"resource\":\(JSON.quote($0.resource)),\"field\":\(JSON.quote($0.field)),\"message\":\(JSON.quote($0.message))}" }
                print("{\"valid\":false,\"errors\":[\(errs.joined(separator: ","))]}")
            } else {
                for x in e.errors { FileHandle.standardError.write((x.description + "\n").data(using: .utf8)!) }
            }
            throw ExitCode(1)
        }
    }
}

Moonlet.main()

/// `moonlet plugins`: the builtin Lua filters.
struct Plugins: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Builtin Lua policy filters (istio-router...).", subcommands: [Export.self])

    /// `moonlet plugins export DIR`: each builtin's source as DIR/NAME.lua, to read or fork.
    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write every builtin filter's source as DIR/NAME.lua (a LuaPlugin with a builtin's name replaces it).")
        @Argument(help: "Directory to write to (created if missing)") var dir: String
        @Flag(help: "Overwrite files that differ from the builtin") var force = false

        func run() throws {
            do {
                for path in try BuiltinPlugins.export(to: dir, force: force) { print(path) }
            } catch let e as BuiltinPlugins.ExportConflict {
                FileHandle.standardError.write((e.description + "\n").data(using: .utf8)!)
                throw ExitCode(1)
            }
        }
    }
}
