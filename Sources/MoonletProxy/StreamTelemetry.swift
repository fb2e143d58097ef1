import MoonletCore
import MoonletTelemetry

/// Istio's request metrics of the streams of one downstream connection (or one HTTP/2
/// stream): the recording that ran inside DownstreamHandler, now its own type so it can
/// become a Lua filter (istio-stats) without touching the request path.
///
/// Stored inline in its handler (a struct: no allocation per connection or stream). The
/// series is found by a small key, and the last one is reused when the key repeats, so
/// the full label set is built once per series.
struct StreamTelemetry {
    let inbound: Bool
    private var lastSeries: RequestSeries?
    private var lastSeriesKey: SeriesKey?

    init(role: ListenerRole) { inbound = role == .inbound }

    /// Records a finished stream. `peerPrincipal`: the downstream's mTLS principal
    /// (inbound); `upstreamMTLS`: the attempt that served it went over mesh mTLS
    /// (outbound). `now`: the clock when the stream ended.
    mutating func record(_ s: ProxyStream, now: UInt64, ctx: LoopContext, peerPrincipal: String, upstreamMTLS: Bool) {
        let ms = Double(now &- s.startNanos) / 1e6
        let inbound = self.inbound
        let service = inbound ? ctx.inboundService : (s.route.host.isEmpty ? "unknown" : s.route.host)
        let mtls = inbound ? !peerPrincipal.isEmpty : upstreamMTLS
        let key = SeriesKey(inbound: inbound, code: s.status, flags: s.responseFlags.rawValue, service: service, principal: inbound ? peerPrincipal : "", mtls: mtls)
        let series: RequestSeries
        if let last = lastSeries, lastSeriesKey == key { series = last } else {
            let flags = s.responseFlags
            series = ctx.metrics.series(key) {
                RequestLabels(reporter: inbound ? "destination" : "source", responseCode: key.code,
                              responseFlags: flags.envoyString, destinationService: service,
                              connectionSecurityPolicy: mtls ? "mutual_tls" : "none",
                              sourcePrincipal: key.principal.isEmpty ? "unknown" : "spiffe://" + key.principal)
            }
            lastSeries = series; lastSeriesKey = key
        }
        series.record(durationMs: ms, requestBytes: s.requestBodyBytes, responseBytes: s.responseBodyBytes)
    }

    /// A request that never became a stream (its head did not parse): counted with flag
    /// DPE and an unknown destination.
    func recordProtocolError(status: Int, responseBytes: Int, ctx: LoopContext) {
        ctx.metrics.recordRequest(RequestLabels(reporter: inbound ? "destination" : "source", responseCode: status,
                                                responseFlags: "DPE", destinationService: "unknown"),
                                  durationMs: 0, requestBytes: 0, responseBytes: Int64(responseBytes))
    }
}
