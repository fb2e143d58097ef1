import NIOCore
import MoonletCore
import MoonletConfig
import MoonletLua
import MoonletTelemetry
import MoonletBalancer
import MoonletTLS
import Logging

/// A connection whose writes are flushed at the end of the loop's batch of I/O events.
protocol DeferredFlush: AnyObject {
    /// Whether the connection is in its loop's flush queue now.
    var flushQueued: Bool { get set }
    /// Flushes the connection's pending writes (at the end of the batch).
    func flushNow()
}

/// Everything one event loop owns: its metrics shard, its Lua VM, its filter chain
/// (swapped on reload, on this loop), its upstream pool and its stream counters.
/// Touched only from the loop's thread.
/// Sendable only in the sense that it is handed to its own loop's closures; it is never used off that loop.
public final class LoopContext: @unchecked Sendable {
    public let loop: EventLoop
    public let metrics = MetricsShard()
    public let lua: LuaLoopRuntime
    /// Load-balancing counters of this loop.
    public let balancer = BalancerState()
    public internal(set) var chain: FilterChain = .empty
    public internal(set) var snapshot: ConfigSnapshot = .empty
    /// The workload certificate and its TLS contexts (nil without --certs); swapped on
    /// this loop when the files rotate, so new handshakes use the new certificate.
    public internal(set) var tls: TLSMaterial?
    /// The PeerAuthentication mode of the inbound port, resolved at each config load.
    public internal(set) var inboundMTLS = EffectiveMTLS(mode: .permissive, source: "default")
    /// Interception settings of the configuration in force (TCPProxy.swift).
    var interception = InterceptionConfig()
    /// Inbound routes by intercepted app port (LoopContext.inboundRouteFor(port:)).
    var inboundRoutesByPort: [Int: RouteDecision] = [:]
    /// The ports the proxy's listeners are bound to (set once they are): a connection
    /// there would loop.
    var listenerPorts: [Int] = []
    /// The admin API's bound port (0 before it is bound, or when it is off): a Lua
    /// `moonlet.http.call` to it on a local address is refused.
    var adminPort = 0
    /// Refused-handshake log lines left in the current second (a flood of bad peers
    /// must not flood the log).
    var tlsLogBudget = 0
    var tlsLogSecond: UInt64 = 0
    let pool: UpstreamPool
    let settings: ProxySettings
    let logger: Logger
    var nextStreamID: UInt64
    var activeStreams = 0
    /// The proxy drains (SIGTERM): every response says `connection: close`.
    var draining = false
    var activeConnections = 0
    /// Downstream handlers alive on this loop (connections and HTTP/2 streams): returns
    /// to zero once they close, or memory is being kept.
    var liveHandlers = 0
    /// Request-id generator: seeded once from the system, no syscall per request.
    var rng = Xoshiro256(seed: SystemRandomNumberGenerator())

    /// Output buffers the loop's streams reuse for the heads they write (the request
    /// head to the upstream, the response head with a small body to the client): two
    /// allocations fewer per request. At most 64 of up to 16 KB each are kept, so the
    /// pool stays small however many connections are open. Value semantics keep reuse
    /// safe: a buffer a pending write still holds is copied on its next use, never
    /// overwritten.
    var spareBuffers: [ByteBuffer] = []
    /// Upstream dispatchers of handlers gone, for the next ones (a handler per HTTP/2
    /// stream then costs no dispatcher allocation).
    var spareDispatchers: [UpstreamDispatcher] = []
    /// Buffers given back while their writes wait for the end of the batch: they join
    /// the pool once flushed (reused earlier, each would be copied).
    var recycledInBatch: [ByteBuffer] = []
    let allocator = ByteBufferAllocator()

