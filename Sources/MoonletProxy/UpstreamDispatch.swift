import NIOCore
import NIOSSL
import MoonletCore
import MoonletBalancer
import MoonletTLS

// MARK: - Upstream dispatch
//
// The upstream side of a stream (phase 4 and 5 of docs/architecture.md): endpoint choice,
// circuit limits and the pool wait, name resolution, connect and TLS, the request bytes
// and their replay copy, mirrors, and the retry decision with the filters'
// on_upstream_failure phase.

/// The upstream dispatcher of a handler's streams: one per DownstreamHandler (per HTTP/1.1
/// connection, reused by its keep-alive requests; per HTTP/2 stream), taken from and given
/// back to its loop's pool (LoopContext.takeDispatcher), so a request costs no allocation
/// of it. It keeps the current attempt's state and calls the handler (the stream, its
/// request state, local replies, upstream writes) directly through `h`.
final class UpstreamDispatcher {
    let ctx: LoopContext
    /// The handler's limits (a pooled dispatcher may serve a handler made after a reload).
    var limits: ProxyLimits { h.limits }
    /// The handler this dispatcher serves. Not retained: the handler owns the dispatcher,
    /// and every callback the dispatcher schedules captures the handler strongly (as the
    /// handler's own callbacks do), so the handler outlives them all.
    unowned(unsafe) var h: DownstreamHandler!
    /// Where the current attempt's upstream side is (idle, resolving, waiting for a
    /// connection, connecting, attached to a connection).
    var state = UpstreamState.idle
    /// Request bytes waiting for the connection being made.
    var pending: ByteBuffer?
    var perTryTimer: Scheduled<Void>?
    /// Retry attempt of the current stream (0 = first try) and the request bytes
    /// kept to replay it.
    var attempt = 0
    var replay: ByteBuffer?
    /// Where the body starts in `replay`.
    var replayHeadLength = 0
    /// Set while the stream waits for a connection (cluster at maxConnections).
    var waiter: PoolWaiter?
    var waitingCircuit: CircuitCounters?
    var waitTimer: RepeatedTask?
    /// The cluster retry slot (maxRetries) of the attempt in flight.
    var retrySlotHeld: CircuitCounters?
    /// Whether the stream counts against its cluster's http2MaxRequests (a counter slot
    /// held, independent of the attempt's state: kept across retries).
    var holdsRequestSlot = false
    /// Mirror copies waiting for the request to complete.
    var mirrorHeads: [(UpstreamCluster, ByteBuffer)] = []
    /// TLS setting of the endpoint the current attempt goes to (nil: plaintext).
    var tls: UpstreamTLS?
    /// The request bytes' shape (upstreamRequestBytes), for an HTTP/2 upstream, which
    /// writes the head from the parsed one: the HTTP/1.1 head's length at their start,
    /// and the body's length after it (-1: chunk-framed).
    var requestHeadBytes = 0
    var requestBodyLength: Int64 = 0
    /// The HTTP/1.1 head of a request without body is not in `pending`: the request was
    /// dispatched for an HTTP/2 upstream (start), and attach writes it only for an
    /// HTTP/1.1 connection.
    var headDeferred = false
    /// Whether the body gathered during a fault-injection delay is chunk-framed (holdBody).
    var earlyChunked = false

    init(ctx: LoopContext) {
        self.ctx = ctx
    }

    /// The connection the current attempt is attached to (nil in every other upstream
    /// state); setting nil makes the upstream side idle.
    @inline(__always)
    var upstream: UpstreamConnection? {
        get { if case .attached(let c) = state { return c } else { return nil } }
        set { state = newValue.map { .attached($0) } ?? .idle }
    }

    /// Back to the state of a new dispatcher (its handler is gone; LoopContext.giveBack).
    func reset() {
        h = nil
        state = .idle
        pending = nil
        headDeferred = false
        perTryTimer?.cancel(); perTryTimer = nil
        attempt = 0
        replay = nil
        replayHeadLength = 0
        if waiter != nil { stopWaiting() }
        retrySlotHeld?.retryDone(); retrySlotHeld = nil
        holdsRequestSlot = false
        mirrorHeads = []
        tls = nil
    }

