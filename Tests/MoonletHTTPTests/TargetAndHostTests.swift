import XCTest
import NIOCore
@testable import MoonletHTTP

/// Request targets (RFC 9112 §3.2) and Host values (RFC 9110 §7.2, RFC 3986 §3.2.2).
final class TargetAndHostTests: XCTestCase {
    func parse(_ s: String) -> HeadParseResult {
        var p = HTTPHeadParser()
        return p.parseRequest(ByteBuffer(string: s))
    }

    func status(_ s: String) -> Int? {
        if case .error(let e) = parse(s) { return e.status }
        return nil
    }

    func head(_ s: String, file: StaticString = #filePath, line: UInt = #line) -> HTTPHead? {
        if case .complete(let h, _) = parse(s) { return h }
        XCTFail("did not parse: \(parse(s))", file: file, line: line)
        return nil
    }

    func test_targetsThatAreNoneOfTheFourForms_get400() {
        for target in ["abc", "*", "other.example:80", "ftp://x/y", "http:/x", "http:///x", "http://a@b/x", "http://a b/x",
                       "http://x/y#frag", "http://:99999/"] {
            XCTAssertEqual(status("GET \(target) HTTP/1.1\r\nHost: h\r\n\r\n"), 400, target)
        }
        // CONNECT takes only authority-form; OPTIONS alone takes "*".
        XCTAssertEqual(status("CONNECT /x HTTP/1.1\r\nHost: h\r\n\r\n"), 400)
        XCTAssertEqual(status("CONNECT h HTTP/1.1\r\nHost: h\r\n\r\n"), 400)
        // No tunnels: a well-formed CONNECT gets 403, as from Envoy without a CONNECT upgrade.
        XCTAssertEqual(status("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n"), 403)
        XCTAssertEqual(status("GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n"), 400)
        XCTAssertEqual(status("POST * HTTP/1.1\r\nHost: h\r\n\r\n"), 400)
    }

    func test_theFourTargetForms_areRecognised() throws {
        XCTAssertEqual(try XCTUnwrap(head("GET /a?b HTTP/1.1\r\nHost: h\r\n\r\n")).targetForm, .origin)
        XCTAssertEqual(try XCTUnwrap(head("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")).targetForm, .asterisk)
        let h = try XCTUnwrap(head("GET HTTP://Other.Example:8080/abs?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"))
        XCTAssertEqual(h.targetForm, .absolute)
        XCTAssertEqual(h.string(h.targetAuthorityRange), "Other.Example:8080")
        XCTAssertEqual(h.string(h.targetPathRange), "/abs?x=1")
        let bare = try XCTUnwrap(head("GET https://[::1]?q HTTP/1.1\r\nHost: h\r\n\r\n"))
        XCTAssertEqual(bare.string(bare.targetAuthorityRange), "[::1]")
        XCTAssertEqual(bare.string(bare.targetPathRange), "?q")
    }

    func test_hostValuesThatAreNotHostAndPort_get400() {
        for host in ["a@b", "a, b", "a/b c", ":99999", "a:99999", "a:", "a:1x", "[::1", "[]", "a b", "a,b", "x:80:80"] {
            XCTAssertEqual(status("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n"), 400, host)
        }
    }

    func test_validHostValues_parse() {
        for host in ["example.com", "example.com:8080", "[::1]:80", "[2001:db8::1]", "10.0.0.1:65535", "xn--bcher-kva.example", "a_b.local", ""] {
            XCTAssertNotNil(head("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n"), host)
        }
    }
}
