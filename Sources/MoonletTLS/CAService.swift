import NIOCore
import NIOPosix
import NIOHTTP1
import NIOSSL
import NIOTLS
import NIOConcurrencyHelpers
import MoonletCore
import X509
import SwiftASN1
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet ca serve`: a small-scale stand-in for Istiod's CA. Sidecars POST a CSR to
/// `/v1/sign` over TLS and get back their certificate chain. A caller proves who it is
/// with a bootstrap token (`Authorization: Bearer ...`, from the token file) or with its
/// current mesh certificate (renewal); either way it only gets its own identity.
///
/// Request body (JSON): `{"csr": "<PEM>", "namespace": "ns", "service_account": "sa", "ttl_seconds": 86400}`.
/// Response: `{"cert_chain": ["<leaf PEM>", "<root PEM>"]}`, or an error status with
/// `{"error": "..."}`.
public final class CAService: @unchecked Sendable {
    public let ca: MeshCA
    /// token -> the identity it may ask for.
    public let tokens: [String: SpiffeID]
    public let maxTTL: TimeInterval
    public let limits: Limits
    /// The mesh TLS policy (mesh config meshMTLS) of the CA's listener.
    public let policy: MeshTLSSettings
    let log: @Sendable (String) -> Void
    /// Connections open now, in all and per source address.
    let state = NIOLockedValueBox((open: 0, perAddress: [String: Int]()))
    /// Log budgets, one per kind of line, so that one kind cannot hide another.
    let budgets = NIOLockedValueBox([LogKind: LogBudget]())

    /// Bounds that keep the CA serving when clients misbehave: a handshake must finish, the
    /// request must follow within its deadline, one response closes the connection, and
    /// connections past the caps (in all, per source address) are refused (logged).
    public struct Limits: Sendable {
        public var maxConnections: Int
        public var maxConnectionsPerAddress: Int
        public var handshakeTimeout: TimeAmount
        /// From the end of the handshake to the whole request: bytes trickling in do not extend it.
        public var requestTimeout: TimeAmount
        public var idleTimeout: TimeAmount
        public init(maxConnections: Int = 1024, maxConnectionsPerAddress: Int = 32, handshakeTimeout: TimeAmount = .seconds(10),
                    requestTimeout: TimeAmount = .seconds(10), idleTimeout: TimeAmount = .seconds(60)) {
            self.maxConnections = maxConnections; self.maxConnectionsPerAddress = maxConnectionsPerAddress
            self.handshakeTimeout = handshakeTimeout; self.requestTimeout = requestTimeout; self.idleTimeout = idleTimeout
        }
    }

    /// Descriptors kept for the CA itself (listener, logs, files) below the open file limit.
    public static let descriptorReserve = 64

    /// The connection cap in effect: `requested`, lowered to the open file limit minus
    /// `descriptorReserve` (past it, accepts would fail with EMFILE before the cap refuses
    /// anything, and nothing would be logged); at least 1.
    public static func connectionCap(requested: Int, fileLimit: Int?) -> Int {
        guard let l = fileLimit else { return requested }
        return max(1, min(requested, l - descriptorReserve))
    }

    /// The soft limit of open files (RLIMIT_NOFILE), nil when unlimited or unknown.
    public static func openFileLimit() -> Int? {
        var r = rlimit()
        #if os(Linux)
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        #else
        let resource = RLIMIT_NOFILE
        #endif
        guard getrlimit(resource, &r) == 0, r.rlim_cur < rlim_t(Int32.max) else { return nil }  // RLIM_INFINITY: no limit
        return Int(r.rlim_cur)
    }

    /// Kinds of log lines, each with its own budget.
    enum LogKind: String, CaseIterable { case refusal = "connection refusal", handshake = "handshake", decision = "signing decision" }
    struct LogBudget { var second = 0; var left = 0; var suppressed = 0 }
    /// Lines of each kind logged per second; the rest are counted and reported.
    static let linesPerSecond = 20

    /// The CA's own identity, `spiffe://<td>/ns/istio-system/sa/moonlet-ca`: sidecars
    /// send their token only to a server that presents it (or, like Istio's CA_ADDR
    /// check, a DNS name equal to the host they dialled).
    public static func identity(trustDomain: String) throws -> SpiffeID {
        try SpiffeID(trustDomain: trustDomain, namespace: "istio-system", serviceAccount: "moonlet-ca")
            .orThrow(TLSConfigError("trust domain", LogText.escape("\"\(trustDomain)\" is not a trust domain")))
    }
    /// DNS names in the CA's serving certificate.
    public static let dnsNames = ["localhost", "moonlet-ca.istio-system.svc", "istiod.istio-system.svc"]

    public init(ca: MeshCA, tokens: [String: SpiffeID], maxTTL: TimeInterval = 86400, limits: Limits = Limits(),
                policy: MeshTLSSettings = MeshTLSSettings(), log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.ca = ca; self.tokens = tokens; self.maxTTL = maxTTL; self.limits = limits; self.policy = policy; self.log = log
    }

    /// Reads a token file: one `<token> <namespace>/<service-account>` per line, `#` comments.
    public static func loadTokens(_ path: String, trustDomain: String) throws -> [String: SpiffeID] {
        var out: [String: SpiffeID] = [:]
        for (i, raw) in try readText(path).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            let who = parts.count == 2 ? parts[1].split(separator: "/") : []
            guard who.count == 2, let id = SpiffeID(trustDomain: trustDomain, namespace: String(who[0]), serviceAccount: String(who[1])) else {
                throw TLSConfigError("\(path):\(i + 1)", "expected \"<token> <namespace>/<service-account>\"")
            }
            out[String(parts[0])] = id
        }
        return out
    }

    /// The CA's own serving certificate: its dedicated identity (`identity(trustDomain:)`),
    /// DNS SANs `dnsNames` and an IP SAN for 127.0.0.1; server auth only.
    func servingContext() throws -> NIOSSLContext {
        let key = try KeyType.ecdsaP256.makeKey()
        let id = try Self.identity(trustDomain: ca.trustDomain)
        let cert = try ca.sign(publicKey: key.publicKey, id: id, ttl: 365 * 86400,
                               extraNames: Self.dnsNames.map { .dnsName($0) } + [.ipAddress(ASN1OctetString(contentBytes: [127, 0, 0, 1]))],
                               usages: [.serverAuth])
        var c = TLSConfiguration.makeServerConfiguration(
            certificateChain: [.certificate(try NIOSSLCertificate(bytes: Array(try cert.serializeAsPEM().pemString.utf8), format: .pem))],
            privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(try key.serializeAsPEM().pemString.utf8), format: .pem)))
        // A client certificate is optional (renewal); when given it must chain to the root.
        c.certificateVerification = CertificateVerification.optionalVerification
        c.trustRoots = NIOSSLTrustRoots.certificates(try NIOSSLCertificate.fromPEMBytes(Array(ca.rootCertPEM.utf8)))
        TLSMaterial.applyPolicy(policy, to: &c)
        return try NIOSSLContext(configuration: c)
    }

    /// Logs `line` (peer text in it escaped by the caller) unless `linesPerSecond` lines of its kind were logged this second; a
    /// suppressed line is counted, and `reportSuppressed` says how many there were.
    func logLimited(_ kind: LogKind, _ line: String) {
        let now = Int(Date().timeIntervalSince1970)
        let ok = budgets.withLockedValue { b -> Bool in
            var k = b[kind] ?? LogBudget()
            defer { b[kind] = k }
            if k.second != now { k.second = now; k.left = Self.linesPerSecond }
            guard k.left > 0 else { k.suppressed += 1; return false }
            k.left -= 1
            return true
        }
        if ok { log(line) }
    }

    /// Logs "N <kind> lines suppressed" for each kind that had lines suppressed since the
    /// last call (called every second while serving).
    func reportSuppressed() {
        let counts = budgets.withLockedValue { b -> [(LogKind, Int)] in
            var out: [(LogKind, Int)] = []
            for k in LogKind.allCases where (b[k]?.suppressed ?? 0) > 0 { out.append((k, b[k]!.suppressed)); b[k]!.suppressed = 0 }
            return out
        }
        for (k, n) in counts { log("ca: \(n) \(k.rawValue) lines suppressed (more than \(Self.linesPerSecond) a second)") }
    }

    /// Binds the signer. Returns the channel (its localAddress has the port).
    /// `fileLimit`: the open file limit the cap must stay under (default: the process's).
    public func bind(group: EventLoopGroup, host: String, port: Int, fileLimit: Int? = CAService.openFileLimit()) throws -> Channel {
        let ctx = try servingContext()
        let cap = Self.connectionCap(requested: limits.maxConnections, fileLimit: fileLimit)
        if cap < limits.maxConnections {
            log("ca: connection cap lowered from \(limits.maxConnections) to \(cap): the open file limit is \(fileLimit ?? 0), \(Self.descriptorReserve) kept for the CA (raise it with ulimit -n)")
        }
        let perAddress = limits.maxConnectionsPerAddress
        let ch = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    let ip = ch.remoteAddress?.ipAddress ?? "?"
                    let address = ch.remoteAddress.map { "\(ip):\($0.port ?? 0)" } ?? "?"
                    let refusal = self.state.withLockedValue { s -> String? in
                        if s.open >= cap { return "\(cap) connections open (the --max-connections cap)" }
                        if s.perAddress[ip, default: 0] >= perAddress { return "\(perAddress) connections open from \(ip) (the --max-connections-per-address cap)" }
                        s.open += 1
                        s.perAddress[ip, default: 0] += 1
                        return nil
                    }
                    if let refusal {
                        self.logLimited(.refusal, "ca: connection from \(address) refused: \(refusal)")
                        ch.close(promise: nil)
                        return
                    }
                    ch.closeFuture.whenComplete { _ in
                        self.state.withLockedValue { s in
                            s.open -= 1
                            s.perAddress[ip, default: 1] -= 1
                            if s.perAddress[ip] == 0 { s.perAddress[ip] = nil }
                        }
                    }
                    let peer = PeerBox()
                    peer.address = address
                    let tls = NIOSSLServerHandler._makeSSLServerHandler(context: ctx) { cert, channel in
                        peer.id = SpiffeID.of(cert)
                        peer.noIdentity = SpiffeID.whyNoIdentity(cert)
                        return channel.eventLoop.makeSucceededFuture(())
                    }
                    let sync = ch.pipeline.syncOperations
                    try sync.addHandler(IdleStateHandler(allTimeout: self.limits.idleTimeout))
                    try sync.addHandler(tls)
                    try sync.addHandler(ConnectionGuard(service: self, address: address, limits: self.limits))
                    try sync.configureHTTPServerPipeline()
                    try sync.addHandler(SignHandler(service: self, peer: peer))
                }
            }
            .bind(host: host, port: port).wait()
        let report = ch.eventLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in self.reportSuppressed() }
        ch.closeFuture.whenComplete { _ in report.cancel() }
        return ch
    }

    final class PeerBox: @unchecked Sendable {
        var id: SpiffeID?
        var noIdentity: String?
        var address = "?"
    }

    /// Closes a connection whose handshake does not finish in time, whose request is not
    /// complete within the request deadline after the handshake, or that stays idle; logs
    /// failed handshakes with the caller's address (the audit trail).
    final class ConnectionGuard: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let service: CAService
        let address: String
        let limits: Limits
        var timer: Scheduled<Void>?
        var handshaken = false
        init(service: CAService, address: String, limits: Limits) {
            self.service = service; self.address = address; self.limits = limits
        }
        func deadline(_ context: ChannelHandlerContext, _ t: TimeAmount, _ what: String) {
            let ch = context.channel, s = service, a = address
            timer?.cancel()
            timer = context.eventLoop.scheduleTask(in: t) {
                s.logLimited(.handshake, "ca: \(what) from \(a) did not finish within \(t.nanoseconds / 1_000_000) ms; closed")
                ch.close(promise: nil)
            }
        }
        func handlerAdded(context: ChannelHandlerContext) { deadline(context, limits.handshakeTimeout, "TLS handshake") }
        func handlerRemoved(context: ChannelHandlerContext) { timer?.cancel() }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            // One deadline for the whole request: bytes trickling in do not extend it.
            if case TLSUserEvent.handshakeCompleted = event { handshaken = true; deadline(context, limits.requestTimeout, "request") }
            if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil); return }
            context.fireUserInboundEventTriggered(event)
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) {
            if !handshaken {
                let cert = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self).peerCertificate
                let trust = TrustDomains(mesh: service.ca.trustDomain, roots: [service.ca.rootCertificate])
                service.logLimited(.handshake, "ca: TLS handshake with \(address) failed: \(TLSMaterial.refusalReason(error, peerCertificate: cert ?? nil, trust: trust))")
            }
            context.close(promise: nil)
        }
    }

    /// Decides one signing request; returns (status, JSON body). `from`: the caller's
    /// address, for the log (every decision is logged: who asked for which identity).
    func handle(method: HTTPMethod, uri: String, authorization: String?, peer: SpiffeID?, peerProblem: String? = nil,
                from: String = "?", body: Data) -> (HTTPResponseStatus, String) {
        func fail(_ s: HTTPResponseStatus, _ msg: String) -> (HTTPResponseStatus, String) {
            // `msg` is raw text: escaped once here for the log; the client escapes what it logs.
            logLimited(.decision, "ca: \(from): refused \(LogText.escape(uri)): \(LogText.escape(msg))")
            return (s, "{\"error\":\(JSON.quote(msg))}")
        }
        guard uri == "/v1/sign" else { return fail(.notFound, "unknown path \(uri)") }
        guard method == .POST else { return fail(.methodNotAllowed, "use POST") }
        guard let obj = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any], let csr = obj["csr"] as? String else {
            return fail(.badRequest, "body must be JSON with a \"csr\" field")
        }
        let ns = obj["namespace"] as? String ?? "", sa = obj["service_account"] as? String ?? ""
        guard let asked = SpiffeID(trustDomain: ca.trustDomain, namespace: ns, serviceAccount: sa) else {
            return fail(.badRequest, "namespace and service_account are required")
        }
        // Who is calling: a token names one identity; a current certificate is its own
        // (exactly one URI SAN, in the CA's trust domain).
        var allowed: SpiffeID?
        var proof = ""
        if let a = authorization, a.hasPrefix("Bearer "), let id = tokens[String(a.dropFirst(7)).trimmingCharacters(in: .whitespaces)] {
            allowed = id; proof = "bootstrap token"
        } else if let p = peer, p.trustDomain == ca.trustDomain {
            allowed = p; proof = "certificate"
        }
        guard let who = allowed else {
            return fail(.unauthorized, "no valid bootstrap token or mesh certificate" + (peerProblem.map { " (\($0))" } ?? ""))
        }
        guard who == asked else { return fail(.forbidden, "caller \(who.uri) (by \(proof)) may not get a certificate for \(asked.uri)") }
        let ttl = min(maxTTL, (obj["ttl_seconds"] as? Double) ?? maxTTL)
        do {
            let leaf = try ca.signCSR(pem: csr, allowed: asked, ttl: ttl)
            logLimited(.decision, "ca: \(from): issued \(LogText.escape(asked.uri)) for \(Int(ttl))s (by \(proof))")
            return (.ok, "{\"cert_chain\":[\(JSON.quote(leaf)),\(JSON.quote(ca.rootCertPEM))]}")
        } catch {
            return fail(.badRequest, "\(error)")
        }
    }

    final class SignHandler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let service: CAService
        let peer: PeerBox
        var head: HTTPRequestHead?
        var body = Data()
        init(service: CAService, peer: PeerBox) { self.service = service; self.peer = peer }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h; body = Data()
            case .body(let b):
                // CSRs are small: a body past 64 KiB is refused.
                if body.count + b.readableBytes > 65536 { head = nil; context.close(promise: nil); return }
                body.append(contentsOf: b.readableBytesView)
            case .end:
                guard let h = head else { return }
                let (status, text) = service.handle(method: h.method, uri: h.uri, authorization: h.headers.first(name: "authorization"), peer: peer.id,
                                                    peerProblem: peer.noIdentity, from: peer.address, body: body)
                // One request per connection: the response closes it (a connection cannot be
                // held open, nor one caller's requests flood the log, by keep-alive).
                let headers = HTTPHeaders([("content-type", "application/json"), ("content-length", String(text.utf8.count)), ("connection", "close")])
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: text)))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
                head = nil
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }
}



