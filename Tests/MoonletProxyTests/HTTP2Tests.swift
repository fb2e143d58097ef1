import XCTest
@testable import MoonletProxy

/// HTTP/2 with prior knowledge (h2c), driven by curl and h2load (nghttp2) as real clients.
final class HTTP2Tests: XCTestCase {
    func run(_ tool: String, _ args: [String]) throws -> String { try runTool(tool, args) }

    /// Reads frames until the server closes; returns the frame types seen and when it closed.
    static func readUntilClosed(_ c: RawClient, within seconds: Double) -> (types: [UInt8], closedAfter: Double?) {
        let start = Date()
        var types: [UInt8] = []
        while Date().timeIntervalSince(start) < seconds {
            while c.pending.count >= 9 {
                let len = Int(c.pending[0]) << 16 | Int(c.pending[1]) << 8 | Int(c.pending[2])
                guard c.pending.count >= 9 + len else { break }
                types.append(c.pending[3])
                c.pending.removeFirst(9 + len)
            }
            if !c.fill() { return (types, Date().timeIntervalSince(start)) }
        }
        return (types, nil)
    }

    func test_anIdleHTTP2Connection_isClosedAfterTheIdleTimeout_butNotWhileAStreamIsOpen() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(body: "slow", delayMs: 900) }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port) { $0.limits.downstreamIdleTimeoutMs = 300 }
        defer { px.stop() }
        let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
        let settings: [UInt8] = [0, 0, 0, 4, 0, 0, 0, 0, 0]
        // Idle: no stream at all.
        let idle = try RawClient(port: px.inbound)
        idle.send(preface + settings)
        let r1 = Self.readUntilClosed(idle, within: 5)
        XCTAssertNotNil(r1.closedAfter, "an idle HTTP/2 connection stays open")
        XCTAssertGreaterThan(r1.closedAfter ?? 0, 0.2)
        // One GET whose response takes 900 ms, three times the idle timeout.
        let busy = try RawClient(port: px.inbound)
        let authority = Array("a".utf8)
        let block: [UInt8] = [0x82, 0x86, 0x84, 0x41, UInt8(authority.count)] + authority // GET http / a (HPACK)
        let headers: [UInt8] = [0, 0, UInt8(block.count), 1, 0x05, 0, 0, 0, 1] + block  // HEADERS, END_STREAM|END_HEADERS, stream 1
        busy.send(preface + settings + headers)
        let r2 = Self.readUntilClosed(busy, within: 5)
        XCTAssertTrue(r2.types.contains(1), "the response headers arrived before the connection closed: frames \(r2.types)")
        XCTAssertGreaterThan(r2.closedAfter ?? 0, 0.9, "closed while the stream was open")
        XCTAssertNotNil(r2.closedAfter, "the connection idles out once the stream is done")
    }

    func test_h2cPriorKnowledge_requestsGoThroughTheFilterChain() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: "\(r.method) \(r.uri) \(r.headers["x-seen-by"].first ?? "-") \(r.bodyBytes)") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, files: [
            "hdr.lua": LuaIntegrationTests.headerFilter,
            "hdr.yaml": ProxyFixture.plugin("hdr"),
        ])
        defer { px.stop() }
        let get = try run("curl", ["-s", "-i", "--max-time", "10", "--http2-prior-knowledge", "http://127.0.0.1:\(px.inbound)/h2?x=1"])
        XCTAssertTrue(get.hasPrefix("HTTP/2 200"), get)
        XCTAssertTrue(get.contains("x-variant: a"), get)
        XCTAssertTrue(get.contains("GET /h2?x=1 moonlet 0"), get)
        let post = try run("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-d", "0123456789", "http://127.0.0.1:\(px.inbound)/p"])
        XCTAssertEqual(post, "POST /p moonlet 10")
        let blocked = try run("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--http2-prior-knowledge", "-H", "x-block: 1", "http://127.0.0.1:\(px.inbound)/"])
        XCTAssertEqual(blocked, "403")
    }

    /// The bridge turns frames into HTTP/1.1 and back without HTTP/1-style parts: cookie
    /// crumbs are joined into one field, a body without content-length goes chunked, a
    /// HEAD response ends the stream on its HEADERS, and a large response streams whole.
    func test_h2cRequests_becomeWellFormedHTTP1_andResponsesComeBackWhole() throws {
        let big = String(repeating: "0123456789abcdef", count: 8192) // 128 KB
        let up = try TestUpstream { r in
            if r.uri == "/big" { return TestUpstream.Reply(body: big) }
            let te = r.headers["transfer-encoding"].first ?? "-"
            let host = r.headers["host"].joined(separator: ",")
            return TestUpstream.Reply(body: "\(r.method) cookie=\(r.headers["cookie"]) host=\(host) te=\(te) body=\(r.body)")
        }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let base = "http://127.0.0.1:\(px.inbound)"
        let cookies = try run("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-H", "cookie: a=1", "-H", "cookie: b=2", "\(base)/c"])
        XCTAssertEqual(cookies, "GET cookie=[\"a=1; b=2\"] host=127.0.0.1:\(px.inbound) te=- body=")
        let upload = try runTool("sh", ["-c", "printf 'streamed body' | curl -s --max-time 10 --http2-prior-knowledge -T - \(base)/u"])
        XCTAssertEqual(upload, "PUT cookie=[] host=127.0.0.1:\(px.inbound) te=chunked body=streamed body")
        let head = try run("curl", ["-s", "-I", "--max-time", "10", "--http2-prior-knowledge", "\(base)/h"])
        XCTAssertTrue(head.hasPrefix("HTTP/2 200"), head)
        let whole = try run("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "\(base)/big"])
        XCTAssertEqual(whole.count, big.count)
        XCTAssertTrue(whole == big)
    }

    func test_h2cMultiplexedLoad_allSucceed() throws {
        let up = try TestUpstream()
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let out = try run("h2load", ["-n", "1000", "-c", "4", "-m", "10", "http://127.0.0.1:\(px.inbound)/"])
        XCTAssertTrue(out.contains("1000 succeeded, 0 failed, 0 errored"), out)
        XCTAssertLessThanOrEqual(up.connections, 2 * 64, "upstream connections are pooled")
    }
}
