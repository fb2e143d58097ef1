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

/// The sidecar's side of the config push (`moonlet run --pilot HOST:PORT`): long-polls
/// pilot on a thread of its own (never an event loop), writes each new version into a
/// directory of its own under the cache directory (where pushed LuaPlugins find their
/// Lua files), hands the directory and the set to `apply` (in `moonlet run`, the proxy's
/// incremental reload: `ProxyServer.applyPushedConfig(files:directory:reason:)`) and
/// reports ACK or NACK. A refused version leaves the last good one
/// serving; when pilot is unreachable the client retries with exponential backoff
/// (jittered) and the proxy keeps serving what it has. With `certsDirectory` the
/// connection is mutual TLS with the workload certificate, and pilot must present one of
/// `expectedIdentities`.
public final class PilotClient: @unchecked Sendable {
    public struct Settings: Sendable {
        /// host:port of pilot.
        public var address: String
        public var node: PilotNode
        /// The workload certificate (cert-chain.pem, key.pem, root-cert.pem); nil: plaintext.
        public var certsDirectory: String?
        public var meshTLS = MeshTLSSettings()
        /// SANs pilot must present (one of them); empty: the default pilot identity in the
        /// trust domain of the workload certificate.
        public var expectedIdentities: [String] = []
        /// Where pushed versions are written (one subdirectory each; the applied one stays).
        public var cacheDirectory: String
        public var pollSeconds = PilotProtocol.defaultPollSeconds
        public var connectTimeout: TimeAmount = .seconds(5)
        /// Reconnect backoff: first wait and cap (seconds); each failure doubles the wait, with ±20% jitter.
        public var backoffBase = 0.5
        public var backoffMax = 10.0
        public init(address: String, node: PilotNode, cacheDirectory: String, certsDirectory: String? = nil) {
            self.address = address; self.node = node; self.cacheDirectory = cacheDirectory; self.certsDirectory = certsDirectory
        }
    }

    /// What the client has done so far.
    public struct Status: Sendable {
        public var appliedVersion: Int?
        public var appliedHash: String?
        public var lastReceivedVersion: Int?
        public var lastNack: String?
        /// The last poll reached pilot.
        public var connected = false
        public var lastError: String?
        public var failures = 0
    }

    public let settings: Settings
    /// Applies a version written in a directory; returns nil when applied, else the error.
    let apply: @Sendable (_ directory: String, _ set: PilotConfigSet) -> String?
    let log: @Sendable (String) -> Void
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let box = NIOLockedValueBox((status: Status(), stopped: false, channel: Channel?.none, appliedDir: String?.none))
    var thread: Thread?
    let done = DispatchSemaphore(value: 0)

    public init(settings: Settings, apply: @escaping @Sendable (_ directory: String, _ set: PilotConfigSet) -> String?,
                log: @escaping @Sendable (String) -> Void = { _ in }) throws {
        let parts = settings.address.split(separator: ":")
        guard parts.count == 2, !parts[0].isEmpty, let p = Int(parts[1]), (1...65535).contains(p) else {
            throw PilotError("--pilot: expected host:port, got \"\(settings.address)\"")
        }
        self.settings = settings; self.apply = apply; self.log = log
    }

    public var status: Status { box.withLockedValue { $0.status } }

    /// Starts the subscription thread.
    public func start() {
        let t = Thread { [self] in
            run()
            done.signal()
        }
        t.name = "moonlet-pilot-client"
        thread = t
        t.start()
    }

    /// Stops polling (the held request is closed) and waits for the thread.
    public func stop() {
        let ch = box.withLockedValue { b -> Channel? in b.stopped = true; return b.channel }
        ch?.close(promise: nil)
        if thread != nil { done.wait(); thread = nil }
        try? group.syncShutdownGracefully()
    }

    var stopped: Bool { box.withLockedValue { $0.stopped } }