/// The sidecar side of the CSR flow: a new key and CSR, sent to the CA over TLS, the CA
/// verified against root-cert.pem and by its identity (the CA's SPIFFE id, or a DNS
/// SAN equal to the host dialled, as Istio checks CA_ADDR's host), authenticated by the
/// current certificate while it is valid, else by the bootstrap token. Blocking; called
/// off the event loops.
public enum CAClient {
    /// `policy`: the mesh TLS policy (meshMTLS) of the connection.
    /// `caIdentity`: the SANs the CA must present (one of them; an empty list is refused);
    /// nil: the CA's default identity in `identity`'s trust domain, or the dialled host
    /// when it is a DNS name.
    public static func requestBundle(caAddress: String, rootCertPath: String, identity: SpiffeID, token: String?,
                                     currentCertDir: String?, keyType: KeyType = .ecdsaP256, ttl: TimeInterval = 86400,
                                     caIdentity: [String]? = nil, policy: MeshTLSSettings = MeshTLSSettings(),
                                     group: EventLoopGroup, timeout: TimeAmount = .seconds(10), now: Date = Date()) throws -> WorkloadBundle {
        let parts = caAddress.split(separator: ":")
        guard parts.count == 2, let port = Int(parts[1]) else { throw TLSConfigError("--ca-address", "expected host:port, got \"\(caAddress)\"") }
        let host = String(parts[0])
        let isName = !host.allSatisfy { $0.isNumber || $0 == "." }
        // The token goes only to a server proven to be the CA: an empty list would check nothing.
        if let c = caIdentity, c.allSatisfy({ $0.isEmpty }) { throw TLSConfigError("--ca-identity", "is empty; the CA's identity must be checked") }
        let expected = try caIdentity ?? ([CAService.identity(trustDomain: identity.trustDomain).uri] + (isName ? [host] : []))
        let root = try readText(rootCertPath)
        var cfg = TLSConfiguration.makeClientConfiguration()
        do { cfg.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(root.utf8))) } catch {
            throw TLSConfigError(rootCertPath, pemProblem(root, kind: "CERTIFICATE"))
        }
        cfg.certificateVerification = .noHostnameVerification
        TLSMaterial.applyPolicy(policy, to: &cfg)
        // The current certificate proves who is asking, while it is valid: an expired one
        // would make the CA refuse the handshake, so the token is used instead.
        var presented = false
        if let dir = currentCertDir {
            let chain = (dir as NSString).appendingPathComponent(WorkloadBundle.certChainFile)
            let key = (dir as NSString).appendingPathComponent(WorkloadBundle.keyFile)
            if let c = try? NIOSSLCertificate.fromPEMFile(chain), let leaf = c.first, let k = try? NIOSSLPrivateKey(file: key, format: .pem),
               Double(leaf.notValidBefore) <= now.timeIntervalSince1970, now.timeIntervalSince1970 < Double(leaf.notValidAfter) {
                cfg.certificateChain = c.map { .certificate($0) }
                cfg.privateKey = .privateKey(k)
                presented = true
            }
        }
        let ctx = try NIOSSLContext(configuration: cfg)
        do {
            return try send(ctx: ctx, host: host, port: port, caAddress: caAddress, expected: expected, identity: identity, token: token,
                            keyType: keyType, ttl: ttl, root: root, group: group, timeout: timeout)
        } catch let e as CertificateRefused {
            // The CA refused the certificate (another root, say): the token still proves who
            // we are. Anything else (no connection, no answer, not the CA) is not retried.
            guard presented, token?.isEmpty == false else { throw e.error }
            return try requestBundle(caAddress: caAddress, rootCertPath: rootCertPath, identity: identity, token: token, currentCertDir: nil,
                                     keyType: keyType, ttl: ttl, caIdentity: caIdentity, policy: policy, group: group, timeout: timeout, now: now)
        }
    }

    /// The CA refused the certificate this sidecar presented: by a TLS alert during the
    /// handshake, or by 401/403.
    struct CertificateRefused: Error { var error: TLSConfigError }

    static func send(ctx: NIOSSLContext, host: String, port: Int, caAddress: String, expected: [String], identity: SpiffeID, token: String?,
                     keyType: KeyType, ttl: TimeInterval, root: String, group: EventLoopGroup, timeout: TimeAmount) throws -> WorkloadBundle {
        let (csr, keyPEM) = try MeshCA.makeCSR(for: identity, keyType: keyType)
        let body = "{\"csr\":\(JSON.quote(csr)),\"namespace\":\(JSON.quote(identity.namespace)),\"service_account\":\(JSON.quote(identity.serviceAccount)),\"ttl_seconds\":\(Int(ttl))}"
        let loop = group.next()
        let promise = loop.makePromise(of: (HTTPResponseStatus, Data).self)
        let ch: Channel
        do {
            ch = try ClientBootstrap(group: loop)
                .connectTimeout(timeout)
                .channelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHandler(try TLSMaterial.makeClientHandler(context: ctx, serverName: nil, expected: expected))
                        try ch.pipeline.syncOperations.addHTTPClientHandlers()
                        try ch.pipeline.syncOperations.addHandler(ResponseCollector(promise: promise))
                    }
                }
                .connect(host: host, port: port).wait()
        } catch {
            throw TLSConfigError(caAddress, "cannot connect to the CA: \(error)")
        }
        // The request (and the token in it) is written only once the handshake verified
        // the CA's identity: the TLS handler buffers application data until then, and
        // drops it when the handshake fails.
        var headers = HTTPHeaders([("host", caAddress), ("content-type", "application/json"), ("content-length", String(body.utf8.count)), ("connection", "close")])
        if let token, !token.isEmpty { headers.add(name: "authorization", value: "Bearer \(token)") }
        ch.write(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: .POST, uri: "/v1/sign", headers: headers)), promise: nil)
        ch.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(string: body))), promise: nil)
        ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let timer = loop.scheduleTask(in: timeout) { promise.fail(TLSConfigError(caAddress, "no answer within \(timeout)")) }
        defer { timer.cancel(); ch.close(promise: nil) }
        let status: HTTPResponseStatus, data: Data
        do { (status, data) = try promise.futureResult.wait() } catch let e as TLSConfigError { throw e } catch let e as PeerIdentityError {
            throw TLSConfigError(caAddress, "CA identity not verified: \(e.description) (expected \(expected.joined(separator: " or ")))")
        } catch {
            let e = TLSConfigError(caAddress, "TLS with the CA failed: \(TLSMaterial.upstreamRefusalReason(error, peerCertificate: nil))")
            if "\(error)".contains("_ALERT_") { throw CertificateRefused(error: e) }
            throw e
        }
        let obj = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        guard status == .ok, let chain = obj?["cert_chain"] as? [String], let leaf = chain.first else {
            let e = TLSConfigError(caAddress, LogText.escape("CA refused: \(status.code) \(obj?["error"] as? String ?? String(decoding: data.prefix(200), as: UTF8.self))"))
            if status == .unauthorized || status == .forbidden { throw CertificateRefused(error: e) }
            throw e
        }
        // root-cert.pem stays as the sidecar has it (Istio mounts it from a ConfigMap): it
        // may hold two roots during a root switch, and it is what decides whom to trust
        // (the sidecar writes only key and chain back).
        return WorkloadBundle(certChainPEM: leaf, keyPEM: keyPEM, rootCertPEM: root)
    }

    final class ResponseCollector: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<(HTTPResponseStatus, Data)>
        var status: HTTPResponseStatus = .ok
        var data = Data()
        init(promise: EventLoopPromise<(HTTPResponseStatus, Data)>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): status = h.status
            case .body(let b): if self.data.count < 1 << 20 { self.data.append(contentsOf: b.readableBytesView) }
            case .end: promise.succeed((status, self.data))
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) {
            let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)
            promise.fail(TLSMaterial.identityRefusal(of: tls) ?? error)
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) { promise.fail(TLSConfigError("CA", "connection closed before a response")) }
    }
}
