import MoonletCore

/// Labels of Istio's standard request metrics that Moonlet fills today.
public struct RequestLabels: Hashable, Sendable {
    /// "source" on the outbound side, "destination" on the inbound side.
    public var reporter: String
    public var responseCode: Int
    public var responseFlags: String
    public var destinationService: String
    public var sourceWorkload: String
    public var destinationWorkload: String
    /// "mutual_tls" when the connection was authenticated with mTLS, else "none".
    public var connectionSecurityPolicy: String
    /// The peer's SPIFFE id on the inbound side ("unknown" without mTLS), as Istio labels it.
    public var sourcePrincipal: String
    public init(reporter: String, responseCode: Int, responseFlags: String, destinationService: String,
                sourceWorkload: String = "unknown", destinationWorkload: String = "unknown", connectionSecurityPolicy: String = "none",
                sourcePrincipal: String = "unknown") {
        self.reporter = reporter; self.responseCode = responseCode; self.responseFlags = responseFlags
        self.destinationService = destinationService; self.sourceWorkload = sourceWorkload
        self.destinationWorkload = destinationWorkload; self.connectionSecurityPolicy = connectionSecurityPolicy
        self.sourcePrincipal = sourcePrincipal
    }
    var prometheus: String {
        "reporter=\"\(reporter)\",source_workload=\"\(esc(sourceWorkload))\",source_principal=\"\(esc(sourcePrincipal))\",destination_workload=\"\(esc(destinationWorkload))\",destination_service=\"\(esc(destinationService))\",response_code=\"\(responseCode)\",response_flags=\"\(responseFlags)\",connection_security_policy=\"\(connectionSecurityPolicy)\""
    }
}

func esc(_ s: String) -> String {
    var o = ""
    for c in s { switch c { case "\\": o += "\\\\"; case "\"": o += "\\\""; case "\n": o += "\\n"; default: o.append(c) } }
    return o
}

/// A histogram with fixed bucket bounds (cumulative only when exposed).
public struct Histogram: Sendable {
    public static let istioDurationBucketsMs: [Double] = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000]
    public static let istioSizeBuckets: [Double] = [1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000]
    public var counts: [UInt64]
    public var sum: Double = 0
    public var count: UInt64 = 0
    public init(bucketCount: Int) { counts = [UInt64](repeating: 0, count: bucketCount + 1) }
    @inline(__always)
    public mutating func observe(_ v: Double, bounds: [Double]) {
        var i = 0
        while i < bounds.count && v > bounds[i] { i += 1 }
        counts[i] += 1; sum += v; count += 1
    }
    public mutating func merge(_ o: Histogram) {
        for i in counts.indices { counts[i] += o.counts[i] }
        sum += o.sum; count += o.count
    }
}

/// Per-plugin call statistics.
public struct PluginStats: Sendable {
    public var calls: UInt64 = 0
    public var errors: UInt64 = 0
    public var nanos: UInt64 = 0
    public var aborted: UInt64 = 0
    public init() {}
    public mutating func merge(_ o: PluginStats) { calls += o.calls; errors += o.errors; nanos += o.nanos; aborted += o.aborted }
}

/// The values of one shard at one moment (or the sum of several).
public struct MetricsSnapshot: Sendable {
    public var requests: [RequestLabels: UInt64] = [:]
    public var durations: [RequestLabels: Histogram] = [:]
    public var requestBytes: [RequestLabels: Histogram] = [:]
    public var responseBytes: [RequestLabels: Histogram] = [:]
    public var activeConnections: [String: Int64] = [:]
    public var connectionsTotal: [String: UInt64] = [:]
    public var plugins: [String: PluginStats] = [:]
    public var counters: [String: UInt64] = [:]
    public init() {}

