import MoonletCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import MoonletSidecar
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// `moonlet inject --webhook`: Istio's sidecar-injector role. An HTTPS server that takes
/// AdmissionReview (admission.k8s.io/v1) POSTs from the API server and answers with the
/// JSONPatch that injects the pod. Which namespaces it sees is the
/// MutatingWebhookConfiguration's business (deploy/kubernetes: `istio-injection=enabled`).
///
/// The serving certificate is read again when its files change (checked at each new
/// connection: a Secret update, cert-manager's renewal); a change that does not load (a
/// half-written file) is logged and the previous certificate keeps serving.
public final class InjectionWebhook: @unchecked Sendable {
    /// The reviewer behind every request.
    public let reviewer: AdmissionReviewer
    /// Largest request body accepted (413 beyond): the API server sends one pod.
    public let maxBodyBytes: Int
    let log: @Sendable (String) -> Void
    let chainPath: String
    let keyPath: String
    // Guarded by `lock`: the context in use and the files' identity when it was loaded.
    private let lock = NSLock()
    private var current: NIOSSLContext
    private var loadedStamp: [Int]

    /// The certificate file in the certs directory (Istio's name).
    public static let certChainFile = "cert-chain.pem"
    /// The private key file in the certs directory.
    public static let keyFile = "key.pem"

    /// A webhook serving with `cert-chain.pem` and `key.pem` from `certsDirectory`.
    public init(reviewer: AdmissionReviewer, certsDirectory: String, maxBodyBytes: Int = 4 << 20,
                log: @escaping @Sendable (String) -> Void = { _ in }) throws {
        chainPath = (certsDirectory as NSString).appendingPathComponent(Self.certChainFile)
        keyPath = (certsDirectory as NSString).appendingPathComponent(Self.keyFile)
        loadedStamp = Self.stamp([chainPath, keyPath])
        current = try Self.makeContext(chainPath: chainPath, keyPath: keyPath)
        self.reviewer = reviewer
        self.maxBodyBytes = maxBodyBytes
        self.log = log
    }

    /// Device, inode, size and modification time of each file (following symbolic links,
    /// as a mounted Secret's files are): any change means the files were replaced.
    static func stamp(_ paths: [String]) -> [Int] {
        paths.flatMap { path -> [Int] in
            var st = stat()
            guard stat(path, &st) == 0 else { return [-1] }
            return [Int(st.st_dev), Int(st.st_ino), Int(st.st_size), Int(st.st_mtim.tv_sec), Int(st.st_mtim.tv_nsec)]
        }
    }

    /// The TLS context for a new connection: reloaded first when the files changed.
    func context() -> NIOSSLContext {
        let now = Self.stamp([chainPath, keyPath])
        lock.lock()
        defer { lock.unlock() }
        if now != loadedStamp {
            loadedStamp = now
            do {
                current = try Self.makeContext(chainPath: chainPath, keyPath: keyPath)
                log("inject webhook: serving certificate reloaded from \(chainPath)")
            } catch {
                log("inject webhook: \(error); the previous certificate keeps serving")
            }
        }
        return current
    }

    static func makeContext(chainPath: String, keyPath: String) throws -> NIOSSLContext {
        let chain: [NIOSSLCertificate]
        do { chain = try NIOSSLCertificate.fromPEMFile(chainPath) } catch { throw WebhookError("\(chainPath): not a PEM certificate chain (\(error))") }
        guard !chain.isEmpty else { throw WebhookError("\(chainPath): no certificate in it") }
        let key: NIOSSLPrivateKey
        do { key = try NIOSSLPrivateKey(file: keyPath, format: .pem) } catch { throw WebhookError("\(keyPath): not a PEM private key (\(error))") }
        var cfg = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(key))
        cfg.minimumTLSVersion = .tlsv12
        cfg.applicationProtocols = ["http/1.1"]
        return try NIOSSLContext(configuration: cfg)
    }

    /// Listens on `host:port` (0 = an ephemeral port; read it from the channel's localAddress).
    public func bind(group: EventLoopGroup, host: String, port: Int) throws -> Channel {
        try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    let sync = ch.pipeline.syncOperations
                    try sync.addHandler(IdleStateHandler(allTimeout: .seconds(30)))
                    try sync.addHandler(NIOSSLServerHandler(context: self.context()))
                    try sync.configureHTTPServerPipeline(withErrorHandling: true)
                    try sync.addHandler(AdmissionHandler(webhook: self))
                }
            }
            .bind(host: host, port: port).wait()
    }
}

/// A start-up error of the webhook (bad certificate files).
public struct WebhookError: Error, CustomStringConvertible {
    /// What went wrong, naming the file.
    public let description: String
    init(_ d: String) { description = d }
}

/// One connection: reads a request, answers it, keeps the connection for the next.
final class AdmissionHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let webhook: InjectionWebhook
    var head: HTTPRequestHead?
    var body = ByteBuffer()
    var tooLarge = false

    init(webhook: InjectionWebhook) { self.webhook = webhook }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h; body.clear(); tooLarge = false
        case .body(var b):
            if body.readableBytes + b.readableBytes > webhook.maxBodyBytes { tooLarge = true } else if !tooLarge { body.writeBuffer(&b) }
        case .end:
            guard let h = head else { return }
            head = nil
            let (status, text) = answer(h)
            var out = context.channel.allocator.buffer(capacity: text.utf8.count)
            out.writeString(text)
            var headers = HTTPHeaders([("content-type", "application/json"), ("content-length", "\(out.readableBytes)")])
            if !h.isKeepAlive { headers.add(name: "connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(out))), promise: nil)
            let keep = h.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if !keep { context.close(promise: nil) } }
        }
    }

    func answer(_ h: HTTPRequestHead) -> (HTTPResponseStatus, String) {
        if h.method == .GET && (h.uri == "/ready" || h.uri == "/healthz/ready") { return (.ok, "{\"ready\":true}") }
        guard h.method == .POST else { return (.methodNotAllowed, "{\"error\":\"POST an AdmissionReview\"}") }
        if tooLarge { return (.payloadTooLarge, "{\"error\":\"body over \(webhook.maxBodyBytes) bytes\"}") }
        let text = body.getString(at: body.readerIndex, length: body.readableBytes) ?? ""
        do {
            return (.ok, try webhook.reviewer.review(text))
        } catch {
            webhook.log("inject webhook: \(h.uri): \(error)")
            return (.badRequest, "{\"error\":\(JSON.quote("\(error)"))}")
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil) } else { context.fireUserInboundEventTriggered(event) }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) { context.close(promise: nil) }
}
