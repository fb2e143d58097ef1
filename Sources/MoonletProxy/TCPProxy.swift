import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import MoonletCore
import MoonletConfig
import MoonletTLS
import MoonletBalancer
import MoonletTelemetry

/// Interception settings of the configuration in force, per loop (swapped with the
/// snapshot at each reload): the mesh config's outboundTrafficPolicy and
/// protocolDetectionTimeout, and the TCP authorization rules.
struct InterceptionConfig {
    /// outboundTrafficPolicy REGISTRY_ONLY: traffic to no known service goes to
    /// BlackHoleCluster (HTTP 502, TCP closed) instead of PassthroughCluster.
    var registryOnly = false
    /// protocolDetectionTimeout (ms, 0: none, Istio's default): after it a connection whose
    /// client has sent nothing (or too little to decide) is served as TCP.
    var detectionTimeoutMs = 0
    /// AuthorizationPolicies for inbound TCP (nil: none selects the workload).
    var tcpAuthz: TCPAuthorization?
}

/// The original destination of one intercepted connection, and what its HTTP streams do
/// with it (the hook DownstreamHandler calls before the filters run).
final class InterceptedDestination {
    let address: SocketAddress
    let ip: String
    let port: Int

    init(_ a: SocketAddress) {
        address = a
        ip = AddressIndex.canonicalIP(a.ipAddress ?? "")
        port = a.port ?? 0
    }

    /// Inbound: the stream goes to the app port the client addressed. Outbound: a Host
    /// that names a service routes as before; otherwise the original destination decides
    /// (a service VIP: the router looks the service up by it; an endpoint address: that
    /// endpoint; nothing known: PassthroughCluster with ALLOW_ANY, BlackHoleCluster with
    /// REGISTRY_ONLY).
    func applyHTTP(_ s: ProxyStream, _ h: DownstreamHandler) {
        let ctx = h.ctx
        if h.role == .inbound {
            s.route = ctx.inboundRouteFor(port: port)
            s.destination.port = port
            return
        }
        let routes = ctx.snapshot.routes
        if routes.lookup(s.request.host) != nil { return }
        s.destination.original = ip
        let index = routes.addressIndex
        if let t = index.lookup(ip: ip, port: port) {
            if t.endpointIndex >= 0, let c = t.cluster, t.endpointIndex < c.endpointCount {
                // An endpoint addressed directly: that endpoint, through its service's cluster
                // (its TLS settings, auto mTLS included).
                var r = RouteDecision()
                r.cluster = c.name; r.host = t.service.fqdn; r.port = t.port.number
                r.upstreamCluster = c; r.endpointIndex = t.endpointIndex
                let e = c.endpoint(t.endpointIndex)
                r.endpoint = e.address; r.endpointPort = e.port
                s.route = r
            }
            // A VIP: the router finds the service by s.destination.original.
            return
        }
        if routes.lookup(ip) != nil { return }
        var r = RouteDecision()
        if ctx.interception.registryOnly || OriginalDestination.isSelf(ip: ip, port: port, local: nil, ownPorts: ctx.ownPorts) {
            r.cluster = "BlackHoleCluster"
        } else {
            r.cluster = "PassthroughCluster"
            r.host = ip; r.port = port
        }
        s.route = r
    }
}

extension LoopContext {
    /// The inbound route to app port `port` (an intercepted connection's original
    /// destination port), made once per port.
    func inboundRouteFor(port: Int) -> RouteDecision {
        if port == settings.appPort || port <= 0 { return inboundRoute }
        if let r = inboundRoutesByPort[port] { return r }
        var r = inboundRoute
        r.cluster = "inbound|\(port)||"
        r.port = port
        if inboundRoutesByPort.count < 4096 { inboundRoutesByPort[port] = r }
        return r
    }

    /// The proxy's own listener ports: a connection there would loop.
    var ownPorts: [Int] {
        listenerPorts.isEmpty ? [settings.inboundPort, settings.outboundPort, settings.adminPort, settings.prometheusPort, settings.healthPort] : listenerPorts
    }
}