    public mutating func merge(_ o: MetricsSnapshot) {
        for (k, v) in o.requests { requests[k, default: 0] += v }
        for (k, v) in o.durations { durations[k, default: Histogram(bucketCount: Histogram.istioDurationBucketsMs.count)].merge(v) }
        for (k, v) in o.requestBytes { requestBytes[k, default: Histogram(bucketCount: Histogram.istioSizeBuckets.count)].merge(v) }
        for (k, v) in o.responseBytes { responseBytes[k, default: Histogram(bucketCount: Histogram.istioSizeBuckets.count)].merge(v) }
        for (k, v) in o.activeConnections { activeConnections[k, default: 0] += v }
        for (k, v) in o.connectionsTotal { connectionsTotal[k, default: 0] += v }
        for (k, v) in o.plugins { plugins[k, default: PluginStats()].merge(v) }
        for (k, v) in o.counters { counters[k, default: 0] += v }
    }
}

/// The request metrics of one label set, updated in place (no hashing per request
/// once a stream has its series).
public final class RequestSeries {
    public let labels: RequestLabels
    var count: UInt64 = 0
    var duration = Histogram(bucketCount: Histogram.istioDurationBucketsMs.count)
    var requestBytes = Histogram(bucketCount: Histogram.istioSizeBuckets.count)
    var responseBytes = Histogram(bucketCount: Histogram.istioSizeBuckets.count)
    init(labels: RequestLabels) { self.labels = labels }

    @inline(__always)
    public func record(durationMs: Double, requestBytes rq: Int64, responseBytes rs: Int64) {
        count &+= 1
        duration.observe(durationMs, bounds: Histogram.istioDurationBucketsMs)
        requestBytes.observe(Double(rq), bounds: Histogram.istioSizeBuckets)
        responseBytes.observe(Double(rs), bounds: Histogram.istioSizeBuckets)
    }
}

/// What identifies a request series cheaply on the hot path.
public struct SeriesKey: Hashable {
    public var inbound: Bool
    public var code: Int
    public var flags: UInt32
    public var service: String
    /// The mTLS peer's principal (inbound), "" otherwise.
    public var principal: String
    public var mtls: Bool
    public init(inbound: Bool, code: Int, flags: UInt32, service: String, principal: String = "", mtls: Bool = false) {
        self.inbound = inbound; self.code = code; self.flags = flags; self.service = service; self.principal = principal; self.mtls = mtls
    }
}

/// Per-plugin counters, held by the plugin instance and bumped directly.
public final class PluginCell {
    public var stats = PluginStats()
    public init() {}
}

/// Metrics of one event loop. Only that loop writes it (no locks, no atomics); a
/// scrape asks each loop for a snapshot and merges them.
public final class MetricsShard {
    var series: [SeriesKey: RequestSeries] = [:]
    var pluginCells: [String: [PluginCell]] = [:]
    var activeConnections: [String: Int64] = [:]
    var connectionsTotal: [String: UInt64] = [:]
    var counters: [String: UInt64] = [:]
    public init() {}

    /// The series for a key, created with its full labels on first use.
    @inline(__always)
    public func series(_ key: SeriesKey, labels: () -> RequestLabels) -> RequestSeries {
        if let s = series[key] { return s }
        let s = RequestSeries(labels: labels())
        series[key] = s
        return s
    }

    /// Records a finished stream (Istio's standard metrics), by full labels.
    public func recordRequest(_ l: RequestLabels, durationMs: Double, requestBytes: Int64, responseBytes: Int64) {
        let key = SeriesKey(inbound: l.reporter == "destination", code: l.responseCode, flags: 0, service: l.destinationService + "|" + l.responseFlags)
        series(key) { l }.record(durationMs: durationMs, requestBytes: requestBytes, responseBytes: responseBytes)
    }
    public func connectionOpened(_ listener: String) {
        activeConnections[listener, default: 0] += 1
        connectionsTotal[listener, default: 0] += 1
    }
    public func connectionClosed(_ listener: String) { activeConnections[listener, default: 0] -= 1 }

    /// The counter cell of a plugin on this loop (instances of one plugin across
    /// reloads share it, so its counts are cumulative).
    public func pluginCell(_ name: String) -> PluginCell {
        if let c = pluginCells[name]?.first { return c }
        let c = PluginCell()
        pluginCells[name] = [c]
        return c
    }
    public func plugin(_ name: String, nanos: UInt64, error: Bool, aborted: Bool) {
        let c = pluginCells[name]?.first ?? pluginCell(name)
        c.stats.calls += 1; c.stats.nanos += nanos
        if error { c.stats.errors += 1 }
        if aborted { c.stats.aborted += 1 }
    }
    public func count(_ name: String, _ by: UInt64 = 1) { counters[name, default: 0] += by }

