import NIOCore
import NIOPosix
import NIOHTTP1
import NIOSSL
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
    let log: @Sendable (String) -> Void

    public init(ca: MeshCA, tokens: [String: SpiffeID], maxTTL: TimeInterval = 86400, log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.ca = ca; self.tokens = tokens; self.maxTTL = maxTTL; self.log = log
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

    /// The CA's own serving certificate: istiod's identity, with DNS SANs for the names
    /// sidecars dial (localhost and istiod.istio-system.svc) and an IP SAN for 127.0.0.1.
    func servingContext() throws -> NIOSSLContext {
        let key = try KeyType.ecdsaP256.makeKey()
        let id = try ca.identity(namespace: "istio-system", serviceAccount: "istiod")
        let cert = try ca.sign(publicKey: key.publicKey, id: id, ttl: 365 * 86400, extraNames: [
            .dnsName("localhost"), .dnsName("istiod.istio-system.svc"), .ipAddress(ASN1OctetString(contentBytes: [127, 0, 0, 1])),
        ], usages: [.serverAuth])
        var c = TLSConfiguration.makeServerConfiguration(
            certificateChain: [.certificate(try NIOSSLCertificate(bytes: Array(try cert.serializeAsPEM().pemString.utf8), format: .pem))],
            privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(try key.serializeAsPEM().pemString.utf8), format: .pem)))
        // A client certificate is optional (renewal); when given it must chain to the root.
        c.certificateVerification = CertificateVerification.optionalVerification
        c.trustRoots = NIOSSLTrustRoots.certificates(try NIOSSLCertificate.fromPEMBytes(Array(ca.rootCertPEM.utf8)))
        c.minimumTLSVersion = .tlsv12
        return try NIOSSLContext(configuration: c)
    }

    /// Binds the signer. Returns the channel (its localAddress has the port).
    public func bind(group: EventLoopGroup, host: String, port: Int) throws -> Channel {
        let ctx = try servingContext()
        return try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    let peer = PeerBox()
                    let tls = NIOSSLServerHandler._makeSSLServerHandler(context: ctx) { cert, channel in
                        peer.id = SpiffeID.of(cert)
                        return channel.eventLoop.makeSucceededFuture(())
                    }
                    try ch.pipeline.syncOperations.addHandler(tls)
                    try ch.pipeline.syncOperations.configureHTTPServerPipeline()
                    try ch.pipeline.syncOperations.addHandler(SignHandler(service: self, peer: peer))
                }
            }
            .bind(host: host, port: port).wait()
    }

    final class PeerBox: @unchecked Sendable { var id: SpiffeID? }

    /// Decides one signing request; returns (status, JSON body).
    func handle(method: HTTPMethod, uri: String, authorization: String?, peer: SpiffeID?, body: Data) -> (HTTPResponseStatus, String) {
        func fail(_ s: HTTPResponseStatus, _ msg: String) -> (HTTPResponseStatus, String) {
            log("ca: refused \(uri): \(msg)")
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
        // Who is calling: a token names one identity; a current certificate is its own.
        var allowed: SpiffeID?
        if let a = authorization, a.hasPrefix("Bearer "), let id = tokens[String(a.dropFirst(7)).trimmingCharacters(in: .whitespaces)] { allowed = id }
        else if let p = peer, p.trustDomain == ca.trustDomain { allowed = p }
        guard let who = allowed else { return fail(.unauthorized, "no valid bootstrap token or mesh certificate") }
        guard who == asked else { return fail(.forbidden, "caller \(who.uri) may not get a certificate for \(asked.uri)") }
        let ttl = min(maxTTL, (obj["ttl_seconds"] as? Double) ?? maxTTL)
        do {
            let leaf = try ca.signCSR(pem: csr, allowed: asked, ttl: ttl)
            log("ca: issued \(asked.uri) for \(Int(ttl))s")
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
                let (status, text) = service.handle(method: h.method, uri: h.uri, authorization: h.headers.first(name: "authorization"), peer: peer.id, body: body)
                var headers = HTTPHeaders([("content-type", "application/json"), ("content-length", String(text.utf8.count))])
                if !h.isKeepAlive { headers.add(name: "connection", value: "close") }
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: text)))), promise: nil)
                let keep = h.isKeepAlive
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if !keep { context.close(promise: nil) } }
                head = nil
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
    }
}



