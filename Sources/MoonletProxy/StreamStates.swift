/// The states of a downstream stream, as swift-nio's own handlers keep theirs: one enum
/// per side with explicit transitions, instead of a set of Bool flags whose
/// combinations had to be kept consistent by hand.

/// Where the downstream request of the current stream is.
enum RequestState: Equatable {
    /// No stream: a request head is awaited (or being parsed).
    case head
    /// The head was read; body bytes stream through to the upstream as they come.
    case body
    /// The head was read; a filter asked for the whole body (stop-and-buffer), which is
    /// collected before anything goes upstream.
    case buffered
    /// The whole request was read; `buffered`: its body was collected for a filter (it
    /// goes upstream with a content-length, never chunked).
    case complete(buffered: Bool)

    @inline(__always)
    var isComplete: Bool { if case .complete = self { return true } else { return false } }

    /// Body bytes are still to come (streaming through, or being buffered).
    @inline(__always)
    var isArriving: Bool { self == .body || self == .buffered }

    /// The body is being or was buffered for a filter.
    @inline(__always)
    var isBuffered: Bool {
        switch self {
        case .buffered, .complete(buffered: true): return true
        default: return false
        }
    }
}

/// Where the response to the client is.
enum ResponseState: Equatable {
    /// Nothing was sent to the client yet: a retry or a local reply can still replace it.
    case none
    /// A response filter asked for the whole body (stop-and-buffer): the upstream's head
    /// and body are held by the proxy, nothing is written yet. The upstream response is
    /// committed (no retry; an upstream failure now resets the client's stream, as
    /// Envoy's once the router passed the head on), but a local reply can still replace it.
    case buffering
    /// The head is written but held (until the first body bytes, the end of the response
    /// or the end of the loop's I/O batch), so a small response leaves in one write.
    case headHeld
    /// The head left; body bytes follow.
    case streaming
    /// The whole response was written.
    case ended
}

/// How the response body is framed to an HTTP/1.1 client.
enum ResponseFraming: Equatable {
    /// As the upstream framed it (content-length, or none).
    case asIs
    /// Re-framed chunked (the upstream's was chunked or close-delimited, the client speaks 1.1).
    case chunked
    /// Close-delimited (an HTTP/1.0 client): the connection closes after the body.
    case untilClose
}

/// Where the current upstream attempt is.
enum UpstreamState {
    /// No attempt in progress (before dispatch, between retries, after the response).
    case idle
    /// The endpoint's name is being looked up (off the loop).
    case resolving
    /// The cluster is at maxConnections: the stream waits for a released connection or
    /// a free slot (PoolWaiter, bounded by maxPendingRequests).
    case waiting
    /// A connection (TLS included), or a stream on an HTTP/2 session being set up, is
    /// being made.
    case connecting
    /// The request is on this connection.
    case attached(UpstreamConnection)

    /// A connection is being made or a name resolved: its completion will attach or fail.
    @inline(__always)
    var isConnecting: Bool {
        switch self {
        case .resolving, .connecting: return true
        default: return false
        }
    }
}

/// Where a downstream connection (or an HTTP/2 stream's handler) is, instead of the
/// closeAfterResponse and closed flags.
enum ConnectionState: Equatable {
    /// Serving; another request may follow the current one (keep-alive).
    case open
    /// The connection closes once the current response is written (a request without
    /// keep-alive, an unfinished request body, a close-delimited response, a drain).
    case closeAfterResponse
    /// Closed or closing now: nothing more is read or written for it.
    case closed
}

/// Where a downstream connection's transport is: whether its inbound TLS handshake
/// completed, and whether its first bytes were read (they may be the HTTP/2 preface).
/// The two facts as one state (what were the tlsEstablished and sniffing flags).
enum TransportState: Equatable {
    /// No handshake completed (or plaintext), no byte read yet.
    case fresh
    /// The TLS handshake completed; no byte read yet.
    case tlsEstablished
    /// The first bytes were read (the protocol is chosen); `tls`: the handshake had completed.
    case reading(tls: Bool)

    /// The inbound TLS handshake completed: later TLS errors are not refusals.
    @inline(__always)
    var tlsEstablished: Bool {
        switch self {
        case .tlsEstablished, .reading(tls: true): return true
        default: return false
        }
    }

    /// The next bytes are the connection's first.
    @inline(__always)
    var firstBytes: Bool {
        switch self {
        case .fresh, .tlsEstablished: return true
        case .reading: return false
        }
    }

    mutating func tlsCompleted() {
        switch self {
        case .fresh: self = .tlsEstablished
        case .reading: self = .reading(tls: true)
        case .tlsEstablished: break
        }
    }

    mutating func firstBytesRead() {
        switch self {
        case .fresh: self = .reading(tls: false)
        case .tlsEstablished: self = .reading(tls: true)
        case .reading: break
        }
    }
}

extension DownstreamHandler {
    /// The connection (or stream) is closed: every callback that can still arrive checks this.
    @inline(__always)
    var closed: Bool { connection == .closed }

    /// The connection closes once the current response is written (unless it is closed
    /// already).
    @inline(__always)
    func closeAfterResponse() {
        if connection == .open { connection = .closeAfterResponse }
    }

    /// The connection the current attempt is attached to (nil in every other upstream
    /// state); setting nil makes the upstream side idle.
    @inline(__always)
    var upstream: UpstreamConnection? {
        get { dispatcher.upstream }
        set { dispatcher.upstream = newValue }
    }

    /// The connection or its request failed before the response completed (the
    /// dispatcher's retry decision, UpstreamDelegate).
    func upstreamFailed(_ reason: UpstreamFailure) { dispatcher.upstreamFailed(reason) }

    /// Something of the response was sent (or held to be sent) to the client: it can no
    /// longer be retried or replaced by a local reply.
    @inline(__always)
    var responseStarted: Bool { responseState != .none }
}