/// One proxied TCP connection: the client side and the upstream side, glued together
/// (bytes relayed both ways, with backpressure: a side reads only while the other can
/// write), half-close preserved (a FIN, or a TLS close_notify, from one side shuts the
/// other side's output), an idle timeout (connectionPool.tcp.idleTimeout, Istio's 1 h
/// default) and Istio's TCP metrics. Lives on the client connection's loop.
final class TCPSession {
    let ctx: LoopContext
    let role: ListenerRole
    let client: TCPGlue
    var upstream: TCPGlue?
    var idleTimeoutMs: Int
    var lastActivity = NIODeadline.now().uptimeNanoseconds
    var idleTimer: Scheduled<Void>?
    /// Bytes from the client (Istio's received bytes) and to it (sent bytes).
    var receivedBytes: UInt64 = 0
    var sentBytes: UInt64 = 0
    var cluster: UpstreamCluster?
    var endpointIndex = -1
    var circuit: CircuitCounters?
    var finished = false
    /// Why the connection ended early (logged at debug), or nil.
    var failure: String?
    /// Istio's TCP metrics of this connection (istio_tcp_*, with Istio's labels), made
    /// once its destination is known (`recordOpened`); nil before, or past the series cap.
    var series: TCPSeries?

    init(ctx: LoopContext, role: ListenerRole, idleTimeoutMs: Int) {
        self.ctx = ctx
        self.role = role
        self.idleTimeoutMs = idleTimeoutMs
        client = TCPGlue(downstream: true)
        client.session = self
        ctx.metrics.count("moonlet_tcp_\(role.rawValue)_connections_opened_total")
    }

    /// The connection's destination is decided: its Istio TCP series (reporter
    /// destination inbound, source outbound; the peer's principal when the hop is mTLS,
    /// its workload when the TCP metadata exchange told it) counts it opened. While the
    /// exchange is under way (`awaitingPeer`) the series waits for the peer's header.
    func recordOpened(destinationService: String, peerPrincipal: String, mtls: Bool) {
        if awaitingPeer { pendingOpen = (destinationService, peerPrincipal, mtls); return }
        let own = ctx.tls.map { "spiffe://" + $0.identity.principal } ?? ""
        let peer = peerPrincipal.isEmpty || peerPrincipal.hasPrefix("spiffe://") ? peerPrincipal : "spiffe://" + peerPrincipal
        let labels = IstioLabels.tcpLabels(inbound: role == .inbound, own: ctx.ownWorkload, peer: peerWorkload, ownPrincipal: own,
                                           peerPrincipal: peer, destinationService: destinationService, mtls: mtls)
        series = ctx.metrics.tcpSeries(labels)
        series?.opened()
    }

    /// The TCP metadata exchange is on for this connection: the series waits for it.
    var awaitingPeer = false
    var pendingOpen: (String, String, Bool)?
    /// The peer's workload from the exchange (nil: none, or the header did not decode).
    var peerWorkload: MeshWorkload?

    /// The peer's exchange header arrived (its node metadata Struct), or none will.
    func peerExchanged(_ structBytes: [UInt8]?) {
        if let b = structBytes, let m = TCPMetadataExchange.peer(structBytes: b) {
            peerWorkload = ctx.peerCache.workload(m, key: b)
        }
        ctx.metrics.count(peerWorkload == nil ? "moonlet_tcp_peer_exchange_failed_total" : "moonlet_tcp_peer_exchange_total")
        awaitingPeer = false
        if let (d, p, m) = pendingOpen { pendingOpen = nil; recordOpened(destinationService: d, peerPrincipal: p, mtls: m) }
    }

    /// The exchange handler for this session's mTLS side (`handshakeDone`: inbound, ALPN known).
    func peerExchange(handshakeDone: Bool) -> TCPPeerExchange {
        awaitingPeer = true
        return TCPPeerExchange(header: ctx.ownExchangeHeader, handshakeDone: handshakeDone) { [weak self] b in self?.peerExchanged(b) }
    }

    /// Bytes read on one side.
    @inline(__always)
    func activity(_ n: Int, fromClient: Bool) {
        lastActivity = NIODeadline.now().uptimeNanoseconds
        if fromClient { receivedBytes &+= UInt64(n) } else { sentBytes &+= UInt64(n) }
    }