    /// The stream ended: the attempt's slots, waits and copies are let go (the
    /// connection itself is dealt with by the handler before).
    func streamEnded(_ s: ProxyStream) {
        perTryTimer?.cancel(); perTryTimer = nil
        replay = nil
        mirrorHeads = []
        if waiter != nil { stopWaiting() }
        retrySlotHeld?.retryDone(); retrySlotHeld = nil
        if holdsRequestSlot, let c = s.route.upstreamCluster { ctx.balancer.circuit(c).requestDone() }
        holdsRequestSlot = false
    }

    /// Picks the endpoint (balancer, outlier state), or uses the route's host:port.
    /// Returns host, port and pool key, or nil after answering locally.
    func chooseEndpoint(_ s: ProxyStream, avoid: Int = -1) -> (String, Int, String)? {
        if s.route.endpoint.isEmpty, let c = s.route.upstreamCluster {
            var picked = ctx.balancer.pick(c, hash: avoid >= 0 ? nil : s.route.hashKey)
            // A retry prefers a different host (a few tries).
            var tries = 0
            while let p = picked, p == avoid, c.endpointCount > 1, tries < 3 {
                ctx.balancer.done(c, p)
                picked = ctx.balancer.pick(c)
                tries += 1
            }
            guard let i = picked else {
                reply503(s, "no healthy upstream", .noHealthyUpstream)
                return nil
            }
            let e = c.endpoint(i)
            s.route.endpointIndex = i
            s.route.endpoint = e.address
            s.route.endpointPort = e.port
            s.destination.address = e.address
            s.destination.port = e.port
        } else if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster {
            ctx.balancer.use(c, s.route.endpointIndex)  // a filter's endpoint override: counted as a pick is
        }
        if s.route.upstreamCluster == nil && s.route.cluster == "BlackHoleCluster" {
            // outboundTrafficPolicy REGISTRY_ONLY (or a request that would loop to this
            // proxy): Istio's block_all virtual host answers 502.
            s.respond(502, body: "", headers: [], flags: [])
            h.sendLocalReply()
            return nil
        }
        let host = s.route.endpoint.isEmpty ? s.route.host : s.route.endpoint
        let port = s.route.endpoint.isEmpty ? s.route.port : s.route.endpointPort
        // A port outside 1-65535 (a filter's route) would trap in the address code.
        if host.isEmpty || !(1...65535).contains(port) {
            s.respond(404, body: "", headers: [], flags: .noRouteFound)
            h.sendLocalReply()
            return nil
        }
        var key: String
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster { key = c.poolKey(s.route.endpointIndex) }
        else if h.role == .inbound && host == ctx.inboundRoute.host && port == ctx.inboundRoute.port { key = ctx.inboundKey }
        else { key = "\(host):\(port)" }
        s.upstreamHost = key
        tls = nil
        if s.route.endpointIndex >= 0, let c = s.route.upstreamCluster, let t = c.tls(s.route.endpointIndex) {
            if t.mode == .istioMutual && ctx.tls == nil {
                // Auto mTLS without a workload certificate: reach the workload in plaintext.
                if !t.automatic {
                    reply503(s, "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: ISTIO_MUTUAL needs a workload certificate (--certs)", .upstreamConnectionFailure)
                    return nil
                }
            } else if (t.mode == .simple || t.mode == .mutual) && t.context == nil {
                // The file error is in the log (at load); the client gets no file system path.
                reply503(s, "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: the DestinationRule's TLS files could not be loaded", .upstreamConnectionFailure)
                return nil
            } else {
                tls = t
                key += t.poolTag
            }
        }
        return (host, port, key)
    }

