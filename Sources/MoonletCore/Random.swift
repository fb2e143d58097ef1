/// Fast per-loop randomness for the hot path (weights, request ids); seeded from the system.
/// xoshiro256** (Blackman and Vigna): fast, good-quality, not for secrets.
public struct Xoshiro256: RandomNumberGenerator, Sendable {
    @usableFromInline var s: (UInt64, UInt64, UInt64, UInt64)
    public init<G: RandomNumberGenerator>(seed: G) {
        var g = seed
        s = (g.next(), g.next(), g.next(), g.next())
        if s == (0, 0, 0, 0) { s.0 = 0x9E3779B97F4A7C15 }
    }
    /// Inlinable: the proxy and the tracing filter draw several per request (ids).
    @inlinable @inline(__always)
    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0; s.3 ^= s.1; s.1 ^= s.2; s.0 ^= s.3
        s.2 ^= t
        s.3 = s.3 << 45 | s.3 >> 19
        return result
    }
}

/// SplitMix64: a tiny seeded generator for reproducible tests and seeding.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }
}