    func armIdleTimer(_ ms: Int) {
        guard idleTimeoutMs > 0 else { return }
        idleTimer = ctx.loop.scheduleTask(in: .milliseconds(Int64(ms))) { [weak self] in
            guard let self, !self.finished else { return }
            let idle = Int((NIODeadline.now().uptimeNanoseconds &- self.lastActivity) / 1_000_000)
            if idle >= self.idleTimeoutMs {
                self.ctx.metrics.count("moonlet_tcp_idle_timeouts_total")
                self.closeBoth()
            } else {
                self.armIdleTimer(self.idleTimeoutMs - idle)
            }
        }
    }

    func closeBoth() {
        client.context?.close(promise: nil)
        upstream?.context?.close(promise: nil)
    }

    /// Connects to `address` (through TLS when `tls` is given) and starts relaying.
    /// `exchange`: the TLS is mesh mTLS, which offers Istio's TCP metadata exchange.
    func connect(to address: SocketAddress, tls: (() throws -> NIOSSLClientHandler)?, exchange: Bool = false, connectTimeoutMs: Int) {
        let up = TCPGlue(downstream: false)
        up.session = self
        upstream = up
        armIdleTimer(idleTimeoutMs)
        ClientBootstrap(group: ctx.loop)
            .channelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .channelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
            .connectTimeout(.milliseconds(Int64(connectTimeoutMs > 0 ? connectTimeoutMs : 10_000)))
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    if let tls {
                        try ch.pipeline.syncOperations.addHandler(try tls())
                        // Istio's TCP metadata exchange, when the peer sidecar takes its ALPN.
                        if exchange { try ch.pipeline.syncOperations.addHandler(self.peerExchange(handshakeDone: false)) }
                    }
                    try ch.pipeline.syncOperations.addHandler(up)
                }
            }
            .connect(to: address)
            .whenComplete { [self] r in
                switch r {
                case .success:
                    // Paired when the upstream channel is active (TCPGlue.channelActive): by
                    // then a TLS handler has begun its handshake and holds the client's
                    // early bytes and half-close until it is done (before, a half-close
                    // would pass under it and end the connection mid-handshake).
                    break
                case .failure(let e):
                    failure = "upstream connect error: \(e)"
                    ctx.metrics.count("moonlet_tcp_upstream_connect_failures_total")
                    client.context?.close(promise: nil)
                    ended()
                }
            }
    }

    /// The upstream channel is active: the two sides are glued (unless the client left).
    func upstreamActive(_ up: TCPGlue) {
        if client.context == nil { up.context?.close(promise: nil); return }
        client.pair(with: up)
    }

    /// Refuses the connection (BlackHoleCluster, RBAC, loop): the client is closed.
    func refuse(_ why: String, counter: String) {
        failure = why
        ctx.metrics.count(counter)
        client.context?.close(promise: nil)
        ended()
    }

    /// One side closed: the other goes too, once what was written to it is out (Envoy's
    /// FlushWrite close); once both are gone, the session ends.
    func sideClosed(_ g: TCPGlue) {
        if g === client { upstream?.closeAfterWrites() } else { client.closeAfterWrites() }
        if client.context == nil && (upstream?.context == nil) { ended() }
    }

    func ended() {
        guard !finished else { return }
        finished = true
        idleTimer?.cancel(); idleTimer = nil
        if let c = cluster, endpointIndex >= 0 { ctx.balancer.done(c, endpointIndex) }
        circuit?.connectionClosed(); circuit = nil
        let m = ctx.metrics
        // Closed before the peer's exchange header: the series counts it without the peer.
        if awaitingPeer { peerExchanged(nil) }
        if let t = series {
            t.closed()
            t.received(Int(clamping: receivedBytes))
            t.sent(Int(clamping: sentBytes))
        }
        m.count("moonlet_tcp_\(role.rawValue)_connections_closed_total")
        if let f = failure { ctx.logger.debug("tcp \(role.rawValue) connection ended: \(f)") }
        client.session = nil
        upstream?.session = nil
    }
}