    /// Picks the upstream from the route decision and sends the request head.
    func start() {
        guard let s = h.stream, let (host, port, key) = chooseEndpoint(s) else { return }
        h.armStreamTimer(s)
        if let t = tls, t.mode == .istioMutual, ctx.tls != nil, !s.upstreamMeshMTLS {
            // A mesh workload over mTLS: it learns this workload from the metadata exchange headers.
            s.upstreamMeshMTLS = true
            if h.role == .outbound { s.withRequest { PeerExchange.addOwn(&$0, ctx: ctx) } }
        }
        attempt = 0
        // Body bytes gathered during a fault-injection delay (holdBody), framed as the
        // request was then.
        let early = pending
        pending = nil
        let chunked = early != nil ? earlyChunked : h.requestChunked
        let keepsReplay = (s.route.retry != nil && s.route.retry!.attempts > 0) || !s.route.mirrors.isEmpty || h.exec.wantsUpstreamFailure
        if s.request.framing == .none && s.route.mirrors.isEmpty && !h.requestState.isBuffered && asksForHTTP2(s) {
            // A request without body to an HTTP/2 upstream, which writes HEADERS from the
            // parsed head: the HTTP/1.1 head is written only if the connection turns out to
            // speak HTTP/1.1 (attach). A retry rebuilds it from the head (rebuiltRequest).
            // A request with a body is written whole now: its bytes are what a retry
            // replays (Istio's router filter asks for on_upstream_failure on every route).
            headDeferred = true
            requestHeadBytes = 0
            requestBodyLength = 0
            replay = nil
            replayHeadLength = 0
            pending = early ?? ctx.outputBuffer(capacity: 0)
        } else {
            var out = upstreamRequestBytes(s, chunked: chunked)
            // Where the body starts in the replay copy (a body buffered for a filter is
            // already in `out`, after the head).
            replayHeadLength = requestHeadBytes
            if var e = early { out.writeBuffer(&e); ctx.recycle(e) }
            replay = keepsReplay ? out : nil
            if !s.route.mirrors.isEmpty {
                prepareMirrors(s, chunked: chunked, bufferedLength: h.requestState.isBuffered ? Int(requestBodyLength) : nil)
            }
            pending = out
        }
        dispatch(host: host, port: port, key: key)
    }

    /// The request waits (a fault-injection delay) before `start`: body bytes that come
    /// meanwhile are gathered in `pending` (requestBodyChunk, requestBodyEnd), framed as
    /// the request is now, and go after the head.
    func holdBody() {
        pending = ctx.outputBuffer(capacity: 0)
        earlyChunked = h.requestChunked
    }

    /// The body's length a request head announces (-1: chunk-framed or until close).
    @inline(__always)
    static func bodyLength(_ framing: BodyFraming) -> Int64 {
        switch framing {
        case .contentLength(let n): return n
        case .chunked, .untilClose: return -1
        case .none: return 0
        }
    }

    /// The upstream request as it is first sent: the head with the filters' edits
    /// spliced in, and a body buffered for a filter (with its content-length).
    func upstreamRequestBytes(_ s: ProxyStream, chunked: Bool? = nil) -> ByteBuffer {
        var out = requestHead(s, chunked: chunked ?? h.requestChunked)
        if h.requestState.isBuffered, var body = s.bufferedRequestBody {
            // The whole body was buffered for a filter: send it with a content-length.
            if h.requestChunked {
                out = ctx.allocator.buffer(capacity: s.request.bytes.readableBytes + 256 + body.readableBytes)
                s.request.removeAll(of: .contentLength)
                HeadWriter.writeRequest(s.request, into: &out) { o in
                    HeadWriter.writeField("content-length", String(body.readableBytes), into: &o)
                }
                requestHeadBytes = out.readableBytes
            }
            requestBodyLength = Int64(body.readableBytes)
            out.writeBuffer(&body)
            h.requestChunked = false
        }
        return out
    }

    /// The request head as HTTP/1.1 (`chunked`: the body is sent chunk-framed).
    func requestHead(_ s: ProxyStream, chunked: Bool) -> ByteBuffer {
        var out = ctx.outputBuffer(capacity: s.request.bytes.readableBytes + 256)
        s.withRequest { head in
            HeadWriter.writeRequest(head, into: &out) { o in
                if chunked { o.writeStaticString("transfer-encoding: chunked\r\n") }
            }
        }
        requestHeadBytes = out.readableBytes
        headDeferred = false
        requestBodyLength = Self.bodyLength(s.request.framing)
        return out
    }

    /// The request to send again when no replay copy was kept (a filter asked to retry
    /// on a route without a retry policy): rebuilt from the head when the request has no
    /// body; nil otherwise (streamed body bytes are gone).
    func rebuiltRequest(_ s: ProxyStream) -> ByteBuffer? {
        guard s.request.framing == .none else { return nil }
        return upstreamRequestBytes(s)
    }

