import XCTest
import NIOCore
@testable import MoonletHTTP

/// HTTPHeadBuilder makes heads without the parser (HTTP/2 requests, local replies): what
/// it records must be what the parser would make of the same bytes.
final class HeadBuilderTests: XCTestCase {
    func assertSameFields(_ built: HTTPHead, _ parsed: HTTPHead, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(built.fields.count, parsed.fields.count, file: file, line: line)
        for (b, p) in zip(built.fields, parsed.fields) {
            XCTAssertEqual([b.nameStart, b.nameLength, b.valueStart, b.valueLength, b.lineStart, b.lineEnd],
                           [p.nameStart, p.nameLength, p.valueStart, p.valueLength, p.lineStart, p.lineEnd], file: file, line: line)
            XCTAssertEqual(b.kind, p.kind, file: file, line: line)
        }
        XCTAssertEqual(built.hostIndex, parsed.hostIndex, file: file, line: line)
        XCTAssertEqual(built.framing, parsed.framing, file: file, line: line)
    }

    func test_aBuiltRequestHead_isWhatTheParserMakesOfItsBytes() {
        var b = HTTPHeadBuilder(method: "POST", target: "/a?b=1", buffer: ByteBufferAllocator().buffer(capacity: 64))
        b.add("host", "example.com:8080", kind: .host)
        b.add("Content-Length", "5")
        b.add("x-request-id", "abc")
        b.add("expect", "100-continue")
        b.add("x_under", "1")
        b.set(framing: .contentLength(5))
        b.set(expectContinue: true)
        b.set(underscoreInName: true)
        let built = b.finish()
        var p = HTTPHeadParser(limits: HTTPParserLimits())
        guard case .complete(let parsed, let consumed) = p.parseRequest(built.bytes) else { return XCTFail("does not parse") }
        XCTAssertEqual(consumed, built.bytes.readableBytes)
        XCTAssertEqual(built.methodRange, parsed.methodRange)
        XCTAssertEqual(built.targetRange, parsed.targetRange)
        XCTAssertEqual(built.method, "POST")
        XCTAssertEqual(built.target, "/a?b=1")
        XCTAssertEqual(built.expectContinue, parsed.expectContinue)
        XCTAssertEqual(built.underscoreInName, parsed.underscoreInName)
        XCTAssertEqual(built.isHead, parsed.isHead)
        assertSameFields(built, parsed)
        XCTAssertEqual(built.first("content-length"), "5")
    }

    func test_aBuiltResponseHead_isWhatTheParserMakesOfItsBytes() {
        var b = HTTPHeadBuilder(status: 404, buffer: ByteBufferAllocator().buffer(capacity: 64))
        b.add("content-length", "3", kind: .contentLength)
        b.add("content-type", "text/plain", kind: .other)
        b.add("X-Custom", "v")
        b.set(framing: .contentLength(3))
        let built = b.finish()
        var p = HTTPHeadParser(limits: HTTPParserLimits())
        guard case .complete(let parsed, _) = p.parseResponse(built.bytes, requestWasHead: false) else { return XCTFail("does not parse") }
        XCTAssertEqual(built.status, 404)
        XCTAssertEqual(built.reasonRange, parsed.reasonRange)
        XCTAssertEqual(built.reason, parsed.reason)
        assertSameFields(built, parsed)
    }

    func test_knownHeaderNames_areClassifiedAsTheParserDoes_inAnyCase() {
        XCTAssertEqual(KnownHeader(name: "Content-Length"), .contentLength)
        XCTAssertEqual(KnownHeader(name: "transfer-encoding"), .transferEncoding)
        XCTAssertEqual(KnownHeader(name: "HOST"), .host)
        XCTAssertEqual(KnownHeader(name: "x-forwarded-client-cert"), .xForwardedClientCert)
        XCTAssertEqual(KnownHeader(name: "x-custom"), .other)
        XCTAssertEqual(KnownHeader(name: ""), .other)
    }
}
