import NIOCore
import Dispatch
import NIOPosix
import NIOSSL
import MoonletCore
import MoonletBalancer
import MoonletTLS

/// Events an upstream connection reports to the stream that holds it. All calls
/// happen on the connection's event loop, directly (no futures).
protocol UpstreamDelegate: AnyObject {
    /// The response head; the callee owns it (it edits it in place, no copy).
    func upstreamResponseHead(_ head: consuming HTTPHead)
    func upstreamResponseBody(_ chunk: ByteBuffer)
    /// The response's trailers, right before `upstreamResponseEnd` (only when it has some).
    func upstreamResponseTrailers(_ trailers: HTTPTrailers)
    /// The response is complete. `reusable`: the connection may serve another request.
    func upstreamResponseEnd(reusable: Bool)
    /// The connection failed or closed before the response completed.
    func upstreamFailed(_ reason: UpstreamFailure)
    func upstreamWritabilityChanged(_ writable: Bool)
}

enum UpstreamFailure: Error {
    case connectFailed(String)
    case reset
    /// An HTTP/2 upstream reset the stream with REFUSED_STREAM (it never processed it).
    case refusedStream
    case protocolError(String)
}

/// One pooled HTTP/1.1 connection to an upstream host: parses the response head in
/// place and frames the body, handing both to its current delegate. An HTTP/2 stream
/// (UpstreamH2Stream) is one too to the dispatcher and the stream's handler: it
/// overrides how request bytes are sent, reading is paused, and the request ends.
class UpstreamConnection: ChannelInboundHandler, DeferredFlush {
    typealias InboundIn = ByteBuffer
    let key: String
    var channel: Channel?
    /// Request bytes written to the connection wait for the end of the loop's batch of
    /// I/O events to be flushed (see LoopContext.flushLater).
    var flushQueued = false
    /// The stream this connection serves now. Held strongly (the stream's handler holds
    /// the connection too) and cleared by finish, fail and abandon, which end every
    /// request; a weak reference would put the handler on Swift's slow reference-counting
    /// path for good.
    var delegate: UpstreamDelegate?
    var parser: HTTPHeadParser
    var buffer: ByteBuffer?
    var decoder: BodyDecoder?
    var inResponse = false
    var requestWasHead = false
    var keepAlive = true
    var requestsServed = 0
    var idleSince: UInt64 = 0
    /// The pool's idle list for `key`, found once: returning the connection then needs
    /// no dictionary lookup.
    var idleList: UpstreamPool.IdleList?
    let createdAt = NIODeadline.now().uptimeNanoseconds
    var closed = false
    /// The cluster connection slot this connection holds (released when it closes).
    var circuit: CircuitCounters?
    /// A stream of an HTTP/2 session: carries one request, never pooled.
    var multiplexed = false

    init(key: String, limits: ProxyLimits) {
        self.key = key
        parser = HTTPHeadParser(limits: HTTPParserLimits(maxHeadBytes: limits.maxHeadBytes, maxHeaderCount: limits.maxHeaderCount))
    }

    /// The end of the loop's batch: sends the request bytes written since the last flush.
    func flushNow() { channel?.flush() }

    /// Request bytes (HTTP/1.1, head then framed body), flushed at the end of the batch.
    func send(_ bytes: ByteBuffer) { channel?.write(bytes, promise: nil) }

    /// Whether more request bytes may be sent now (else the client is paused until
    /// upstreamWritabilityChanged says so).
    var isWritable: Bool { channel?.isWritable ?? false }

    /// The request ended downstream. HTTP/1.1 has nothing to add (a chunked body's last
    /// chunk carries its trailers; a content-length body has no place for them, see
    /// docs/grpc.md); an HTTP/2 stream ends the stream, trailers after the DATA.
    func requestEnded(trailers: HTTPTrailers?) {}

    /// Pauses or resumes reading the response (the client cannot take more / can again).
    func setReading(_ on: Bool) { channel?.setOption(ChannelOptions.autoRead, value: on).whenComplete { _ in } }

    /// Closes the connection (an HTTP/2 stream: the stream only).
    func close() { channel?.close(promise: nil) }

    /// Marks the start of a request on this connection.
    final func begin(delegate: UpstreamDelegate, isHead: Bool) {
        self.delegate = delegate
        requestWasHead = isHead
        inResponse = true
        decoder = nil
        requestsServed += 1
        parser.reset()
    }