    /// Takes an idle pooled connection or connects, then sends `pending`.
    func dispatch(host: String, port: Int, key: String) {
        guard let s = h.stream else { return }
        armPerTryTimer(s)
        let cl = s.route.upstreamCluster
        if let cl, !holdsRequestSlot {
            // http2MaxRequests: active requests per cluster across the sidecar.
            let cc = ctx.balancer.circuit(cl)
            guard cc.tryRequest(max: cl.maxRequests) else {
                replyOverflow(s)
                return
            }
            holdsRequestSlot = true
        }
        if let c = ctx.pool.takeIdle(key, idleTimeoutMs: cl?.idleTimeoutMs ?? 0, maxDurationMs: cl?.maxConnectionDurationMs ?? 0) {
            attach(c)
            return
        }
        if asksForHTTP2(s) {
            // A stream of an open HTTP/2 connection with room for it is attached at once,
            // without the callbacks the other cases need (two allocations per request).
            if let session = ctx.pool.session(key, maxRequests: cl?.maxRequestsPerConnection ?? 0, maxDurationMs: cl?.maxConnectionDurationMs ?? 0),
               session.opensAtOnce {
                attach(session.newStream())
                return
            }
            // A full connection, or one being set up, gives the request a stream once it
            // can (connected); `otherwise` dispatches it again.
            state = .connecting
            if ctx.pool.openStream(key, maxRequests: cl?.maxRequestsPerConnection ?? 0, maxDurationMs: cl?.maxConnectionDurationMs ?? 0,
                                   connected(stream: s.id, attempt: attempt),
                                   // The connection being set up failed, chose HTTP/1.1 or is full.
                                   otherwise: redispatch(s.id, host: host, port: port, key: key)) { return }
            state = .idle
        }
        let address: SocketAddress
        // A name being resolved (off the loop) dispatches again once its lookup is done.
        switch ctx.pool.address(host: host, port: port, ready: redispatch(s.id, host: host, port: port, key: key)) {
        case .ready(let a): address = a
        case .pending:
            state = .resolving
            return
        case .failed(let e):
            upstreamFailed(.connectFailed("DNS resolution of \(host) failed: \(e)"))
            return
        }
        // Circuit breaking: connections are bounded per cluster across the sidecar;
        // past the bound a bounded number of streams wait, the rest get 503 UO at once.
        var slot: CircuitCounters? = nil
        if let cl = s.route.upstreamCluster {
            let cc = ctx.balancer.circuit(cl)
            if !cc.tryOpenConnection(max: cl.maxConnections) {
                if cc.tryWait(max: cl.maxPendingRequests) {
                    startWaiting(s, cc, cl, host: host, port: port, key: key, address: address)
                    return
                }
                replyOverflow(s)
                return
            }
            slot = cc
        }
        connect(s, key: key, address: address, slot: slot)
    }

    /// Starts `dispatch` over for stream `sid` once what it waited for is settled (a
    /// name lookup, an HTTP/2 connection being set up), if the stream is still current.
    func redispatch(_ sid: UInt64, host: String, port: Int, key: String) -> () -> Void {
        let h: DownstreamHandler = self.h
        let try_ = attempt
        return {
            // A retry (after a per-try timeout) moved on meanwhile: this wait is over.
            guard h.stream?.id == sid, self.attempt == try_, !h.closed else { return }
            self.state = .idle
            self.dispatch(host: host, port: port, key: key)
        }
    }

    /// Waits for a connection: one released on this loop for the same host, or a
    /// free slot (checked every 10 ms, since slots free up on other loops too).
    func startWaiting(_ s: ProxyStream, _ cc: CircuitCounters, _ cl: UpstreamCluster, host: String, port: Int, key: String, address: SocketAddress) {
        let sid = s.id, try_ = attempt
        let h: DownstreamHandler = self.h
        waitingCircuit = cc
        let w = PoolWaiter(key: key) { c in
            guard let cur = h.stream, cur.id == sid, self.attempt == try_, self.waiter != nil, !h.closed else { return false }
            self.stopWaiting()
            self.attach(c)
            return true
        }
        waiter = w
        state = .waiting
        ctx.pool.wait(w)
        waitTimer = ctx.loop.scheduleRepeatedTask(initialDelay: .milliseconds(10), delay: .milliseconds(10)) { _ in
            guard let cur = h.stream, cur.id == sid, self.waiter != nil else { return }
            if cc.tryOpenConnection(max: cl.maxConnections) {
                self.stopWaiting()
                self.connect(cur, key: key, address: address, slot: cc)
            }
        }
    }

