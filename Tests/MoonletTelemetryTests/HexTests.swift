import XCTest
import MoonletCore

final class HexTests: XCTestCase {
    private func text(_ v: UInt32) -> String {
        withUnsafeBytes(of: Hex.eightDigits(v)) { String(decoding: $0, as: UTF8.self) }
    }

    func test_eightDigits_areTheLowercaseHexOfTheValue_mostSignificantFirst_andZeroPadded() {
        var values: [UInt32] = [0, 1, 9, 10, 15, 16, 0xFF, 0xDEAD_BEEF, 0x0123_4567, 0x89AB_CDEF, 0xFFFF_FFFF, 0xA0A0_0909]
        // Every digit value at every position.
        for shift in stride(from: 0, to: 32, by: 4) { for d in 0..<16 { values.append(UInt32(d) << UInt32(shift)) } }
        var g = SystemRandomNumberGenerator()
        for _ in 0..<1000 { values.append(UInt32.random(in: .min ... .max, using: &g)) }
        for v in values {
            let want = String(v, radix: 16)
            XCTAssertEqual(text(v), String(repeating: "0", count: 8 - want.count) + want, "\(v)")
        }
    }
}
