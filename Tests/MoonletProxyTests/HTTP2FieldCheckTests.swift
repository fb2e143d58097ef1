import XCTest
import MoonletHTTP
@testable import MoonletProxy

/// The word-at-a-time HTTP/2 field checks give the verdict of the byte-by-byte rules
/// for every byte value at every position of names and values of every length (values up to two 16-byte blocks,
/// a word and a tail).
final class HTTP2FieldCheckTests: XCTestCase {
    /// RFC 9113 §8.2.1 and the HTTP/1.1 field-value rule, one byte at a time.
    func referenceValue(_ v: [UInt8]) -> HTTP2FieldCheck.Value {
        guard let first = v.first, let last = v.last else { return .valid }
        if first == 32 || first == 9 || last == 32 || last == 9 { return .malformed }
        if v.contains(where: { $0 == 0 || $0 == 10 || $0 == 13 }) { return .malformed }
        return v.contains(where: { ($0 < 32 && $0 != 9) || $0 == 127 }) ? .control : .valid
    }

    func referenceName(_ n: [UInt8]) -> (Bool, Bool) {
        guard !n.isEmpty else { return (false, false) }
        let ok = n.allSatisfy { HeaderValidation.isTchar($0) && !($0 >= 65 && $0 <= 90) }
        return (ok, ok && n.contains(95))
    }

    func testEveryByteAtEveryPositionGetsTheByteByByteVerdict_forValuesOfEveryLength() {
        for length in 1...35 {
            let base = (0..<length).map { UInt8(97 + $0 % 26) }
            for position in 0..<length {
                for byte in 0...255 {
                    var v = base
                    v[position] = UInt8(byte)
                    let got = v.withUnsafeBytes { HTTP2FieldCheck.value($0) }
                    XCTAssertEqual(got, referenceValue(v), "value of \(length) bytes, \(byte) at \(position)")
                }
            }
        }
        XCTAssertEqual([UInt8]().withUnsafeBytes { HTTP2FieldCheck.value($0) }, .valid)
    }

    func testEveryByteAtEveryPositionGetsTheByteByByteVerdict_forNamesOfEveryLength() {
        for length in 1...19 {
            let base = (0..<length).map { UInt8([97, 45, 48, 122, 57][$0 % 5]) } // a - 0 z 9
            for position in 0..<length {
                for byte in 0...255 {
                    var n = base
                    n[position] = UInt8(byte)
                    var underscore = false
                    let ok = n.withUnsafeBytes { HTTP2FieldCheck.isName($0, underscore: &underscore) }
                    let want = referenceName(n)
                    XCTAssertEqual(ok, want.0, "name of \(length) bytes, \(byte) at \(position)")
                    if ok { XCTAssertEqual(underscore, want.1, "underscore: \(length) bytes, \(byte) at \(position)") }
                }
            }
        }
        XCTAssertFalse([UInt8]().withUnsafeBytes { HTTP2FieldCheck.isName($0) })
    }
}
