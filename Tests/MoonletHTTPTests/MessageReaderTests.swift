import XCTest
import NIOCore
@testable import MoonletHTTP

final class MessageReaderTests: XCTestCase {
    /// Feeds `text` in pieces of `step` bytes and describes the events.
    func events(_ text: String, requests: Bool, step: Int, head: Bool = false) throws -> [String] {
        var r = HTTPMessageReader(requests: requests, limits: HTTPParserLimits())
        r.requestWasHead = head
        var out: [String] = []
        let bytes = Array(text.utf8)
        var i = 0
        while i < bytes.count {
            let piece = ByteBuffer(bytes: bytes[i..<min(i + step, bytes.count)])
            try r.feed(piece) { e in
                switch e {
                case .head(let h): out.append(requests ? "head \(h.method) \(h.target)" : "head \(h.status)")
                case .body(let b): if out.last?.hasPrefix("body ") == true { out[out.count - 1] += String(buffer: b) } else { out.append("body " + String(buffer: b)) }
                case .trailers(let t): out.append("trailers " + t.fields.map { "\($0.name)=\($0.value)" }.joined(separator: ","))
                case .end: out.append("end")
                }
            }
            i += step
        }
        return out
    }

    func test_aChunkedMessagesTrailers_comeRightBeforeItsEnd() throws {
        let text = "POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nx-sum: 1\r\n\r\nGET /n HTTP/1.1\r\nHost: x\r\n\r\n"
        for step in [1, 5, text.utf8.count] {
            XCTAssertEqual(try events(text, requests: true, step: step), ["head POST /t", "body ab", "trailers x-sum=1", "end", "head GET /n", "end"])
        }
    }

    func test_requestsSplitAtAnyByte_giveTheSameHeadsBodiesAndEnds() throws {
        let text = "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" +
            "POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n" +
            "GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
        let expected = ["head POST /a", "body hello", "end", "head POST /b", "body abcde", "end", "head GET /c", "end"]
        for step in [1, 2, 7, 1000] { XCTAssertEqual(try events(text, requests: true, step: step), expected, "step \(step)") }
    }

    func test_responses_skipInterimHeads_andHonourHEAD() throws {
        let text = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        XCTAssertEqual(try events(text, requests: false, step: 3), ["head 200", "body ok", "end"])
        XCTAssertEqual(try events("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", requests: false, step: 4, head: true), ["head 200", "end"])
    }

    func test_malformedChunking_throws() {
        let text = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        XCTAssertThrowsError(try events(text, requests: true, step: 100))
    }
}