    func stopWaiting() {
        if let w = waiter { ctx.pool.removeWaiter(w); waiter = nil }
        if case .waiting = state { state = .idle }
        waitTimer?.cancel(); waitTimer = nil
        waitingCircuit?.doneWaiting(); waitingCircuit = nil
    }

    func connect(_ s: ProxyStream, key: String, address: SocketAddress, slot: CircuitCounters?) {
        state = .connecting
        // A mesh (ISTIO_MUTUAL) connection with a workload certificate offers h2 by ALPN;
        // a plaintext one to an HTTP/2 port speaks h2c (prior knowledge).
        let h2 = asksForHTTP2(s)
        let plan = UpstreamTLSPlan(tls, meshMaterial: ctx.tls, serverName: s.route.host, offerH2: h2)
        ctx.pool.connect(key: key, address: address, timeoutMs: s.route.upstreamCluster?.connectTimeoutMs ?? 0,
                         keepalive: s.route.upstreamCluster?.tcpKeepalive, tls: plan.make, tlsExpected: plan.expected, tlsMesh: plan.mesh, offersH2: h2,
                         h2c: h2 && plan.make == nil, slot: slot, connected(stream: s.id, attempt: attempt))
    }

    /// Whether the upstream connection speaks HTTP/2. Over mesh mTLS (ALPN h2): by the
    /// cluster's UpstreamProtocol and, for `likeDownstream`, what this stream's client
    /// spoke. In plaintext (h2c, prior knowledge): to the app when its port is declared
    /// HTTP2/GRPC (inbound, RouteTable.inboundHTTP2Ports), or to a cluster whose port is
    /// (outbound without mTLS, UpstreamProtocol.http2 from the port's protocol).
    func asksForHTTP2(_ s: ProxyStream) -> Bool {
        guard let t = tls else {
            if h.role == .inbound {
                let ports = ctx.snapshot.routes.inboundHTTP2Ports
                return !ports.isEmpty && ports.contains(s.route.endpoint.isEmpty ? s.route.port : s.route.endpointPort)
            }
            return s.route.upstreamCluster?.upstreamProtocol == .http2
        }
        guard t.mode == .istioMutual, ctx.tls != nil, let cl = s.route.upstreamCluster else { return false }
        switch cl.upstreamProtocol {
        case .http1: return false
        case .http2: return true
        case .likeDownstream: return h.http2Stream
        }
    }

    /// Completion of a connect or a new HTTP/2 stream: attaches the connection if the
    /// stream and attempt that asked for it are still current, else gives it back.
    func connected(stream sid: UInt64, attempt try_: Int) -> (Result<UpstreamConnection, Error>) -> Void {
        let h: DownstreamHandler = self.h
        return { r in
            let current = h.stream.map { $0.id == sid } == true && self.attempt == try_
            switch r {
            case .success(let c):
                guard current, !h.closed else { self.ctx.pool.release(c); return }
                self.attach(c)
            case .failure(let e):
                guard current else { return }
                self.state = .idle
                self.upstreamFailed(e as? UpstreamFailure ?? .connectFailed("\(e)"))
            }
        }
    }

    /// Answers 503 locally with an Envoy response flag.
    func reply503(_ s: ProxyStream, _ body: String, _ flag: ResponseFlags) {
        s.respond(503, body: body, flags: flag)
        h.sendLocalReply()
    }

    /// Circuit breaking overflow (UO): counted and answered at once.
    func replyOverflow(_ s: ProxyStream) {
        ctx.metrics.count("moonlet_upstream_overflow_total")
        reply503(s, "upstream connect error or disconnect/reset before headers. reset reason: overflow", .upstreamOverflow)
    }

    /// Builds the head of each mirror copy: the same request with the shadow authority,
    /// closing its connection after the (ignored) response.
    func prepareMirrors(_ s: ProxyStream, chunked: Bool, bufferedLength: Int? = nil) {
        mirrorHeads = s.route.mirrors.map { m in
            var head = s.request
            head.set("host", m.authority)
            head.hostIndex = -1
            // A body buffered for a filter goes whole, with its (possibly new) length.
            if bufferedLength != nil { head.removeAll(of: .contentLength) }
            var b = ctx.allocator.buffer(capacity: head.bytes.readableBytes + 64)
            HeadWriter.writeRequest(head, into: &b) { o in
                if let n = bufferedLength { HeadWriter.writeField("content-length", String(n), into: &o) }
                else if chunked { o.writeStaticString("transfer-encoding: chunked\r\n") }
                o.writeStaticString("connection: close\r\n")
            }
            return (m.cluster, b)
        }
        if h.requestState.isComplete { sendMirrors() }
    }

