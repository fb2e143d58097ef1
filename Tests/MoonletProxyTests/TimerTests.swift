import XCTest
import NIOCore
import NIOConcurrencyHelpers
@testable import MoonletProxy
import MoonletLua

/// moonlet.timer.after / every through the proxy: callbacks on the event loop, under
/// the plugin's budgets, waiting in moonlet.http.call, stopped on reload.
final class TimerTests: XCTestCase {
    var app: TestUpstream!
    override func setUpWithError() throws { app = try TestUpstream() }
    override func tearDown() { app?.stop() }

    /// Polls `cond` for up to `seconds`.
    func eventually(_ seconds: Double = 3, _ cond: () -> Bool) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end { if cond() { return true }; usleep(20_000) }
        return cond()
    }

    func shared(_ dict: String, _ key: String) -> Int {
        switch SharedDict.named(dict)?.get(key) {
        case .int(let i)?: return Int(i)
        case .double(let d)?: return Int(d)
        default: return 0
        }
    }

    func testADenyListRefreshedEvery100msFromAnUpstream_isConsultedByTheRequestFilter() throws {
        let denied = NIOLockedValueBox("bob")
        let lists = try TestUpstream { _ in
            var r = TestUpstream.Reply()
            r.body = denied.withLockedValue { $0 }
            return r
        }
        defer { lists.stop() }
        let px = try ProxyFixture(appPort: app.port, files: [
            "deny.lua": """
            local deny = {}
            local refreshes = moonlet.metrics.counter("denylist_refreshes_total", {})
            moonlet.timer.every(0.1, function()
              local res, err = moonlet.http.call("http://127.0.0.1:\(lists.port)", { path = "/deny", timeout_ms = 500 })
              if not res then moonlet.log.warn("deny list: ", err) return end
              local d = {}
              for user in res.body:gmatch("%S+") do d[user] = true end
              deny = d
              refreshes:inc()
            end)
            return {
              on_request = function(s)
                if deny[s.request.headers:get("x-user") or ""] then return s:respond(403, "denied\\n") end
              end,
            }
            """,
            "deny.yaml": ProxyFixture.plugin("deny"),
        ], concurrency: 2)
        defer { px.stop() }
        func status(_ user: String) -> Int? { get(try! RawClient(port: px.inbound), headers: "x-user: \(user)\r\n")?.status }
        XCTAssertTrue(eventually { status("bob") == 403 })
        XCTAssertEqual(status("alice"), 200)
        denied.withLockedValue { $0 = "alice carol" }
        XCTAssertTrue(eventually { status("alice") == 403 })
        XCTAssertTrue(eventually { status("bob") == 200 })
        XCTAssertEqual(status("carol"), 403)
        // Refreshes every 100 ms on each event loop (2 loops): the list server sees the calls.
        XCTAssertGreaterThanOrEqual(lists.seen.count, 2)
        XCTAssertEqual(lists.seen.first?.uri, "/deny")
        let metrics = adminGet(px.admin, "/stats/prometheus")?.body ?? ""
        XCTAssertTrue(metrics.contains("denylist_refreshes_total"), metrics)
    }

    func testSixtyFourBusyTimersCannotStarveTraffic_theLoopsTimerShareIsBounded() throws {
        // Each callback runs to its wall-clock budget (100 ms) every 10 ms: without a bound
        // across runs and timers the loop would do nothing else.
        let px = try ProxyFixture(appPort: app.port, files: [
            "busy.lua": """
            for i = 1, 64 do moonlet.timer.every(0.01, function() local x = 0 while true do x = x + 1 end end) end
            return {}
            """,
            "busy.yaml": ProxyFixture.plugin("busy"),
        ], concurrency: 1)
        defer { px.stop() }
        usleep(300_000)
        var slowest = 0.0
        for _ in 0..<10 {
            let t0 = Date()
            XCTAssertEqual(get(try RawClient(port: px.inbound))?.status, 200)
            slowest = max(slowest, Date().timeIntervalSince(t0))
        }
        // A request waits at most for one run in progress (100 ms budget), never for the queue.
        XCTAssertLessThan(slowest, 1.0, "a request waited \(slowest) s behind timers")
    }

    func testAReloadedPluginsOldTimerNoLongerFires() throws {
        let key = UUID().uuidString
        func plugin(_ version: String) -> String {
            """
            moonlet.timer.every(0.02, function() moonlet.shared("timer-test"):incr("\(key)-\(version)", 1, 0) end)
            moonlet.timer.after(0.05, function() moonlet.shared("timer-test"):incr("\(key)-\(version)-once", 1, 0) end)
            return {}
            """
        }
        let px = try ProxyFixture(appPort: app.port, files: ["t.lua": plugin("v1"), "t.yaml": ProxyFixture.plugin("t")], concurrency: 1)
        defer { px.stop() }
        XCTAssertTrue(eventually { self.shared("timer-test", "\(key)-v1") >= 3 })
        XCTAssertTrue(eventually { self.shared("timer-test", "\(key)-v1-once") == 1 })
        try px.write("t.lua", plugin("v2"))
        XCTAssertTrue(eventually(5) { self.shared("timer-test", "\(key)-v2") >= 3 })
        let v1 = shared("timer-test", "\(key)-v1")
        usleep(300_000)
        XCTAssertEqual(shared("timer-test", "\(key)-v1"), v1, "the old version's timer stopped")
        XCTAssertEqual(shared("timer-test", "\(key)-v1-once"), 1, "after fires once")
        XCTAssertGreaterThan(shared("timer-test", "\(key)-v2"), 3)
    }

    func testAFailingOrRunawayEveryCallbackIsCountedAndLogged_andKeepsRunning() throws {
        let key = UUID().uuidString
        let log = CapturedLog()
        let px = try ProxyFixture(appPort: app.port, files: [
            "bad.lua": """
            moonlet.timer.every(0.02, function()
              local n = moonlet.shared("timer-test"):incr("\(key)", 1, 0)
              if n % 2 == 0 then error("boom " .. n) end
              if n == 3 then while true do end end
            end)
            return {}
            """,
            "bad.yaml": ProxyFixture.plugin("bad", "  limits:\n    maxInstructions: 100000\n"),
        ], concurrency: 1, logger: log.logger)
        defer { px.stop() }
        XCTAssertTrue(eventually { self.shared("timer-test", key) >= 6 })
        // Counted and kept on /plugins: errors (the even runs) and the runaway run's abort.
        var plugins = ""
        XCTAssertTrue(eventually {
            plugins = adminGet(px.admin, "/plugins")?.body ?? ""
            return plugins.contains("\"aborted\":1") && plugins.contains("plugin bad: timer 1:")
        }, plugins)
        XCTAssertTrue(plugins.contains("boom"), plugins)
        // Logged (at most a line a second per timer).
        XCTAssertTrue(eventually { log.all.contains { $0.contains("plugin bad: timer 1:") && $0.contains("boom") } }, log.all.joined(separator: "\n"))
        // The proxy keeps serving.
        XCTAssertEqual(get(try RawClient(port: px.inbound))?.status, 200)
    }
    func testATimerCancelledFromAnotherCallbackStops_andCancelOnlyReachesThePluginsOwnTimers() throws {
        let key = UUID().uuidString
        let px = try ProxyFixture(appPort: app.port, files: [
            "c.lua": """
            local dict = moonlet.shared("timer-test")
            local ticking = moonlet.timer.every(0.02, function() dict:incr("\(key)-ticks", 1, 0) end)
            moonlet.timer.after(0.15, function()
              dict:set("\(key)-cancelled", tostring(moonlet.timer.cancel(ticking)) .. "," .. tostring(moonlet.timer.cancel(ticking)))
              dict:set("\(key)-at", dict:get("\(key)-ticks"))
            end)
            return {}
            """,
            "c.yaml": ProxyFixture.plugin("c"),
            // Another plugin of the same VM cannot cancel c's timers (ids are per plugin).
            "other.lua": "moonlet.timer.after(0.05, function() for id = 1, 10 do moonlet.timer.cancel(id) end end)\nreturn {}",
            "other.yaml": ProxyFixture.plugin("other"),
        ], concurrency: 1)
        defer { px.stop() }
        XCTAssertTrue(eventually { MoonletLuaShared.get("timer-test", "\(key)-cancelled") != nil })
        XCTAssertEqual(MoonletLuaShared.get("timer-test", "\(key)-cancelled"), "true,false")
        let at = shared("timer-test", "\(key)-at")
        XCTAssertGreaterThanOrEqual(at, 1, "ticked until cancelled (the other plugin's cancels did not reach it)")
        usleep(200_000)
        XCTAssertEqual(shared("timer-test", "\(key)-ticks"), at)
    }
}