    /// Connections (client and upstream) with writes waiting for the end of the loop's
    /// current batch of I/O events. NIO runs a task submitted from the loop after it
    /// has handled every ready socket of the batch, so one task per batch flushes them
    /// all: the writes of many streams leave together. See DownstreamHandler "writes".
    var deferredFlushes: [any DeferredFlush] = []
    var flushTaskQueued = false
    lazy var flushTask: () -> Void = { self.flushDeferred() }

    /// Client connections whose request-header and idle deadlines one repeating task per
    /// loop checks (see `watch`). A scheduled task per connection, armed when it opens
    /// and cancelled when it closes, cost about 6% of a short connection's CPU (an
    /// allocation, a promise and a heap insert and removal each time); here a connection
    /// is watched by an append and a swap-remove, and a deadline is a plain field.
    var watched: [DownstreamHandler] = []
    var watchTask: RepeatedTask?

    /// How often deadlines are checked: an eighth of the shortest timeout, between 10 ms
    /// and 1 s (so a timeout fires at most that much late).
    var watchTickMs: Int64 {
        let l = settings.limits
        let shortest = [l.requestHeaderTimeoutMs, l.requestBodyIdleTimeoutMs, l.requestTimeoutMs, l.downstreamIdleTimeoutMs].filter { $0 > 0 }.min() ?? 8000
        return Int64(min(1000, max(10, shortest / 8)))
    }

    /// Starts checking `h`'s deadlines (on its loop, when its connection opens).
    func watch(_ h: DownstreamHandler) {
        guard h.watchIndex < 0 else { return }
        h.watchIndex = watched.count
        watched.append(h)
        if watchTask == nil {
            let tick = TimeAmount.milliseconds(watchTickMs)
            // Strong: the task lives as long as the loop, like this context.
            watchTask = loop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { _ in self.checkDeadlines() }
        }
    }

    /// Stops checking `h` (its connection closed).
    func unwatch(_ h: DownstreamHandler) {
        let i = h.watchIndex
        guard i >= 0, i < watched.count, watched[i] === h else { return }
        let last = watched.removeLast()
        if last !== h { watched[i] = last; last.watchIndex = i }
        h.watchIndex = -1
    }

    /// SIGTERM: every client connection learns that the proxy goes away. HTTP/2 gets
    /// GOAWAY (NO_ERROR: streams it opened later are refused, and the connection closes
    /// after its last stream); HTTP/1.1 closes after the response in flight, and an idle
    /// keep-alive connection gets `connection: close` on its next response.
    func drainConnections() {
        draining = true
        for h in watched { h.drain() }
    }

    /// Runs every watched connection's deadline check; one that closes leaves the list
    /// (its place taken by the last one, which is checked next).
    func checkDeadlines() {
        let now = NIODeadline.now().uptimeNanoseconds
        var i = 0
        while i < watched.count {
            let h = watched[i]
            h.checkDeadlines(now: now)
            if i < watched.count && watched[i] === h { i += 1 }
        }
    }

    /// Queues a flush of `f` for the end of the current batch (once, however many
    /// writes). Called on the loop only.
    @inline(__always)
    func flushLater(_ f: any DeferredFlush) {
        f.flushQueued = true
        deferredFlushes.append(f)
        if !flushTaskQueued { flushTaskQueued = true; loop.execute(flushTask) }
    }

    /// Flushes every queued connection, in the order queued (a flush that queues
    /// another is served in the same pass), then pools the buffers given back meanwhile.
    func flushDeferred() {
        var i = 0
        while i < deferredFlushes.count {
            let f = deferredFlushes[i]
            f.flushQueued = false
            f.flushNow()
            i += 1
        }
        deferredFlushes.removeAll(keepingCapacity: true)
        flushTaskQueued = false
        for b in recycledInBatch where spareBuffers.count < 64 { spareBuffers.append(b) }
        recycledInBatch.removeAll(keepingCapacity: true)
    }

    /// A dispatcher for a new handler, from the pool when it has one.
    @inline(__always)
    func takeDispatcher() -> UpstreamDispatcher {
        spareDispatchers.popLast() ?? UpstreamDispatcher(ctx: self)
    }

