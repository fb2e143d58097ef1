import NIOCore
import NIOPosix
import NIOConcurrencyHelpers
import MoonletCore
import MoonletConfig
import MoonletLua
import MoonletTelemetry
import MoonletBalancer
import MoonletTLS
import NIOSSL
import Logging
#if canImport(Foundation)
import Foundation
#endif

/// The running sidecar: event loops, listeners, the admin API and configuration
/// (load, watch, reload). Composition lives in the executable; tests start it in-process.
public final class ProxyServer: @unchecked Sendable {
    public let settings: ProxySettings
    public let group: MultiThreadedEventLoopGroup
    public let logger: Logger
    public let lua: LuaHost
    var contexts: [LoopContext] = []
    var contextByLoop: [ObjectIdentifier: LoopContext] = [:]
    var listeners: [Channel] = []
    var adminChannels: [Channel] = []
    /// Guards the fields below; never held while waiting for an event loop.
    let lock = NIOLock()
    /// Serializes reloads (file watcher, admin, SIGHUP).
    let reloadLock = NIOLock()
    var snapshot: ConfigSnapshot = .empty
    var generation: LuaPluginGeneration?
    var lastReloadError: String?
    var reloadCount = 0
    var watchFingerprint = ""
    var watchTimer: DispatchSourceTimer?
    var certTimer: DispatchSourceTimer?
    /// The workload certificate in force (nil without --certs).
    var tlsMaterial: TLSMaterial?
    var lastCertError: String?
    /// /healthz/ready: started, not draining, and (with pilot) the first pushed version applied.
    public var ready: Bool { started && !awaitingFirstPush }
    var started = false
    /// Set by `expectPushedConfig()` (PilotApply.swift) until a pushed version is applied.
    var awaitingFirstPush = false
    var draining = false
    /// Native filters that run with the Lua ones (composition adds them).
    public var nativeFilters: [Filter] = []
    /// Fetches and refreshes the JWKS of RequestAuthentication jwksUris (made when a
    /// configuration first names a jwksUri).
    var jwksFetcher: JWKSFetcher?
    /// The JWT providers and JWKS URIs of the accepted configuration (RequestAuthnSetup).
    var acceptedAuthnProviders: [String: JWTVerifying] = [:]
    var acceptedAuthnURIs: Set<String> = []
    /// The mesh config in force (MeshConfigReload.swift).
    let meshState = MeshConfigState()
    /// What the last load decoded, per document: a reload decodes only what changed.
    let configCache = ConfigCache()
    /// Where loads run (lower priority than the event loops).
    let compileThread = ConfigCompileThread()
    /// Resources pushed with `apply(sources:reason:)`, loaded with the files at every reload.
    var pushedSources: [ConfigLoader.Source] = []

    /// Bound ports (after start), by role: "inbound", "outbound", "admin", "prometheus", "health".
    public private(set) var boundPorts: [String: Int] = [:]