    /// A consumed read buffer is let go at once (`buffer` nil, not an empty slice): NIO
    /// reuses its receive buffer for the next read only when nothing else holds it.
    final func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffer == nil || buffer!.readableBytes == 0 { buffer = incoming } else { buffer!.writeBuffer(&incoming) }
        process()
    }

    final func process() {
        guard inResponse, let delegate else {
            // Bytes with no request outstanding: the connection is unusable.
            if (buffer?.readableBytes ?? 0) > 0 { keepAlive = false; channel?.close(promise: nil) }
            return
        }
        while var buf = buffer, buf.readableBytes > 0, inResponse {
            if decoder == nil {
                switch parser.parseResponse(buf, requestWasHead: requestWasHead) {
                case .needMore:
                    return
                case .error(let e):
                    fail(.protocolError(e.reason))
                    return
                case .complete(let head, let consumed):
                    buf.moveReaderIndex(forwardBy: consumed)
                    buffer = buf.readableBytes > 0 ? buf : nil
                    if head.status >= 100 && head.status < 200 {
                        // Interim responses are consumed here (the proxy answers 100-continue itself).
                        parser.reset()
                        if head.status == 101 { fail(.protocolError("upgrade not supported")); return }
                        continue
                    }
                    keepAlive = head.keepAlive
                    decoder = BodyDecoder(framing: head.framing)
                    // Moved, not copied: a copy would share the head's field array, and the first
                    // edit downstream (hop-by-hop fields, the metadata exchange) would copy it
                    // again. Debug builds pass a copy: with `consume`, Swift 6's -Onone pass
                    // MovedAsyncVarDebugInfoPropagator never ends on this loop (swiftlang/swift#75679).
                    #if DEBUG
                    delegate.upstreamResponseHead(head)
                    #else
                    delegate.upstreamResponseHead(consume head)
                    #endif
                    guard self.delegate != nil, inResponse else { return } // abandoned
                    if decoder?.isDone == true { finish(); return }
                    continue
                }
            }
            do {
                var d = decoder!
                let done = try d.decode(&buf) { chunk in if self.delegate != nil { delegate.upstreamResponseBody(chunk) } }
                if self.delegate == nil { return } // abandoned while relaying
                decoder = d
                buffer = buf.readableBytes > 0 ? buf : nil
                if done {
                    if let t = d.trailers { delegate.upstreamResponseTrailers(t) }
                    finish(); return
                }
            } catch {
                fail(.protocolError("\(error)"))
                return
            }
        }
    }

    /// The stream no longer wants this response (retry, local reply, client gone): stop
    /// delivering and close, since the rest of the response cannot be skipped safely.
    func abandon() {
        delegate = nil
        inResponse = false
        keepAlive = false
        channel?.close(promise: nil)
    }

    final func finish() {
        inResponse = false
        let d = delegate
        delegate = nil
        let leftover = buffer?.readableBytes ?? 0
        let reusable = keepAlive && leftover == 0 && !closed && !multiplexed
        d?.upstreamResponseEnd(reusable: reusable)
    }

    func fail(_ f: UpstreamFailure) {
        keepAlive = false
        inResponse = false
        let d = delegate
        delegate = nil
        channel?.close(promise: nil)
        d?.upstreamFailed(f)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        circuit?.connectionClosed()
        circuit = nil
        if inResponse {
            // A close-delimited body ends here; `closed` makes finish() report it unreusable.
            if decoder?.isUntilClose == true { finish() } else { fail(.reset) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        delegate?.upstreamWritabilityChanged(context.channel.isWritable)
    }
}

/// A stream waiting for a connection (http1MaxPendingRequests).
final class PoolWaiter {
    let key: String
    let onConnection: (UpstreamConnection) -> Bool
    init(key: String, onConnection: @escaping (UpstreamConnection) -> Bool) { self.key = key; self.onConnection = onConnection }
    func handOver(_ c: UpstreamConnection) -> Bool { onConnection(c) }
}

/// Upstream connections of one event loop, keyed by "ip:port". Idle connections are
/// reused LIFO; none is shared across loops, so no lock is taken.
final class UpstreamPool {
    let loop: EventLoop
    let limits: ProxyLimits
    /// Idle connections by key. Each list is a class so that taking and returning a
    /// connection mutates it in place: an Optional-chained mutation through the
    /// dictionary (`idle[key]?.popLast()`) allocated three coroutine frames per request.
    final class IdleList { var items: [UpstreamConnection] = [] }
    var idle: [String: IdleList] = [:]
    var sweeper: RepeatedTask?

    /// Streams waiting for a connection to a key (the cluster is at maxConnections).
    var waiters: [String: [PoolWaiter]] = [:]

    init(loop: EventLoop, limits: ProxyLimits) {
        self.loop = loop
        self.limits = limits
        let every = TimeAmount.milliseconds(Int64(min(limits.upstreamIdleTimeoutMs, 30_000)))
        // Held strongly (shutDown cancels the task): a weak reference would give the pool
        // a side table, and every retain and release of it, twice per request, would
        // take Swift's slow reference-counting path.
        sweeper = loop.scheduleRepeatedTask(initialDelay: every, delay: every) { _ in self.sweep() }
    }

    /// The address of `host:port`, if known now. An IP address is parsed at once. A
    /// name is resolved on a background queue, never on the event loop (Envoy's
    /// STRICT_DNS resolves asynchronously too): the first use returns `.pending` and
    /// `ready` is called on this loop once the lookup is done (ask again for its
    /// outcome). A resolved name is refreshed in the background after `dnsRefreshMs`,
    /// the old address serving meanwhile; a failed one is retried after `dnsFailureRetryMs`.
    func address(host: String, port: Int, ready: @escaping () -> Void) -> AddressLookup {
        let key = "\(host):\(port)"
        if let e = resolved[key] {
            let now = NIODeadline.now().uptimeNanoseconds
            switch e.result {
            case .success(let a):
                if now > e.expires && resolving[key] == nil { startResolving(key, host: host, port: port) }
                return .ready(a)
            case .failure(let err):
                if now <= e.expires { return .failed(err) }
            }
        }
        if let a = try? SocketAddress(ipAddress: host, port: port) {
            resolved[key] = (.success(a), UInt64.max)
            return .ready(a)
        }
        if resolving[key] == nil { startResolving(key, host: host, port: port) }
        resolving[key]!.append(ready)
        return .pending
    }

    enum AddressLookup {
        case ready(SocketAddress)
        case pending
        case failed(Error)
    }

    /// Names resolved (or failed) and when they are due again (monotonic ns).
    var resolved: [String: (result: Result<SocketAddress, Error>, expires: UInt64)] = [:]
    /// Names being resolved, with the callers waiting for them.
    var resolving: [String: [() -> Void]] = [:]
    static let dnsRefreshMs: UInt64 = 30_000
    static let dnsFailureRetryMs: UInt64 = 5_000
    static let resolverQueue = DispatchQueue(label: "moonlet.dns", attributes: .concurrent)

    func startResolving(_ key: String, host: String, port: Int) {
        resolving[key] = []
        let loop = self.loop
        Self.resolverQueue.async {
            let r = Result { try SocketAddress.makeAddressResolvingHost(host, port: port) }
            loop.execute {
                let ms = (try? r.get()) == nil ? Self.dnsFailureRetryMs : Self.dnsRefreshMs
                self.resolved[key] = (r, NIODeadline.now().uptimeNanoseconds + ms * 1_000_000)
                for w in self.resolving.removeValue(forKey: key) ?? [] { w() }
            }
        }
    }

    /// An idle live connection for `key`, if any. The list is mutated in place (a
    /// copy out of the dictionary would copy every pooled connection per request).
    func takeIdle(_ key: String, idleTimeoutMs: Int = 0, maxDurationMs: Int = 0) -> UpstreamConnection? {
        var now: UInt64 = 0
        guard let list = idle[key] else { return nil }
        while let c = list.items.popLast() {
            guard !c.closed, let ch = c.channel, ch.isActive else { continue }
            if idleTimeoutMs > 0 || maxDurationMs > 0 {
                if now == 0 { now = NIODeadline.now().uptimeNanoseconds }
                // The cluster's idleTimeout / maxConnectionDuration retire old connections.
                if (idleTimeoutMs > 0 && now - c.idleSince > UInt64(idleTimeoutMs) * 1_000_000)
                    || (maxDurationMs > 0 && now - c.createdAt > UInt64(maxDurationMs) * 1_000_000) {
                    ch.close(promise: nil)
                    continue
                }
            }
            return c
        }
        return nil
    }

    /// HTTP/2 connections by key (at most one taking new streams per key).
    var sessions: [String: UpstreamH2Connection] = [:]

    /// Keys whose last TLS connection negotiated h2. While a new connection to such a
    /// key is being set up, requests wait for it instead of each opening a connection
    /// of its own (ALPN is only known after the handshake).
    var speaksH2: Set<String> = []
    /// Streams waiting for the HTTP/2 connection being set up to a key. Each gets the
    /// new session, or nil when the connection failed or the peer chose HTTP/1.1.
    var awaitingSession: [String: [(UpstreamH2Connection?) -> Void]] = [:]

    /// An HTTP/2 connection to `key` that takes another stream, if any.
    func session(_ key: String, maxRequests: Int, maxDurationMs: Int) -> UpstreamH2Connection? {
        guard let s = sessions[key] else { return nil }
        if s.accepts(maxRequests: maxRequests, maxDurationMs: maxDurationMs) { return s }
        sessions[key] = nil
        return nil
    }

    /// Puts a request on an HTTP/2 connection to `key`: a new stream of the open one, or
    /// of the one being set up to a peer known to speak h2 (`done` gets the stream).
    /// False when there is neither: the caller connects. `otherwise` runs when the
    /// connection being set up cannot take the request after all (it failed, the peer
    /// chose HTTP/1.1, or the per-connection bounds are reached).
    func openStream(_ key: String, maxRequests: Int, maxDurationMs: Int,
                    _ done: @escaping (Result<UpstreamConnection, Error>) -> Void, otherwise: @escaping () -> Void) -> Bool {
        if let s = session(key, maxRequests: maxRequests, maxDurationMs: maxDurationMs) {
            s.openStream(done, otherwise: otherwise)
            return true
        }
        guard awaitingSession[key] != nil else { return false }
        awaitingSession[key]!.append { s in
            if let s, s.accepts(maxRequests: maxRequests, maxDurationMs: maxDurationMs) { s.openStream(done, otherwise: otherwise) } else { otherwise() }
        }
        return true
    }

    /// Connects to `address`. Without `tls` the connection is handed over once TCP is
    /// up (the request may be written at once). With `tls` it is handed over after the
    /// handshake: as HTTP/1.1, or, when ALPN chose "h2", as the first stream of a new
    /// HTTP/2 session that later requests to `key` share. `slot` (the cluster's
    /// connection slot) is held by the connection or session and released when it
    /// closes, or at once when connecting fails.
    func connect(key: String, address: SocketAddress, timeoutMs: Int = 0, keepalive: (probes: Int, timeSeconds: Int, intervalSeconds: Int)? = nil,
                 tls: (() throws -> NIOSSLClientHandler)? = nil, tlsExpected: String = "", tlsMesh: Bool = true, offersH2: Bool = false, h2c: Bool = false,
                 slot: CircuitCounters? = nil, _ done: @escaping (Result<UpstreamConnection, Error>) -> Void) {
        let conn = UpstreamConnection(key: key, limits: limits)
        // h2c: the peer is known to speak HTTP/2 (its port is declared so), no ALPN to wait for.
        if h2c { speaksH2.insert(key) }
        // A connection that offers h2 gathers the requests to `key` that arrive while it is
        // set up, as Envoy's HTTP/2 pool queues streams on its connecting client: they
        // become its streams (a burst of 100 calls opens one connection, not 100), share its
        // failure, or, when ALPN chose HTTP/1.1 after all, connect on their own.
        let gathers = offersH2 && awaitingSession[key] == nil
        if gathers { awaitingSession[key] = [] }
        var finished = false
        var session: UpstreamH2Connection? = nil
        func finish(_ r: Result<UpstreamConnection, Error>) {
            guard !finished else { return }
            finished = true
            if case .failure = r { slot?.connectionClosed() }
            done(r)
            guard gathers, let waiting = awaitingSession.removeValue(forKey: key) else { return }
            // The first stream is handed over from inside handOver, before `session` is
            // assigned: the session it opened is the key's current one.
            let s = session ?? sessions[key]
            for w in waiting { w(s) }
        }
        // ClientBootstrap sets TCP_NODELAY itself and runs the connect timeout. The other
        // options are set in the initializer through the synchronous options: as
        // bootstrap options each one costs a type-erased trip and a future per connect.
        let marks = ChannelOptions.Types.WriteBufferWaterMark(low: limits.highWaterMarkBytes / 4, high: limits.highWaterMarkBytes)
        ClientBootstrap(group: loop)
            .connectTimeout(.milliseconds(Int64(timeoutMs > 0 ? timeoutMs : limits.connectTimeoutMs)))
            .channelInitializer { ch in
                conn.channel = ch
                return ch.eventLoop.makeCompletedFuture {
                    if let options = ch.syncOptions {
                        try options.setOption(ChannelOptions.writeBufferWaterMark, value: marks)
                        if let ka = keepalive {
                            try options.setOption(ChannelOptions.socketOption(.so_keepalive), value: 1)
                            try options.setOption(ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPIDLE)), value: ka.timeSeconds)
                            try options.setOption(ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPINTVL)), value: ka.intervalSeconds)
                            try options.setOption(ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPCNT)), value: ka.probes)
                        }
                    }
                    guard let tls else {
                        // h2c: the HTTP/2 pipeline is set up once TCP is up (handOver).
                        if !h2c { try ch.pipeline.syncOperations.addHandler(conn) }
                        return
                    }
                    try ch.pipeline.syncOperations.addHandler(try tls())
                    try ch.pipeline.syncOperations.addHandler(UpstreamHandshake(timeoutMs: self.limits.tlsHandshakeTimeoutMs, mesh: tlsMesh, configure: { _, proto in
                        session = self.handOver(conn, protocol: proto, key: key, slot: slot, finish)
                    }, failed: { why in
                        self.onTLSFailure?(address, tlsExpected, why)
                        finish(.failure(UpstreamFailure.connectFailed(why)))
                    }))
                }
            }
            .connect(to: address)
            .whenComplete { r in
                switch r {
                case .success:
                    guard tls == nil else { return } // handed over after the handshake
                    if h2c {
                        session = self.handOver(conn, protocol: "h2", key: key, slot: slot, finish)
                        return
                    }
                    conn.circuit = slot
                    if conn.closed { slot?.connectionClosed(); conn.circuit = nil }
                    finish(.success(conn))
                case .failure(let e): finish(.failure(e))
                }
            }
    }

    /// After a TLS handshake: with ALPN "h2" the connection becomes an HTTP/2 session
    /// (returned) whose first stream goes to `done`; otherwise the HTTP/1.1 connection
    /// itself does, holding `slot`.
    func handOver(_ conn: UpstreamConnection, protocol proto: String?, key: String, slot: CircuitCounters?,
                  _ done: @escaping (Result<UpstreamConnection, Error>) -> Void) -> UpstreamH2Connection? {
        guard let ch = conn.channel else { return nil }
        if proto == "h2" {
            speaksH2.insert(key)
            let s = startSession(key: key, channel: ch, slot: slot, done)
            s?.openStream(done, otherwise: { done(.failure(UpstreamFailure.connectFailed("the HTTP/2 connection closed before its first stream"))) })
            return s
        }
        speaksH2.remove(key)
        do {
            try ch.pipeline.syncOperations.addHandler(conn)
            conn.circuit = slot
            done(.success(conn))
        } catch {
            ch.close(promise: nil)
            done(.failure(UpstreamFailure.connectFailed("\(error)")))
        }
        return nil
    }

    /// Turns a connection that negotiated "h2" (or an h2c one) into an HTTP/2 session for
    /// `key` (nil, with `failed` told why, when that fails).
    func startSession(key: String, channel: Channel, slot: CircuitCounters?, _ failed: @escaping (Result<UpstreamConnection, Error>) -> Void) -> UpstreamH2Connection? {
        let s = UpstreamH2Connection(key: key, limits: limits, allocator: channel.allocator)
        if (try? channel.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)) == nil { s.scheme = "http" }
        do {
            try channel.pipeline.syncOperations.addHandler(s)
        } catch {
            channel.close(promise: nil)
            failed(.failure(UpstreamFailure.connectFailed("HTTP/2 setup failed: \(error)")))
            return nil
        }
        s.circuit = slot
        sessions[key]?.retire() // an earlier connection (set up concurrently) takes no new streams
        sessions[key] = s
        onHTTP2Session?()
        channel.closeFuture.whenComplete { _ in
            s.closed = true
            s.circuit?.connectionClosed(); s.circuit = nil
            if self.sessions[key] === s { self.sessions[key] = nil }
        }
        return s
    }

    /// Called when an upstream connection starts speaking HTTP/2 (for a metric).
    var onHTTP2Session: (() -> Void)?
    /// Called when a TLS handshake to an upstream fails: its address, the identity
    /// expected of it, and the reason in words (the loop logs it, rate-limited).
    var onTLSFailure: ((SocketAddress, String, String) -> Void)?

    /// Queues a stream until a connection to `key` is released on this loop.
    func wait(_ w: PoolWaiter) { waiters[w.key, default: []].append(w) }

    func removeWaiter(_ w: PoolWaiter) {
        waiters[w.key]?.removeAll { $0 === w }
        if waiters[w.key]?.isEmpty == true { waiters[w.key] = nil }
    }

    /// Returns a connection to the idle list (or to a waiting stream). `now`: the clock,
    /// when the caller has just read it.
    func release(_ c: UpstreamConnection, now: UInt64 = 0) {
        if c.multiplexed { c.abandon(); return }
        guard !c.closed, let ch = c.channel, ch.isActive else { return }
        if shutDown { ch.close(promise: nil); return }
        // A waiting stream takes the connection first (FIFO).
        while !waiters.isEmpty, let w = waiters[c.key]?.first {
            waiters[c.key]!.removeFirst()
            if waiters[c.key]!.isEmpty { waiters[c.key] = nil }
            if w.handOver(c) { return }
        }
        let list: IdleList
        if let l = c.idleList { list = l }
        else if let l = idle[c.key] { list = l; c.idleList = l }
        else { list = IdleList(); idle[c.key] = list; c.idleList = list }
        if list.items.count >= limits.maxIdleUpstreamPerHost { ch.close(promise: nil); return }
        c.idleSince = now != 0 ? now : NIODeadline.now().uptimeNanoseconds
        list.items.append(c)
    }

    func sweep() {
        let now = NIODeadline.now().uptimeNanoseconds
        let maxIdle = UInt64(limits.upstreamIdleTimeoutMs) * 1_000_000
        for list in idle.values {
            var keep: [UpstreamConnection] = []
            for c in list.items {
                if c.closed || now - c.idleSince > maxIdle { c.channel?.close(promise: nil) } else { keep.append(c) }
            }
            list.items = keep
        }
        for s in sessions.values where s.openStreams == 0 && now - s.idleSince > maxIdle {
            sessions[s.key] = nil
            s.retire()
        }
    }

    /// Set by closeAll: connections handed back later are closed, not kept.
    var shutDown = false

    func closeAll() {
        shutDown = true
        sweeper?.cancel()
        for list in idle.values { for c in list.items { c.channel?.close(promise: nil) } }
        idle = [:]
        for s in sessions.values { s.retire(); s.closeConnection() }
        sessions = [:]
    }

    var idleCount: Int { idle.values.reduce(0) { $0 + $1.items.count } }
}

