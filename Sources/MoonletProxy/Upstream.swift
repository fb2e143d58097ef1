import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import MoonletCore
import MoonletBalancer

/// Events an upstream connection reports to the stream that holds it. All calls
/// happen on the connection's event loop, directly (no futures).
protocol UpstreamDelegate: AnyObject {
    /// The response head; the callee owns it (it edits it in place, no copy).
    func upstreamResponseHead(_ head: consuming HTTPHead)
    func upstreamResponseBody(_ chunk: ByteBuffer)
    /// The response is complete. `reusable`: the connection may serve another request.
    func upstreamResponseEnd(reusable: Bool)
    /// The connection failed or closed before the response completed.
    func upstreamFailed(_ reason: UpstreamFailure)
    func upstreamWritabilityChanged(_ writable: Bool)
}

enum UpstreamFailure: Error {
    case connectFailed(String)
    case reset
    case protocolError(String)
}

/// One pooled HTTP/1.1 connection to an upstream host: parses the response head in
/// place and frames the body, handing both to its current delegate.
final class UpstreamConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let key: String
    var channel: Channel?
    weak var delegate: UpstreamDelegate?
    var parser: HTTPHeadParser
    var buffer: ByteBuffer?
    var decoder: BodyDecoder?
    var inResponse = false
    var requestWasHead = false
    var keepAlive = true
    var requestsServed = 0
    var idleSince: UInt64 = 0
    let createdAt = NIODeadline.now().uptimeNanoseconds
    var closed = false
    /// The cluster connection slot this connection holds (released when it closes).
    var circuit: CircuitCounters?
    /// Set while a TLS handshake is under way: a close or error then is a connect failure.
    var tlsPending = false
    var tlsError: String?

    init(key: String, limits: ProxyLimits) {
        self.key = key
        parser = HTTPHeadParser(limits: HTTPParserLimits(maxHeadBytes: limits.maxHeadBytes, maxHeaderCount: limits.maxHeaderCount))
    }

    /// Marks the start of a request on this connection.
    func begin(delegate: UpstreamDelegate, isHead: Bool) {
        self.delegate = delegate
        requestWasHead = isHead
        inResponse = true
        decoder = nil
        requestsServed += 1
        parser.reset()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffer == nil || buffer!.readableBytes == 0 { buffer = incoming } else { buffer!.writeBuffer(&incoming) }
        process()
    }

    func process() {
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
                    buffer = buf
                    if head.status >= 100 && head.status < 200 {
                        // Interim responses are consumed here (the proxy answers 100-continue itself).
                        parser.reset()
                        if head.status == 101 { fail(.protocolError("upgrade not supported")); return }
                        continue
                    }
                    keepAlive = head.keepAlive
                    decoder = BodyDecoder(framing: head.framing)
                    delegate.upstreamResponseHead(consume head)
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
                buffer = buf
                if done { finish(); return }
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

    func finish() {
        inResponse = false
        let d = delegate
        delegate = nil
        let leftover = buffer?.readableBytes ?? 0
        let reusable = keepAlive && leftover == 0 && !closed
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
            if tlsPending { fail(.connectFailed(tlsError ?? "TLS handshake did not complete")); return }
            // A close-delimited body ends here; `closed` makes finish() report it unreusable.
            if decoder?.isUntilClose == true { finish() } else { fail(.reset) }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { tlsPending = false }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if tlsPending && tlsError == nil { tlsError = "TLS error: \(error)" }
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
    var addresses: [String: SocketAddress] = [:]
    var sweeper: RepeatedTask?

    /// Streams waiting for a connection to a key (the cluster is at maxConnections).
    var waiters: [String: [PoolWaiter]] = [:]

    init(loop: EventLoop, limits: ProxyLimits) {
        self.loop = loop
        self.limits = limits
        let every = TimeAmount.milliseconds(Int64(min(limits.upstreamIdleTimeoutMs, 30_000)))
        sweeper = loop.scheduleRepeatedTask(initialDelay: every, delay: every) { [weak self] _ in self?.sweep() }
    }

    func address(host: String, port: Int) throws -> SocketAddress {
        let key = "\(host):\(port)"
        if let a = addresses[key] { return a }
        let a = try SocketAddress.makeAddressResolvingHost(host, port: port)
        addresses[key] = a
        return a
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

    /// Connects to `address`; with `tls`, its client handler goes in front of the
    /// connection (the request waits in it until the handshake is done).
    func connect(key: String, address: SocketAddress, timeoutMs: Int = 0, keepalive: (probes: Int, timeSeconds: Int, intervalSeconds: Int)? = nil,
                 tls: (() throws -> NIOSSLClientHandler)? = nil,
                 _ done: @escaping (Result<UpstreamConnection, Error>) -> Void) {
        let conn = UpstreamConnection(key: key, limits: limits)
        var bootstrap = ClientBootstrap(group: loop)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
        if let ka = keepalive {
            bootstrap = bootstrap
                .channelOption(ChannelOptions.socketOption(.so_keepalive), value: 1)
                .channelOption(ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPIDLE)), value: ka.timeSeconds)
                .channelOption(ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPINTVL)), value: ka.intervalSeconds)
                .channelOption(ChannelOptions.Types.SocketOption(level: .tcp, name: NIOBSDSocket.Option(rawValue: TCP_KEEPCNT)), value: ka.probes)
        }
        bootstrap
            .channelOption(ChannelOptions.connectTimeout, value: .milliseconds(Int64(timeoutMs > 0 ? timeoutMs : limits.connectTimeoutMs)))
            .channelOption(ChannelOptions.writeBufferWaterMark, value: .init(low: limits.highWaterMarkBytes / 4, high: limits.highWaterMarkBytes))
            .channelInitializer { ch in
                conn.channel = ch
                return ch.eventLoop.makeCompletedFuture {
                    if let tls {
                        conn.tlsPending = true
                        try ch.pipeline.syncOperations.addHandler(try tls())
                    }
                    try ch.pipeline.syncOperations.addHandler(conn)
                }
            }
            .connect(to: address)
            .whenComplete { r in
                switch r {
                case .success: done(.success(conn))
                case .failure(let e): done(.failure(e))
                }
            }
    }

    /// Queues a stream until a connection to `key` is released on this loop.
    func wait(_ w: PoolWaiter) { waiters[w.key, default: []].append(w) }

    func removeWaiter(_ w: PoolWaiter) {
        waiters[w.key]?.removeAll { $0 === w }
        if waiters[w.key]?.isEmpty == true { waiters[w.key] = nil }
    }

    func release(_ c: UpstreamConnection) {
        guard !c.closed, let ch = c.channel, ch.isActive else { return }
        // A waiting stream takes the connection first (FIFO).
        while let w = waiters[c.key]?.first {
            waiters[c.key]!.removeFirst()
            if waiters[c.key]!.isEmpty { waiters[c.key] = nil }
            if w.handOver(c) { return }
        }
        let list: IdleList
        if let l = idle[c.key] { list = l } else { list = IdleList(); idle[c.key] = list }
        if list.items.count >= limits.maxIdleUpstreamPerHost { ch.close(promise: nil); return }
        c.idleSince = NIODeadline.now().uptimeNanoseconds
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
    }

    func closeAll() {
        sweeper?.cancel()
        for list in idle.values { for c in list.items { c.channel?.close(promise: nil) } }
        idle = [:]
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
            .channelOption(ChannelOptions.connectTimeout, value: .milliseconds(Int64(timeoutMs)))
            .channelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(Discard()) } }
            .connect(to: address)
            .whenSuccess { ch in
                ch.writeAndFlush(payload, promise: nil)
                ch.eventLoop.scheduleTask(in: .seconds(30)) { ch.close(promise: nil) }
            }
    }
}