    /// A gone handler's dispatcher, reset, back to the pool (bounded).
    func giveBack(_ d: UpstreamDispatcher) {
        guard spareDispatchers.count < 256 else { return }
        d.reset()
        spareDispatchers.append(d)
    }

    /// An empty buffer of at least `capacity` bytes, from the pool when it has one.
    @inline(__always)
    func outputBuffer(capacity: Int) -> ByteBuffer {
        guard var b = spareBuffers.popLast() else { return allocator.buffer(capacity: capacity) }
        b.clear(minimumCapacity: capacity)
        return b
    }

    /// Gives a written buffer back to the pool (dropped when the pool is full or the buffer large).
    @inline(__always)
    func recycle(_ b: ByteBuffer) {
        guard b.capacity <= 16 * 1024 + 4096 else { return }
        if flushTaskQueued { if recycledInBatch.count < 64 { recycledInBatch.append(b) } }
        else if spareBuffers.count < 64 { spareBuffers.append(b) }
    }
    /// The inbound listener's fixed route, built once.
    let inboundRoute: RouteDecision
    let inboundKey: String
    let inboundService: String
    /// Peer workloads decoded from x-envoy-peer-metadata on this loop (PeerExchange).
    let peerCache = PeerMetadataCache()
    /// This sidecar's workload, as Istio's metric labels name it (TCP connections' series).
    lazy var ownWorkload: MeshWorkload = {
        let id = settings.identity
        return MeshWorkload(workload: id.effectiveWorkloadName, namespace: id.namespace, labels: id.labels,
                            cluster: id.clusterID, serviceAccount: id.serviceAccount, serial: 0)
    }()
    /// This sidecar's x-envoy-peer-metadata and x-envoy-peer-metadata-id values.
    let ownPeerMetadata: String
    let ownPeerID: String
    /// This sidecar's TCP metadata exchange header (TCPMetadataExchange), made once.
    let ownExchangeHeader: [UInt8]

    init(loop: EventLoop, index: Int, settings: ProxySettings, host: LuaHost, logger: Logger) {
        self.loop = loop
        self.settings = settings
        self.logger = logger
        lua = LuaLoopRuntime(host: host, metrics: metrics)
        pool = UpstreamPool(loop: loop, limits: settings.limits)
        nextStreamID = UInt64(index) << 48 | 1
        var r = RouteDecision()
        r.cluster = "inbound|\(settings.appPort)||"
        r.host = "127.0.0.1"
        r.port = settings.appPort
        inboundRoute = r
        inboundKey = "127.0.0.1:\(settings.appPort)"
        inboundService = settings.identity.labels["app"] ?? "unknown"
        let id = settings.identity
        let meta = PeerMetadata(name: id.podName.isEmpty ? id.effectiveWorkloadName : id.podName, namespace: id.namespace,
                                workloadName: id.effectiveWorkloadName, serviceAccount: id.serviceAccount, clusterID: id.clusterID, labels: id.labels)
        ownPeerMetadata = meta.encoded()
        ownPeerID = meta.nodeID(ip: id.instanceIP.isEmpty ? settings.bindAddress : id.instanceIP)
        ownExchangeHeader = TCPMetadataExchange.header(meta, id: ownPeerID)
        pool.onHTTP2Session = { [unowned self] in self.metrics.count("moonlet_upstream_cx_http2_total") }
        // moonlet.http.call goes out through this loop's pool (HTTPCallout.swift).
        lua.vm.httpClient = LoopHTTPClient(ctx: self)
        lua.vm.eventLoop = loop     // moonlet.timer callbacks run on this loop
        lua.vm.maxBufferedBodyBytes = settings.limits.maxBufferedBodyBytes
        pool.onTLSFailure = { [unowned self] address, expected, why in
            self.metrics.count("moonlet_upstream_tls_failures_total")
            if self.mayLogTLSRefusal() { self.logger.warning("upstream TLS with \(address.ipAddress ?? "?"):\(address.port ?? 0) refused: \(why) (expected \(expected))") }
        }
    }

