import NIOConcurrencyHelpers
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet.shared(name)`: a dictionary shared by every event loop's VM (like
/// OpenResty's lua_shared_dict). Guarded by one lock per dict; it is meant for
/// counters and flags a filter chooses to share, not for the proxy's own hot path.
/// Its memory is outside the VMs' caps, so each dict has a byte cap of its own (keys,
/// values and a per-entry overhead): a write that would pass it fails with
/// "no memory", as OpenResty's do, after expired entries are dropped.
public final class SharedDict: @unchecked Sendable {
    public enum Value: Equatable, Sendable { case int(Int64), double(Double), string(String), bool(Bool) }
    public enum SetResult: Equatable { case ok, full }
    public enum IncrResult: Equatable { case ok(Int64), missing, notInteger, full }
    struct Entry { var value: Value; var expires: Double }

    let lock = NIOLock()
    var map: [String: Entry] = [:]
    /// Bytes the entries take, as `size(_:_:)` counts them.
    public private(set) var bytes = 0
    /// Most keys one dict holds.
    public let capacity: Int
    /// Most bytes one dict holds (keys, values, `entryOverhead` per entry).
    public let maxBytes: Int
    /// What one entry costs beyond its key and value (hash slot, expiry, boxing).
    public static let entryOverhead = 64

    init(capacity: Int, maxBytes: Int) { self.capacity = capacity; self.maxBytes = maxBytes }

    static let registryLock = NIOLock()
    nonisolated(unsafe) static var registry: [String: SharedDict] = [:]

    /// The dict called `name`, made with `maxBytes` the first time it is asked for;
    /// nil when `maxDicts` dicts exist already (each one is memory outside the VMs).
    public static func named(_ name: String, maxBytes: Int = LuaLimits().sharedDictMaxBytes, maxDicts: Int = LuaLimits().maxSharedDicts) -> SharedDict? {
        registryLock.withLock {
            if let d = registry[name] { return d }
            guard registry.count < maxDicts else { return nil }
            let d = SharedDict(capacity: 100_000, maxBytes: maxBytes)
            registry[name] = d
            return d
        }
    }

    static func now() -> Double {
        var ts = timespec(); clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    static func size(_ k: String, _ v: Value) -> Int {
        if case .string(let s) = v { return entryOverhead + k.utf8.count + s.utf8.count }
        return entryOverhead + k.utf8.count + 8
    }

    func live(_ k: String, _ t: Double) -> Entry? {
        guard let e = map[k] else { return nil }
        if e.expires > 0 && e.expires <= t { remove(k); return nil }
        return e
    }

    func remove(_ k: String) {
        if let old = map.removeValue(forKey: k) { bytes -= Self.size(k, old.value) }
    }

    /// Stores `v` under `k` if the dict has room for it (lock held).
    func store(_ k: String, _ v: Value, expires: Double, now t: Double) -> SetResult {
        let old = map[k]
        let delta = Self.size(k, v) - (old.map { Self.size(k, $0.value) } ?? 0)
        if (old == nil && map.count >= capacity) || bytes + delta > maxBytes {
            purgeExpired(t)
            let delta = Self.size(k, v) - (map[k].map { Self.size(k, $0.value) } ?? 0)
            if (map[k] == nil && map.count >= capacity) || bytes + delta > maxBytes { return .full }
        }
        remove(k)
        map[k] = Entry(value: v, expires: expires)
        bytes += Self.size(k, v)
        return .ok
    }

    func purgeExpired(_ t: Double) {
        for (k, e) in map where e.expires > 0 && e.expires <= t { remove(k) }
    }

    static func expiry(_ ttl: Double?, _ t: Double) -> Double { (ttl ?? 0) > 0 ? t + ttl! : 0 }

    public func get(_ k: String) -> Value? { lock.withLock { live(k, Self.now())?.value } }

    public func set(_ k: String, _ v: Value, ttl: Double?) -> SetResult {
        let t = Self.now()
        return lock.withLock { store(k, v, expires: Self.expiry(ttl, t), now: t) }
    }

    public func incr(_ k: String, by: Int64, initial: Int64?, ttl: Double?) -> IncrResult {
        let t = Self.now()
        return lock.withLock {
            if let e = live(k, t) {
                guard case .int(let i) = e.value else { return .notInteger }
                map[k]!.value = .int(i &+ by)
                return .ok(i &+ by)
            }
            guard let initial else { return .missing }
            if store(k, .int(initial &+ by), expires: Self.expiry(ttl, t), now: t) == .full { return .full }
            return .ok(initial &+ by)
        }
    }

    /// Sets `new` only if the current value equals `expected` (nil = absent); nil when
    /// it did not, `.full` when there was no room for `new`.
    public func cas(_ k: String, expected: Value?, new: Value?, ttl: Double?) -> SetResult? {
        let t = Self.now()
        return lock.withLock {
            guard live(k, t)?.value == expected else { return nil }
            guard let new else { remove(k); return .ok }
            return store(k, new, expires: Self.expiry(ttl, t), now: t)
        }
    }

    public func delete(_ k: String) { lock.withLock { remove(k) } }
}
