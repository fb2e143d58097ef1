import XCTest
import Logging
@testable import MoonletProxy

/// Issue 24 item 12: what a peer sends cannot forge a log line.
final class LogEscapingTests: XCTestCase {
    func test_aFilterLoggingAHeaderOrPath_cannotForgeALogLine() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let log = CapturedLog()
        let lua = """
        return { on_request = function(s)
          moonlet.log.warn("path", s.request.path, "ua", s.request.headers:get("user-agent"))
          error("bad value " .. s.request.headers:get("user-agent"))
        end }
        """
        let px = try ProxyFixture(appPort: app.port, files: ["l.lua": lua, "l.yaml": ProxyFixture.plugin("l")], concurrency: 1, logger: log.logger)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        // A header value cannot hold CR, LF or other C0 controls on the wire, but obs-text
        // bytes can: UTF-8 for NEL (U+0085) and LINE SEPARATOR (U+2028), which log
        // viewers break lines at.
        c.send("GET /a HTTP/1.1\r\nHost: app\r\nUser-Agent: x\u{85}2026-12-06 info\u{2028}forged line\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 500)
        let lines = log.all.filter { $0.contains("forged line") }
        XCTAssertEqual(lines.count, 2, "\(log.all)")
        for l in lines {
            XCTAssertFalse(l.unicodeScalars.contains { $0.value < 0x20 || (0x7f...0x9f).contains($0.value) || $0.value == 0x2028 }, "a control character reached the log: \(l.debugDescription)")
            XCTAssertTrue(l.contains("x\\u{85}2026-12-06 info\\u{2028}forged line"), l)
        }
    }
}
