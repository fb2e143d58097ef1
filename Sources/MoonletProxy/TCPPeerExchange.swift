import NIOCore
import NIOTLS
import MoonletCore
import MoonletTelemetry

/// Istio's TCP metadata exchange on one mTLS side of a TCPSession (TCPMetadataExchange),
/// between the TLS handler and the session's glue: this sidecar's header goes out ahead of
/// any relayed byte, the peer's is read off the start of the stream (and handed to the
/// session for its metric labels), then the handler takes itself out and the bytes flow
/// untouched. On the upstream side it waits for the handshake: the exchange happens only
/// when the peer chose ALPN `istio-peer-exchange` (writes from the glue are held until
/// then). On the inbound side it is added once that ALPN was negotiated.
final class TCPPeerExchange: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum State { case handshaking, reading, passThrough }
    var state: State
    let header: [UInt8]
    /// The peer's node metadata Struct (nil: none came, or it did not decode); called once.
    var onPeer: (([UInt8]?) -> Void)?
    var inbound: ByteBuffer?
    /// Writes (and a flush, an output close) the glue made during the handshake.
    var held: [(NIOAny, EventLoopPromise<Void>?)] = []
    var heldFlush = false
    var heldClose: (CloseMode, EventLoopPromise<Void>?)?

    /// `handshakeDone`: the inbound side, where the ALPN is already known.
    init(header: [UInt8], handshakeDone: Bool, onPeer: @escaping ([UInt8]?) -> Void) {
        self.header = header
        self.state = handshakeDone ? .reading : .handshaking
        self.onPeer = onPeer
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // Inbound: the ALPN is known; the peer's header is read whatever the glue asks.
        if state == .reading && context.channel.isActive { sendHeader(context); context.read() }
    }

    func channelActive(context: ChannelHandlerContext) {
        if state == .reading { sendHeader(context) }
        context.fireChannelActive()
    }

    var headerSent = false
    func sendHeader(_ context: ChannelHandlerContext) {
        guard !headerSent else { return }
        headerSent = true
        var b = context.channel.allocator.buffer(capacity: header.count)
        b.writeBytes(header)
        context.writeAndFlush(wrapOutboundOut(b), promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if state == .handshaking, case TLSUserEvent.handshakeCompleted(let proto) = event {
            if proto == TCPMetadataExchange.alpn {
                state = .reading
                sendHeader(context)
                context.read()   // the peer's header, whatever the glue asks for
            } else {
                peer(nil)
            }
            releaseHeld(context)
            context.fireUserInboundEventTriggered(event)
            if state == .passThrough { context.pipeline.syncOperations.removeHandler(context: context, promise: nil) }
            return
        }
        if state == .reading, case ChannelEvent.inputClosed = event {
            // The stream ended inside the header: what came is the connection's own.
            forward(context)
            peer(nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard state == .reading else { context.fireChannelRead(data); return }
        var b = unwrapInboundIn(data)
        if inbound == nil { inbound = b } else { inbound!.writeBuffer(&b) }
        let r = inbound!.withUnsafeReadableBytes { TCPMetadataExchange.parse($0) }
        switch r {
        case .needMore:
            return
        case .absent:
            peer(nil)
        case .tooLarge:
            // No stream data to pass on, and more than Moonlet buffers: the connection ends.
            inbound = nil
            peer(nil)
            context.close(promise: nil)
            return
        case .header(let bytes, let consumed):
            inbound!.moveReaderIndex(forwardBy: consumed)
            peer(bytes)
        }
        forward(context)
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        // Still inside the header: nothing for the glue yet, but the rest must come.
        if state == .reading { context.read(); return }
        context.fireChannelReadComplete()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if state != .passThrough { peer(nil) }
        for (_, p) in held { p?.fail(ChannelError.ioOnClosedChannel) }
        held = []
        heldClose?.1?.fail(ChannelError.ioOnClosedChannel)
        heldClose = nil
        context.fireChannelInactive()
    }

    /// The bytes read past the header go on to the glue.
    func forward(_ context: ChannelHandlerContext) {
        guard let b = inbound else { return }
        inbound = nil
        if b.readableBytes > 0 {
            context.fireChannelRead(wrapInboundOut(b))
            context.fireChannelReadComplete()
        }
    }

    func peer(_ bytes: [UInt8]?) {
        state = .passThrough
        let f = onPeer
        onPeer = nil
        f?(bytes)
    }

    // MARK: outbound: held while the handshake decides

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if state == .handshaking { held.append((data, promise)); return }
        context.write(data, promise: promise)
    }

    func flush(context: ChannelHandlerContext) {
        if state == .handshaking { heldFlush = true; return }
        context.flush()
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if state == .handshaking && mode == .output { heldClose = (mode, promise); return }
        context.close(mode: mode, promise: promise)
    }

    func releaseHeld(_ context: ChannelHandlerContext) {
        let w = held
        held = []
        for (d, p) in w { context.write(d, promise: p) }
        if heldFlush || !w.isEmpty { heldFlush = false; context.flush() }
        if let (m, p) = heldClose { heldClose = nil; context.close(mode: m, promise: p) }
    }
}
