import XCTest
@testable import MoonletProxy

/// HTTP/2 with prior knowledge (h2c), driven by curl and h2load (nghttp2) as real clients.
final class HTTP2Tests: XCTestCase {
    func run(_ tool: String, _ args: [String]) throws -> String { try runTool(tool, args) }

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
