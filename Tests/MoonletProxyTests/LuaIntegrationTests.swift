import XCTest
import NIOCore
import NIOConcurrencyHelpers
@testable import MoonletProxy

final class LuaIntegrationTests: XCTestCase {
    var up: TestUpstream!
    override func setUpWithError() throws { up = try TestUpstream() }
    override func tearDown() { up?.stop() }

    static let headerFilter = """
    local f = {}
    function f.on_request(s, conf)
      if s.request.headers:get("x-block") then
        return s:respond(403, "blocked\\n", { ["content-type"] = "text/plain" })
      end
      s.request.headers:set("x-seen-by", "moonlet")
      s.request.headers:remove("x-secret")
    end
    function f.on_response(s, conf)
      s.response.headers:set("x-variant", conf.variant or "a")
    end
    return f
    """

    func test_luaFilter_addsAndRemovesHeaders_andRepliesLocally() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "hdr.lua": Self.headerFilter,
            "hdr.yaml": ProxyFixture.plugin("hdr", "  pluginConfig:\n    variant: b\n"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, headers: "x-secret: s\r\n"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("x-variant"), "b")
        XCTAssertEqual(up.seen.first?.headers["x-seen-by"], ["moonlet"])
        XCTAssertFalse(up.seen.first?.headers.contains(name: "x-secret") ?? true)
        let blocked = try XCTUnwrap(get(c, headers: "x-block: 1\r\n"))
        XCTAssertEqual(blocked.status, 403)
        XCTAssertEqual(blocked.body, "blocked\n")
        XCTAssertEqual(blocked.header("x-variant"), "b", "local replies pass through response filters")
        XCTAssertEqual(up.seen.count, 1)
        let plugins = try XCTUnwrap(adminGet(px.admin, "/plugins")).body
        XCTAssertTrue(plugins.contains("\"name\":\"hdr\""), plugins)
        XCTAssertTrue(plugins.contains("\"executions\":4"), plugins)
    }

    func test_onLogRunsForLocalReplies_andVarsAreSharedAcrossFilters() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "a.lua": "return { on_request = function(s) s.vars.who = 'a' end }",
            "b.lua": """
            return {
              on_request = function(s) if s.request.path == '/deny' then return s:respond(401, 'no') end end,
              on_log = function(s) moonlet.shared('log'):set(s.request.path, s.vars.who .. ':' .. s.response.status) end,
            }
            """,
            "a.yaml": ProxyFixture.plugin("a", "  priority: 10\n"),
            "b.yaml": ProxyFixture.plugin("b"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c, "/deny")?.status, 401)
        XCTAssertEqual(get(c, "/ok")?.status, 200)
        // on_log runs once the last byte is written, so it may finish just after the client reads.
        func logged(_ k: String) -> String? {
            for _ in 0..<100 { if let v = MoonletLuaShared.get("log", k) { return v }; usleep(10_000) }
            return nil
        }
        XCTAssertEqual(logged("/deny"), "a:401")
        XCTAssertEqual(logged("/ok"), "a:200")
    }

    func test_responseFilter_replacesALocalReply_evenWithTheSameStatusAndBody() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "deny.lua": "return { on_request = function(s) return s:respond(403, 'no', { ['x-why'] = 'first' }) end }",
            "swap.lua": "return { on_response = function(s) if s.response.status == 403 then s:respond(403, 'no', { ['x-why'] = 'second' }) end end }",
            "deny.yaml": ProxyFixture.plugin("deny", "  priority: 10\n"),
            "swap.yaml": ProxyFixture.plugin("swap"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c))
        XCTAssertEqual(r.status, 403)
        XCTAssertEqual(r.all("x-why"), ["second"])
    }

    func test_runawayLua_gets500WithinBudget_whileOtherRequestsKeepFlowing() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "spin.lua": "return { on_request = function(s) if s.request.path == '/spin' then while true do end end end }",
            "spin.yaml": ProxyFixture.plugin("spin", "  limits:\n    timeoutMs: 300\n"),
        ], concurrency: 1)
        defer { px.stop() }
        let failures = NIOLockedValueBox(0)
        let okCount = NIOLockedValueBox(0)
        let stop = NIOLockedValueBox(false)
        let group = DispatchGroup()
        for _ in 0..<2 {
            DispatchQueue.global().async(group: group) {
                guard let c = try? RawClient(port: px.inbound) else { failures.withLockedValue { $0 += 1 }; return }
                while !stop.withLockedValue({ $0 }) {
                    if get(c, "/ok")?.status == 200 { okCount.withLockedValue { $0 += 1 } } else { failures.withLockedValue { $0 += 1 } }
                }
            }
        }
        let c = try RawClient(port: px.inbound)
        let t0 = Date()
        let r = try XCTUnwrap(get(c, "/spin"))
        let took = Date().timeIntervalSince(t0)
        XCTAssertEqual(r.status, 500)
        XCTAssertLessThan(took, 2.0)
        usleep(200_000)
        stop.withLockedValue { $0 = true }
        group.wait()
        XCTAssertEqual(failures.withLockedValue { $0 }, 0)
        XCTAssertGreaterThan(okCount.withLockedValue { $0 }, 10)
        XCTAssertEqual(get(c, "/ok")?.status, 200)
    }

    func test_badLuaUpdate_isRejected_lastGoodKeepsServing() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "hdr.lua": Self.headerFilter,
            "hdr.yaml": ProxyFixture.plugin("hdr"),
        ])
        defer { px.stop() }
        try px.write("hdr.lua", "return { on_request = function(s) if then end }")
        let r = try XCTUnwrap(adminGet(px.admin, "/plugins/reload", method: "POST"))
        XCTAssertEqual(r.status, 400)
        XCTAssertTrue(r.body.contains("hdr.lua:1"), r.body)
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c)?.header("x-variant"), "a")
        let plugins = try XCTUnwrap(adminGet(px.admin, "/plugins")).body
        XCTAssertTrue(plugins.contains("hdr.lua:1"), plugins)
    }

    func test_changedLuaFile_appliesWithinOneSecond() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "hdr.lua": Self.headerFilter,
            "hdr.yaml": ProxyFixture.plugin("hdr"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c)?.header("x-variant"), "a")
        try px.write("hdr.lua", Self.headerFilter.replacingOccurrences(of: "conf.variant or \"a\"", with: "\"edited\""))
        let t0 = Date()
        var seen = ""
        while Date().timeIntervalSince(t0) < 3 {
            seen = get(c)?.header("x-variant") ?? ""
            if seen == "edited" { break }
            usleep(50_000)
        }
        XCTAssertEqual(seen, "edited")
        XCTAssertLessThan(Date().timeIntervalSince(t0), 1.5)
    }

    func test_twentyReloadsUnderLoad_dropNoRequest() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "hdr.lua": Self.headerFilter,
            "hdr.yaml": ProxyFixture.plugin("hdr"),
        ])
        defer { px.stop() }
        let failures = NIOLockedValueBox([String]())
        let total = NIOLockedValueBox(0)
        let stop = NIOLockedValueBox(false)
        let group = DispatchGroup()
        for w in 0..<4 {
            DispatchQueue.global().async(group: group) {
                var c = try? RawClient(port: px.inbound)
                var n = 0
                while !stop.withLockedValue({ $0 }) {
                    n += 1
                    // Half the workers open a new connection now and then.
                    if w % 2 == 1 && n % 10 == 0 { c = try? RawClient(port: px.inbound) }
                    guard let cl = c, let r = get(cl, "/w\(w)") else { failures.withLockedValue { $0.append("no response") }; c = try? RawClient(port: px.inbound); continue }
                    total.withLockedValue { $0 += 1 }
                    if r.status != 200 || r.header("x-variant") == nil { failures.withLockedValue { $0.append("\(r.status) \(r.header("x-variant") ?? "-")") } }
                }
            }
        }
        for i in 0..<20 {
            try px.write("hdr.lua", Self.headerFilter.replacingOccurrences(of: "conf.variant or \"a\"", with: "\"v\(i)\""))
            XCTAssertEqual(adminGet(px.admin, "/plugins/reload", method: "POST")?.status, 200)
            usleep(50_000)
        }
        stop.withLockedValue { $0 = true }
        group.wait()
        XCTAssertEqual(failures.withLockedValue { $0 }, [])
        XCTAssertGreaterThan(total.withLockedValue { $0 }, 100)
    }

    func test_stopAndBuffer_givesTheWholeBodyToTheFilter() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "body.lua": """
            return {
              on_request = function(s) return moonlet.STOP_AND_BUFFER end,
              on_request_body = function(s, conf, body, eos)
                if eos and s.request:body():find("forbidden") then return s:respond(403, "body refused") end
                s.request.headers:set("x-body-len", tostring(#s.request:body()))
              end,
            }
            """,
            "body.yaml": ProxyFixture.plugin("body"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsome\r\n5\r\n data\r\n0\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        XCTAssertEqual(up.seen.first?.body, "some data")
        XCTAssertEqual(up.seen.first?.headers["x-body-len"], ["9"])
        XCTAssertEqual(up.seen.first?.headers["content-length"], ["9"])
        c.send("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nforbidden")
        XCTAssertEqual(c.read()?.status, 403)
        XCTAssertEqual(up.seen.count, 1)
    }

    func test_luaCannotSendASecondHostOrHopByHopHeadersUpstream() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "hdrs.lua": """
            return { on_request = function(s)
              local h = s.request.headers
              pcall(h.add, h, "host", "evil.example")
              pcall(h.set, h, "te", "gzip")
              pcall(h.set, h, "upgrade", "websocket")
              pcall(h.add, h, "expect", "100-continue")
            end }
            """,
            "hdrs.yaml": ProxyFixture.plugin("hdrs"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c)?.status, 200)
        let seen = try XCTUnwrap(up.seen.first)
        XCTAssertEqual(seen.headers["host"].count, 1, "\(seen.headers["host"])")
        XCTAssertFalse(seen.headers["host"].contains("evil.example"))
        for n in ["te", "upgrade", "expect"] { XCTAssertFalse(seen.headers.contains(name: n), n) }
    }

    func test_patternBacktrackingOverACookie_endsWithinTwiceTheBudget_andTheLoopKeepsServing() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "cookies.lua": """
            return { on_request = function(s)
              local c = s.request.headers:get("cookie")
              if c then for k, v in c:gmatch("(.-)=(.-);") do end end
            end }
            """,
            "cookies.yaml": ProxyFixture.plugin("cookies"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let t0 = Date()
        let r = get(c, headers: "cookie: " + String(repeating: "k=v", count: 19_000) + "\r\n")
        XCTAssertEqual(r?.status, 500)
        XCTAssertLessThan(Date().timeIntervalSince(t0), 0.2 + 0.3, "default budget 100 ms, x2, plus the round trip")
        let c2 = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c2)?.status, 200)
    }
}

import MoonletLua
enum MoonletLuaShared {
    static func get(_ dict: String, _ key: String) -> String? {
        if case .string(let s) = SharedDict.named(dict)?.get(key) { return s }
        return nil
    }
}
