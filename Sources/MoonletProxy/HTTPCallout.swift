import NIOCore
import NIOSSL
import MoonletCore
import MoonletConfig
import MoonletLua
import MoonletTLS

/// `moonlet.http.call`'s client on one event loop (LuaHTTPClient): the request goes out
/// through the loop's upstream pool and connect code, so a mesh service is reached as
/// any upstream is (its endpoints picked by the balancer, mTLS by its DestinationRule
/// or auto mTLS, pooled connections reused), without blocking the loop.
final class LoopHTTPClient: LuaHTTPClient {
    unowned let ctx: LoopContext
    init(ctx: LoopContext) { self.ctx = ctx }

    func start(_ request: LuaHTTPRequest, stream: ProxyStream,
               done: @escaping (Result<LuaHTTPResponse, LuaHTTPError>) -> Void) -> LuaHTTPCancellable {
        let c = HTTPCallout(ctx: ctx, request: request, done: done)
        c.begin(routes: (stream.config as? ConfigSnapshot)?.routes ?? ctx.snapshot.routes)
        return c
    }
}

/// One `moonlet.http.call` exchange: target resolved, connection taken or made, request
/// written, response collected (bounded), outcome delivered once (always from a task
/// of its own on the loop, never from inside `start`).
final class HTTPCallout: UpstreamDelegate, LuaHTTPCancellable {
    let ctx: LoopContext
    let request: LuaHTTPRequest
    var done: ((Result<LuaHTTPResponse, LuaHTTPError>) -> Void)?
    var timer: Scheduled<Void>?
    var conn: UpstreamConnection?
    var status = 0
    var headers: [(name: String, value: String)] = []
    var body: [UInt8] = []
    /// The cluster endpoint picked (released to the balancer when the exchange ends).
    var picked: (UpstreamCluster, Int)?
    var tls: UpstreamTLS?
    var wire = ByteBuffer()

    init(ctx: LoopContext, request: LuaHTTPRequest, done: @escaping (Result<LuaHTTPResponse, LuaHTTPError>) -> Void) {
        self.ctx = ctx; self.request = request; self.done = done
    }

    /// Where a target goes: a cluster of the registry, or a host and port.
    enum Target {
        case cluster(UpstreamCluster, authority: String, path: String)
        case direct(host: String, port: Int, authority: String, path: String)
    }

    /// Resolves `target` against the stream's snapshot (see LuaHTTPRequest.target).
    static func resolve(_ target: String, routes: RouteTable) -> Result<Target, LuaHTTPError> {
        if target.hasPrefix("outbound|") {
            guard case .cluster(let nc)? = routes.resolveCluster(target) else { return .failure(LuaHTTPError("unknown cluster \(target)")) }
            return .success(.cluster(nc.cluster, authority: authority(nc.host, nc.port), path: "/"))
        }
        let lower = target.lowercased()
        if lower.hasPrefix("https://") {
            return .failure(LuaHTTPError("https:// URLs are not supported; name the mesh service (its mTLS applies) or use http://"))
        }
        var rest = Substring(target)
        var isURL = false
        if lower.hasPrefix("http://") { rest = rest.dropFirst(7); isURL = true }
        let end = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        let auth = rest[..<end]
        var path = String(rest[end...])
        if path.isEmpty { path = "/" } else if path.first == "?" { path = "/" + path }
        guard !isURL || !auth.isEmpty else { return .failure(LuaHTTPError("URL without a host: \(target)")) }
        guard !auth.utf8.contains(where: { $0 <= 32 || $0 == 127 }) else { return .failure(LuaHTTPError("bad host in \(target)")) }
        guard isURL || end == rest.endIndex else { return .failure(LuaHTTPError("not a URL, service host or cluster name: \(target) (a URL starts with http://)")) }
        var host = String(auth), port: Int? = nil
        if auth.first == "[" {
            guard let close = auth.firstIndex(of: "]") else { return .failure(LuaHTTPError("bad IPv6 address in \(target)")) }
            host = String(auth[auth.index(after: auth.startIndex)..<close])
            let after = auth[auth.index(after: close)...]
            if after.first == ":" { port = Int(after.dropFirst()) ; if port == nil { return .failure(LuaHTTPError("bad port in \(target)")) } }
        } else if let colon = auth.lastIndex(of: ":") {
            host = String(auth[..<colon])
            guard let p = Int(auth[auth.index(after: colon)...]) else { return .failure(LuaHTTPError("bad port in \(target)")) }
            port = p
        }
        if let p = port, !(1...65535).contains(p) { return .failure(LuaHTTPError("bad port in \(target)")) }
        guard !host.isEmpty, !host.utf8.contains(where: { $0 <= 32 || $0 == 127 || $0 == UInt8(ascii: "@") }) else {
            return .failure(LuaHTTPError("bad host in \(target)"))
        }
        let isIP = (try? SocketAddress(ipAddress: host, port: 0)) != nil
        if !isIP {
            // A service of the registry: its cluster (endpoints, balancer, mTLS).
            let svcPort = port ?? routes.services[host.lowercased()]?.ports.first?.number
            if let sp = svcPort, case .cluster(let nc)? = routes.resolveCluster("outbound|\(sp)||\(host)") {
                return .success(.cluster(nc.cluster, authority: String(auth), path: path))
            }
            if !isURL { return .failure(LuaHTTPError("unknown service host \(host) (not in the registry; use an http:// URL)")) }
        }
        let p = port ?? 80
        return .success(.direct(host: host, port: p, authority: String(auth), path: path))
    }

