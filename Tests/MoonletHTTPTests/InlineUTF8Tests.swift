import XCTest
@testable import MoonletHTTP

/// Small Strings read from their words: the layout the shortcut relies on holds here, and
/// every String that is not small ASCII is told apart (the callers' fallback).
final class InlineUTF8Tests: XCTestCase {
    func test_smallASCIIStrings_areReadFromTheirWords_andOthersAreToldApart() {
        XCTAssertTrue(InlineUTF8.isAvailable, "64-bit little-endian Swift: the layout is expected")
        XCTAssertTrue(HeaderLine.inlineNames)
        XCTAssertGreaterThanOrEqual(HeaderLine.inlineTextOffset, 16, "a text value's String found in the line")
        for n in 0...15 {
            let s = String(decoding: (0..<n).map { UInt8(97 + $0) }, as: UTF8.self)
            let w = InlineUTF8.words(s)
            XCTAssertEqual(InlineUTF8.count(w.1), n)
            var c = w
            let bytes = withUnsafeBytes(of: &c) { Array($0.prefix(n)) }
            XCTAssertEqual(bytes, Array(s.utf8))
            XCTAssertEqual(InlineUTF8.key(s).map { [$0.0, $0.1] }, [w.0, w.1])
        }
        XCTAssertEqual(InlineUTF8.count(InlineUTF8.words(String(repeating: "a", count: 16)).1), -1, "large")
        XCTAssertEqual(InlineUTF8.count(InlineUTF8.words("é").1), -1, "small, not ASCII")
        XCTAssertNil(InlineUTF8.key("x-envoy-original-path"))
        // A String of the same bytes made another way compares equal by its words.
        var built = "x-request"
        built += "-id"
        XCTAssertTrue(InlineUTF8.words(built) == InlineUTF8.words("x-request-id"))
        XCTAssertTrue(InlineUTF8.key(built)! == InlineUTF8.words("x-request-id"))
    }
}
