/// Every limit and timeout the proxy enforces on untrusted traffic, with safe defaults
/// (documented in docs/configuration.md). Durations are milliseconds.
public struct ProxyLimits: Sendable {
    /// Largest request or response head (431 / 502 beyond).
    public var maxHeadBytes = 60 * 1024
    /// Most header lines in a head (431 beyond).
    public var maxHeaderCount = 100
    /// Largest body a filter may ask to buffer (413 beyond).
    public var maxBufferedBodyBytes = 1 << 20
    /// Time to receive a complete request head once its first byte arrived (408).
    public var requestHeaderTimeoutMs = 10_000
    /// Time a request body may go without a byte while the proxy reads it (Envoy's stream
    /// idle timeout, for the request side): 408, flag SI, connection closed. 0 disables.
    public var requestBodyIdleTimeoutMs = 15_000
    /// Time for a whole request to arrive once its head was read (Envoy's request_timeout,
    /// off there by default): a body that trickles a byte before each idle timeout still
    /// ends here. 408, flag SI, connection closed. 0 disables.
    public var requestTimeoutMs = 300_000
    /// Time for an inbound TLS handshake, and in PERMISSIVE mode for the first byte that
    /// tells TLS from plaintext, to complete (closed silently beyond).
    public var tlsHandshakeTimeoutMs = 10_000
    /// Downstream connection idle between requests (closed silently).
    public var downstreamIdleTimeoutMs = 3_600_000
    /// Upstream connect timeout (Envoy's default: 10s) — 503 UF.
    public var connectTimeoutMs = 10_000
    /// Per-stream timeout from request start to the end of the response head (504 UT).
    /// Istio's route default is none; Envoy's is 15s. 0 disables.
    public var streamTimeoutMs = 0
    /// Idle upstream pooled connection lifetime (Envoy's default: 1h).
    public var upstreamIdleTimeoutMs = 3_600_000
    /// Most idle upstream connections kept per host per event loop. Must exceed the
    /// concurrency a loop sees, or every release past it closes a connection that the
    /// next request reopens (Envoy keeps idle connections up to its 1024 circuit limit).
    public var maxIdleUpstreamPerHost = 1024
    /// Largest amount of unsent data queued toward one peer before reading from the
    /// other side pauses (backpressure).
    public var highWaterMarkBytes = 256 * 1024
    /// Time a draining proxy waits for in-flight streams (SIGTERM).
    public var drainTimeoutMs = 5_000
    /// Time a connection that is closing waits for its peer to take the bytes still
    /// queued (an HTTP/1.1 response before `connection: close`, the rest of a TCP relay
    /// once the other side closed); beyond, it is closed with them unsent. A peer that
    /// does not read cannot hold the connection longer.
    public var closeFlushTimeoutMs = 30_000
    /// Most concurrent downstream connections per event loop (beyond: accept then close).
    public var maxConnectionsPerLoop = 16_384
    /// Request header names with an underscore (Envoy's headers_with_underscores_action):
    /// an app behind WSGI/CGI reads `X_Forwarded_Client_Cert` as the proxy's
    /// x-forwarded-client-cert. `.drop` (default) removes them, `.reject` answers 400,
    /// `.allow` forwards them except those that fold onto a header the proxy manages.
    public var headersWithUnderscores = UnderscoreHeaderAction.drop
    public init() {}
}

public enum UnderscoreHeaderAction: String, Sendable, CaseIterable {
    case allow, drop, reject
}
