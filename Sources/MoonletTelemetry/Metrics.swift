import MoonletCore

import Atomics

/// A label set of a metric, rendered once in Prometheus text form (`a="x",b="y"`, names
/// sorted): series are found and merged by this text, so a label set costs its
/// rendering once, when its series is made, never per update.
public struct RequestLabels: Hashable, Sendable {
    public let text: String
    /// `pairs`: label names (valid Prometheus label names; the caller checked them) and
    /// raw values (escaped here).
    public init(_ pairs: [(String, String)]) {
        text = pairs.sorted { $0.0 < $1.0 }.map { "\($0.0)=\"\(esc($0.1))\"" }.joined(separator: ",")
    }
    public init(text: String) { self.text = text }
    var prometheus: String { text }
}

/// Istio's standard label names of the HTTP metrics, in Istio's order.
public enum IstioLabels {
    public static let http: [String] = [
        "reporter", "source_workload", "source_canonical_service", "source_canonical_revision", "source_workload_namespace",
        "source_principal", "source_app", "source_version", "source_cluster", "destination_workload",
        "destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
        "destination_service", "destination_canonical_service", "destination_canonical_revision", "destination_service_name",
        "destination_service_namespace", "destination_cluster", "request_protocol", "response_code", "grpc_response_status",
        "response_flags", "connection_security_policy",
    ]
    /// The TCP metrics carry the same labels less the HTTP ones.
    public static let tcp: [String] = http.filter { !["request_protocol", "response_code", "grpc_response_status"].contains($0) }

