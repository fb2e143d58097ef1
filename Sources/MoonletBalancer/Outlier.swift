import MoonletCore
import Atomics
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

/// Outlier detection state of one cluster, shared by every event loop: per endpoint,
/// counters of consecutive errors and the time until which it is ejected. The hot
/// path does relaxed atomic loads (and a store only when a counter must reset); the
/// lock is taken only to eject, so loops never wait on each other per request.
public final class OutlierState: @unchecked Sendable {
    public let policy: OutlierPolicy
    let consecutive5xx: [ManagedAtomic<Int>]
    let consecutiveGateway: [ManagedAtomic<Int>]
    let consecutiveLocal: [ManagedAtomic<Int>]
    /// Monotonic nanoseconds until which an endpoint is ejected (0 = not ejected).
    let ejectedUntil: [ManagedAtomic<UInt64>]
    /// Ejections so far per endpoint (metrics).
    let ejections: [ManagedAtomic<Int>]
    /// The latest `ejectedUntil` of any endpoint: before it no endpoint can be ejected,
    /// so the common case (nothing ejected) costs one load per pick.
    let latestUntil = ManagedAtomic<UInt64>(0)
    /// Envoy's ejection multiplier: +1 per ejection, -1 per sweep interval the endpoint
    /// spends healthy afterwards. Only read and written under `ejectLock`.
    var multiplier: [Int]
    /// When the last ejection ended (monotonic ns, 0 = never ejected). Under `ejectLock`.
    var lastReturn: [UInt64]
    let ejectLock = NIOLock()
    /// Start of the sweep schedule: ejected endpoints return on a sweep tick, every
    /// `interval` from here, as Envoy's detector runs its analysis each interval.
    let epoch: UInt64
    let intervalNs: UInt64
    /// Envoy's max_ejection_time default: 300 s, or the base ejection time if longer.
    let maxEjectionNs: UInt64

    init(policy: OutlierPolicy, count: Int, epoch: UInt64 = monotonicNanos()) {
        self.policy = policy
        consecutive5xx = (0..<count).map { _ in ManagedAtomic(0) }
        consecutiveGateway = (0..<count).map { _ in ManagedAtomic(0) }
        consecutiveLocal = (0..<count).map { _ in ManagedAtomic(0) }
        ejectedUntil = (0..<count).map { _ in ManagedAtomic(UInt64(0)) }
        ejections = (0..<count).map { _ in ManagedAtomic(0) }
        multiplier = [Int](repeating: 0, count: count)
        lastReturn = [UInt64](repeating: 0, count: count)
        self.epoch = epoch
        intervalNs = UInt64(max(1, policy.intervalMs)) * 1_000_000
        maxEjectionNs = UInt64(max(300_000, policy.baseEjectionTimeMs)) * 1_000_000
    }

    public var count: Int { ejectedUntil.count }
    /// Ejections so far, all endpoints.
    public var totalEjections: Int { ejections.reduce(0) { $0 + $1.load(ordering: .relaxed) } }

    @inline(__always)
    public func isEjected(_ i: Int, now: UInt64) -> Bool {
        let u = ejectedUntil[i].load(ordering: .relaxed)
        return u != 0 && u > now
    }

    /// Whether any endpoint may be ejected at `now` (false: none is).
    @inline(__always)
    public func anyEjected(now: UInt64) -> Bool { latestUntil.load(ordering: .relaxed) > now }

    public func ejectedCount(now: UInt64) -> Int {
        guard anyEjected(now: now) else { return 0 }
        var n = 0
        for i in 0..<count where isEjected(i, now: now) { n += 1 }
        return n
    }

    /// Until when endpoint `i` is ejected (monotonic ns), or nil.
    public func ejectedUntilNanos(_ i: Int, now: UInt64) -> UInt64? { isEjected(i, now: now) ? ejectedUntil[i].load(ordering: .relaxed) : nil }

    /// The outcome of one request to endpoint `i`: an HTTP status, or a local-origin
    /// failure (connect failure, reset) when `status` is nil.
    /// `now` is read only when the outcome ejects the endpoint.
    public func record(_ i: Int, status: Int?, now: @autoclosure () -> UInt64) {
        guard i < count else { return }
        let gateway = status == nil || status == 502 || status == 503 || status == 504
        let is5xx = status == nil || (status! >= 500)
        var trip = false
        func bump(_ c: ManagedAtomic<Int>, _ limit: Int, _ hit: Bool) {
            if hit {
                if c.wrappingIncrementThenLoad(ordering: .relaxed) >= limit && limit > 0 { trip = true }
            } else if c.load(ordering: .relaxed) != 0 {
                c.store(0, ordering: .relaxed)
            }
        }
        bump(consecutive5xx[i], policy.consecutive5xxErrors, is5xx)
        bump(consecutiveGateway[i], policy.consecutiveGatewayErrors, gateway)
        bump(consecutiveLocal[i], policy.consecutiveLocalOriginFailures, status == nil)
        if trip { eject(i, now: now()) }
    }