/// The sidecar side of the CSR flow: a new key and CSR, sent to the CA over TLS (the CA
/// verified against root-cert.pem), authenticated by the current certificate when there is
/// one, else by the bootstrap token. Blocking; called off the event loops.
public enum CAClient {
    public static func requestBundle(caAddress: String, rootCertPath: String, identity: SpiffeID, token: String?,
                                     currentCertDir: String?, keyType: KeyType = .ecdsaP256, ttl: TimeInterval = 86400,
                                     group: EventLoopGroup, timeout: TimeAmount = .seconds(10)) throws -> WorkloadBundle {
        let parts = caAddress.split(separator: ":")
        guard parts.count == 2, let port = Int(parts[1]) else { throw TLSConfigError("--ca-address", "expected host:port, got \"\(caAddress)\"") }
        let host = String(parts[0])
        let root = try readText(rootCertPath)
        var cfg = TLSConfiguration.makeClientConfiguration()
        cfg.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(root.utf8)))
        cfg.certificateVerification = .noHostnameVerification
        cfg.minimumTLSVersion = .tlsv12
        if let dir = currentCertDir {
            let chain = (dir as NSString).appendingPathComponent(WorkloadBundle.certChainFile)
            let key = (dir as NSString).appendingPathComponent(WorkloadBundle.keyFile)
            if let c = try? NIOSSLCertificate.fromPEMFile(chain), let k = try? NIOSSLPrivateKey(file: key, format: .pem) {
                cfg.certificateChain = c.map { .certificate($0) }
                cfg.privateKey = .privateKey(k)
            }
        }
        let ctx = try NIOSSLContext(configuration: cfg)
        let (csr, keyPEM) = try MeshCA.makeCSR(for: identity, keyType: keyType)
        let body = "{\"csr\":\(JSON.quote(csr)),\"namespace\":\(JSON.quote(identity.namespace)),\"service_account\":\(JSON.quote(identity.serviceAccount)),\"ttl_seconds\":\(Int(ttl))}"
        let loop = group.next()
        let promise = loop.makePromise(of: (HTTPResponseStatus, Data).self)
        let ch = try ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: ctx, serverHostname: nil))
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(ResponseCollector(promise: promise))
                }
            }
            .connect(host: host, port: port).wait()
        var headers = HTTPHeaders([("host", caAddress), ("content-type", "application/json"), ("content-length", String(body.utf8.count)), ("connection", "close")])
        if let token, !token.isEmpty { headers.add(name: "authorization", value: "Bearer \(token)") }
        ch.write(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: .POST, uri: "/v1/sign", headers: headers)), promise: nil)
        ch.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(string: body))), promise: nil)
        ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let timer = loop.scheduleTask(in: timeout) { promise.fail(TLSConfigError(caAddress, "no answer within \(timeout)")) }
        defer { timer.cancel(); ch.close(promise: nil) }
        let (status, data) = try promise.futureResult.wait()
        let obj = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        guard status == .ok, let chain = obj?["cert_chain"] as? [String], let leaf = chain.first else {
            throw TLSConfigError(caAddress, "CA refused: \(status.code) \(obj?["error"] as? String ?? String(decoding: data, as: UTF8.self))")
        }
        return WorkloadBundle(certChainPEM: leaf, keyPEM: keyPEM, rootCertPEM: chain.count > 1 ? chain[1] : root)
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
        func errorCaught(context: ChannelHandlerContext, error: Error) { promise.fail(error); context.close(promise: nil) }
        func channelInactive(context: ChannelHandlerContext) { promise.fail(TLSConfigError("CA", "connection closed before a response")) }
    }
}
