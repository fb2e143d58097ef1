import NIOCore
import NIOSSL
import MoonletCore
import MoonletConfig
import MoonletTLS

/// How the inbound listener secures a new connection, from the PeerAuthentication mode
/// in force (read per connection, so a policy change applies to the next connection).
enum InboundSecurity {
    case plaintext
    case mutualTLS(TLSMaterial)
    /// PERMISSIVE: TLS when the first byte starts a TLS record, plaintext otherwise.
    case sniff(TLSMaterial)
    case refuse(String)

    static func plan(_ ctx: LoopContext) -> InboundSecurity {
        switch ctx.inboundMTLS.mode {
        case .disable: return .plaintext
        case .strict:
            guard let m = ctx.tls else { return .refuse("STRICT mTLS (\(ctx.inboundMTLS.source)) but no workload certificate (--certs)") }
            return .mutualTLS(m)
        case .permissive, .unset:
            guard let m = ctx.tls else { return .plaintext }
            return .sniff(m)
        }
    }

    /// Adds the handlers the plan needs in front of `downstream`, then `downstream` (or
    /// `last` in its place: the interception handler, which adds `downstream` for HTTP).
    static func install(on ch: Channel, ctx: LoopContext, downstream: DownstreamHandler, last: ChannelHandler? = nil) throws {
        let sync = ch.pipeline.syncOperations
        // Intercepted: a FIN waits for the handshake (Interception.swift, EarlyEOFHold).
        if last != nil { try sync.addHandler(EarlyEOFHold()) }
        switch plan(ctx) {
        case .plaintext: break
        case .mutualTLS(let m):
            // The handler is held strongly (see DownstreamHandler, "timers"): both live in
            // this pipeline and go when it does.
            try sync.addHandler(SNIPeek(downstream: downstream))
            try sync.addHandler(m.makeServerHandler { id in downstream.peerAuthenticated(id) })
            downstream.armHandshakeTimer(ch)
        case .sniff(let m):
            try sync.addHandler(TLSSniffer(material: m, downstream: downstream))
            downstream.armHandshakeTimer(ch)
        case .refuse(let why):
            if ctx.mayLogTLSRefusal() {
                ctx.logger.warning("inbound connection from \(ch.remoteAddress.map { "\($0)" } ?? "?") refused: \(why)")
            }
            ctx.metrics.count("moonlet_inbound_tls_refused_total")
            ch.close(promise: nil)
            return
        }
        if let last { try sync.addHandler(last) } else { try sync.addHandler(downstream) }
    }
}

/// Reads the SNI of the ClientHello in the first read of a TLS connection (Envoy's
/// requested server name: `s.source.serverName`, %REQUESTED_SERVER_NAME%), then removes
/// itself. A ClientHello split over several reads leaves the name empty.
final class SNIPeek: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    let downstream: DownstreamHandler
    init(downstream: DownstreamHandler) { self.downstream = downstream }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        downstream.peer.serverName = Self.serverName(unwrapInboundIn(data)) ?? ""
        context.fireChannelRead(data)
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    /// The server_name of the ClientHello that starts `buf`, nil when there is none.
    static func serverName(_ buf: ByteBuffer) -> String? {
        guard case .tls(let sni) = ProtocolSniffer.classifyTLS(buf.readableBytesView) else { return nil }
        return sni
    }
}

/// PERMISSIVE mode: looks at the first byte of a connection. A TLS handshake record
/// (0x16) gets the mTLS server handler spliced in; anything else is plaintext HTTP. The
/// sniffer then removes itself, so it costs nothing after the first read.
final class TLSSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    let material: TLSMaterial
    let downstream: DownstreamHandler

    init(material: TLSMaterial, downstream: DownstreamHandler) { self.material = material; self.downstream = downstream }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buf = unwrapInboundIn(data)
        if buf.readableBytes > 0, buf.getInteger(at: buf.readerIndex, as: UInt8.self) != 0x16 {
            // Plaintext: the handshake timer no longer applies.
            downstream.handshakeTimer?.cancel(); downstream.handshakeTimer = nil
        } else {
            let d = downstream
            d.peer.serverName = SNIPeek.serverName(buf) ?? ""
            do {
                let tls = try material.makeServerHandler { id in d.peerAuthenticated(id) }
                try context.pipeline.syncOperations.addHandler(tls, position: .after(self))
            } catch {
                context.close(promise: nil)
                return
            }
        }
        context.fireChannelRead(data)
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
