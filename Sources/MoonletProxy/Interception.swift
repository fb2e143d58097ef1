import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import MoonletCore
import MoonletConfig
import MoonletTLS
import MoonletBalancer
import MoonletTelemetry

/// The first handler an intercepted connection's bytes reach (after the inbound TLS
/// handlers, if any): decides, as Istio does, whether the connection is HTTP (handed to
/// the connection's DownstreamHandler, added in its place) or TCP (a TCPSession to the
/// original destination), then removes itself.
///
/// The decision, in order: a port whose protocol is declared (ServiceEntry port
/// `protocol` or name prefix; inbound: the ports of services this workload serves) is
/// taken as declared without waiting for bytes, which server-first protocols (MySQL)
/// need; an inbound mTLS connection from a peer sidecar is TCP when it negotiated Istio's
/// TCP ALPN ("istio", "istio-peer-exchange") and HTTP with an HTTP one; otherwise the
/// first bytes are sniffed (ProtocolSniffer). With a protocolDetectionTimeout (mesh
/// config, 0 by default: none) a connection still undecided then is TCP.
final class InterceptionHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer

    let ctx: LoopContext
    let role: ListenerRole
    let downstream: DownstreamHandler
    let original: InterceptedDestination
    /// The declared protocol of the original destination's port (.sniff: undeclared).
    let declared: PortProtocol
    /// The service port and target the original destination names (outbound).
    let target: AddressTarget?
    var buffered: ByteBuffer?
    var decided = false
    var inputClosed = false
    var waitingForTLS = false
    var timer: Scheduled<Void>?

    init(ctx: LoopContext, role: ListenerRole, downstream: DownstreamHandler, original: SocketAddress) {
        self.ctx = ctx
        self.role = role
        self.downstream = downstream
        let o = InterceptedDestination(original)
        self.original = o
        let index = ctx.snapshot.routes.addressIndex
        if role == .outbound {
            let t = index.lookup(ip: o.ip, port: o.port)
            target = t
            declared = t?.protocolKind ?? .sniff
        } else {
            target = nil
            declared = index.localPorts[o.port] ?? .sniff
        }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // A client's FIN before the decision must not close the connection with its bytes
        // unread (a TCP client may send and half-close at once); HTTP turns it off again.
        _ = try? context.channel.syncOptions?.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
    }

    func channelActive(context: ChannelHandlerContext) {
        let sync = context.pipeline.syncOperations
        waitingForTLS = role == .inbound && ((try? sync.handler(type: NIOSSLServerHandler.self)) != nil || (try? sync.handler(type: TLSSniffer.self)) != nil)
        // A declared TLS port still waits for the ClientHello: its SNI may route it.
        if !waitingForTLS && declared != .sniff && declared != .tls {
            decide(context, declared.isHTTP ? .http1 : .tcp)
            return
        }
        let ms = ctx.interception.detectionTimeoutMs
        if ms > 0 {
            timer = context.eventLoop.scheduleTask(in: .milliseconds(Int64(ms))) { [weak self] in
                guard let self, !self.decided, let c = self.contextRef else { return }
                self.ctx.metrics.count("moonlet_protocol_detection_timeouts_total")
                self.decide(c, .tcp)
            }
        }
        contextRef = context
    }
    /// This handler's context while it waits (for the detection timer).
    var contextRef: ChannelHandlerContext?
    /// The ALPN the mTLS handshake settled on (inbound), nil before or without TLS.
    var negotiatedALPN: String?

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel(); timer = nil
        contextRef = nil
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted(let proto) = event {
            // The connection's handler takes the peer identity, cancels its handshake timer.
            downstream.userInboundEventTriggered(context: context, event: event)
            guard context.channel.isActive, !decided else { return }
            waitingForTLS = false
            releaseEOF(context)
            negotiatedALPN = proto
            if TLSMaterial.isTCPALPN(proto) { decide(context, .tcp); return }
            if let p = proto, p == "h2" || p == "http/1.1" || p.hasPrefix("istio-http") { decide(context, .http1); return }
            if declared != .sniff { decide(context, declared.isHTTP ? .http1 : .tcp) }
            return
        }
        if case ChannelEvent.inputClosed = event, !decided {
            inputClosed = true
            let r = classifyNow(final: true)
            decide(context, declared == .tls && (r == .http1 || r == .http2) ? .tcp : r)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // TLS refusals are logged and counted by the connection's handler.
        downstream.errorCaught(context: context, error: error)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = unwrapInboundIn(data)
        if buffered == nil { buffered = b } else { buffered!.writeBuffer(&b) }
        guard !decided else { return }
        // A declared port (here: inbound, after PERMISSIVE found plaintext): as declared.
        if declared != .sniff && declared != .tls { decide(context, declared.isHTTP ? .http1 : .tcp); return }
        let r = classifyNow(final: false)
        if declared == .tls, r != .needMore {
            // A declared TLS port is TLS or opaque TCP, never HTTP.
            if case .tls = r { decide(context, r) } else { decide(context, .tcp) }
            return
        }
        if r != .needMore { decide(context, r) }
    }

    func classifyNow(final: Bool) -> ProtocolSniffer.Result {
        guard let b = buffered, b.readableBytes > 0 else { return final ? .tcp : .needMore }
        let r = ProtocolSniffer.classify(b.readableBytesView)
        if r == .needMore && (final || b.readableBytes >= ProtocolSniffer.maxBytes) { return .tcp }
        return r
    }

    /// Lets a FIN held by EarlyEOFHold through (once the handshake is done or the
    /// protocol decided).
    func releaseEOF(_ context: ChannelHandlerContext) {
        guard role == .inbound, let hold = try? context.pipeline.syncOperations.handler(type: EarlyEOFHold.self) else { return }
        // After this handler's own work: the event goes through the TLS handler, then here.
        context.eventLoop.execute { hold.release() }
    }

    func decide(_ context: ChannelHandlerContext, _ r: ProtocolSniffer.Result) {
        guard !decided else { return }
        decided = true
        timer?.cancel(); timer = nil
        releaseEOF(context)
        switch r {
        case .http1, .http2, .needMore: startHTTP(context)
        case .tls(let sni): startTCP(context, sni: sni)
        case .tcp: startTCP(context, sni: nil)
        }
    }

    /// HTTP: the connection's DownstreamHandler takes over, as on a non-intercepted
    /// connection, with the original destination for its streams.
    func startHTTP(_ context: ChannelHandlerContext) {
        ctx.metrics.count("moonlet_intercepted_http_connections_total")
        _ = try? context.channel.syncOptions?.setOption(ChannelOptions.allowRemoteHalfClosure, value: false)
        downstream.interception = original
        do { try context.pipeline.syncOperations.addHandler(downstream, position: .after(self)) } catch { context.close(promise: nil); return }
        // The mTLS peer was authenticated before the handler saw its connection open
        // (which resets its peer): the identity is kept.
        let identity = downstream.peer
        context.fireChannelActive()
        downstream.peer.principal = identity.principal
        downstream.peer.namespace = identity.namespace
        if let b = buffered {
            buffered = nil
            context.fireChannelRead(wrapInboundOut(b))
            context.fireChannelReadComplete()
        }
        if inputClosed { context.close(promise: nil); return }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    /// TCP (or TLS the app originated, passed through untouched): a TCPSession to where the
    /// original destination leads.
    func startTCP(_ context: ChannelHandlerContext, sni: String?) {
        let session = TCPSession(ctx: ctx, role: role, idleTimeoutMs: 3_600_000)
        let glue = session.client
        glue.pendingRead = true
        // Istio's TCP metadata exchange (inbound, its ALPN negotiated over mTLS): the
        // caller's header is read off the stream before the glue sees a byte.
        let exchange = role == .inbound && negotiatedALPN == TCPMetadataExchange.alpn ? session.peerExchange(handshakeDone: true) : nil
        do {
            if let exchange {
                try context.pipeline.syncOperations.addHandler(exchange, position: .after(self))
                try context.pipeline.syncOperations.addHandler(glue, position: .after(exchange))
            } else {
                try context.pipeline.syncOperations.addHandler(glue, position: .after(self))
            }
        } catch { context.close(promise: nil); return }
        if exchange != nil, let b = buffered, b.readableBytes > 0 {
            // Bytes read before the decision begin with the header: through the exchange.
            buffered = nil
            context.fireChannelRead(wrapInboundOut(b))
        }
        if let b = buffered, b.readableBytes > 0 { glue.pending.append(b) }
        buffered = nil
        if inputClosed {
            if exchange != nil { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) } else { glue.pendingEOF = true }
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        if role == .inbound { routeInbound(session, context.channel) } else { routeOutbound(session, context.channel, sni: sni) }
    }

    /// Inbound TCP: authorization (the mTLS peer's identity, addresses, port), then the
    /// app on 127.0.0.1 at the original destination port.
    func routeInbound(_ session: TCPSession, _ ch: Channel) {
        let port = original.port
        if ctx.ownPorts.contains(port) {
            session.refuse("inbound connection to the proxy's own port \(port)", counter: "moonlet_tcp_loop_refused_total")
            return
        }
        if let authz = ctx.interception.tcpAuthz {
            let peer = downstream.peer
            let c = TCPAuthorization.Connection(principal: peer.principal, namespace: peer.namespace, sourceIP: ch.remoteAddress?.ipAddress ?? "",
                                                destinationIP: original.ip, destinationPort: port)
            if case .denied(let id) = authz.evaluate(c) {
                session.refuse("RBAC: access denied (policy \(id)) for \(peer.principal.isEmpty ? c.sourceIP : peer.principal)", counter: "envoy_tcp_rbac_denied")
                return
            }
            ctx.metrics.count("envoy_tcp_rbac_allowed")
        }
        guard let app = try? SocketAddress(ipAddress: "127.0.0.1", port: port) else { session.refuse("bad port", counter: "moonlet_tcp_refused_total"); return }
        let peer = downstream.peer.principal
        session.recordOpened(destinationService: ctx.inboundService == "unknown" ? "unknown"
                                : "\(ctx.inboundService).\(ctx.settings.identity.namespace).svc.cluster.local",
                             peerPrincipal: peer, mtls: !peer.isEmpty)
        session.connect(to: app, tls: nil, connectTimeoutMs: 0)
    }

    /// Outbound TCP: a service (by VIP or endpoint address, or by the SNI of a ClientHello
    /// to a known host on that port) through its cluster, with the cluster's TLS (auto
    /// mTLS to mesh workloads); anything else by outboundTrafficPolicy. A VirtualService
    /// of the service (or, for TLS, of the SNI's host) with `tls`/`tcp` rules picks the
    /// cluster instead: the first rule matching the original destination (and SNI), then
    /// one of its destinations by weight (L4Routes.swift); a service reached by one of its
    /// endpoint addresses keeps that endpoint.
    func routeOutbound(_ session: TCPSession, _ ch: Channel, sni: String?) {
        let routes = ctx.snapshot.routes
        var t = target
        if t == nil, let sni, let svc = routes.lookup(sni)?.service, let sp = svc.ports.first(where: { $0.number == original.port }) {
            t = AddressTarget(service: svc, port: sp, cluster: svc.clusters["|\(sp.number)"], endpointIndex: -1)
        }
        // The VirtualService's L4 rules: of the service addressed, else of the SNI's host.
        var vh: VirtualHost?
        if let t, t.endpointIndex < 0 { vh = routes.hosts[t.service.fqdn] }
        if t == nil, let sni { vh = routes.lookup(sni) }
        if let v = vh, v.hasL4Routes, let rule = v.l4Route(ip: original.ip, port: original.port, sni: sni) {
            // The service port dialled (a VIP's port; for a TLS connection found by SNI, its port).
            let rt = rule.target(random: ctx.rng.next(), port: t?.port.number ?? original.port)
            guard let c = rt.cluster, let svc = routes.services[rt.fqdn] else {
                session.refuse("VirtualService \(v.virtualService): no cluster \(rt.missing)", counter: "moonlet_tcp_refused_total")
                return
            }
            ctx.metrics.count("moonlet_tcp_virtualservice_routed_total")
            connectOutbound(session, cluster: c, endpointIndex: -1, fqdn: svc.fqdn)
            return
        }
        guard let t else {
            if ctx.interception.registryOnly {
                session.refuse("BlackHoleCluster: \(original.ip):\(original.port) is no known service (REGISTRY_ONLY)", counter: "moonlet_tcp_blackhole_total")
                return
            }
            if OriginalDestination.isSelf(ip: original.ip, port: original.port, local: ch.localAddress, ownPorts: ctx.ownPorts) {
                session.refuse("connection to the proxy itself (\(original.ip):\(original.port))", counter: "moonlet_tcp_loop_refused_total")
                return
            }
            ctx.metrics.count("moonlet_tcp_passthrough_total")
            session.recordOpened(destinationService: "\(original.ip):\(original.port)", peerPrincipal: "", mtls: false)
            session.connect(to: original.address, tls: nil, connectTimeoutMs: 0)
            return
        }
        guard let c = t.cluster else { session.refuse("no cluster for \(t.service.fqdn):\(t.port.number)", counter: "moonlet_tcp_refused_total"); return }
        connectOutbound(session, cluster: c, endpointIndex: t.endpointIndex, fqdn: t.service.fqdn)
    }

    /// Connects an outbound session through cluster `c` (endpoint `endpointIndex`, or -1:
    /// the balancer picks) of service `fqdn`, with the cluster's TLS and limits.
    func connectOutbound(_ session: TCPSession, cluster c: ClusterInfo, endpointIndex: Int, fqdn: String) {
        session.idleTimeoutMs = c.settings.tcpIdleTimeoutMs
        let i: Int
        if endpointIndex >= 0 { i = endpointIndex; ctx.balancer.use(c, i) } else {
            guard let p = ctx.balancer.pick(c) else { session.refuse("no healthy upstream for \(c.name)", counter: "moonlet_tcp_no_healthy_upstream_total"); return }
            i = p
        }
        session.cluster = c
        session.endpointIndex = i
        let cc = ctx.balancer.circuit(c)
        guard cc.tryOpenConnection(max: c.maxConnections) else {
            session.refuse("\(c.name): maxConnections reached", counter: "moonlet_tcp_overflow_total")
            return
        }
        session.circuit = cc
        let e = c.endpoint(i)
        if let tls = c.tls(i) {
            if tls.mode == .istioMutual && ctx.tls == nil && !tls.automatic {
                session.refuse("ISTIO_MUTUAL needs a workload certificate (--certs)", counter: "moonlet_tcp_refused_total")
                return
            }
            if tls.mode != .istioMutual && !(tls.context is NIOSSLContext) && (tls.mode == .simple || tls.mode == .mutual) {
                session.refuse("the DestinationRule's TLS files could not be loaded", counter: "moonlet_tcp_refused_total")
                return
            }
        }
        let makeTLS = UpstreamTLSPlan(c.tls(i), meshMaterial: ctx.tls, serverName: fqdn, tcp: true).make
        // The peer's principal as the mTLS check expects it (the endpoint's service account).
        let mtls = c.tls(i)?.mode == .istioMutual && ctx.tls != nil
        let expectedPeer = mtls ? (c.tls(i)?.subjectAltNames.first ?? "") : ""
        // Mesh mTLS offers Istio's TCP metadata exchange: the series waits for the peer's header.
        if mtls { session.awaitingPeer = true }
        session.recordOpened(destinationService: fqdn, peerPrincipal: expectedPeer, mtls: mtls)
        resolveAndConnect(session, host: e.address, port: e.port, tls: makeTLS, exchange: mtls, timeoutMs: c.connectTimeoutMs)
    }

    /// A DNS endpoint: resolved off the loop (the upstream pool's resolver), then connected.
    func resolveAndConnect(_ session: TCPSession, host: String, port: Int, tls: (() throws -> NIOSSLClientHandler)?, exchange: Bool, timeoutMs: Int) {
        switch ctx.pool.address(host: host, port: port, ready: { self.resolveAndConnect(session, host: host, port: port, tls: tls, exchange: exchange, timeoutMs: timeoutMs) }) {
        case .ready(let a): session.connect(to: a, tls: tls, exchange: exchange, connectTimeoutMs: timeoutMs)
        case .pending: break
        case .failed(let e): session.refuse("DNS resolution of \(host) failed: \(e)", counter: "moonlet_tcp_upstream_connect_failures_total")
        }
    }
}

/// First handler of an intercepted inbound connection: holds back the client's FIN
/// (ChannelEvent.inputClosed) until the InterceptionHandler has seen the TLS handshake
/// complete or decided the protocol. A client that sends its bytes and half-closes at once
/// (through a peer sidecar: its data, close_notify and FIN in one flight) would otherwise
/// have its FIN reach the TLS handler while the peer's certificate is still being checked,
/// which ends the handshake as "EOF during handshake".
final class EarlyEOFHold: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    var held = false
    var released = false
    var context: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if !released, case ChannelEvent.inputClosed = event { held = true; return }
        context.fireUserInboundEventTriggered(event)
    }

    /// The handshake is done (or the protocol decided): a held FIN goes on, and the
    /// handler leaves the pipeline.
    func release() {
        guard !released, let context else { return }
        released = true
        if held { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
