import XCTest
import NIOCore
import Logging
import MoonletCore
import MoonletConfig
import MoonletTelemetry
@testable import MoonletLua

/// Issue 16, "a filter can never stall or take over the proxy": each test is the
/// attack, run through the same plugin chain the proxy uses.
extension LuaFilterTests {
    /// Runs `code` as the only filter's on_request and returns (action, seconds, last error).
    func attack(_ code: String, fail: FailStrategy = .failClose, timeoutMs: Int? = nil) throws -> (FilterAction, Double, String) {
        let c = try chain([spec("attack", "return { on_request = function(s)\n\(code)\nend }", fail: fail, timeoutMs: timeoutMs)])
        let s = stream()
        let t0 = Date()
        let action = c.runRequest(s)
        let dt = Date().timeIntervalSince(t0)
        finish(s, c)
        return (action, dt, host.statuses().first { $0.name == "attack" }?.lastError ?? "")
    }

    // MARK: 1. finalizers

    func test_finalizers_cannotBeInstalled_soAFinalizerLoopCannotHangTheLoop() throws {
        let (action, dt, err) = try attack("""
        local ok, e = pcall(setmetatable, {}, { __gc = function() end })
        assert(not ok and e:find("__gc"), "a __gc metatable was accepted")
        local mt = {}
        setmetatable({}, mt)
        mt.__gc = function() while true do end end   -- added later: never marks the table
        pcall(setmetatable, {}, { __gc = function() while true do end end })
        error("a later error path runs a full collection")
        """)
        XCTAssertEqual(action, .respond)
        XCTAssertTrue(err.contains("a later error path"), err)
        XCTAssertLessThan(dt, 2)
    }

