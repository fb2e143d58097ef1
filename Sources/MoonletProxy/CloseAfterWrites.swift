import NIOCore

extension ChannelHandlerContext {
    /// Runs `then` once every write made through this context so far is out: an empty
    /// write's promise is completed in order, after them (through TLS too). NIO's full
    /// close fails the writes still pending, and a half-close becomes a full close when
    /// the channel's input is shut already: a close that must not cut data waits for this.
    func whenWritesAreOut(_ then: @escaping (Result<Void, Error>) -> Void) {
        let written = eventLoop.makePromise(of: Void.self)
        writeAndFlush(NIOAny(ByteBuffer()), promise: written)
        written.futureResult.whenComplete(then)
    }

    /// Closes the channel once the writes made so far are out (Envoy's FlushWrite close),
    /// or after `timeoutMs` when the peer does not take them.
    func closeWhenWritesAreOut(timeoutMs: Int) {
        let channel = self.channel
        let force = eventLoop.scheduleTask(in: .milliseconds(Int64(timeoutMs))) { channel.close(promise: nil) }
        whenWritesAreOut { _ in force.cancel(); channel.close(promise: nil) }
    }
}