/// One side of a TCPSession (the client's channel or the upstream's): what it reads is
/// written to its partner; it asks its channel for more only while the partner's
/// channel is writable (NIO's glue pattern: no unbounded buffering).
final class TCPGlue: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let downstream: Bool
    var session: TCPSession?
    var partner: TCPGlue?
    var context: ChannelHandlerContext?
    var pendingRead = false
    /// Client bytes read before the upstream connected (the sniffed first bytes, and at
    /// most one read more: reading waits for the partner).
    var pending: [ByteBuffer] = []
    var pendingEOF = false
    /// The other side is gone: this one is read on and what comes is dropped, while the
    /// bytes queued to it go out (closeAfterWrites). A peer blocked writing to us would
    /// otherwise never read what we still owe it.
    var draining = false

    init(downstream: Bool) { self.downstream = downstream }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        guard !downstream else { return }
        if (try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)) != nil {
            // NIOSSL begins its handshake right after passing channelActive on: pairing
            // waits for that, so that the client's early bytes and half-close are held by
            // it (a half-close before would go out as a FIN ahead of the ClientHello).
            context.eventLoop.execute { self.session?.upstreamActive(self) }
        } else {
            session?.upstreamActive(self)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    /// The upstream is connected: the client's early bytes (and EOF) go to it, and the
    /// client is read again.
    func pair(with up: TCPGlue) {
        partner = up
        up.partner = self
        for b in pending { up.partnerWrite(NIOAny(b)) }
        pending = []
        up.partnerFlush()
        if pendingEOF { up.partnerWriteEOF() }
        if pendingRead, up.partnerWritable { pendingRead = false; context?.read() }
        // The upstream asked to read before it had a partner (its TLS handshake needs it).
        if up.pendingRead, partnerWritable { up.pendingRead = false; up.context?.read() }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if draining { return }
        let b = unwrapInboundIn(data)
        session?.activity(b.readableBytes, fromClient: downstream)
        if let p = partner { p.partnerWrite(data) } else { pending.append(b) }
    }

    func channelReadComplete(context: ChannelHandlerContext) { partner?.partnerFlush() }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            // Half-close: the other side's output is shut once its writes are out.
            if let p = partner { p.partnerFlush(); p.partnerWriteEOF() } else { pendingEOF = true }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        let s = session
        self.context = nil
        s?.sideClosed(self)
        partner = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if session?.failure == nil { session?.failure = "\(downstream ? "client" : "upstream") error: \(error)" }
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    func read(context: ChannelHandlerContext) {
        if draining { context.read(); return }
        if let p = partner, p.partnerWritable { context.read() } else { pendingRead = true }
    }

    // Called by the partner.
    func partnerWrite(_ data: NIOAny) { context?.write(data, promise: nil) }
    func partnerFlush() { context?.flush() }
    /// The partner's input ended: this side's output is shut once every byte written
    /// before is out. Not at once: NIO turns a half-close into a full close when the
    /// channel's input is shut already (the client half-closed first), and a full close
    /// drops the writes still pending (the tail of the answer).
    func partnerWriteEOF() {
        context?.whenWritesAreOut { [weak self] result in
            guard let context = self?.context else { return }
            if case .failure = result { context.close(promise: nil); return }
            let p = context.eventLoop.makePromise(of: Void.self)
            // A transport that cannot half-close closes fully.
            p.futureResult.whenFailure { [weak self] _ in self?.context?.close(promise: nil) }
            context.close(mode: .output, promise: p)
        }
    }

    /// Closes this side once every byte written to it is out (its partner is gone), or
    /// after closeFlushTimeoutMs; meanwhile it is read and what comes is dropped.
    func closeAfterWrites() {
        guard let context, !draining else { return }
        draining = true
        if pendingRead { pendingRead = false; context.read() }
        context.closeWhenWritesAreOut(timeoutMs: session?.ctx.settings.limits.closeFlushTimeoutMs ?? 30_000)
    }

    func partnerBecameWritable() {
        if pendingRead { pendingRead = false; context?.read() }
    }
    var partnerWritable: Bool { context?.channel.isWritable ?? false }
}
