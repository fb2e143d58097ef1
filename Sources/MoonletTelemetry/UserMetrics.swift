import Atomics
import NIOConcurrencyHelpers

/// The metrics Lua filters define with `moonlet.metrics.counter/gauge/histogram`, process-wide:
/// each (name, label set) is a series with an index. Counters and histograms are
/// counted per event loop (MetricsShard.userAdd / userObserve, no locks) and summed on a
/// scrape; a gauge is one atomic cell shared by every loop, so `set` means what it says.
/// The lock is taken when a handle is made (load time, or a lazily made handle's first
/// use in a VM), never per update.
public final class UserMetricRegistry: @unchecked Sendable {
    public enum Kind: String, Sendable { case counter, gauge, histogram }

    /// A gauge's value: a Double in an atomic 64-bit cell.
    public final class Gauge: @unchecked Sendable {
        let bits = ManagedAtomic<UInt64>(0)
        public init() {}
        public var value: Double { Double(bitPattern: bits.load(ordering: .relaxed)) }
        public func set(_ v: Double) { bits.store(v.bitPattern, ordering: .relaxed) }
        public func add(_ v: Double) {
            var old = bits.load(ordering: .relaxed)
            while true {
                let (done, now) = bits.weakCompareExchange(expected: old, desired: (Double(bitPattern: old) + v).bitPattern, ordering: .relaxed)
                if done { return }
                old = now
            }
        }
    }

    /// What a handle needs: the series index, its kind, a gauge's cell, a histogram's bounds.
    public struct Series: Sendable {
        public let index: Int
        public let kind: Kind
        public let gauge: Gauge?
        public let buckets: [Double]
    }

    struct Family { var kind: Kind; var buckets: [Double] }

    /// Histogram bounds when none are given (Prometheus client defaults, in seconds).
    public static let defaultBuckets: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

    let lock = NIOLock()
    var families: [String: Family] = [:]
    var byKey: [String: Series] = [:]
    var entries: [(name: String, labels: String, series: Series)] = []
    /// Series the registry holds at most (`--lua-max-metric-series`).
    public let maxSeries: Int

    public init(maxSeries: Int) { self.maxSeries = maxSeries }

    public enum Failure: Error, Equatable {
        /// The name is defined with another kind or other buckets.
        case conflict(String)
        /// The cap is reached.
        case full
    }

    /// The series of `name` with `labels` (rendered, RequestLabels form), made on first use.
    public func series(name: String, kind: Kind, labels: String, buckets: [Double]) -> Result<Series, Failure> {
        lock.withLock {
            if let f = families[name] {
                if f.kind != kind { return .failure(.conflict("\(name) is already a \(f.kind.rawValue)")) }
                if kind == .histogram && f.buckets != buckets { return .failure(.conflict("\(name) is already a histogram with other buckets")) }
            }
            let key = name + "{" + labels
            if let s = byKey[key] { return .success(s) }
            guard entries.count < maxSeries else { return .failure(.full) }
            if families[name] == nil { families[name] = Family(kind: kind, buckets: buckets) }
            let s = Series(index: entries.count, kind: kind, gauge: kind == .gauge ? Gauge() : nil, buckets: buckets)
            byKey[key] = s
            entries.append((name, labels, s))
            return .success(s)
        }
    }

    /// The index of the series `name` with `labels` (rendered form) if it exists: for
    /// readers of a snapshot's `userValues` (the offline filter harness).
    public func existingIndex(name: String, labels: String = "") -> Int? {
        lock.withLock { byKey[name + "{" + labels]?.index }
    }

    /// Appends every family in Prometheus text form (counters and histograms from the
    /// merged snapshot, gauges from their cells).
    func render(_ snap: MetricsSnapshot, into o: inout String) {
        let (fams, list) = lock.withLock { (families, entries) }
        var byName: [String: [(labels: String, series: Series)]] = [:]
        for e in list { byName[e.name, default: []].append((e.labels, e.series)) }
        for name in byName.keys.sorted() {
            guard let f = fams[name] else { continue }
            o += "# TYPE \(name) \(f.kind.rawValue)\n"
            for (labels, s) in byName[name]!.sorted(by: { $0.labels < $1.labels }) {
                let braces = labels.isEmpty ? "" : "{\(labels)}"
                switch f.kind {
                case .counter: o += "\(name)\(braces) \(PrometheusExposition.fmt(snap.userValues[s.index] ?? 0))\n"
                case .gauge: o += "\(name)\(braces) \(PrometheusExposition.fmt(s.gauge?.value ?? 0))\n"
                case .histogram:
                    PrometheusExposition.histogramLines(&o, name, labels, snap.userHistograms[s.index] ?? Histogram(bucketCount: f.buckets.count), f.buckets)
                }
            }
        }
    }
}
