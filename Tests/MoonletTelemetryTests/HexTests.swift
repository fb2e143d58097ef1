import XCTest
import Foundation
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

extension HexTests {
    func test_uuidV4_isVersion4WithTheRFCVariant_andKeepsEveryOtherRandomBit() {
        let re = try! NSRegularExpression(pattern: "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
        var g = SystemRandomNumberGenerator()
        for _ in 0..<1000 {
            let a = UInt64.random(in: .min ... .max, using: &g), b = UInt64.random(in: .min ... .max, using: &g)
            let u = Hex.uuidV4(a, b)
            XCTAssertEqual(re.numberOfMatches(in: u, range: NSRange(location: 0, length: 36)), 1, u)
            let digits = u.replacingOccurrences(of: "-", with: "")
            let hi = UInt64(digits.prefix(16), radix: 16)!, lo = UInt64(digits.suffix(16), radix: 16)!
            XCTAssertEqual(hi, (a & 0xFFFF_FFFF_FFFF_0FFF) | 0x4000)
            XCTAssertEqual(lo, (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000)
        }
    }
}