/// Fire-and-forget mirror requests: a connection of its own, the response read and
/// dropped, closed when the upstream closes (the copy says `connection: close`) or
/// after a timeout.
enum MirrorSender {
    final class Discard: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }

    static func send(_ payload: ByteBuffer, to address: SocketAddress, on loop: EventLoop, timeoutMs: Int) {
        ClientBootstrap(group: loop)
            .connectTimeout(.milliseconds(Int64(timeoutMs)))
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(Discard()) } }
            .connect(to: address)
            .whenSuccess { ch in
                ch.writeAndFlush(payload, promise: nil)
                ch.eventLoop.scheduleTask(in: .seconds(30)) { ch.close(promise: nil) }
            }
    }
}

/// How a connection to an upstream endpoint does TLS, from its cluster's settings: mesh
/// mTLS (ISTIO_MUTUAL) with the workload certificate, checked against the endpoint's
/// identities; or the DestinationRule's own TLS context; or none. `expected` says what
/// the peer must present (for errors); `mesh` is false for the DestinationRule's TLS.
struct UpstreamTLSPlan {
    var make: (() throws -> NIOSSLClientHandler)? = nil
    var expected = ""
    var mesh = true

    /// `serverName`: the SNI when the settings name none; `offerH2`: ALPN h2 (mesh only);
    /// `tcp`: Istio's TCP ALPN (mesh only, the TCP proxy).
    init(_ tls: UpstreamTLS?, meshMaterial: TLSMaterial?, serverName: String, offerH2: Bool = false, tcp: Bool = false) {
        guard let t = tls else { return }
        if t.mode == .istioMutual, let m = meshMaterial {
            let expected = t.fromServiceAccounts ? m.inOwnTrustDomain(t.subjectAltNames) : t.subjectAltNames
            make = { try m.makeClientHandler(serverName: t.sni, expected: expected, offerH2: offerH2, tcp: tcp) }
            self.expected = expected.isEmpty ? "a mesh identity" : expected.joined(separator: " or ")
        } else if let c = t.context as? NIOSSLContext {
            let sni = t.sni ?? serverName
            make = { try TLSMaterial.makeClientHandler(context: c, serverName: sni, expected: t.subjectAltNames) }
            self.expected = t.subjectAltNames.isEmpty ? sni : t.subjectAltNames.joined(separator: " or ")
            mesh = false
        }
    }
}