    /// The label set of Istio's TCP metrics for one connection, as the istio-stats filter
    /// fills the HTTP ones: `own` is this workload, `peer` the other side's (from peer
    /// metadata; nil: every label of that side "unknown"); principals are full
    /// `spiffe://` ids or "" (then "unknown"). Build it once per connection and get the
    /// series with `MetricsShard.tcpSeries`.
    public static func tcpLabels(inbound: Bool, own: MeshWorkload, peer: MeshWorkload?, ownPrincipal: String, peerPrincipal: String,
                                 destinationService: String, mtls: Bool, responseFlags: String = "-") -> RequestLabels {
        let (src, dst) = inbound ? (peer, own) : (own, peer)
        let (srcP, dstP) = inbound ? (peerPrincipal, ownPrincipal) : (ownPrincipal, peerPrincipal)
        func v(_ w: MeshWorkload?, _ f: (MeshWorkload) -> String) -> String {
            guard let w else { return "unknown" }
            let x = f(w)
            return x.isEmpty ? "unknown" : x
        }
        var name = destinationService, ns = v(dst) { $0.namespace }
        let parts = destinationService.split(separator: ".", maxSplits: 3, omittingEmptySubsequences: false)
        if parts.count >= 3 && parts[2] == "svc" { name = String(parts[0]); ns = String(parts[1]) }
        return RequestLabels([
            ("reporter", inbound ? "destination" : "source"),
            ("source_workload", v(src) { $0.workload }), ("source_workload_namespace", v(src) { $0.namespace }),
            ("source_principal", mtls && !srcP.isEmpty ? srcP : "unknown"), ("source_app", v(src) { $0.app }),
            ("source_version", v(src) { $0.version }), ("source_canonical_service", v(src) { $0.canonicalService }),
            ("source_canonical_revision", v(src) { $0.canonicalRevision }), ("source_cluster", v(src) { $0.cluster }),
            ("destination_workload", v(dst) { $0.workload }), ("destination_workload_namespace", v(dst) { $0.namespace }),
            ("destination_principal", mtls && !dstP.isEmpty ? dstP : "unknown"), ("destination_app", v(dst) { $0.app }),
            ("destination_version", v(dst) { $0.version }), ("destination_canonical_service", v(dst) { $0.canonicalService }),
            ("destination_canonical_revision", v(dst) { $0.canonicalRevision }), ("destination_cluster", v(dst) { $0.cluster }),
            ("destination_service", destinationService.isEmpty ? "unknown" : destinationService),
            ("destination_service_name", name.isEmpty ? "unknown" : name), ("destination_service_namespace", ns),
            ("response_flags", responseFlags), ("connection_security_policy", inbound ? (mtls ? "mutual_tls" : "none") : "unknown"),
        ])
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
    public var tcp: [RequestLabels: TCPCounts] = [:]
    /// `moonlet.metrics` counters and histograms by UserMetricRegistry index.
    public var userValues: [Int: Double] = [:]
    public var userHistograms: [Int: Histogram] = [:]
    public init() {}

    public mutating func merge(_ o: MetricsSnapshot) {
        for (k, v) in o.tcp { tcp[k, default: TCPCounts()].merge(v) }
        for (k, v) in o.userValues { userValues[k, default: 0] += v }
        for (k, v) in o.userHistograms { if userHistograms[k] == nil { userHistograms[k] = v } else { userHistograms[k]!.merge(v) } }
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
    /// The label set of each of the four metrics (istio_requests_total,
    /// istio_request_duration_milliseconds, istio_request_bytes, istio_response_bytes);
    /// nil: that metric is disabled (Telemetry `metrics` overrides). All `labels` unless
    /// overridden.
    public let perMetric: [RequestLabels?]
    var count: UInt64 = 0
    var duration = Histogram(bucketCount: Histogram.istioDurationBucketsMs.count)
    var requestBytes = Histogram(bucketCount: Histogram.istioSizeBuckets.count)
    var responseBytes = Histogram(bucketCount: Histogram.istioSizeBuckets.count)
    init(labels: RequestLabels, perMetric: [RequestLabels?]? = nil) {
        self.labels = labels
        self.perMetric = perMetric ?? [labels, labels, labels, labels]
    }

    /// The shard's key of a series with per-metric label sets ("" for a disabled one).
    static func key(_ per: [RequestLabels?]) -> String { per.map { $0?.text ?? "\u{1}" }.joined(separator: "\u{0}") }

    @inline(__always)
    public func record(durationMs: Double, requestBytes rq: Int64, responseBytes rs: Int64) {
        count &+= 1
        duration.observe(durationMs, bounds: Histogram.istioDurationBucketsMs)
        requestBytes.observe(Double(rq), bounds: Histogram.istioSizeBuckets)
        responseBytes.observe(Double(rs), bounds: Histogram.istioSizeBuckets)
    }
}

/// Istio's TCP metrics of one label set: istio_tcp_sent_bytes_total,
/// istio_tcp_received_bytes_total, istio_tcp_connections_opened_total,
/// istio_tcp_connections_closed_total.
public struct TCPCounts: Sendable {
    public var sent: UInt64 = 0
    public var received: UInt64 = 0
    public var opened: UInt64 = 0
    public var closed: UInt64 = 0
    public init() {}
    mutating func merge(_ o: TCPCounts) { sent += o.sent; received += o.received; opened += o.opened; closed += o.closed }
}

/// The TCP metrics of one label set on one loop, updated in place by the TCP proxy
/// (get it once per connection from `MetricsShard.tcpSeries`).
public final class TCPSeries {
    public let labels: RequestLabels
    public internal(set) var counts = TCPCounts()
    init(labels: RequestLabels) { self.labels = labels }
    @inline(__always) public func opened() { counts.opened &+= 1 }
    @inline(__always) public func closed() { counts.closed &+= 1 }
    @inline(__always) public func sent(_ n: Int) { counts.sent &+= UInt64(max(0, n)) }
    @inline(__always) public func received(_ n: Int) { counts.received &+= UInt64(max(0, n)) }
}

/// Per-plugin counters, held by the plugin instance and bumped directly.
public final class PluginCell {
    public var stats = PluginStats()
    public init() {}
}

/// Metrics of one event loop. Only that loop writes it (no locks, no atomics); a
/// scrape asks each loop for a snapshot and merges them.
public final class MetricsShard {
    var series: [String: RequestSeries] = [:]
    var tcpSeriesByLabels: [String: TCPSeries] = [:]
    var pluginCells: [String: [PluginCell]] = [:]
    var activeConnections: [String: Int64] = [:]
    var connectionsTotal: [String: UInt64] = [:]
    var counters: [String: UInt64] = [:]
    /// `moonlet.metrics` counter values and histograms of this loop, by registry index.
    var userValues: [Double] = []
    var userHistograms: [Int: Histogram] = [:]
    /// Label sets of the Istio families (HTTP and TCP together) one loop keeps at most;
    /// past it a new one is refused and counted in `moonlet_metric_series_refused_total`.
    public var maxSeries = 20_000
    public init() {}

    /// The request series of a label set, made on first use; nil (and counted) past `maxSeries`.
    public func requestSeries(_ labels: RequestLabels) -> RequestSeries? {
        if let s = series[labels.text] { return s }
        guard series.count + tcpSeriesByLabels.count < maxSeries else { count("moonlet_metric_series_refused_total"); return nil }
        let s = RequestSeries(labels: labels)
        series[labels.text] = s
        return s
    }

    /// The request series whose four metrics have their own label sets (nil: that metric
    /// is not recorded), made on first use; nil (and counted) past `maxSeries`.
    public func requestSeries(perMetric per: [RequestLabels?]) -> RequestSeries? {
        precondition(per.count == 4)
        if let f = per[0], per[1] == f, per[2] == f, per[3] == f { return requestSeries(f) }
        let key = RequestSeries.key(per)
        if let s = series[key] { return s }
        guard series.count + tcpSeriesByLabels.count < maxSeries else { count("moonlet_metric_series_refused_total"); return nil }
        let s = RequestSeries(labels: per.first(where: { $0 != nil }).flatMap { $0 } ?? RequestLabels(text: ""), perMetric: per)
        series[key] = s
        return s
    }

    /// The TCP series of a label set (IstioLabels.tcp), made on first use; nil past `maxSeries`.
    public func tcpSeries(_ labels: RequestLabels) -> TCPSeries? {
        if let s = tcpSeriesByLabels[labels.text] { return s }
        guard series.count + tcpSeriesByLabels.count < maxSeries else { count("moonlet_metric_series_refused_total"); return nil }
        let s = TCPSeries(labels: labels)
        tcpSeriesByLabels[labels.text] = s
        return s
    }

    /// Records a finished stream (Istio's standard metrics), by full labels.
    public func recordRequest(_ l: RequestLabels, durationMs: Double, requestBytes: Int64, responseBytes: Int64) {
        requestSeries(l)?.record(durationMs: durationMs, requestBytes: requestBytes, responseBytes: responseBytes)
    }

    /// Adds to a `moonlet.metrics` counter of this loop.
    @inline(__always)
    public func userAdd(_ index: Int, _ v: Double) {
        if index >= userValues.count { userValues.append(contentsOf: repeatElement(0, count: index + 1 - userValues.count)) }
        userValues[index] += v
    }

    /// Observes a value into a `moonlet.metrics` histogram of this loop.
    @inline(__always)
    public func userObserve(_ index: Int, _ v: Double, bounds: [Double]) {
        if userHistograms[index] == nil { userHistograms[index] = Histogram(bucketCount: bounds.count) }
        userHistograms[index]!.observe(v, bounds: bounds)
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
            let p = s.perMetric
            if let l = p[0] { d.requests[l, default: 0] += s.count }
            if let l = p[1] { d.durations[l, default: Histogram(bucketCount: Histogram.istioDurationBucketsMs.count)].merge(s.duration) }
            if let l = p[2] { d.requestBytes[l, default: Histogram(bucketCount: Histogram.istioSizeBuckets.count)].merge(s.requestBytes) }
            if let l = p[3] { d.responseBytes[l, default: Histogram(bucketCount: Histogram.istioSizeBuckets.count)].merge(s.responseBytes) }
        }
        for (name, cells) in pluginCells {
            var st = PluginStats()
            for c in cells { st.merge(c.stats) }
            d.plugins[name] = st
        }
        for s in tcpSeriesByLabels.values { d.tcp[s.labels, default: TCPCounts()].merge(s.counts) }
        for (i, v) in userValues.enumerated() where v != 0 { d.userValues[i] = v }
        d.userHistograms = userHistograms
        d.activeConnections = activeConnections
        d.connectionsTotal = connectionsTotal
        d.counters = counters
        return d
    }
}

/// Prometheus text exposition (format 0.0.4) of a merged snapshot.
public enum PrometheusExposition {
    public static func render(_ s: MetricsSnapshot, extra: [(String, String, Double)] = [], user: UserMetricRegistry? = nil) -> String {
        var o = ""
        o += "# TYPE istio_requests_total counter\n"
        for (k, v) in s.requests.sorted(by: { $0.key.prometheus < $1.key.prometheus }) { o += "istio_requests_total{\(k.prometheus)} \(v)\n" }
        histogram(&o, "istio_request_duration_milliseconds", s.durations, Histogram.istioDurationBucketsMs)
        histogram(&o, "istio_request_bytes", s.requestBytes, Histogram.istioSizeBuckets)
        histogram(&o, "istio_response_bytes", s.responseBytes, Histogram.istioSizeBuckets)
        tcpFamily(&o, "istio_tcp_sent_bytes_total", s.tcp) { $0.sent }
        tcpFamily(&o, "istio_tcp_received_bytes_total", s.tcp) { $0.received }
        tcpFamily(&o, "istio_tcp_connections_opened_total", s.tcp) { $0.opened }
        tcpFamily(&o, "istio_tcp_connections_closed_total", s.tcp) { $0.closed }
        family(&o, "moonlet_downstream_connections_active", "gauge", "listener", s.activeConnections) { "\($0)" }
        family(&o, "moonlet_downstream_connections_total", "counter", "listener", s.connectionsTotal) { "\($0)" }
        family(&o, "moonlet_lua_executions_total", "counter", "plugin", s.plugins) { "\($0.calls)" }
        family(&o, "moonlet_lua_errors_total", "counter", "plugin", s.plugins) { "\($0.errors)" }
        family(&o, "moonlet_lua_aborted_total", "counter", "plugin", s.plugins) { "\($0.aborted)" }
        family(&o, "moonlet_lua_seconds_total", "counter", "plugin", s.plugins) { "\(Double($0.nanos) / 1e9)" }
        for (k, v) in s.counters.sorted(by: { $0.key < $1.key }) { o += "# TYPE \(k) counter\n\(k) \(v)\n" }
        if let user { user.render(s, into: &o) }
        for (name, help, v) in extra { o += "# HELP \(name) \(help)\n# TYPE \(name) gauge\n\(name) \(v)\n" }
        return o
    }