    /// Sends the mirror copies once the request is complete (head + replayed body);
    /// a body past the replay bound is not mirrored.
    func sendMirrors() {
        guard !mirrorHeads.isEmpty, let bytes = replay else { mirrorHeads = []; return }
        var body = bytes
        body.moveReaderIndex(forwardBy: min(replayHeadLength, body.readableBytes))
        for (cluster, head) in mirrorHeads {
            guard let i = ctx.balancer.pick(cluster) else { continue }
            ctx.balancer.done(cluster, i)
            let e = cluster.endpoint(i)
            var payload = head
            var b = body
            payload.writeBuffer(&b)
            // A mirror whose name is not resolved yet is skipped (the lookup starts now).
            guard case .ready(let address) = ctx.pool.address(host: e.address, port: e.port, ready: {}) else { continue }
            ctx.metrics.count("moonlet_upstream_mirrored_total")
            MirrorSender.send(payload, to: address, on: ctx.loop, timeoutMs: limits.connectTimeoutMs)
        }
        mirrorHeads = []
    }

    /// Records bytes sent upstream for a possible retry (bounded: past the limit the
    /// request is no longer retried).
    @inline(__always)
    func recordForReplay(_ b: ByteBuffer) {
        guard replay != nil else { return }
        if replay!.readableBytes + b.readableBytes > limits.maxBufferedBodyBytes { replay = nil; return }
        var c = b
        replay!.writeBuffer(&c)
    }

    /// Decides whether a failed attempt is retried, and retries it: a different host is
    /// preferred, with 25 ms x jitter backoff. A failure (connect failure, reset, refused
    /// stream, 5xx, per-try timeout) first runs the filters' on_upstream_failure phase
    /// (FilterChain.runUpstreamFailure); its verdict, else the route's policy, decides
    /// (RetryDecision). Returns false when the outcome stands (no retry allowed, attempts
    /// used up, request incomplete or not replayable, cluster maxRetries reached).
    func retryIfAllowed(_ s: ProxyStream, _ outcome: AttemptOutcome) -> Bool {
        var verdict = RetryVerdict.routePolicy
        if let kind = outcome.failureKind, h.exec.wantsUpstreamFailure {
            let info = UpstreamFailureInfo(kind: kind, status: outcome.failureStatus, attempt: attempt, endpoint: RetryDecision.endpointAddress(s),
                                           grpcStatus: outcome.grpcStatus)
            verdict = h.exec.upstreamFailure(s, info)
            // The phase may have ended the stream's connection (nothing else runs then).
            guard h.stream === s, !h.closed else { return true }
        }
        guard attempt < RetryDecision.attempts(verdict: verdict, outcome: outcome, policy: s.route.retry),
              h.requestState.isComplete, let bytes = replay ?? rebuiltRequest(s) else { return false }
        // maxRetries bounds concurrent retries per cluster across the sidecar.
        var retrySlot: CircuitCounters? = nil
        if let cl = s.route.upstreamCluster {
            let cc = ctx.balancer.circuit(cl)
            guard cc.tryRetry(max: cl.maxRetries) else { ctx.metrics.count("moonlet_upstream_retry_overflow_total"); return false }
            retrySlot = cc
        }
        attempt += 1
        ctx.metrics.count("moonlet_upstream_retries_total")
        perTryTimer?.cancel(); perTryTimer = nil
        if let u = upstream { u.abandon(); upstream = nil }
        if waiter != nil { stopWaiting() }
        let avoid = s.route.endpointIndex
        if avoid >= 0, let c = s.route.upstreamCluster { ctx.balancer.done(c, avoid) }
        if s.route.upstreamCluster != nil { s.route.endpoint = ""; s.route.endpointIndex = -1 }
        let sid = s.id, try_ = attempt
        let h: DownstreamHandler = self.h
        let backoffMs = Int64(25 * (1 + Int(ctx.rng.next() % UInt64(1 << min(attempt, 4)))))
        retrySlotHeld?.retryDone()
        retrySlotHeld = retrySlot   // held until this attempt ends (next retry or stream end)
        ctx.loop.scheduleTask(in: .milliseconds(backoffMs)) {
            guard let cur = h.stream, cur.id == sid, self.attempt == try_, !h.closed else { return }
            guard let (host, port, key) = self.chooseEndpoint(cur, avoid: avoid) else { return }
            self.pending = bytes
            self.dispatch(host: host, port: port, key: key)
        }
        return true
    }