    func run() {
        var seen: (version: Int, hash: String)?
        var backoff = settings.backoffBase
        while !stopped {
            do {
                let st = status
                var q: [(String, String)] = [("node", settings.node.id), ("namespace", settings.node.namespace),
                                             ("service_account", settings.node.serviceAccount), ("timeout", String(settings.pollSeconds))]
                if !settings.node.labels.isEmpty {
                    q.append(("labels", settings.node.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")))
                }
                if let s = seen { q += [("version", String(s.version)), ("hash", s.hash)] }
                if let v = st.appliedVersion, let h = st.appliedHash { q += [("applied_version", String(v)), ("applied_hash", h)] }
                let (code, data) = try request(.GET, PilotProtocol.configPath + "?" + Query.build(q), body: nil,
                                               timeout: .seconds(Int64(settings.pollSeconds + 10)))
                reachable()
                backoff = settings.backoffBase
                switch code {
                case 304: continue
                case 200:
                    let set = try JSONDecoder().decode(PilotConfigSet.self, from: data)
                    guard PilotConfigSet.hash(of: set.files) == set.hash else { throw PilotError("pilot sent version \(set.version) whose files do not match its hash") }
                    seen = (set.version, set.hash)
                    receive(set)
                default:
                    let msg = (try? JSONSerialization.jsonObject(with: data) as? [String: Any])?["error"] as? String ?? String(decoding: data.prefix(200), as: UTF8.self)
                    throw PilotError("pilot answered \(code): \(msg)")
                }
            } catch {
                if stopped { break }
                unreachable("\(error)", retryIn: backoff)
                let jitter = Double.random(in: 0.8...1.2)
                sleepUnlessStopped(backoff * jitter)
                backoff = min(settings.backoffMax, backoff * 2)
            }
        }
    }

    func sleepUnlessStopped(_ seconds: Double) {
        let end = Date().addingTimeInterval(seconds)
        while !stopped && Date() < end { usleep(UInt32(min(50_000, max(1000, end.timeIntervalSinceNow * 1_000_000)))) }
    }

    func reachable() {
        let was = box.withLockedValue { b -> (Bool, Int) in
            defer { b.status.connected = true; b.status.failures = 0; b.status.lastError = nil }
            return (b.status.connected, b.status.failures)
        }
        if !was.0 && was.1 > 0 { log("pilot: connected to \(settings.address) again after \(was.1) failed attempts") }
    }

    func unreachable(_ error: String, retryIn: Double) {
        let n = box.withLockedValue { b -> Int in
            b.status.connected = false; b.status.failures += 1; b.status.lastError = error
            return b.status.failures
        }
        // The first failure, then every 10th: a pilot down for long does not flood the log.
        if n == 1 || n % 10 == 0 {
            let keeping = status.appliedVersion.map { "keeping version \($0)" } ?? "no configuration from pilot yet"
            log("pilot: \(settings.address) unreachable (\(LogText.escape(error))); \(keeping); retrying in \(String(format: "%.1f", retryIn))s (attempt \(n))")
        }
    }

    /// Applies `set` (unless it is what is applied already) and reports the outcome.
    func receive(_ set: PilotConfigSet) {
        let st = status
        var err: String?
        if st.appliedHash == set.hash {
            // The same content under another version (pilot restarted): nothing to reload.
            box.withLockedValue { $0.status.appliedVersion = set.version; $0.status.lastReceivedVersion = set.version }
        } else {
            let dir = (settings.cacheDirectory as NSString).appendingPathComponent("\(set.version)-\(set.hash.prefix(12))")
            try? FileManager.default.removeItem(atPath: dir)
            do {
                try set.write(to: dir)
                err = apply(dir, set).map { $0.replacingOccurrences(of: dir + "/", with: "") }
            } catch {
                err = "cannot write version \(set.version) to \(settings.cacheDirectory): \(error)"
            }
            if let err {
                try? FileManager.default.removeItem(atPath: dir)
                box.withLockedValue { $0.status.lastNack = err; $0.status.lastReceivedVersion = set.version }
                log("pilot: version \(set.version) refused; keeping \(st.appliedVersion.map { "version \($0)" } ?? "the configuration in force"):\n\(err)")
            } else {
                let old = box.withLockedValue { b -> String? in
                    defer { b.appliedDir = dir }
                    b.status.appliedVersion = set.version; b.status.appliedHash = set.hash; b.status.lastReceivedVersion = set.version
                    return b.appliedDir
                }
                if let old, old != dir { try? FileManager.default.removeItem(atPath: old) }
                log("pilot: version \(set.version) applied (hash \(set.hash.prefix(12)))")
            }
        }
        let ack = PilotAck(node: settings.node.id, version: set.version, hash: set.hash, error: err)
        do {
            let (code, data) = try request(.POST, PilotProtocol.ackPath, body: try JSONEncoder().encode(ack), timeout: .seconds(10))
            if code != 200 { log("pilot: \(err == nil ? "ACK" : "NACK") of version \(set.version) refused: \(code) \(String(decoding: data.prefix(200), as: UTF8.self))") }
        } catch {
            // The next poll tells pilot what is applied (applied_version), so a lost ACK is not fatal.
            log("pilot: \(err == nil ? "ACK" : "NACK") of version \(set.version) not delivered: \(LogText.escape("\(error)"))")
        }
    }

    // MARK: HTTP

    /// The TLS context and the identities pilot must present (nil without certificates).
    func tls() throws -> (TLSMaterial, [String])? {
        guard let dir = settings.certsDirectory else { return nil }
        let m = try TLSMaterial.load(dir: dir, mesh: settings.meshTLS)
        let expected = settings.expectedIdentities.isEmpty ? [PilotProtocol.defaultIdentity(trustDomain: m.identity.trustDomain)] : settings.expectedIdentities
        return (m, expected)
    }

    /// One request on a connection of its own; blocking. Returns status code and body.
    func request(_ method: HTTPMethod, _ target: String, body: Data?, timeout: TimeAmount) throws -> (Int, Data) {
        let parts = settings.address.split(separator: ":")
        let host = String(parts[0]), port = Int(parts[1])!
        let material = try tls()
        let loop = group.next()
        let promise = loop.makePromise(of: (Int, Data).self)
        let ch: Channel
        do {
            ch = try ClientBootstrap(group: loop)
            .connectTimeout(settings.connectTimeout)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    if let (m, expected) = material {
                        try ch.pipeline.syncOperations.addHandler(try m.makeClientHandler(serverName: nil, expected: expected))
                    }
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(Collector(promise: promise))
                }
            }
            .connect(host: host, port: port).wait()
        } catch {
            promise.fail(error)
            throw error
        }
        let stoppedNow = box.withLockedValue { b -> Bool in if !b.stopped { b.channel = ch }; return b.stopped }
        if stoppedNow { ch.close(promise: nil); promise.fail(PilotError("stopped")); throw PilotError("stopped") }
        var headers = HTTPHeaders([("host", settings.address), ("connection", "close"), ("content-length", String(body?.count ?? 0))])
        if body != nil { headers.add(name: "content-type", value: "application/json") }
        ch.write(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: method, uri: target, headers: headers)), promise: nil)
        if let body { ch.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil) }
        ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let timer = loop.scheduleTask(in: timeout) { promise.fail(PilotError("no answer from \(self.settings.address) within \(timeout.nanoseconds / 1_000_000_000)s")) }
        defer {
            timer.cancel()
            ch.close(promise: nil)
            box.withLockedValue { b in if b.channel === ch { b.channel = nil } }
        }
        do { return try promise.futureResult.wait() } catch let e as PeerIdentityError {
            throw PilotError("pilot's identity not verified: \(e.description)")
        }
    }

    final class Collector: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<(Int, Data)>
        var status = 0
        var data = Data()
        init(promise: EventLoopPromise<(Int, Data)>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data part: NIOAny) {
            switch unwrapInboundIn(part) {
            case .head(let h): status = Int(h.status.code)
            case .body(let b):
                // A resource set is bounded (64 MiB): a larger answer is refused.
                if data.count + b.readableBytes > 64 << 20 { promise.fail(PilotError("answer over 64 MiB")); context.close(promise: nil); return }
                data.append(contentsOf: b.readableBytesView)
            case .end: promise.succeed((status, data))
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) {
            let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)
            promise.fail(TLSMaterial.identityRefusal(of: tls) ?? error)
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) { promise.fail(PilotError("connection closed before a response")) }
    }
}