    public init(settings: ProxySettings, logger: Logger) {
        self.settings = settings
        self.logger = logger
        group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, settings.concurrency))
        lua = LuaHost(logger: logger, limits: settings.luaLimits)
        let id = settings.identity
        lua.ownWorkload = MeshWorkload(workload: id.effectiveWorkloadName, namespace: id.namespace, labels: id.labels,
                                       cluster: id.clusterID, serviceAccount: id.serviceAccount, serial: 0)
        lua.telemetry.maxQueuedBytes = settings.accessLogMaxQueuedBytes
        var i = 0
        for loop in group.makeIterator() {
            let index = i
            let c = try! loop.submit { LoopContext(loop: loop, index: index, settings: settings, host: self.lua, logger: logger) }.wait()
            contexts.append(c)
            contextByLoop[ObjectIdentifier(loop)] = c
            i += 1
        }
    }

    /// Loads the configuration, binds every listener, starts watching for changes.
    public func start() throws {
        try startCertificates()
        if case .failure(let e) = reload(reason: "start") {
            throw e
        }
        do { try bindAll() } catch {
            // Nothing stays bound when one port is refused.
            for ch in listeners + adminChannels { try? ch.close().wait() }
            listeners = []; adminChannels = []; boundPorts = [:]
            throw error
        }
        let own = Array(boundPorts.values)
        let admin = boundPorts["admin"] ?? 0
        for c in contexts { try? c.loop.submit { c.listenerPorts = own; c.adminPort = admin }.wait() }
        if (!settings.configPaths.isEmpty || settings.meshConfigPath != nil) && settings.watchIntervalMs > 0 {
            watchFingerprint = fingerprint()
            // Polled off the event loops: a reload waits for every loop to swap its chain.
            let t = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "moonlet.config-watch"))
            t.schedule(deadline: .now() + .milliseconds(settings.watchIntervalMs), repeating: .milliseconds(settings.watchIntervalMs))
            t.setEventHandler { [weak self] in self?.checkForChanges() }
            t.resume()
            watchTimer = t
        }
        startLogFlushing()
        started = true
        logger.info("moonlet ready", metadata: ["inbound": "\(boundPorts["inbound"] ?? 0)", "outbound": "\(boundPorts["outbound"] ?? 0)",
                                                "admin": "\(boundPorts["admin"] ?? 0)", "loops": "\(contexts.count)"])
    }

    /// Binds the inbound and outbound listeners, the admin API and the Prometheus and
    /// health ports.
    func bindAll() throws {
        listeners.append(try bindProxy(.inbound, port: settings.inboundPort))
        listeners.append(try bindProxy(.outbound, port: settings.outboundPort))
        // The admin API listens on loopback unless --admin-bind opens it (as Istio's
        // Envoy admin on 127.0.0.1:15000); Prometheus and health follow --bind.
        for (name, port, host) in [("admin", settings.adminPort, settings.adminBindAddress), ("prometheus", settings.prometheusPort, settings.bindAddress),
                                   ("health", settings.healthPort, settings.bindAddress)] where port >= 0 {
            if port == 0 && name != "admin" { continue }
            let ch = try Self.bindNamed(name, host: host, port: port) {
                try AdminServer.bind(group: group, host: host, port: port, role: AdminServer.Role(rawValue: name) ?? .admin, server: self)
            }
            adminChannels.append(ch)
            boundPorts[name] = ch.localAddress?.port ?? port
        }
    }

    /// Runs `bind` for listener `name`; a failure names the address, the listener and the
    /// flag that sets its port ("127.0.0.1:15001 (outbound listener, --outbound-port):
    /// address already in use").
    static func bindNamed(_ name: String, host: String, port: Int, _ bind: () throws -> Channel) throws -> Channel {
        do { return try bind() } catch {
            var why = "\(error)"
            if let io = error as? IOError { why = String(cString: strerror(io.errnoCode)).lowercased() }
            let what = name == "inbound" || name == "outbound" ? "\(name) listener" : "\(name) port"
            throw ReloadError(message: "cannot listen on \(host):\(port) (\(what), --\(name)-port): \(why)")
        }
    }

    func bindProxy(_ role: ListenerRole, port: Int) throws -> Channel {
        try Self.bindNamed(role.rawValue, host: settings.bindAddress, port: port) { try bindListener(role, port: port) }
    }

    func bindListener(_ role: ListenerRole, port: Int) throws -> Channel {
        let byLoop = contextByLoop
        let marks = ChannelOptions.Types.WriteBufferWaterMark(low: settings.limits.highWaterMarkBytes / 4, high: settings.limits.highWaterMarkBytes)
        let ch = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 1024)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(ChannelOptions.maxMessagesPerRead, value: 64)
            // No child channel options: each one costs an accepted connection a type-erased
            // trip with dynamic casts and a future (about 4% of a new connection's CPU).
            // NIO's default is 4 reads per wake-up; TCP_NODELAY (an accepted socket without
            // it, although the listener has it, was seen under a burst of 200 connections)
            // and the water marks are set below through the synchronous options.
            .childChannelInitializer { ch in
                let ctx = byLoop[ObjectIdentifier(ch.eventLoop)]!
                if ctx.activeConnections >= ctx.settings.limits.maxConnectionsPerLoop {
                    return ch.close()
                }
                return ch.eventLoop.makeCompletedFuture {
                    let options = ch.syncOptions
                    try options?.setOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
                    try options?.setOption(ChannelOptions.writeBufferWaterMark, value: marks)
                    let h = DownstreamHandler(ctx: ctx, role: role)
                    // An intercepted connection (iptables): protocol detection first (Interception.swift).
                    let settings = ctx.settings
                    let original = settings.originalDestinationOverride.map { $0(role, ch.localAddress) }
                        ?? OriginalDestination.read(ch, tproxy: role == .inbound && settings.inboundTPROXY)
                    let sniffer = original.map { InterceptionHandler(ctx: ctx, role: role, downstream: h, original: $0) }
                    if role == .inbound { try InboundSecurity.install(on: ch, ctx: ctx, downstream: h, last: sniffer) }
                    else if let sniffer { try ch.pipeline.syncOperations.addHandler(sniffer) } else { try ch.pipeline.syncOperations.addHandler(h) }
                }
            }
            .bind(host: settings.bindAddress, port: port).wait()
        if role == .inbound && settings.inboundTPROXY {
            // TPROXY delivers connections for any address: the listener must be transparent
            // (needs CAP_NET_ADMIN, which the sidecar has in TPROXY mode).
            let v6 = ch.localAddress?.protocol == .inet6
            let opt = ChannelOptions.Types.SocketOption(level: NIOBSDSocket.OptionLevel(rawValue: v6 ? OriginalDestination.solIPv6 : OriginalDestination.solIP),
                                                        name: NIOBSDSocket.Option(rawValue: v6 ? 75 : OriginalDestination.ipTransparent))
            try ch.setOption(opt, value: 1).wait()
        }
        boundPorts[role.rawValue] = ch.localAddress?.port ?? port
        return ch
    }

    // MARK: configuration

    /// Loads config and plugins, and on success swaps them in on every loop. On failure
    /// the last good snapshot keeps serving and the error is kept for /plugins.
    /// Once the proxy is ready, runs on the compile thread (lower priority than the
    /// event loops, see ConfigCompileThread) while the caller waits; the first load, with
    /// no traffic to yield to, runs at full priority on the caller's thread.
    @discardableResult
    public func reload(reason: String) -> Result<Int, ReloadError> {
        if !ready { return reloadOnCompileThread(reason: reason) }
        return compileThread.run { self.reloadOnCompileThread(reason: reason) }
    }

    /// Applies a new set of pushed resources (`moonlet pilot`): `sources` replace the
    /// ones pushed before and are loaded with the configuration files (--config), as one
    /// snapshot, exactly as a file change is (validation, last good snapshot kept on
    /// error, only changed documents decoded again, the Sidecar scope applied). Each
    /// source is a YAML text of one or more documents; its `name` is what errors name.
    /// Returns the snapshot version applied, or why nothing changed.
    @discardableResult
    public func apply(sources: [ConfigLoader.Source], reason: String = "push") -> Result<Int, ReloadError> {
        let body = { () -> Result<Int, ReloadError> in
            self.reloadLock.lock()
            let previous = self.pushedSources
            self.pushedSources = sources
            self.reloadLock.unlock()
            let r = self.reloadOnCompileThread(reason: reason)
            if case .failure = r {
                self.reloadLock.lock(); self.pushedSources = previous; self.reloadLock.unlock()
            }
            return r
        }
        // As `reload`: before ready (a sidecar waiting for its first push) at full priority.
        if !ready { return body() }
        return compileThread.run(body)
    }

    func reloadOnCompileThread(reason: String) -> Result<Int, ReloadError> {
        reloadLock.lock()
        defer { reloadLock.unlock() }
        let cpuStart = Self.threadCPUNanos()
        let version = lock.withLock { reloadCount += 1; return reloadCount }
        // The mesh config is re-read first; the reload below uses it (MeshConfigReload.swift).
        let meshMaterial: TLSMaterial?
        switch beginMeshConfigReload(reason: reason) { case .success(let m): meshMaterial = m; case .failure(let e): return .failure(e) }
        var meshApplied = false
        defer { endMeshConfigReload(applied: meshApplied, material: meshMaterial, reason: reason) }
        let mesh = currentMeshConfig, identity = meshIdentity
        var snap = ConfigSnapshot.empty
        let configPaths = settings.configPaths
        if !configPaths.isEmpty || !pushedSources.isEmpty {
            switch ConfigLoader().load(paths: configPaths, version: version, namespace: identity.namespace, labels: identity.labels,
                                       rootNamespace: identity.rootNamespace, cache: configCache, sources: pushedSources) {
            case .success(let s): snap = s
            case .failure(let e):
                lock.withLock { lastReloadError = e.description }
                logger.error("config rejected (\(reason)); keeping the last good snapshot:\n\(e.description)")
                return .failure(ReloadError(message: e.description))
            }
        }
        snap.pathNormalization = mesh.pathNormalization
        for s in snap.skipped { logger.notice("\(s)") }
        for p in snap.routes.scope.ingressProblems(appPort: settings.appPort) { logger.error("\(p)") }
        var specs = snap.plugins.filter { $0.applies(to: identity) }
        // Istio traffic resources bring the builtin router, unless a LuaPlugin named
        // "istio-router" replaces it (same place: phase unset, lowest priority).
        if !snap.routes.isEmpty || snap.routes.scope.outboundTrafficPolicy == .registryOnly {
            if let i = specs.firstIndex(where: { $0.name == "istio-router" }) {
                var fork = specs.remove(at: i)
                fork.phase = LuaPluginSpec.builtinRouter.phase
                fork.priority = LuaPluginSpec.builtinRouter.priority
                specs.append(fork)
            } else {
                specs.append(.builtinRouter)
            }
        }
        // RequestAuthentications that select the workload bring the builtin istio-authn.
        let authn: RequestAuthnSetup.Prepared?
        switch prepareRequestAuthn(snap, version: version, into: &specs, reason: reason) { case .success(let p): authn = p; case .failure(let e): return .failure(e) }
        // AuthorizationPolicies that select the workload bring the builtin istio-authz
        // (phase AUTHZ), configured with the compiled policies, unless a LuaPlugin replaces it.
        let authz = AuthorizationCompiler.compile(snap.istio, workload: identity, trustDomain: mesh.tls.trustDomain ?? "cluster.local",
                                                  aliases: mesh.tls.trustDomainAliases, providers: mesh.extensionProviders)
        for n in authz.notes { logger.notice("\(n)") }
        for e in authz.errors { logger.error("\(e)") }
        // A LuaPlugin named istio-authz (a fork) gets the compiled policies where it gives
        // no pluginConfig, for each of its variants and its shadow too (a fork can be
        // compared with the original: configuration.md "A/B experiments").
        if let conf = authz.config {
            if let i = specs.firstIndex(where: { $0.name == "istio-authz" }) { specs[i].inheritPluginConfig(conf) } else { specs.append(.builtinAuthz(conf)) }
        }
        // Istio's request metrics: the builtin istio-stats (phase STATS), unless a
        // LuaPlugin of that name replaces it (then only that one records them).
        if !specs.contains(where: { $0.name == "istio-stats" }) { specs.append(.builtinStats) }
        lua.trustDomain = mesh.tls.trustDomain ?? "cluster.local"
        // Telemetry resources and the mesh config's telemetry keys bring istio-accesslog
        // and istio-tracing (TelemetryPolicy, TelemetryWiring.swift).
        switch applyTelemetry(snap, mesh: mesh, identity: identity, into: &specs) {
        case .success: break
        case .failure(let e):
            abandonRequestAuthn(authn)
            lock.withLock { lastReloadError = e.description }
            logger.error("Telemetry rejected (\(reason)); keeping the last good snapshot:\n\(e.description)")
            return .failure(ReloadError(message: e.description))
        }
        let gen: LuaPluginGeneration
        switch lua.prepare(specs) {
        case .success(let g): gen = g
        case .failure(let e):
            abandonRequestAuthn(authn)
            lock.withLock { lastReloadError = e.description }
            logger.error("plugins rejected (\(reason)); keeping the last good version:\n\(e.description)")
            return .failure(ReloadError(message: e.description))
        }
        lock.withLock {
            lastReloadError = nil
            snapshot = snap
            generation = gen
        }
        meshApplied = true
        commitRequestAuthn(authn)
        let natives = nativeFilters
        let mtls = PeerAuthenticationResolver.resolve(snap.istio, workload: identity, port: settings.appPort)
        if mtls.mode == .strict && currentTLS == nil {
            logger.error("inbound mTLS is STRICT (\(mtls.source)) but there is no workload certificate (--certs): every inbound connection is refused")
        }
        buildUpstreamTLSContexts(snap)
        // Intercepted traffic: outboundTrafficPolicy, protocolDetectionTimeout, TCP authorization.
        let interception = InterceptionConfig(registryOnly: mesh.telemetry.outboundTrafficPolicy == .registryOnly,
                                              detectionTimeoutMs: mesh.telemetry.protocolDetectionTimeoutMs ?? 0,
                                              tcpAuthz: TCPAuthorization(authz.config))
        // Each loop hands back what it replaced: the last reference to the old snapshot
        // (a large mesh's tables) is dropped here, off the event loops.
        var futures: [EventLoopFuture<(ConfigSnapshot, FilterChain)>] = []
        for c in contexts {
            futures.append(c.loop.submit {
                let filters = natives + c.lua.filters(for: gen)
                let old = (c.snapshot, c.chain)
                c.chain = FilterChain(filters)
                c.snapshot = snap
                c.inboundMTLS = mtls
                c.interception = interception
                return old
            })
        }
        var replaced: [(ConfigSnapshot, FilterChain)] = []
        for f in futures { if let old = try? f.wait() { replaced.append(old) } }
        let decoded = configCache.decodedLastLoad, read = configCache.filesReadLastLoad
        let cpuMs = (Self.threadCPUNanos() - cpuStart) / 1_000_000
        logger.info("configuration applied (\(reason))", metadata: ["version": "\(version)", "plugins": "\(gen.plugins.map(\.spec.name))", "inbound_mtls": "\(mtls.mode.rawValue)",
                                                                  "authorization_policies": "\(authz.policies)", "documents_decoded": "\(decoded)",
                                                                  "files_read": "\(read)", "compile_cpu_ms": "\(cpuMs)"])
        replaced.removeAll()
        return .success(version)
    }

    /// CPU time of the calling thread (nanoseconds): what a reload cost, whatever else the
    /// machine runs (logged as compile_cpu_ms).
    static func threadCPUNanos() -> Int {
        var t = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
        return t.tv_sec * 1_000_000_000 + t.tv_nsec
    }

    /// Files whose change triggers a reload: the YAML and every referenced .lua.
    func fingerprint() -> String {
        var files = settings.configPaths.flatMap { ConfigLoader.yamlFiles(at: $0) }
        files += lock.withLock { snapshot.plugins.map(\.path) }
        if let mesh = settings.meshConfigPath { files.append(mesh) }
        for d in lua.pluginDirs {
            if let items = try? FileManager.default.contentsOfDirectory(atPath: d) {
                files += items.filter { $0.hasSuffix(".lua") }.map { (d as NSString).appendingPathComponent($0) }
            }
        }
        return FileStamp.fingerprint(Set(files).sorted())
    }

    func checkForChanges() {
        let fp = fingerprint()
        guard fp != watchFingerprint else { return }
        watchFingerprint = fp
        reload(reason: "file change")
    }

    // MARK: stats

    /// Merges every loop's metrics shard (each read on its own loop).
    public func metricsSnapshot() -> EventLoopFuture<MetricsSnapshot> {
        let futures = contexts.map { c in c.loop.submit { c.metrics.snapshot() } }
        return EventLoopFuture.reduce(MetricsSnapshot(), futures, on: group.next()) { acc, s in var a = acc; a.merge(s); return a }
    }

    /// /clusters: every cluster of the active snapshot with its circuit counters and,
    /// per endpoint, labels, active requests (summed over loops) and outlier state.
    public func clustersReport(json: Bool) -> EventLoopFuture<String> {
        let snap = currentSnapshot
        let clusters = snap.routes.services.values.sorted { $0.fqdn < $1.fqdn }.flatMap { svc in svc.clusters.values.sorted { $0.name < $1.name } }
        let futures = contexts.map { c in
            c.loop.submit { clusters.map { cl in (0..<cl.endpointCount).map { i -> [Int] in
                let (n, f) = c.balancer.outcomes(cl, i)
                return [c.balancer.activeRequests(cl, i), n, f]
            } } }
        }
        // Per cluster, per endpoint: [active requests, finished, failed], summed over loops.
        return EventLoopFuture.reduce([[[Int]]](repeating: [], count: clusters.count), futures, on: group.next()) { acc, loopCounts in
            var out = acc
            for (i, counts) in loopCounts.enumerated() {
                if out[i].isEmpty { out[i] = counts } else { for k in counts.indices { for m in 0..<3 { out[i][k][m] += counts[k][m] } } }
            }
            return out
        }.map { stats in
            let now = monotonicNanos()
            var text = ""
            var items: [String] = []
            for (ci, cl) in clusters.enumerated() {
                let cc = CircuitRegistry.counters(for: cl)
                let od = OutlierRegistry.state(for: cl)
                let n = cl.name
                text += "\(n)::default_priority::max_connections::\(cl.maxConnections)\n"
                text += "\(n)::default_priority::max_pending_requests::\(cl.maxPendingRequests)\n"
                text += "\(n)::lb_policy::\(cl.policy.rawValue)\n"
                text += "\(n)::cx_active::\(cc.connections.load(ordering: .relaxed))\n"
                text += "\(n)::rq_pending::\(cc.pending.load(ordering: .relaxed))\n"
                text += "\(n)::upstream_rq_pending_overflow::\(cc.overflows.load(ordering: .relaxed))\n"
                var eps: [String] = []
                for i in 0..<cl.endpointCount {
                    let e = cl.endpoint(i)
                    let addr = "\(e.address):\(e.port)"
                    let labels = cl.endpoints[i].labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
                    let until = od?.ejectedUntilNanos(i, now: now)
                    let st = stats[ci].indices.contains(i) ? stats[ci][i] : [0, 0, 0]
                    let rq = st[0]
                    let rate = st[1] == 0 ? "-1" : String(format: "%.1f", Double(st[1] - st[2]) * 100 / Double(st[1]))
                    text += "\(n)::\(addr)::rq_active::\(rq)\n"
                    text += "\(n)::\(addr)::rq_total::\(st[1])\n"
                    text += "\(n)::\(addr)::rq_error::\(st[2])\n"
                    text += "\(n)::\(addr)::success_rate::\(rate)\n"
                    text += "\(n)::\(addr)::health_flags::\(until == nil ? "healthy" : "/failed_outlier_check")\n"
                    if let until { text += "\(n)::\(addr)::ejected_for_ms::\((until - now) / 1_000_000)\n" }
                    text += "\(n)::\(addr)::labels::\(labels)\n"
                    eps.append("{\"address\":\(JSON.quote(addr)),\"labels\":\(JSON.quote(labels)),\"rq_active\":\(rq),\"rq_total\":\(st[1]),\"rq_error\":\(st[2]),\"success_rate\":\(rate),\"ejected\":\(until != nil),\"ejected_for_ms\":\(until.map { String(($0 - now) / 1_000_000) } ?? "null")}")
                }
                items.append("{\"name\":\(JSON.quote(n)),\"lb_policy\":\(JSON.quote(cl.policy.rawValue)),\"max_connections\":\(cl.maxConnections),\"max_pending_requests\":\(cl.maxPendingRequests),\"cx_active\":\(cc.connections.load(ordering: .relaxed)),\"rq_pending\":\(cc.pending.load(ordering: .relaxed)),\"overflow\":\(cc.overflows.load(ordering: .relaxed)),\"endpoints\":[\(eps.joined(separator: ","))]}")
            }
            return json ? "{\"clusters\":[\(items.joined(separator: ","))]}\n" : clusters.isEmpty ? "no clusters\n" : text
        }
    }

    /// Circuit-breaker and outlier counters per cluster, in Prometheus text.
    func clusterMetrics() -> String {
        var o = "# TYPE moonlet_upstream_cx_active gauge\n"
        let circuits = CircuitRegistry.all()
        for (n, c) in circuits { o += "moonlet_upstream_cx_active{cluster=\"\(n)\"} \(c.connections.load(ordering: .relaxed))\n" }
        o += "# TYPE moonlet_upstream_rq_pending_overflow_total counter\n"
        for (n, c) in circuits { o += "moonlet_upstream_rq_pending_overflow_total{cluster=\"\(n)\"} \(c.overflows.load(ordering: .relaxed))\n" }
        o += "# TYPE moonlet_upstream_rq_retry_overflow_total counter\n"
        for (n, c) in circuits { o += "moonlet_upstream_rq_retry_overflow_total{cluster=\"\(n)\"} \(c.retryOverflows.load(ordering: .relaxed))\n" }
        o += "# TYPE moonlet_outlier_ejections_total counter\n"
        for (n, st) in OutlierRegistry.all() { o += "moonlet_outlier_ejections_total{cluster=\"\(n.split(separator: "#").first.map(String.init) ?? n)\"} \(st.totalEjections)\n" }
        return o
    }

    public func luaMemory() -> EventLoopFuture<Int> {
        let futures = contexts.map { c in c.loop.submit { c.lua.vm.memoryUsed } }
        return EventLoopFuture.reduce(0, futures, on: group.next()) { $0 + $1 }
    }

    func activeStreams() -> Int {
        contexts.map { c in (try? c.loop.submit { c.activeStreams }.wait()) ?? 0 }.reduce(0, +)
    }

    public var currentSnapshot: ConfigSnapshot { lock.withLock { snapshot } }
    public var lastError: String? { lock.withLock { lastReloadError } }

    // MARK: shutdown

    /// Stops accepting, lets in-flight streams finish (up to the drain timeout), then
    /// closes everything.
    public func drainAndStop() {
        guard !draining else { return }
        draining = true
        started = false
        logger.info("draining")
        for l in listeners { try? l.close().wait() }
        for c in contexts { c.loop.execute { c.drainConnections() } }
        let deadline = Date().addingTimeInterval(Double(settings.limits.drainTimeoutMs) / 1000)
        while Date() < deadline && activeStreams() > 0 { usleep(20_000) }
        stop()
    }

    public func stop() {
        watchTimer?.cancel()
        certTimer?.cancel()
        lock.withLock { jwksFetcher }?.shutdown()
        JWTProviders.replace([:], for: lua)
        for l in listeners { try? l.close().wait() }
        for a in adminChannels { try? a.close().wait() }
        listeners = []; adminChannels = []
        for c in contexts { try? c.loop.submit { c.pool.closeAll(); c.lua.vm.flushLogs() }.wait() }
        lua.telemetry.close()
        try? group.syncShutdownGracefully()
    }
}

public struct ReloadError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}