    /// One metric family with a single label, sorted by label value.
    static func family<V>(_ o: inout String, _ name: String, _ type: String, _ label: String, _ values: [String: V], _ value: (V) -> String) {
        o += "# TYPE \(name) \(type)\n"
        for (k, v) in values.sorted(by: { $0.key < $1.key }) { o += "\(name){\(label)=\"\(esc(k))\"} \(value(v))\n" }
    }

    static func tcpFamily(_ o: inout String, _ name: String, _ m: [RequestLabels: TCPCounts], _ value: (TCPCounts) -> UInt64) {
        o += "# TYPE \(name) counter\n"
        for (k, v) in m.sorted(by: { $0.key.text < $1.key.text }) { o += "\(name){\(k.text)} \(value(v))\n" }
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
    static func fmt(_ d: Double) -> String { d == d.rounded() && abs(d) < 1e15 ? String(Int(d)) : String(d) }

    /// One histogram's lines (`labels` may be empty).
    static func histogramLines(_ o: inout String, _ name: String, _ labels: String, _ h: Histogram, _ bounds: [Double]) {
        let sep = labels.isEmpty ? "" : ","
        var cum: UInt64 = 0
        for (i, b) in bounds.enumerated() {
            cum += h.counts[i]
            o += "\(name)_bucket{\(labels)\(sep)le=\"\(fmt(b))\"} \(cum)\n"
        }
        o += "\(name)_bucket{\(labels)\(sep)le=\"+Inf\"} \(h.count)\n"
        let braces = labels.isEmpty ? "" : "{\(labels)}"
        o += "\(name)_sum\(braces) \(fmt(h.sum))\n\(name)_count\(braces) \(h.count)\n"
    }
}