    /// Whether a refused-handshake line may be logged now (at most 10 a second per loop).
    func mayLogTLSRefusal() -> Bool {
        let sec = NIODeadline.now().uptimeNanoseconds / 1_000_000_000
        if sec != tlsLogSecond { tlsLogSecond = sec; tlsLogBudget = 10 }
        guard tlsLogBudget > 0 else { return false }
        tlsLogBudget -= 1
        return true
    }

    /// A new x-request-id line (UUID v4, written as text where the head is written).
    func requestIDLine() -> HeaderLine { HeaderLine("x-request-id", uuid: rng.next(), rng.next()) }
}

/// Settings of a running proxy (from flags and environment).
public struct ProxySettings: Sendable {
    public var inboundPort = 15006
    public var outboundPort = 15001
    public var adminPort = 15000
    public var prometheusPort = 15090
    public var healthPort = 15021
    public var appPort = 8080
    public var bindAddress = "127.0.0.1"
    /// Address of the admin API (15000): loopback unless opened explicitly (--admin-bind).
    public var adminBindAddress = "127.0.0.1"
    public var concurrency = System.coreCount
    public var identity = WorkloadIdentity()
    public var limits = ProxyLimits()
    public var configPaths: [String] = []
    /// How often the config directory and plugin files are checked for changes.
    public var watchIntervalMs = 500
    /// Directory with cert-chain.pem, key.pem and root-cert.pem (Istio's file names);
    /// nil: no workload certificate (plaintext only).
    public var certsDirectory: String?
    /// `moonlet ca serve` address ("host:port"): the sidecar gets and renews its
    /// certificate there (into certsDirectory), Istio's CSR flow.
    public var caAddress: String?
    /// Bootstrap token file presented to the CA before the first certificate exists.
    public var caTokenFile: String?
    /// Key type of CSRs sent to the CA.
    public var csrKeyType = "ecdsa-p256"
    /// The SAN the CA must present (nil: its SPIFFE id, spiffe://<td>/ns/istio-system/sa/moonlet-ca,
    /// or the CA address's host when that is a DNS name).
    public var caIdentity: String?
    /// Trust domain, aliases and mesh mTLS policy (mesh config).
    public var meshTLS = MeshTLSSettings()
    /// Mesh config keys read but not applied (logged at start).
    public var meshConfigNotApplied: [String] = []
    /// The mesh config file (--mesh-config): watched with the config files and re-read at
    /// every reload; `meshTLS`, `identity.rootNamespace` and `meshConfigNotApplied` are
    /// then the start-time values only (ProxyServer.currentMeshConfig is the one in force).
    public var meshConfigPath: String?
    /// --trust-domain / TRUST_DOMAIN: wins over the mesh config's trustDomain at every reload.
    public var trustDomainOverride: String?
    /// Lua budgets and the caps of memory Lua holds outside its VMs (shared dicts, metric names).
    public var luaLimits = LuaLimits()
    /// The inbound listener is IP_TRANSPARENT and intercepted connections' original
    /// destination is their local address (istio-iptables TPROXY mode); otherwise it is
    /// read with SO_ORIGINAL_DST (REDIRECT).
    public var inboundTPROXY = false
    /// Tests: gives the original destination of an accepted connection instead of the
    /// socket (nil: not intercepted).
    public var originalDestinationOverride: (@Sendable (_ role: ListenerRole, _ local: SocketAddress?) -> SocketAddress?)?
    /// Bytes of access log lines one file's writer may have queued (a slow or stuck disk):
    /// past it lines are dropped and counted in moonlet_access_log_dropped_lines_total.
    /// Default 8 MB, at least 64 KB.
    public var accessLogMaxQueuedBytes = 8 << 20
    public init() {}
}

