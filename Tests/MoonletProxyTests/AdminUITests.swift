import XCTest
@testable import MoonletProxy

/// The admin page (`GET /ui`), rendered by headless Chromium against a live proxy.
final class AdminUITests: XCTestCase {
    var up: TestUpstream!
    override func setUpWithError() throws { up = try TestUpstream() }
    override func tearDown() { up?.stop() }

    static func chromium() -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
            for name in ["chromium", "chromium-browser", "google-chrome"] {
                let p = "\(dir)/\(name)"
                if FileManager.default.isExecutableFile(atPath: p) { return p }
            }
        }
        return nil
    }

    /// The DOM after the page's script ran (Chromium's virtual time lets its fetches finish).
    func renderedDOM(_ url: String) throws -> String {
        guard let chromium = Self.chromium() else {
            throw XCTSkip("chromium is not installed (scripts/install-deps installs Debian's chromium): the admin page is not rendered")
        }
        let profile = NSTemporaryDirectory() + "moonlet-ui-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: profile) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: chromium)
        p.arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--user-data-dir=\(profile)",
                       "--virtual-time-budget=5000", "--dump-dom", url]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let killer = DispatchWorkItem { if p.isRunning { p.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 60, execute: killer)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        killer.cancel()
        return String(decoding: data, as: UTF8.self)
    }

    func testAdminPageIsOneSelfContainedDocument() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let r = try XCTUnwrap(adminGet(px.admin, "/ui"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("content-type"), "text/html; charset=utf-8")
        XCTAssertTrue(r.body.contains("<script>") && r.body.contains("<style>"))
        XCTAssertFalse(r.body.contains("src=\"http"), "no external assets")
        XCTAssertFalse(r.body.contains("href=\"http"), "no external assets")
    }

    func testHeadlessChromiumRendersPluginsArmsVerdictsAndClusters() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "control.lua": ExperimentTests.tagging, "candidate.lua": ExperimentTests.failing20,
            "exp.yaml": ExperimentTests.experiment(variants: [("control", 50), ("candidate", 50)]),
            "hdr.lua": "return { on_request = function(s) end }",
            "hdr.yaml": ProxyFixture.plugin("hdr"),
            "svc.yaml": meshService("reviews", ports: [up.port]),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for _ in 0..<600 { _ = get(c) }
        usleep(200_000)
        let dom = try renderedDOM("http://127.0.0.1:\(px.admin)/ui")
        XCTAssertTrue(dom.contains("data-rendered=\"1\""), "the script ran: \(dom.prefix(2000))")
        XCTAssertTrue(dom.contains("data-plugin=\"exp\""), dom)
        XCTAssertTrue(dom.contains("data-arm=\"control\""), dom)
        XCTAssertTrue(dom.contains("data-arm=\"candidate\""), dom)
        XCTAssertTrue(dom.contains("data-verdict=\"worse\""), "the candidate's error-rate verdict: \(dom)")
        XCTAssertTrue(dom.contains("data-plugin-row=\"hdr\""), dom)
        XCTAssertTrue(dom.contains("data-chart=\"exp\""), dom)
        XCTAssertTrue(dom.contains("reviews"), "clusters: \(dom)")
    }
}