    func armPerTryTimer(_ s: ProxyStream) {
        perTryTimer?.cancel(); perTryTimer = nil
        guard let ms = s.route.retry?.perTryTimeoutMs, ms > 0 else { return }
        let sid = s.id, try_ = attempt
        let h: DownstreamHandler = self.h
        perTryTimer = ctx.loop.scheduleTask(in: .milliseconds(Int64(ms))) {
            guard let cur = h.stream, cur.id == sid, self.attempt == try_, !h.responseStarted else { return }
            if self.retryIfAllowed(cur, .perTryTimeout) { return }
            if let u = self.upstream { u.abandon(); self.upstream = nil }
            cur.respond(504, body: "upstream request timeout", flags: .upstreamRequestTimeout)
            if !h.requestState.isComplete { h.closeAfterResponse() }
            h.sendLocalReply()
        }
    }

    func attach(_ c: UpstreamConnection) {
        guard let s = h.stream else { return }
        upstream = c
        c.begin(delegate: h, isHead: s.request.isHead)
        if c.multiplexed {
            // HTTP/2: HEADERS from the parsed head; the bytes below bring the body after it.
            unsafeDowncast(c, to: UpstreamH2Stream.self).startRequest(
                s.request, headBytes: requestHeadBytes, bodyLength: requestBodyLength,
                complete: h.requestState.isComplete, trailers: s.requestTrailers)
        } else if headDeferred {
            // Asked for HTTP/2, got an HTTP/1.1 connection: the head goes after all.
            if let p = pending { ctx.recycle(p) }
            pending = requestHead(s, chunked: false)
        }
        if var p = pending {
            pending = nil
            if h.requestChunked, case .complete(buffered: false) = h.requestState {
                let last = ChunkedEncoder.lastChunk(trailers: s.requestTrailers)
                var l = last
                p.writeBuffer(&l)
                recordForReplay(last)
                h.requestChunked = false
            }
            h.writeUpstream(c, p)
            ctx.recycle(p)
        }
    }

    /// The attempt failed before its response completed: outlier detection is told,
    /// the retry decision runs (before any response byte went out), else the failure
    /// becomes the response (503/502), or a reset once the response has started.
    func upstreamFailed(_ reason: UpstreamFailure) {
        guard let s = h.stream else { return }
        upstream = nil
        // A head that a response filter holds (it waits in http.call) counts as started,
        // as Envoy's router counts a response handed to the filters: no retry, no reply.
        let started = h.responseStarted || h.responsePauseState != nil
        if !started, s.route.endpointIndex >= 0, let c = s.route.upstreamCluster {
            // Local-origin failure (connect failure, reset, protocol error) for outlier detection.
            ctx.balancer.report(c, s.route.endpointIndex, status: nil)
        }
        if !started {
            if retryIfAllowed(s, .failed(reason)) { return }
            if attempt > 0 { s.responseFlags.insert(.upstreamRetryLimitExceeded) }
        }
        if started {
            // Mid-response failure: the client can only learn it from a reset. A waiting
            // response filter's resumption then finds nothing to resume.
            h.responsePauseState = nil
            s.resumer = nil
            s.responseFlags.insert(.upstreamConnectionTermination)
            h.resetDownstream()
            return
        }
        switch reason {
        case .connectFailed(let why):
            s.respond(503, body: "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: \(why)", flags: .upstreamConnectionFailure)
        case .reset:
            s.respond(503, body: "upstream connect error or disconnect/reset before headers. reset reason: connection termination", flags: .upstreamConnectionTermination)
        case .refusedStream:
            s.respond(503, body: "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset", flags: .upstreamConnectionTermination)
        case .protocolError(let why):
            s.respond(502, body: "upstream protocol error: \(why)", flags: .upstreamProtocolError)
        }
        if !h.requestState.isComplete { h.closeAfterResponse() }
        h.sendLocalReply()
    }

}