    /// Whether `host` names this machine: loopback (127.0.0.0/8, ::1, localhost), the
    /// unspecified address, or an IPv4-mapped loopback.
    static func isLocal(_ host: String) -> Bool {
        let h = host.lowercased()
        if h == "localhost" || h.hasSuffix(".localhost") || h == "::1" || h == "0.0.0.0" || h == "::" { return true }
        if h.hasPrefix("127.") || h.hasPrefix("::ffff:127.") { return true }
        if h == "0:0:0:0:0:0:0:1" { return true }
        return false
    }

    static func authority(_ host: String, _ port: Int) -> String { port == 80 ? host : "\(host):\(port)" }

    func begin(routes: RouteTable) {
        timer = ctx.loop.scheduleTask(in: .milliseconds(Int64(request.timeoutMs))) {
            self.timer = nil
            self.fail("timeout after \(self.request.timeoutMs) ms")
        }
        let target: Target
        switch Self.resolve(request.target, routes: routes) {
        case .success(let t): target = t
        case .failure(let e): fail(e.message); return
        }
        switch target {
        case .cluster(let c, let authority, let path):
            guard let i = ctx.balancer.pick(c) else { fail("no healthy upstream for \(request.target)"); return }
            picked = (c, i)
            let e = c.endpoint(i)
            var key = c.poolKey(i)
            if let t = c.tls(i) {
                if t.mode == .istioMutual && ctx.tls == nil {
                    if !t.automatic { fail("ISTIO_MUTUAL needs a workload certificate (--certs)"); return }
                } else if (t.mode == .simple || t.mode == .mutual) && t.context == nil {
                    fail("the DestinationRule's TLS files could not be loaded"); return
                } else {
                    tls = t
                    key += t.poolTag
                }
            }
            wire = requestBytes(authority: authority, path: request.path ?? path)
            connect(host: e.address, port: e.port, key: key, sniHost: authority)
        case .direct(let host, let port, let authority, let path):
            // The sidecar's own admin API (reload, config dump, log level) is the
            // operator's, not a filter's: a plugin must not drive it.
            if ctx.adminPort > 0 && port == ctx.adminPort && Self.isLocal(host) {
                fail("the sidecar's own admin port (\(port)) is not a target for moonlet.http.call"); return
            }
            wire = requestBytes(authority: authority, path: request.path ?? path)
            connect(host: host, port: port, key: "\(host):\(port)", sniHost: host)
        }
    }

    /// The request as HTTP/1.1 bytes: the caller's headers (framing and connection
    /// headers are the client's own), a host, and a content-length (0 without a body).
    func requestBytes(authority: String, path: String) -> ByteBuffer {
        var b = ctx.allocator.buffer(capacity: 256 + request.body.count)
        b.writeString("\(request.method) \(path) HTTP/1.1\r\n")
        let host = request.headers.first { $0.name == "host" }?.value ?? authority
        b.writeString("host: \(host)\r\n")
        for (n, v) in request.headers where !["host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"].contains(n) {
            b.writeString("\(n): \(v)\r\n")
        }
        b.writeString("content-length: \(request.body.count)\r\n\r\n")
        b.writeBytes(request.body)
        return b
    }