    func eject(_ i: Int, now: UInt64) {
        ejectLock.withLock {
            guard !isEjected(i, now: now) else { return }
            // maxEjectionPercent as Envoy applies it: eject while the share already
            // ejected is below it (3 hosts at 50%: 0% and 33% are, so two can go; at 10%
            // one can; at 0% none).
            guard Self.mayEject(ejected: ejectedCount(now: now), of: count, maxPercent: policy.maxEjectionPercent) else { return }
            ejections[i].wrappingIncrement(ordering: .relaxed)
            // The multiplier decays by one per interval spent healthy since the last return.
            if lastReturn[i] != 0 && now > lastReturn[i] {
                multiplier[i] = max(0, multiplier[i] - Int((now - lastReturn[i]) / intervalNs))
            }
            multiplier[i] += 1
            let duration = min(UInt64(policy.baseEjectionTimeMs) * 1_000_000 * UInt64(multiplier[i]), maxEjectionNs)
            // Back in service on the first sweep tick after the ejection time.
            let due = now + duration
            let ticks = (due - min(due, epoch) + intervalNs - 1) / intervalNs
            let until = max(due, epoch + ticks * intervalNs)
            lastReturn[i] = until
            ejectedUntil[i].store(until, ordering: .relaxed)
            if until > latestUntil.load(ordering: .relaxed) { latestUntil.store(until, ordering: .relaxed) }
            consecutive5xx[i].store(0, ordering: .relaxed)
            consecutiveGateway[i].store(0, ordering: .relaxed)
            consecutiveLocal[i].store(0, ordering: .relaxed)
        }
    }

    /// Envoy's test (`100 * ejected / hosts < max_ejection_percent`), in integers.
    static func mayEject(ejected: Int, of hosts: Int, maxPercent: Int) -> Bool {
        ejected * 100 < maxPercent * hosts
    }

    /// True when so few hosts are healthy that ejection is ignored (panic mode): the
    /// healthy share is below minHealthPercent. Istio sets Envoy's panic threshold to
    /// minHealthPercent, 0 unless set, so by default there is no panic mode: with every
    /// host ejected nothing is picked (503 UH, "no healthy upstream").
    public func panic(now: UInt64) -> Bool {
        guard policy.minHealthPercent > 0 else { return false }
        return (count - ejectedCount(now: now)) * 100 < count * policy.minHealthPercent
    }
}

/// Outlier state by stable cluster name (and endpoint set), kept across reloads.
public enum OutlierRegistry {
    static let lock = NIOLock()
    nonisolated(unsafe) static var states: [String: OutlierState] = [:]

    public static func all() -> [(String, OutlierState)] { lock.withLock { states.sorted { $0.key < $1.key } } }

    public static func state(for c: UpstreamCluster) -> OutlierState? {
        guard let p = c.outlierPolicy, p.enabled else { return nil }
        let key = c.stableName + "#" + (0..<c.endpointCount).map { let e = c.endpoint($0); return "\(e.address):\(e.port)" }.joined(separator: ",")
        return lock.withLock {
            if let s = states[key], s.policy == p, s.count == c.endpointCount { return s }
            let s = OutlierState(policy: p, count: c.endpointCount)
            states[key] = s
            return s
        }
    }
}

@inline(__always)
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Circuit-breaker counters of one cluster, shared by every event loop: open
/// connections and streams waiting for one. Atomics, no lock.
public final class CircuitCounters: @unchecked Sendable {
    public let connections = ManagedAtomic(0)
    public let pending = ManagedAtomic(0)
    public let overflows = ManagedAtomic(0)
    /// Active requests (http2MaxRequests).
    public let requests = ManagedAtomic(0)
    public func tryRequest(max: Int) -> Bool {
        if Self.increment(requests, below: max) { return true }
        overflows.wrappingIncrement(ordering: .relaxed)
        return false
    }
    public func requestDone() { requests.wrappingDecrement(ordering: .relaxed) }
    /// Retries in flight, and retries refused by maxRetries.
    public let retries = ManagedAtomic(0)
    public let retryOverflows = ManagedAtomic(0)
    init() {}

    /// Increments `a` if it is below `max`; false when it is not.
    @inline(__always)
    static func increment(_ a: ManagedAtomic<Int>, below max: Int) -> Bool {
        var cur = a.load(ordering: .relaxed)
        while cur < max {
            let (done, now) = a.compareExchange(expected: cur, desired: cur + 1, ordering: .relaxed)
            if done { return true }
            cur = now
        }
        return false
    }

    /// Takes a retry slot if fewer than `max` retries are in flight.
    public func tryRetry(max: Int) -> Bool {
        if Self.increment(retries, below: max) { return true }
        retryOverflows.wrappingIncrement(ordering: .relaxed)
        return false
    }
    public func retryDone() { retries.wrappingDecrement(ordering: .relaxed) }

    /// Takes a connection slot if one is free under `max`.
    public func tryOpenConnection(max: Int) -> Bool { Self.increment(connections, below: max) }
    public func connectionClosed() { connections.wrappingDecrement(ordering: .relaxed) }

    public func tryWait(max: Int) -> Bool {
        if Self.increment(pending, below: max) { return true }
        overflows.wrappingIncrement(ordering: .relaxed)
        return false
    }
    public func doneWaiting() { pending.wrappingDecrement(ordering: .relaxed) }
}

/// Circuit counters by stable cluster name, kept across reloads.
public enum CircuitRegistry {
    static let lock = NIOLock()
    nonisolated(unsafe) static var counters: [String: CircuitCounters] = [:]

    public static func counters(for c: UpstreamCluster) -> CircuitCounters {
        lock.withLock {
            if let x = counters[c.stableName] { return x }
            let x = CircuitCounters()
            counters[c.stableName] = x
            return x
        }
    }

    public static func all() -> [(String, CircuitCounters)] { lock.withLock { counters.sorted { $0.key < $1.key } } }
}