    func test_pluginTablesWithMetamethods_areReadRaw_soLoadingCannotHangOrCrash() throws {
        let spin = "function() while true do end end"
        let t0 = Date()
        let c = try chain([
            spec("mt-module", "return setmetatable({}, { __index = \(spin) })"),
            spec("mt-env", "setmetatable(_G, { __index = \(spin) }) return { on_request = function(s) s.request.headers:set('x-env', '1') end }"),
        ])
        XCTAssertLessThan(Date().timeIntervalSince(t0), 2)
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue)
        XCTAssertEqual(s.request.first("x-env"), "1")
        finish(s, c)
    }

    func test_loadingAPlugin_hasAWallClockBudgetOfItsOwn_longerThanAPhases() throws {
        // configure spins 300 ms of wall clock: past a phase's budget (200 ms in setUp),
        // inside the load budget (1 s), so the plugin loads; the same spin in a phase is
        // still aborted.
        let spin = "local t = moonlet.now() while moonlet.now() - t < 0.3 do end"
        let c = try chain([spec("slow-load", "return { configure = function(c) \(spin) return c end, on_request = function(s) \(spin) end }",
                                maxInstructions: 1_000_000_000)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .respond)
        finish(s, c)
        XCTAssertEqual(LuaLimits().loadTimeoutMs, 1000)
    }

    // MARK: 2. budgets inside C functions

    /// Each snippet spends its time inside one C library call; every one must end with
    /// the budget error within twice the wall-clock budget (200 ms in setUp).
    func test_callBudget_holdsInsideStringAndTableCFunctions() throws {
        let attacks: [(String, String)] = [
            ("string.find backtracking", #"string.find(("a"):rep(16), ("a*"):rep(16) .. "b")"#),
            ("string.match backtracking", #"string.match(("a"):rep(24), ("a-"):rep(24) .. "b")"#),
            ("gmatch over a 58 KB cookie", #"local c = ("k=v"):rep(20000) for a, b in c:gmatch("(.-)=(.-);") do end"#),
            ("gsub backtracking", #"string.gsub(("a"):rep(5000), "(.-)b", "x")"#),
            ("plain find", #"local s = ("a"):rep(4e6) s:find(("a"):rep(2e6) .. "b", 1, true)"#),
            ("rep of an empty string", #"local x = string.rep("", 1e15) .. string.rep("", 1e15, "") error("rep returned")"#),
            ("table.move over a huge range", #"table.move({}, 1, 1e12, 2)"#),
            ("table.insert with a huge length", #"table.insert(setmetatable({}, { __len = function() return 1e12 end }), 1, "x")"#),
            ("table.remove with a huge length", #"table.remove(setmetatable({}, { __len = function() return 1e12 end }), 1)"#),
            ("table.concat through a C __index", #"table.concat(setmetatable({}, { __index = type }), "", 1, 1e9)"#),
            ("pcall catching the budget error", #"while true do pcall(function() while true do end end) end"#),
            ("xpcall catching the budget error", #"while true do xpcall(function() while true do end end, function(e) return e end) end"#),
            ("coroutine.resume catching the budget error", #"while true do coroutine.resume(coroutine.create(function() while true do end end)) end"#),
            ("table.sort through a C __index", #"table.sort(setmetatable({}, { __index = type, __newindex = rawequal, __len = function() return 2^31 - 2 end }))"#),
        ]
        for (name, code) in attacks {
            let (action, dt, err) = try attack(code)
            XCTAssertEqual(action, .respond, name)
            XCTAssertLessThan(dt, 0.4, "\(name): \(dt) s")
            XCTAssertTrue(err.contains("budget") || err.contains("rep returned"), "\(name): \(err)")
        }
    }

    func test_boundedLibraryFunctions_keepTheirResults() throws {
        let (action, _, err) = try attack(#"""
        assert(("hello world"):find("o w") == 5)
        assert(("hello world"):find("l+") == 3)
        assert(select(2, ("hello world"):gsub("o", "0")) == 2)
        assert(("k1=v1;k2=v2;"):match("k2=(.-);") == "v2")
        local n = 0 for k, v in ("a=1;b=2;"):gmatch("(%w+)=(%w+);") do n = n + 1 end assert(n == 2)
        assert(("ab"):rep(3, ",") == "ab,ab,ab" and ("x"):rep(0) == "" and (""):rep(3, "-") == "--")
        assert(#("xyz"):rep(100000) == 300000)
        local t = { 5, 3, 9, 1 } table.sort(t) assert(table.concat(t, ",") == "1,3,5,9")
        table.sort(t, function(a, b) return a > b end) assert(table.concat(t, ",") == "9,5,3,1")
        table.insert(t, 1, 0) assert(t[1] == 0 and #t == 5) assert(table.remove(t, 1) == 0)
        local m = table.move({ 1, 2, 3 }, 1, 3, 2) assert(m[1] == 1 and m[2] == 1 and m[4] == 3)
        local ok, e = pcall(error, "caught") assert(not ok and e:find("caught"))   -- pcall still catches errors
        assert(select("#", pcall(function() return 1, 2, 3 end)) == 4)
        local gen = coroutine.wrap(function() for i = 1, 3 do pcall(coroutine.yield, i) end end)
        assert(gen() == 1 and gen() == 2)
        s.request.headers:set("x-ok", "1")
        """#)
        XCTAssertEqual(action, .continue, err)
    }

    func test_logAndPrint_surviveABadToString_andCutLongLines() throws {
        let (action, dt, err) = try attack(#"""
        local bad = setmetatable({}, { __tostring = function() return {} end })
        moonlet.log.err("bad:", bad, setmetatable({}, { __tostring = function() error("boom") end }))
        print(string.rep("x", 8e6))
        moonlet.log.debug(string.rep("y", 8e6))
        s.request.headers:set("x-ok", "1")
        """#)
        XCTAssertEqual(action, .continue, err)
        XCTAssertLessThan(dt, 1)
    }

    // MARK: 3. isolation

    func test_pluginsCannotTamperWithEachOther() throws {
        try "return { value = 'clean' }".write(toFile: dir + "/common.lua", atomically: true, encoding: .utf8)
        var evil = spec("evil", #"""
        local function try(f, ...) pcall(f, ...) end
        return { on_request = function(s)
          leaked = "from evil"
          tostring = function() return "evil" end
          try(function() string.upper = function() return "evil" end end)
          try(rawset, string, "upper", function() return "evil" end)
          try(function() rawset(getmetatable("").__index, "upper", function() return "evil" end) end)
          try(function() getmetatable(s.source).__index = function() return "spiffe://evil/admin" end end)
          try(setmetatable, moonlet, { __index = function() return "evil" end })
          try(function() moonlet.regex.match = function() return { [0] = "evil" } end end)
          try(rawset, moonlet.regex, "match", function() return { [0] = "evil" } end)
          try(rawset, moonlet, "shared", function() return "evil" end)
          try(function() table.insert = nil; math.floor = nil; os.time = nil end)
          try(function() getmetatable(moonlet.shared("iso")).__index.get = function() return "evil" end end)
          try(function() math.randomseed(1) end)
          require("common").value = "evil"
          s.request.headers:set("x-evil-ran", "1")
        end }
        """#)
        evil.priority = 10
        let victim = spec("victim", #"""
        return { on_request = function(s)
          assert(leaked == nil, "globals leak")
          assert(tostring(1) == "1", "tostring replaced")
          assert(("a"):upper() == "A" and string.upper("b") == "B", "string.upper replaced")
          assert(getmetatable("") == false and getmetatable(s.source) == false, "metatables visible")
          assert(s.source.principal == "", "s.source.principal: " .. tostring(s.source.principal))
          assert(moonlet.regex.match("abc", "b")[0] == "b", "moonlet.regex replaced")
          assert(type(moonlet.shared) == "function" and moonlet.shared("iso"):get("k") == nil)
          assert(table.insert and math.floor and os.time, "library functions removed")
          assert(require("common").value == "clean", "required module shared")
          local n = 0 for k in pairs(string) do n = n + 1 end assert(n > 10, "pairs over string")
          s.request.headers:set("x-victim-ok", "1")
        end }
        """#)
        let c = try chain([evil, victim])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue, host.statuses().map { $0.lastError ?? "" }.joined(separator: "; "))
        XCTAssertEqual(s.request.first("x-evil-ran"), "1")
        XCTAssertEqual(s.request.first("x-victim-ok"), "1")
        finish(s, c)
    }

    func test_readOnlyTables_refuseEveryWrite_withAClearError() throws {
        let (action, _, err) = try attack(#"""
        local function refused(f, ...)
          local ok, e = pcall(f, ...)
          assert(not ok, "write accepted")
          return e
        end
        assert(refused(function() string.x = 1 end):find("string is read%-only"))
        assert(refused(rawset, table, "x", 1):find("read%-only"))
        assert(refused(setmetatable, math, {}):find("protected metatable"))
        assert(refused(function() moonlet.log.info = print end):find("moonlet.log is read%-only"))
        assert(getmetatable(moonlet) == false and getmetatable(moonlet.shared("iso2")) == false)
        mine = 1; assert(_G.mine == 1)   -- a plugin's own globals are its to change
        s.request.headers:set("x-ok", "1")
        """#)
        XCTAssertEqual(action, .continue, err)
    }

    // MARK: 4. memory outside the VM

    func test_sharedDict_setFailsWithNoMemory_pastItsByteCap() throws {
        var limits = LuaLimits()
        limits.sharedDictMaxBytes = 64 << 10
        host = LuaHost(logger: Logger(label: "test"), limits: limits)
        runtime = LuaLoopRuntime(host: host, metrics: nil)
        let name = "cap-\(UUID().uuidString)"
        let (action, _, err) = try attack("""
        local d = moonlet.shared("\(name)")
        local v = string.rep("x", 1024)
        local n, ok, e = 0, true, nil
        while n < 10000 do
          ok, e = d:set("k" .. n, v)
          if not ok then break end
          n = n + 1
        end
        assert(not ok and e == "no memory", "set never failed")
        assert(n > 10 and n < 64, "stored " .. n)
        local m = 0
        while m < 1000 and d:set("s" .. m, true) do m = m + 1 end   -- the last few bytes
        local r, ie = d:incr("fresh", 1, 0)
        assert(r == nil and ie == "no memory")
        d:delete("k0")
        assert(d:set("k0", "small"))      -- room again once something is deleted
        s.request.headers:set("x-ok", "1")
        """)
        XCTAssertEqual(action, .continue, err)
        XCTAssertLessThanOrEqual(SharedDict.named(name)?.bytes ?? .max, 64 << 10)
    }

    func test_sharedDicts_areCappedInNumber() throws {
        var limits = LuaLimits()
        limits.maxSharedDicts = SharedDict.registryLock.withLock { SharedDict.registry.count } + 1
        host = LuaHost(logger: Logger(label: "test"), limits: limits)
        runtime = LuaLoopRuntime(host: host, metrics: nil)
        let (action, _, err) = try attack("""
        moonlet.shared("one-more-\(UUID().uuidString)")
        local ok, e = pcall(moonlet.shared, "too-many-\(UUID().uuidString)")
        assert(not ok and e:find("too many shared dicts"), tostring(e))
        s.request.headers:set("x-ok", "1")
        """)
        XCTAssertEqual(action, .continue, err)
    }

    func test_luaMetricSeries_areCapped_andRefusalsCounted() throws {
        var limits = LuaLimits()
        limits.maxMetricSeries = 5
        host = LuaHost(logger: Logger(label: "test"), limits: limits)
        let shard = MetricsShard()
        runtime = LuaLoopRuntime(host: host, metrics: shard)
        let (action, _, err) = try attack("""
        for i = 1, 5 do assert(moonlet.metrics.counter("m", {i = i})):inc() end
        for i = 6, 12 do
          local h, e = moonlet.metrics.counter("m", {i = i})
          assert(h and e:find("too many metric series"), "past the cap: a handle whose updates are dropped, and why")
          h:inc()
        end
        moonlet.metrics.counter("m", {i = 1}):inc(2)   -- a known series still counts
        assert(moonlet.metrics.counter("legacy", 2))    -- the older form counter(name, n)
        """)
        XCTAssertEqual(action, .continue, err)
        let text = PrometheusExposition.render(shard.snapshot(), user: host.userMetrics)
        XCTAssertTrue(text.contains("m{i=\"1\"} 3\n"), text)
        XCTAssertTrue(text.contains("m{i=\"5\"} 1\n"), text)
        XCTAssertFalse(text.contains("m{i=\"6\"}"), text)
        XCTAssertEqual(shard.snapshot().counters[LuaHost.refusedSeriesMetric], 7)
        XCTAssertEqual(shard.snapshot().counters["moonlet_lua_legacy"], 2)
    }

    func test_metricNamesLabelsAndKinds_areCheckedWithClearErrors() throws {
        let (action, _, err) = try attack("""
        local function refused(why, f, ...)
          local ok, e = pcall(f, ...)
          assert(not ok, why .. " was accepted")
          return e
        end
        local M = moonlet.metrics
        assert(refused("a dash", M.counter, "a-b"):find("Prometheus metric name"))
        assert(refused("a leading digit", M.gauge, "1a"):find("Prometheus metric name"))
        assert(refused("istio_ prefix", M.counter, "istio_requests_total"):find("proxy's own"))
        assert(refused("a bad label", M.counter, "ok_total", {["bad-label"] = "x"}):find("label names"))
        assert(refused("le on a histogram", M.histogram, "h", {le = "1"}):find("label names"))
        assert(refused("decreasing buckets", M.histogram, "h2", nil, {1, 0.5}):find("increasing"))
        local c = M.counter("c_total")
        assert(refused("a negative inc", c.inc, c, -1):find("negative"))
        assert(refused("set on a counter", c.set, c, 1):find("only a gauge"))
        assert(refused("the same name as a gauge", M.gauge, "c_total"):find("already a counter"))
        local g = M.gauge("g", {k = "v"})
        g:set(5); g:inc(2); g:dec(1)
        M.histogram("lat_seconds", {route = "r"}, {0.1, 1}):observe(0.5)
        """)
        XCTAssertEqual(action, .continue, err)
        let text = PrometheusExposition.render(MetricsShard().snapshot(), user: host.userMetrics)
        XCTAssertTrue(text.contains("# TYPE g gauge\ng{k=\"v\"} 6\n"), text)
        XCTAssertTrue(text.contains("# TYPE lat_seconds histogram"), text)
    }

    // MARK: 5. regex limits

    func test_regexAtItsMatchLimit_isAnError_soADenyRuleFailsClosed() throws {
        let (action, _, err) = try attack("""
        local subject = string.rep("a", 40) .. "!"
        if moonlet.regex.match(subject, "^(a|aa)+$") == nil then
          s.request.headers:set("x-allowed", "1")   -- the deny rule did not match
        end
        """)
        XCTAssertEqual(action, .respond, "a match limit read as no match")
        XCTAssertTrue(err.contains("match limit"), err)
        for fn in ["find", "gsub"] {
            let (a, _, e) = try attack("moonlet.regex.\(fn)(string.rep('a', 40) .. '!', '^(a|aa)+$', 'x')")
            XCTAssertEqual(a, .respond, fn)
            XCTAssertTrue(e.contains("regex.\(fn)") && e.contains("match limit"), e)
        }
    }

    // MARK: 7. proxy-managed headers

    func test_respondArguments_thatWouldBreakFraming_raiseInTheBinding() throws {
        let (action, _, err) = try attack(#"""
        local function refused(...) local ok, e = pcall(s.respond, s, ...) assert(not ok, "accepted") return e end
        assert(refused(200, "x", { ["transfer-encoding"] = "chunked" }):find("managed by the proxy"))
        assert(refused(200, "x", { ["Content-Length"] = "99" }):find("managed by the proxy"))
        assert(refused(200, "x", { ["x-big"] = string.rep("v", 70000) }):find("16 KiB"))
        local many = {} for i = 1, 120 do many["x-h" .. i] = "v" end
        assert(refused(200, "x", many):find("more than 64 headers"))
        s:respond(403, "no")
        assert(not pcall(function() s.response.status = 100 end))
        """#)
        XCTAssertEqual(action, .respond, err)
        XCTAssertTrue(err.isEmpty, err)
    }

    func test_hostAndHopByHopHeaders_areManagedByTheProxy() throws {
        let c = try chain([spec("managed", #"""
        return { on_request = function(s)
          local h = s.request.headers
          local function refused(f, ...) local ok, e = pcall(f, ...) assert(not ok, "accepted") return e end
          assert(refused(h.add, h, "host", "evil.example"):find("one Host"))
          for _, n in ipairs({ "te", "upgrade", "expect", "keep-alive", "proxy-connection", "content-length" }) do
            assert(refused(h.set, h, n, "x"):find("managed by the proxy"), n)
            assert(refused(h.add, h, n, "x"):find("managed by the proxy"), n)
            assert(refused(h.remove, h, n):find("managed by the proxy"), n)
          end
          assert(refused(h.remove, h, "host"):find("keeps its Host"))
          assert(refused(h.set, h, "host", nil):find("keeps its Host"))
          assert(refused(h.set, h, "host", "a@b"):find("host%[:port%]"))
          assert(refused(function() s.request.authority = "a b" end):find("host%[:port%]"))
          h:set("HOST", "new.example:8080")
        end }
        """#)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue, host.statuses().first?.lastError ?? "")
        XCTAssertEqual(s.request.all("host"), ["new.example:8080"])
        for n in ["te", "upgrade", "expect", "keep-alive", "proxy-connection"] { XCTAssertNil(s.request.first(n), n) }
        finish(s, c)
    }
}
