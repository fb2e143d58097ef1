/// Hex digits written eight at a time, for ids made per request (x-request-id, trace
/// and span ids): no per-digit loop or table load.
public enum Hex {
    /// The eight lowercase hex digits of `v`, most significant first, as the bytes of a
    /// UInt64 to store as is on a little-endian machine (the first digit at the lowest
    /// address).
    @inlinable @inline(__always)
    public static func eightDigits(_ v: UInt32) -> UInt64 {
        var x = UInt64(v)
        // One nibble per byte: 0xABCDEFGH -> 0x0A0B0C0D0E0F0G0H.
        x = (x | (x << 16)) & 0x0000_FFFF_0000_FFFF
        x = (x | (x << 8)) & 0x00FF_00FF_00FF_00FF
        x = (x | (x << 4)) & 0x0F0F_0F0F_0F0F_0F0F
        // '0'-'9' for 0-9, 'a'-'f' for 10-15 ('a' is '0' + 10 + 39).
        let letters = ((x &+ 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101
        x = x &+ 0x3030_3030_3030_3030 &+ letters &* 39
        return x.byteSwapped.littleEndian
    }

    /// Writes the 16 lowercase hex digits of `v` at `p`.
    @inlinable @inline(__always)
    public static func write16(_ v: UInt64, to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: eightDigits(UInt32(truncatingIfNeeded: v >> 32)), as: UInt64.self)
        p.storeBytes(of: eightDigits(UInt32(truncatingIfNeeded: v)), toByteOffset: 8, as: UInt64.self)
    }

    /// The text of a version 4 UUID (8-4-4-4-12 lowercase hex digits, as Envoy makes
    /// x-request-id) from 128 random bits.
    public static func uuidV4(_ random1: UInt64, _ random2: UInt64) -> String {
        String(unsafeUninitializedCapacity: 36) { out in
            writeUUIDv4(random1, random2, to: UnsafeMutableRawPointer(out.baseAddress!))
            return 36
        }
    }

    /// Writes the 36 bytes of `uuidV4(random1, random2)` at `p`.
    @inlinable @inline(__always)
    public static func writeUUIDv4(_ random1: UInt64, _ random2: UInt64, to p: UnsafeMutableRawPointer) {
        let a = (random1 & 0xFFFF_FFFF_FFFF_0FFF) | 0x4000
        let b = (random2 & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000
        // Eight digits a store, the middle groups then moved apart for their dashes
        // (byte moves: right on either byte order).
        func move(_ from: Int, _ to: Int) { p.storeBytes(of: p.load(fromByteOffset: from, as: UInt8.self), toByteOffset: to, as: UInt8.self) }
        p.storeBytes(of: eightDigits(UInt32(truncatingIfNeeded: a >> 32)), as: UInt64.self)
        p.storeBytes(of: eightDigits(UInt32(truncatingIfNeeded: a)), toByteOffset: 9, as: UInt64.self)
        move(16, 17); move(15, 16); move(14, 15); move(13, 14)
        p.storeBytes(of: eightDigits(UInt32(truncatingIfNeeded: b >> 32)), toByteOffset: 19, as: UInt64.self)
        move(26, 27); move(25, 26); move(24, 25); move(23, 24)
        p.storeBytes(of: eightDigits(UInt32(truncatingIfNeeded: b)), toByteOffset: 28, as: UInt64.self)
        p.storeBytes(of: 45, toByteOffset: 8, as: UInt8.self); p.storeBytes(of: 45, toByteOffset: 13, as: UInt8.self)
        p.storeBytes(of: 45, toByteOffset: 18, as: UInt8.self); p.storeBytes(of: 45, toByteOffset: 23, as: UInt8.self)
    }
}
