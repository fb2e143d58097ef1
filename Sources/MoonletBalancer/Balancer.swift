import MoonletCore

/// Per-event-loop load-balancing state: round-robin cursors and active-request counts
/// per cluster endpoint. Owned by one loop, so picking takes no lock; counts are per
/// loop, as Envoy's per-worker load balancers keep them.
public final class BalancerState {
    var cursors: [Int] = []
    var active: [[Int32]] = []
    /// Outlier state per cluster id (looked up by stable name once per cluster).
    var outliers: [OutlierState?] = []
    var outlierResolved: [Bool] = []
    var circuits: [CircuitCounters?] = []
    /// Per endpoint, this loop's finished requests and those that failed (5xx or
    /// local-origin failure), for /clusters' success rate.
    var served: [[Int]] = []
    var failed: [[Int]] = []
    var random: Xoshiro256

    public init(seed: UInt64 = 0) {
        random = seed == 0 ? Xoshiro256(seed: SystemRandomNumberGenerator()) : Xoshiro256(seed: SplitMix64(seed: seed))
    }

    @inline(__always)
    func ensure(_ c: UpstreamCluster) {
        if c.id >= cursors.count {
            let grow = c.id + 1 - cursors.count
            cursors += [Int](repeating: 0, count: grow)
            active += [[Int32]](repeating: [], count: grow)
            outliers += [OutlierState?](repeating: nil, count: grow)
            outlierResolved += [Bool](repeating: false, count: grow)
            circuits += [CircuitCounters?](repeating: nil, count: grow)
            served += [[Int]](repeating: [], count: grow)
            failed += [[Int]](repeating: [], count: grow)
        }
        if active[c.id].count != c.endpointCount {
            active[c.id] = [Int32](repeating: 0, count: c.endpointCount)
            served[c.id] = [Int](repeating: 0, count: c.endpointCount)
            failed[c.id] = [Int](repeating: 0, count: c.endpointCount)
            outlierResolved[c.id] = false
        }
        if !outlierResolved[c.id] {
            outliers[c.id] = OutlierRegistry.state(for: c)
            circuits[c.id] = CircuitRegistry.counters(for: c)
            outlierResolved[c.id] = true
        }
    }

    /// The cluster's circuit-breaker counters (shared by all loops).
    public func circuit(_ c: UpstreamCluster) -> CircuitCounters {
        ensure(c)
        return circuits[c.id]!
    }

    /// The outlier state of a cluster, if its DestinationRule enables detection.
    public func outlier(_ c: UpstreamCluster) -> OutlierState? {
        ensure(c)
        return outliers[c.id]
    }

    /// Reports the outcome of a request to endpoint `i` (status, or nil for a
    /// connect failure or reset) to outlier detection.
    public func report(_ c: UpstreamCluster, _ i: Int, status: Int?) {
        ensure(c)
        guard i < served[c.id].count else { return }
        served[c.id][i] += 1
        if status == nil || status! >= 500 { failed[c.id][i] += 1 }
        guard let o = outliers[c.id] else { return }
        o.record(i, status: status, now: monotonicNanos())
    }

    /// This loop's (requests, failures) to endpoint `i` of `c`.
    public func outcomes(_ c: UpstreamCluster, _ i: Int) -> (Int, Int) {
        guard c.id < served.count, i < served[c.id].count else { return (0, 0) }
        return (served[c.id][i], failed[c.id][i])
    }

    /// Picks an endpoint index of `c` (nil when it has none, or when every one is
    /// ejected and the cluster is not in panic mode) and counts it active.
    /// `hash` is the request's consistent-hash key, for consistentHash clusters.
    public func pick(_ c: UpstreamCluster, hash: UInt64? = nil) -> Int? {
        let n = c.endpointCount
        guard n > 0 else { return nil }
        ensure(c)
        if c.policy == .consistentHash {
            let key = hash ?? random.next()
            let o = outliers[c.id]
            let now = o == nil ? 0 : monotonicNanos()
            let panic = o?.panic(now: now) ?? true
            if let i = c.hashPick(key, skip: { panic ? false : o!.isEjected($0, now: now) }) {
                active[c.id][i] += 1
                return i
            }
        }
        if let o = outliers[c.id] {
            let now = monotonicNanos()
            if o.anyEjected(now: now) && !o.panic(now: now) {
                // Pick among the hosts not ejected (a few tries, then a scan).
                for _ in 0..<4 {
                    let i = pickIndex(c, n)
                    if !o.isEjected(i, now: now) { active[c.id][i] += 1; return i }
                }
                let healthy = (0..<n).filter { !o.isEjected($0, now: now) }
                // Every host ejected and no panic mode (minHealthPercent unset): none.
                guard !healthy.isEmpty else { return nil }
                let i = healthy[Int(random.next() % UInt64(healthy.count))]
                active[c.id][i] += 1
                return i
            }
        }
        let i = pickIndex(c, n)
        active[c.id][i] += 1
        return i
    }

    @inline(__always)
    func pickIndex(_ c: UpstreamCluster, _ n: Int) -> Int {
        let i: Int
        switch c.policy {
        case .roundRobin:
            i = cursors[c.id] % n
            cursors[c.id] = (i + 1) % n
        case .random, .passthrough, .consistentHash:
            i = Int(random.next() % UInt64(n))
        case .leastRequest:
            if n == 1 { i = 0 } else {
                let a = Int(random.next() % UInt64(n))
                var b = Int(random.next() % UInt64(n - 1))
                if b >= a { b += 1 }
                i = active[c.id][b] < active[c.id][a] ? b : a
            }
        }
        return i
    }

    /// Counts endpoint `i` of `c` active for a stream that chose it without `pick` (a
    /// filter's endpoint override); `done` ends it as it ends a pick.
    public func use(_ c: UpstreamCluster, _ i: Int) {
        guard i >= 0, i < c.endpointCount else { return }
        ensure(c)
        active[c.id][i] += 1
    }

    /// The stream sent to endpoint `i` of `c` finished.
    public func done(_ c: UpstreamCluster, _ i: Int) {
        guard c.id < active.count, i < active[c.id].count, active[c.id][i] > 0 else { return }
        active[c.id][i] -= 1
    }

    /// Active requests this loop has on an endpoint (for /clusters and tests).
    public func activeRequests(_ c: UpstreamCluster, _ i: Int) -> Int {
        c.id < active.count && i < active[c.id].count ? Int(active[c.id][i]) : 0
    }

    /// Forgets all counters (a new snapshot renumbers clusters).
    public func reset() { cursors = []; active = []; outliers = []; outlierResolved = []; circuits = []; served = []; failed = [] }
}

