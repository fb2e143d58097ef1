import NIOConcurrencyHelpers
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet.shared(name)`: a dictionary shared by every event loop's VM (like
/// OpenResty's lua_shared_dict). Guarded by one lock per dict; it is meant for
/// counters and flags a filter chooses to share, not for the proxy's own hot path.
public final class SharedDict: @unchecked Sendable {
    public enum Value: Equatable, Sendable { case int(Int64), double(Double), string(String), bool(Bool) }
    public enum SetResult { case ok, full }
    struct Entry { var value: Value; var expires: Double }

    let lock = NIOLock()
    var map: [String: Entry] = [:]
    /// Most keys one dict holds (set beyond it fails with "no memory").
    public let capacity: Int

    init(capacity: Int) { self.capacity = capacity }

    static let registryLock = NIOLock()
    nonisolated(unsafe) static var registry: [String: SharedDict] = [:]

    public static func named(_ name: String) -> SharedDict {
        registryLock.withLock {
            if let d = registry[name] { return d }
            let d = SharedDict(capacity: 100_000)
            registry[name] = d
            return d
        }
    }

    static func now() -> Double {
        var ts = timespec(); clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    func live(_ k: String, _ t: Double) -> Entry? {
        guard let e = map[k] else { return nil }
        if e.expires > 0 && e.expires <= t { map[k] = nil; return nil }
        return e
    }

    public func get(_ k: String) -> Value? { lock.withLock { live(k, Self.now())?.value } }

    public func set(_ k: String, _ v: Value, ttl: Double?) -> SetResult {
        let t = Self.now()
        return lock.withLock {
            if map[k] == nil && map.count >= capacity {
                map = map.filter { $0.value.expires == 0 || $0.value.expires > t }
                if map.count >= capacity { return .full }
            }
            map[k] = Entry(value: v, expires: (ttl ?? 0) > 0 ? t + ttl! : 0)
            return .ok
        }
    }

    public func incr(_ k: String, by: Int64, initial: Int64?, ttl: Double?) -> Int64? {
        let t = Self.now()
        return lock.withLock {
            if let e = live(k, t) {
                guard case .int(let i) = e.value else { return nil }
                map[k]!.value = .int(i &+ by)
                return i &+ by
            }
            guard let initial else { return nil }
            if map.count >= capacity { return nil }
            map[k] = Entry(value: .int(initial &+ by), expires: (ttl ?? 0) > 0 ? t + ttl! : 0)
            return initial &+ by
        }
    }

    /// Sets `new` only if the current value equals `expected` (nil = absent).
    public func cas(_ k: String, expected: Value?, new: Value?, ttl: Double?) -> Bool {
        let t = Self.now()
        return lock.withLock {
            guard live(k, t)?.value == expected else { return false }
            if let new { map[k] = Entry(value: new, expires: (ttl ?? 0) > 0 ? t + ttl! : 0) } else { map[k] = nil }
            return true
        }
    }

    public func delete(_ k: String) { lock.withLock { map[k] = nil } }
}