    func connect(host: String, port: Int, key: String, sniHost: String) {
        guard done != nil else { return }
        if let c = ctx.pool.takeIdle(key) { attach(c); return }
        let address: SocketAddress
        switch ctx.pool.address(host: host, port: port, ready: { self.connect(host: host, port: port, key: key, sniHost: sniHost) }) {
        case .ready(let a): address = a
        case .pending: return
        case .failed(let e): fail("DNS resolution of \(host) failed: \(e)"); return
        }
        let plan = UpstreamTLSPlan(tls, meshMaterial: ctx.tls, serverName: sniHost, offerH2: false)
        let cluster = picked?.0
        ctx.pool.connect(key: key, address: address, timeoutMs: cluster?.connectTimeoutMs ?? 0, keepalive: cluster?.tcpKeepalive,
                         tls: plan.make, tlsExpected: plan.expected, tlsMesh: plan.mesh, offersH2: false, slot: nil) { r in
            switch r {
            case .success(let c):
                guard self.done != nil else { c.abandon(); return }
                self.attach(c)
            case .failure(let e):
                self.fail("connection to \(host):\(port) failed: \(e)")
            }
        }
    }

    func attach(_ c: UpstreamConnection) {
        guard done != nil, let ch = c.channel else { c.abandon(); if done != nil { fail("connection closed") }; return }
        conn = c
        c.begin(delegate: self, isHead: request.method == "HEAD")
        ch.writeAndFlush(wire, promise: nil)
        wire = ByteBuffer()
    }

    // MARK: UpstreamDelegate

    func upstreamResponseHead(_ head: consuming HTTPHead) {
        let h = consume head
        status = h.status
        for i in h.fields.indices where !h.fields[i].removed {
            headers.append((h.lowercasedName(at: i), h.value(at: i)))
        }
        if case .contentLength(let n) = h.framing, n > Int64(LuaHTTPLimits.maxBodyBytes) {
            conn?.abandon(); conn = nil
            fail("response body larger than \(LuaHTTPLimits.maxBodyBytes) bytes")
        }
    }

    /// The response's trailers are not given to the script.
    func upstreamResponseTrailers(_ trailers: HTTPTrailers) {}

    func upstreamResponseBody(_ chunk: ByteBuffer) {
        guard done != nil else { return }
        if body.count + chunk.readableBytes > LuaHTTPLimits.maxBodyBytes {
            conn?.abandon(); conn = nil
            fail("response body larger than \(LuaHTTPLimits.maxBodyBytes) bytes")
            return
        }
        body.append(contentsOf: chunk.readableBytesView)
    }

    func upstreamResponseEnd(reusable: Bool) {
        if let c = conn {
            conn = nil
            if reusable { ctx.pool.release(c) } else { c.channel?.close(promise: nil) }
        }
        deliver(.success(LuaHTTPResponse(status: status, headers: headers, body: body)))
    }

    func upstreamFailed(_ reason: UpstreamFailure) {
        conn = nil
        let why: String
        switch reason {
        case .connectFailed(let m): why = "connection failed: \(m)"
        case .reset: why = "connection reset before the response completed"
        case .refusedStream: why = "stream refused"
        case .protocolError(let m): why = "upstream protocol error: \(m)"
        }
        fail(why)
    }

    func upstreamWritabilityChanged(_ writable: Bool) {}

    // MARK: outcome

    func fail(_ why: String) {
        if let c = conn { conn = nil; c.abandon() }
        deliver(.failure(LuaHTTPError(why)))
    }

    /// Hands the outcome over once, from a task of its own (the caller may be inside
    /// `start`, or inside the connection's read handler).
    func deliver(_ r: Result<LuaHTTPResponse, LuaHTTPError>) {
        guard let d = done else { return }
        done = nil
        release()
        ctx.metrics.count("moonlet_lua_http_calls_total")
        if case .failure = r { ctx.metrics.count("moonlet_lua_http_call_errors_total") }
        ctx.loop.execute { d(r) }
    }

    func cancel() {
        guard done != nil else { return }
        done = nil
        if let c = conn { conn = nil; c.abandon() }
        release()
    }

    func release() {
        timer?.cancel(); timer = nil
        if let (c, i) = picked { picked = nil; ctx.balancer.done(c, i) }
    }
}
