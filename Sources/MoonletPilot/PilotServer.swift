import NIOCore
import NIOPosix
import NIOHTTP1
import NIOSSL
import NIOConcurrencyHelpers
import MoonletCore
import MoonletConfig
import MoonletTLS
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet pilot`: Istio's Galley and Pilot roles at small scale. Watches a config
/// directory, validates each change (an invalid one is not served: the last good version
/// stays, and the error shows on `/status` and in the log), and serves the validated set to
/// sidecars by HTTP long-poll (`PilotProtocol`). Sidecars ACK or NACK each version;
/// `/status` lists them. With `certsDirectory`, the listener is mutual TLS with the mesh
/// certificates: a sidecar must present a mesh identity, and may ask only for its own
/// namespace and service account.
public final class PilotServer: @unchecked Sendable {
    public struct Settings: Sendable {
        public var configDirectory: String
        /// cert-chain.pem, key.pem, root-cert.pem (pilot's own mesh identity); nil: plaintext.
        public var certsDirectory: String?
        public var meshTLS = MeshTLSSettings()
        /// How often the directory (and the certificates) are checked for changes.
        public var watchIntervalMs = 500
        /// Connections served at once (each sidecar holds one while it waits); more are refused.
        public var maxConnections = 4096
        /// Time to finish the TLS handshake and send a request head.
        public var requestTimeout: TimeAmount = .seconds(10)
        /// A sidecar not seen for this long is listed as stale on `/status` (dropped after 10 times as long).
        public var staleAfterSeconds: Double = 120
        /// Istio's root namespace: its Sidecar without a selector is every workload's
        /// default, its policies apply to every workload (per-sidecar scope).
        public var rootNamespace = "istio-system"
        public init(configDirectory: String, certsDirectory: String? = nil) {
            self.configDirectory = configDirectory; self.certsDirectory = certsDirectory
        }
    }

    /// What pilot knows of one sidecar (shown on `/status`).
    public struct SidecarRecord: Sendable {
        public var node: String
        /// namespace/service-account (from its certificate under mTLS, else as it says).
        public var workload: String
        /// Its SPIFFE id under mTLS.
        public var identity: String?
        public var labels: [String: String]
        public var address: String
        public var appliedVersion: Int?
        public var appliedHash: String?
        public var lastAckVersion: Int?
        public var lastNack: (version: Int, hash: String, error: String, at: Date)?
        public var lastSeen: Date
        /// A long-poll is held for it now.
        public var waiting: Int
    }

    public let settings: Settings
    let log: @Sendable (String) -> Void
    /// The part of the validated set one sidecar gets (called per request, possibly under
    /// the state lock: it takes only its own). By default `sidecarScope`: what the
    /// `Sidecar` resource selecting the node's workload imports (PushScopeIndex). A test
    /// may replace it before `bind`.
    public var scope: @Sendable (PilotNode, PilotConfigSet) -> PilotConfigSet = { _, set in set }

    /// The scoped sets handed out, per workload (namespace and labels): the version a
    /// workload's set carries is the one at which its content last changed, so that a
    /// change outside its scope is not pushed to it.
    struct ScopeCache {
        var setHash = ""
        var index: PushScopeIndex?
        var byWorkload: [String: (computedFor: Int, set: PilotConfigSet)] = [:]
    }
    let scopeCache = NIOLockedValueBox(ScopeCache())

    struct State {
        var current: PilotConfigSet?
        var validatedAt: Date?
        var lastError: (message: String, at: Date)?
        var fingerprint = ""
        var sidecars: [String: SidecarRecord] = [:]
        var waiters: [ObjectIdentifier: Waiter] = [:]
        var tls: TLSMaterial?
        var tlsError: String?
        var open = 0
        /// Open connections, closed with the listener.
        var connections: [ObjectIdentifier: Channel] = [:]
    }
    let state = NIOLockedValueBox(State())
    var timer: DispatchSourceTimer?
    let startedAt = Date()

    public init(settings: Settings, log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.settings = settings; self.log = log
        scope = { [weak self] node, set in self?.sidecarScope(node, set) ?? set }
    }

    /// What `node` receives of `set`: the documents in its Sidecar's scope (all of `set`
    /// when no Sidecar narrows it), with the version at which that content last changed.
    public func sidecarScope(_ node: PilotNode, _ set: PilotConfigSet) -> PilotConfigSet {
        let key = node.namespace + "\u{0}" + node.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
        // The index of this set (made by `refresh`; made here when a caller's set is another).
        let cached = scopeCache.withLockedValue { c -> (PilotConfigSet?, PushScopeIndex?) in
            guard c.setHash == set.hash else { return (nil, nil) }
            if let e = c.byWorkload[key], e.computedFor == set.version { return (e.set, c.index) }
            return (nil, c.index)
        }
        if let done = cached.0 { return done }
        var index = cached.1
        if index == nil {
            let made = PushScopeIndex(files: set.files.map { ($0.path, $0.content) })
            scopeCache.withLockedValue { c in
                if c.setHash != set.hash { c.setHash = set.hash; c.index = made }
            }
            index = made
        }
        let id = WorkloadIdentity(namespace: node.namespace, serviceAccount: node.serviceAccount, labels: node.labels, rootNamespace: settings.rootNamespace)
        var scoped = set
        if let files = index!.files(for: id) {
            scoped = PilotConfigSet(version: set.version, files: files.map { PilotFile(path: $0.path, content: $0.content) })
        }
        return scopeCache.withLockedValue { c in
            // Unchanged content keeps the version the workload already has.
            if let prev = c.byWorkload[key]?.set, prev.hash == scoped.hash, prev.version <= scoped.version { scoped = prev }
            if c.setHash == set.hash {
                if c.byWorkload.count >= 65_536 { c.byWorkload = [:] }
                c.byWorkload[key] = (set.version, scoped)
            }
            return scoped
        }
    }

    // MARK: configuration

    /// The set served now (nil until a valid one was read).
    public var current: PilotConfigSet? { state.withLockedValue { $0.current } }
    /// The last validation error, nil once a valid version replaced it.
    public var lastError: String? { state.withLockedValue { $0.lastError?.message } }
    public var sidecars: [SidecarRecord] { state.withLockedValue { Array($0.sidecars.values) }.sorted { $0.node < $1.node } }

    /// Files whose change triggers a re-read: YAML and Lua under the directory.
    func fingerprint() -> String {
        let dir = settings.configDirectory
        var files = ConfigLoader.yamlFiles(at: dir)
        if let e = FileManager.default.enumerator(atPath: dir) {
            for case let rel as String in e where rel.hasSuffix(".lua") && !rel.hasPrefix("..") { files.append((dir as NSString).appendingPathComponent(rel)) }
        }
        return FileStamp.fingerprint(files.sorted())
    }

    /// Reads and validates the directory; a valid set whose content changed becomes the
    /// next version and wakes every waiting sidecar. Returns the error of an invalid set.
    @discardableResult
    public func refresh(reason: String) -> ConfigErrors? {
        let fp = fingerprint()
        let next = (state.withLockedValue { $0.current?.version } ?? 0) + 1
        var notes: [String] = []
        switch PilotConfigSet.load(dir: settings.configDirectory, version: next, notes: &notes) {
        case .failure(let e):
            let first = state.withLockedValue { s -> Bool in
                s.fingerprint = fp
                let isNew = s.lastError?.message != e.description
                s.lastError = (e.description, Date())
                return isNew
            }
            if first {
                let keeping = current.map { "keeping version \($0.version)" } ?? "nothing served yet"
                log("pilot: configuration rejected (\(reason)); \(keeping):\n\(e.description)")
            }
            return e
        case .success(let set):
            // The per-sidecar index of a new content, ready before any sidecar is woken.
            if scopeCache.withLockedValue({ $0.setHash }) != set.hash {
                let index = PushScopeIndex(files: set.files.map { ($0.path, $0.content) })
                scopeCache.withLockedValue { c in c.setHash = set.hash; c.index = index }
            }
            let (changed, recovered, waiters) = state.withLockedValue { s -> (Bool, Bool, [Waiter]) in
                s.fingerprint = fp
                let recovered = s.lastError != nil
                s.lastError = nil
                if s.current?.hash == set.hash { return (false, recovered, []) }
                s.current = set
                s.validatedAt = Date()
                let w = Array(s.waiters.values)
                s.waiters = [:]
                return (true, recovered, w)
            }
            if changed {
                for n in notes { log("pilot: note: \(n)") }
                log("pilot: serving version \(set.version) (\(set.files.count) files, hash \(set.hash.prefix(12))) (\(reason)); \(waiters.count) sidecars waiting")
            } else if recovered {
                log("pilot: configuration valid again (\(reason)); still serving version \(current?.version ?? 0)")
            }
            for w in waiters { w.wake() }
            return nil
        }
    }

    func checkForChanges() {
        if fingerprint() != state.withLockedValue({ $0.fingerprint }) { refresh(reason: "file change") }
        loadCertificates(initial: false)
        expireSidecars()
    }

    func expireSidecars() {
        let limit = Date().addingTimeInterval(-settings.staleAfterSeconds * 10)
        state.withLockedValue { s in s.sidecars = s.sidecars.filter { $0.value.waiting > 0 || $0.value.lastSeen > limit } }
    }

    /// (Re)loads pilot's certificate when its files changed. A broken rotation keeps the
    /// last good certificate (logged).
    func loadCertificates(initial: Bool) {
        guard let dir = settings.certsDirectory else { return }
        let fp = TLSMaterial.fingerprint(dir: dir)
        if !initial, state.withLockedValue({ $0.tls?.fingerprint }) == fp { return }
        do {
            let m = try TLSMaterial.load(dir: dir, mesh: settings.meshTLS)
            state.withLockedValue { $0.tls = m; $0.tlsError = nil }
            log("pilot: serving mutual TLS as \(m.identity.uri) (valid until \(m.notAfter))")
        } catch {
            let msg = "\(error)"
            let isNew = state.withLockedValue { s -> Bool in defer { s.tlsError = msg }; return s.tlsError != msg }
            if isNew { log("pilot: certificate in \(dir) not loaded\(initial ? "" : ", keeping the last good one"): \(msg)") }
        }
    }

    // MARK: serving

    /// Validates the directory, starts watching it and binds the listener. Returns the
    /// channel (its localAddress has the port). Without a valid configuration pilot still
    /// starts (serving nothing until one is valid: `/healthz/ready` says 503).
    public func bind(group: EventLoopGroup, host: String, port: Int) throws -> Channel {
        loadCertificates(initial: true)
        if settings.certsDirectory != nil, state.withLockedValue({ $0.tls }) == nil {
            throw PilotError("--certs: \(state.withLockedValue { $0.tlsError } ?? "no certificate")")
        }
        refresh(reason: "start")
        let t = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "moonlet.pilot-watch"))
        t.schedule(deadline: .now() + .milliseconds(settings.watchIntervalMs), repeating: .milliseconds(settings.watchIntervalMs))
        t.setEventHandler { [weak self] in self?.checkForChanges() }
        t.resume()
        timer = t
        let ch = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(ChannelOptions.backlog, value: 1024)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    let address = ch.remoteAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? "?"
                    let admitted = self.state.withLockedValue { s -> Bool in
                        guard s.open < self.settings.maxConnections else { return false }
                        s.open += 1
                        return true
                    }
                    guard admitted else {
                        self.logLimited("pilot: connection from \(address) refused: \(self.settings.maxConnections) connections open")
                        ch.close(promise: nil)
                        return
                    }
                    let key = ObjectIdentifier(ch)
                    self.state.withLockedValue { $0.connections[key] = ch }
                    ch.closeFuture.whenComplete { _ in self.state.withLockedValue { $0.open -= 1; $0.connections[key] = nil } }
                    let peer = PeerBox()
                    let sync = ch.pipeline.syncOperations
                    if self.settings.certsDirectory != nil {
                        guard let m = self.state.withLockedValue({ $0.tls }) else { ch.close(promise: nil); return }
                        try sync.addHandler(try m.makeServerHandler { id in peer.id = id })
                    }
                    try sync.configureHTTPServerPipeline(withErrorHandling: true)
                    try sync.addHandler(PilotHTTPHandler(server: self, peer: peer, address: address))
                }
            }
            .bind(host: host, port: port).wait()
        // Closing the listener stops pilot: the watcher and every open connection (held
        // polls included) end with it, as when the process exits.
        ch.closeFuture.whenComplete { _ in
            self.stopWatching()
            for c in self.state.withLockedValue({ Array($0.connections.values) }) { c.close(promise: nil) }
        }
        return ch
    }

    /// Lines about callers (refusals, failed handshakes) logged per second; the rest are
    /// counted and reported with the next line that passes.
    static let callerLinesPerSecond = 20
    let logBudget = NIOLockedValueBox((second: 0, left: 0, suppressed: 0))

    /// Logs a line about a caller unless `callerLinesPerSecond` were logged this second (a
    /// misbehaving client must not flood the log).
    func logLimited(_ line: String) {
        let now = Int(Date().timeIntervalSince1970)
        let (ok, suppressed) = logBudget.withLockedValue { b -> (Bool, Int) in
            if b.second != now { b.second = now; b.left = Self.callerLinesPerSecond }
            guard b.left > 0 else { b.suppressed += 1; return (false, 0) }
            b.left -= 1
            defer { b.suppressed = 0 }
            return (true, b.suppressed)
        }
        guard ok else { return }
        if suppressed > 0 { log("pilot: \(suppressed) lines about callers suppressed (more than \(Self.callerLinesPerSecond) a second)") }
        log(line)
    }

    public func stopWatching() {
        timer?.cancel()
        timer = nil
        let waiters = state.withLockedValue { s -> [Waiter] in defer { s.waiters = [:] }; return Array(s.waiters.values) }
        for w in waiters { w.wake() }
    }

    final class PeerBox: @unchecked Sendable { var id: SpiffeID? }

    /// One held long-poll, woken (on its loop) by a new version or its timeout.
    final class Waiter: @unchecked Sendable {
        let loop: EventLoop
        let onWake: () -> Void
        init(loop: EventLoop, onWake: @escaping () -> Void) { self.loop = loop; self.onWake = onWake }
        func wake() { loop.execute(onWake) }
    }

    /// An answer: status, content type and body.
    struct Reply { var status: HTTPResponseStatus; var type = "application/json"; var body: String }

    static func error(_ s: HTTPResponseStatus, _ msg: String) -> Reply { Reply(status: s, body: "{\"error\":\(JSON.quote(msg))}\n") }

    /// The node a config request names, checked against the peer's certificate under mTLS.
    func node(from q: [String: String], peer: SpiffeID?) -> Result<PilotNode, PilotError> {
        guard let id = q["node"], !id.isEmpty, id.utf8.count <= 253 else { return .failure(PilotError("the node query parameter (the sidecar's node id) is required")) }
        var n = PilotNode(id: id, namespace: q["namespace"] ?? "default", serviceAccount: q["service_account"] ?? "default")
        do { n.labels = try WorkloadIdentity.parseLabels(q["labels"] ?? "") } catch { return .failure(PilotError("labels: \(error)")) }
        if settings.certsDirectory != nil {
            guard let p = peer else { return .failure(PilotError("no verified mesh identity")) }
            if q["namespace"] == nil { n.namespace = p.namespace }
            if q["service_account"] == nil { n.serviceAccount = p.serviceAccount }
            guard p.namespace == n.namespace, p.serviceAccount == n.serviceAccount else {
                return .failure(PilotError("\(p.uri) may not ask for the configuration of \(n.workload)"))
            }
        }
        return .success(n)
    }

    /// Records that `node` was seen (a poll, with what it says it applied).
    func seen(_ n: PilotNode, peer: SpiffeID?, address: String, applied: (Int, String)?, waitingDelta: Int) {
        state.withLockedValue { s in
            var r = s.sidecars[n.id] ?? SidecarRecord(node: n.id, workload: n.workload, identity: nil, labels: [:], address: address, lastSeen: Date(), waiting: 0)
            r.workload = n.workload; r.identity = peer?.uri; r.labels = n.labels; r.address = address
            r.lastSeen = Date()
            if let (v, h) = applied { r.appliedVersion = v; r.appliedHash = h }
            r.waiting = max(0, r.waiting + waitingDelta)
            s.sidecars[n.id] = r
        }
    }

    /// Whether the sidecar lacks `set` (so it is answered now rather than held).
    static func differs(_ set: PilotConfigSet, version: Int?, hash: String?) -> Bool { set.version != version || set.hash != hash }

    func ack(_ a: PilotAck, peer: SpiffeID?, address: String) -> Reply {
        let outcome = state.withLockedValue { s -> Reply? in
            guard var r = s.sidecars[a.node] else { return Self.error(.notFound, "unknown node \(a.node): poll \(PilotProtocol.configPath) first") }
            if settings.certsDirectory != nil, r.identity != peer?.uri {
                return Self.error(.forbidden, "\(peer?.uri ?? "no identity") may not acknowledge for node \(a.node) (\(r.identity ?? "?"))")
            }
            r.lastSeen = Date(); r.address = address
            if let e = a.error {
                r.lastNack = (a.version, a.hash, String(e.prefix(4096)), Date())
            } else {
                r.lastAckVersion = a.version
                r.appliedVersion = a.version; r.appliedHash = a.hash
            }
            s.sidecars[a.node] = r
            return nil
        }
        if let outcome { return outcome }
        if let e = a.error {
            log("pilot: NACK from \(LogText.escape(a.node)) for version \(a.version): \(LogText.escape(e))")
        } else {
            log("pilot: ACK from \(LogText.escape(a.node)) for version \(a.version)")
        }
        return Reply(status: .ok, body: "{}\n")
    }

    /// `/status`: the served version, the validation state and every sidecar, as JSON.
    public func statusJSON(now: Date = Date()) -> String {
        let s = state.withLockedValue { $0 }
        func time(_ d: Date?) -> String { d.map { JSON.quote(ISO8601DateFormatter().string(from: $0)) } ?? "null" }
        var o = "{\"version\":\(s.current.map { String($0.version) } ?? "null"),\"hash\":\(s.current.map { JSON.quote($0.hash) } ?? "null")"
        o += ",\"files\":\(s.current?.files.count ?? 0),\"validated_at\":\(time(s.validatedAt)),\"started_at\":\(time(startedAt))"
        o += ",\"last_error\":" + (s.lastError.map { "{\"message\":\(JSON.quote($0.message)),\"at\":\(time($0.at))}" } ?? "null")
        o += ",\"mtls\":\(settings.certsDirectory != nil),\"identity\":\(s.tls.map { JSON.quote($0.identity.uri) } ?? "null")"
        o += ",\"certificate_error\":\(s.tlsError.map(JSON.quote) ?? "null")"
        var items: [String] = []
        for r in s.sidecars.values.sorted(by: { $0.node < $1.node }) {
            // In sync: it applied what it gets of the current set (its scope).
            let parts = r.workload.split(separator: "/", maxSplits: 1).map(String.init)
            let node = PilotNode(id: r.node, namespace: parts.first ?? "default", serviceAccount: parts.count > 1 ? parts[1] : "default", labels: r.labels)
            let inSync = s.current.map { r.appliedHash == scope(node, $0).hash } ?? false
            let nack = r.lastNack.map { "{\"version\":\($0.version),\"hash\":\(JSON.quote($0.hash)),\"error\":\(JSON.quote($0.error)),\"at\":\(time($0.at))}" } ?? "null"
            let labels = r.labels.sorted { $0.key < $1.key }.map { "\(JSON.quote($0.key)):\(JSON.quote($0.value))" }.joined(separator: ",")
            items.append("{\"node\":\(JSON.quote(r.node)),\"workload\":\(JSON.quote(r.workload)),\"identity\":\(r.identity.map(JSON.quote) ?? "null"),"
                + "\"labels\":{\(labels)},\"address\":\(JSON.quote(r.address)),\"applied_version\":\(r.appliedVersion.map(String.init) ?? "null"),"
                + "\"applied_hash\":\(r.appliedHash.map(JSON.quote) ?? "null"),\"in_sync\":\(inSync),\"last_nack\":\(nack),"
                + "\"last_seen\":\(time(r.lastSeen)),\"connected\":\(r.waiting > 0),\"stale\":\(now.timeIntervalSince(r.lastSeen) > settings.staleAfterSeconds && r.waiting == 0)}")
        }
        o += ",\"sidecars\":[\(items.joined(separator: ","))]}\n"
        return o
    }

    /// One connection: one request, one response, then close (a long-poll holds the
    /// request until a version or its timeout).
    final class PilotHTTPHandler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let server: PilotServer
        let peer: PeerBox
        let address: String
        var head: HTTPRequestHead?
        var body = ByteBuffer()
        var answered = false
        var waiter: Waiter?
        var waitTimer: Scheduled<Void>?
        var headTimer: Scheduled<Void>?
        var waitingNode: PilotNode?
        init(server: PilotServer, peer: PeerBox, address: String) { self.server = server; self.peer = peer; self.address = address }

        func handlerAdded(context: ChannelHandlerContext) {
            let ch = context.channel
            headTimer = context.eventLoop.scheduleTask(in: server.settings.requestTimeout) { ch.close(promise: nil) }
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h; body.clear()
            case .body(var b):
                if body.readableBytes + b.readableBytes > 65536 { respond(context, PilotServer.error(.payloadTooLarge, "body over 64 KiB")); return }
                body.writeBuffer(&b)
            case .end:
                headTimer?.cancel()
                guard let h = head, !answered else { return }
                handle(context, h)
            }
        }

        func handle(_ context: ChannelHandlerContext, _ h: HTTPRequestHead) {
            let (path, q) = Query.parse(h.uri)
            switch (h.method, path) {
            case (.GET, PilotProtocol.configPath): poll(context, q)
            case (.POST, PilotProtocol.ackPath):
                guard let a = try? JSONDecoder().decode(PilotAck.self, from: Data(body.readableBytesView)) else {
                    respond(context, PilotServer.error(.badRequest, "body must be JSON {\"node\",\"version\",\"hash\",\"error\"}")); return
                }
                respond(context, server.ack(a, peer: peer.id, address: address))
            case (.GET, PilotProtocol.statusPath): respond(context, Reply(status: .ok, body: server.statusJSON()))
            case (.GET, PilotProtocol.readyPath):
                respond(context, server.current == nil ? Reply(status: .serviceUnavailable, type: "text/plain", body: "no valid configuration yet\n")
                                                      : Reply(status: .ok, type: "text/plain", body: "ready\n"))
            case (_, PilotProtocol.configPath), (_, PilotProtocol.ackPath), (_, PilotProtocol.statusPath):
                respond(context, PilotServer.error(.methodNotAllowed, "method \(h.method) not allowed on \(path)"))
            default: respond(context, PilotServer.error(.notFound, "unknown path \(LogText.escape(path))"))
            }
        }

        func poll(_ context: ChannelHandlerContext, _ q: [String: String]) {
            let node: PilotNode
            switch server.node(from: q, peer: peer.id) {
            case .success(let n): node = n
            case .failure(let e):
                server.logLimited("pilot: config request from \(address) refused: \(LogText.escape(e.description))")
                respond(context, PilotServer.error(peer.id == nil && server.settings.certsDirectory != nil ? .unauthorized : (e.description.contains("may not") ? .forbidden : .badRequest), e.description))
                return
            }
            let version = q["version"].flatMap(Int.init), hash = q["hash"]
            let applied = q["applied_version"].flatMap(Int.init).flatMap { v in q["applied_hash"].map { (v, $0) } }
            let timeout = min(PilotProtocol.maxPollSeconds, max(0, q["timeout"].flatMap(Int.init) ?? PilotProtocol.defaultPollSeconds))
            server.seen(node, peer: peer.id, address: address, applied: applied, waitingDelta: 0)
            if answerIfChanged(context, node, version: version, hash: hash) { return }
            // Hold it: woken by a new version (or pilot stopping), or 304 at the timeout.
            let loop = context.eventLoop
            let w = Waiter(loop: loop) { [weak self] in
                guard let self, !self.answered else { return }
                if !self.answerIfChanged(context, node, version: version, hash: hash) { self.register(context, node, version: version, hash: hash) }
            }
            waiter = w
            waitingNode = node
            server.seen(node, peer: peer.id, address: address, applied: nil, waitingDelta: 1)
            register(context, node, version: version, hash: hash)
            waitTimer = loop.scheduleTask(in: .seconds(Int64(timeout))) { [weak self] in
                guard let self, !self.answered else { return }
                self.respond(context, Reply(status: .notModified, body: ""))
            }
        }

        /// Adds the waiter, or answers at once when a version landed meanwhile.
        func register(_ context: ChannelHandlerContext, _ node: PilotNode, version: Int?, hash: String?) {
            guard let w = waiter else { return }
            let raced = server.state.withLockedValue { s -> Bool in
                if let c = s.current, PilotServer.differs(server.scope(node, c), version: version, hash: hash) { return true }
                s.waiters[ObjectIdentifier(w)] = w
                return false
            }
            if raced { _ = answerIfChanged(context, node, version: version, hash: hash) }
        }

        func answerIfChanged(_ context: ChannelHandlerContext, _ node: PilotNode, version: Int?, hash: String?) -> Bool {
            guard let c = server.current else { return false }
            let set = server.scope(node, c)
            guard PilotServer.differs(set, version: version, hash: hash) else { return false }
            do {
                let data = try JSONEncoder().encode(set)
                respond(context, Reply(status: .ok, body: String(decoding: data, as: UTF8.self)))
            } catch {
                respond(context, PilotServer.error(.internalServerError, "cannot encode the configuration: \(error)"))
            }
            return true
        }

        func respond(_ context: ChannelHandlerContext, _ r: Reply) {
            guard !answered else { return }
            answered = true
            cleanup()
            var headers = HTTPHeaders([("content-length", String(r.body.utf8.count)), ("connection", "close")])
            if r.status != .notModified { headers.add(name: "content-type", value: r.type) }
            if let c = server.current { headers.add(name: "x-moonlet-pilot-version", value: String(c.version)) }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: r.status, headers: headers))), promise: nil)
            if !r.body.isEmpty { context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: r.body)))), promise: nil) }
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
        }

        func cleanup() {
            waitTimer?.cancel(); waitTimer = nil
            headTimer?.cancel(); headTimer = nil
            if let w = waiter { server.state.withLockedValue { _ = $0.waiters.removeValue(forKey: ObjectIdentifier(w)) } }
            waiter = nil
            if let n = waitingNode { server.seen(n, peer: peer.id, address: address, applied: nil, waitingDelta: -1); waitingNode = nil }
        }

        func channelInactive(context: ChannelHandlerContext) {
            answered = true
            cleanup()
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            if !(error is NIOSSLError) && !(error is PeerIdentityError) {
                server.logLimited("pilot: connection from \(address): \(LogText.escape("\(error)"))")
            } else {
                server.logLimited("pilot: TLS with \(address) failed: \(TLSMaterial.refusalReason(error, peerCertificate: nil))")
            }
            context.close(promise: nil)
        }
    }
}