    public func snapshot() -> MetricsSnapshot {
        var d = MetricsSnapshot()
        for s in series.values {
            d.requests[s.labels, default: 0] += s.count
            d.durations[s.labels, default: Histogram(bucketCount: Histogram.istioDurationBucketsMs.count)].merge(s.duration)
            d.requestBytes[s.labels, default: Histogram(bucketCount: Histogram.istioSizeBuckets.count)].merge(s.requestBytes)
            d.responseBytes[s.labels, default: Histogram(bucketCount: Histogram.istioSizeBuckets.count)].merge(s.responseBytes)
        }
        for (name, cells) in pluginCells {
            var st = PluginStats()
            for c in cells { st.merge(c.stats) }
            d.plugins[name] = st
        }
        d.activeConnections = activeConnections
        d.connectionsTotal = connectionsTotal
        d.counters = counters
        return d
    }
}

/// Prometheus text exposition (format 0.0.4) of a merged snapshot.
public enum PrometheusExposition {
    public static func render(_ s: MetricsSnapshot, extra: [(String, String, Double)] = []) -> String {
        var o = ""
        o += "# TYPE istio_requests_total counter\n"
        for (k, v) in s.requests.sorted(by: { $0.key.prometheus < $1.key.prometheus }) { o += "istio_requests_total{\(k.prometheus)} \(v)\n" }
        histogram(&o, "istio_request_duration_milliseconds", s.durations, Histogram.istioDurationBucketsMs)
        histogram(&o, "istio_request_bytes", s.requestBytes, Histogram.istioSizeBuckets)
        histogram(&o, "istio_response_bytes", s.responseBytes, Histogram.istioSizeBuckets)
        family(&o, "moonlet_downstream_connections_active", "gauge", "listener", s.activeConnections) { "\($0)" }
        family(&o, "moonlet_downstream_connections_total", "counter", "listener", s.connectionsTotal) { "\($0)" }
        family(&o, "moonlet_lua_executions_total", "counter", "plugin", s.plugins) { "\($0.calls)" }
        family(&o, "moonlet_lua_errors_total", "counter", "plugin", s.plugins) { "\($0.errors)" }
        family(&o, "moonlet_lua_aborted_total", "counter", "plugin", s.plugins) { "\($0.aborted)" }
        family(&o, "moonlet_lua_seconds_total", "counter", "plugin", s.plugins) { "\(Double($0.nanos) / 1e9)" }
        for (k, v) in s.counters.sorted(by: { $0.key < $1.key }) { o += "# TYPE \(k) counter\n\(k) \(v)\n" }
        for (name, help, v) in extra { o += "# HELP \(name) \(help)\n# TYPE \(name) gauge\n\(name) \(v)\n" }
        return o
    }

    /// One metric family with a single label, sorted by label value.
    static func family<V>(_ o: inout String, _ name: String, _ type: String, _ label: String, _ values: [String: V], _ value: (V) -> String) {
        o += "# TYPE \(name) \(type)\n"
        for (k, v) in values.sorted(by: { $0.key < $1.key }) { o += "\(name){\(label)=\"\(esc(k))\"} \(value(v))\n" }
    }

    static func histogram(_ o: inout String, _ name: String, _ m: [RequestLabels: Histogram], _ bounds: [Double]) {
        o += "# TYPE \(name) histogram\n"
        for (k, h) in m.sorted(by: { $0.key.prometheus < $1.key.prometheus }) {
            var cum: UInt64 = 0
            for (i, b) in bounds.enumerated() {
                cum += h.counts[i]
                o += "\(name)_bucket{\(k.prometheus),le=\"\(fmt(b))\"} \(cum)\n"
            }
            o += "\(name)_bucket{\(k.prometheus),le=\"+Inf\"} \(h.count)\n"
            o += "\(name)_sum{\(k.prometheus)} \(h.sum)\n\(name)_count{\(k.prometheus)} \(h.count)\n"
        }
    }
    static func fmt(_ d: Double) -> String { d == d.rounded() ? String(Int(d)) : String(d) }
}
