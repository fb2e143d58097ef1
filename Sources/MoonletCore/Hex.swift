/// Hex digits written eight at a time, for ids made per request (x-request-id, trace
/// and span ids): no per-digit loop or table load.
public enum Hex {
    /// The eight lowercase hex digits of `v`, most significant first, as the bytes of a
    /// UInt64 to store as is (the first digit at the lowest address).
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
}
