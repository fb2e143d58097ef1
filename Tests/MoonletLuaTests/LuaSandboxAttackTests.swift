import XCTest
import NIOCore
import Logging
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// The hostile-plugin attack on the sandbox: one test per finding, each the attack
/// itself run through the plugin chain. Attacks that used to hang run on a thread of
/// their own so the test ends (and fails) even when the attack is not stopped.
extension LuaFilterTests {
    /// Runs `body` on a thread with an 8 MiB stack; fails the test when it has not
    /// finished within `seconds` (the thread is then left to spin).
    func finishes(within seconds: Double, _ what: String, _ body: @escaping () throws -> Void) {
        final class Box: @unchecked Sendable { var failure: Error? }
        let done = DispatchSemaphore(value: 0)
        let box = Box()
        let t = Thread {
            do { try body() } catch { box.failure = error }
            done.signal()
        }
        t.stackSize = 8 << 20
        t.start()
        if done.wait(timeout: .now() + seconds) == .timedOut {
            XCTFail("\(what): still running after \(seconds) s")
            return
        }
        if let failure = box.failure { XCTFail("\(what): \(failure)") }
    }

    /// Runs `code` as an on_request attack and asserts the call failed (500) within
    /// `seconds` with an error containing one of `saying`.
    func assertAttackFails(_ code: String, saying: [String], within seconds: Double, _ what: String = "", timeoutMs: Int? = nil,
                           file: StaticString = #filePath, line: UInt = #line) throws {
        let (action, dt, err) = try attack(code, timeoutMs: timeoutMs)
        XCTAssertEqual(action, .respond, what, file: file, line: line)
        XCTAssertTrue(saying.contains { err.contains($0) }, "\(what): \(err)", file: file, line: line)
        XCTAssertLessThan(dt, seconds, "\(what): \(dt) s", file: file, line: line)
    }

    // MARK: 2. pattern matching

    func test_aGmatchIteratorReusedAfterPatternTooComplex_failsAgainInsteadOfOverflowingTheCStack() throws {
        finishes(within: 5, "gmatch reuse") {
            try self.assertAttackFails(#"""
            local n = 1e6
            local it = ("a"):rep(n):gmatch(("a?"):rep(n))
            local ok1, e1 = pcall(it)
            local ok2, e2 = pcall(it)
            assert(not ok1 and e1:find("too complex"), tostring(e1))
            assert(not ok2 and e2:find("too complex"), tostring(e2))
            error("iterator failed twice")
            """#, saying: ["iterator failed twice"], within: 5)
        }
    }

    // MARK: 1. the VM at its allocation limit

    /// The plugin fills its VM to within bytes of the allocator's hard limit, then the
    /// host pushes a body chunk and plugin code calls API functions that allocate.
    func test_aVMFilledToItsHardLimit_failsCallsCleanly_insteadOfAbortingTheProcess() throws {
        try fillAndServe()
        // Once the filler is unloaded, its memory is garbage and the VM serves again.
        let ok = try chain([spec("after", "return { on_request = function(s) s.request.headers:set('x-after', s.request.path) end }")])
        let s = stream()
        XCTAssertEqual(ok.runRequest(s), .continue, host.statuses().first { $0.name == "after" }?.lastError ?? "")
        XCTAssertEqual(s.request.first("x-after"), "/p")
        finish(s, ok)
    }

    private func fillAndServe() throws {
        let c = try chain([spec("filler", #"""
        local f = {}
        local hog, idx, n = {}, 0, 1 << 24
        for i = 1, 1024 do hog[i] = false end
        local keep = {}
        for i = 1, 20000 do keep[i] = false end
        local rep = string.rep
        local function fill()
          while n >= 48 do
            local ok, v = pcall(rep, "x", n)
            if ok then idx = idx + 1; hog[idx] = v else n = n // 2 end
          end
        end
        local calls = 0
        function f.on_request_body(s, conf, chunk, eos)
          calls = calls + 1
          if calls == 1 then
            for round = 1, 4 do n = 1 << 20; while n >= 48 do pcall(fill) end end
          elseif calls == 2 then
            idx = idx + 1; hog[idx] = chunk
          else
            -- every get_all makes a table in host mode: kept, they would grow the VM past its cap
            for i = 1, 20000 do keep[i] = s.request.headers:get_all("x-in") end
          end
          return "filled"
        end
        return f
        """#, fail: .failOpen)])
        let limit = 32 << 20
        let hard = limit + limit / 4 + (1 << 20)
        for _ in 0..<4 {
            let s = stream()
            _ = c.runRequestBody(s, chunk: ByteBuffer(repeating: 0x61, count: 256 << 10), endOfStream: true)
            finish(s, c)
            XCTAssertLessThan(runtime.vm.memoryUsed, hard + (1 << 20))
        }
    }

    // MARK: 3. memory outside the VM cap

    func test_hostSideCopiesAPluginCanGrow_areBoundedInTheBindings() throws {
        try assertAttackFails(#"""
        local function refused(what, f, ...)
          local ok, e = pcall(f, ...)
          assert(not ok, what .. " was accepted")
          return e
        end
        -- 100 MB of replacement (one per empty match), built outside the VM
        local e = refused("a 100 MB gsub result", moonlet.regex.gsub, ("a"):rep(1000), "", ("x"):rep(1e5))
        assert(e:find("too large"), e)
        -- 200 nested captures of a 1 MB subject: 200 MB of copies
        e = refused("200 MB of captures", moonlet.regex.match, ("a"):rep(1e6), ("("):rep(200) .. "a*" .. (")"):rep(200))
        assert(e:find("captures longer"), e)
        refused("a 200-byte metric name", moonlet.metrics.counter, ("a"):rep(200))
        refused("a 5000-byte regex", moonlet.regex.find, "x", "(?#" .. ("a"):rep(5000) .. ")x")
        local v = ("v"):rep(16000)
        e = refused("unbounded added headers", function() for i = 1, 1e4 do s.request.headers:add("x-a", v) end end)
        assert(e:find("added to this head"), e)
        refused("unbounded added headers", function() for i = 1, 1e4 do s.request.headers:set("x-b" .. i, "1") end end)
        error("all refused")
        """#, saying: ["all refused"], within: 1)
    }

    // MARK: 4, 5. budget errors that used to be swallowed

    func test_aLoopingToStringInALogCall_endsTheCallWithinItsBudget() throws {
        finishes(within: 5, "log with a looping __tostring") {
            try self.assertAttackFails(#"""
            local o = setmetatable({}, { __tostring = function() while true do end end })
            while true do moonlet.log.err(o) end
            """#, saying: ["budget"], within: 0.4)
        }
    }

    func test_aVMOverItsSoftMemoryCap_stillEndsRunawayCallsWithinTheBudget() throws {
        finishes(within: 5, "pcall loop over the soft cap") {
            try self.assertAttackFails(#"""
            local b = {}
            for i = 1, 9 do b[i] = ("x"):rep(4e6 + i) end   -- 36 MB: over the 32 MiB cap, under the hard limit
            while true do pcall(function() while true do end end) end
            """#, saying: ["budget", "memory"], within: 0.4)
        }
    }

    // MARK: 9. long C functions between two hook checks

    /// Each loop calls a C function that works for milliseconds per call; the hook,
    /// every 1000 instructions, would let hundreds of calls run between two checks.
    func test_loopsOverLinearTimeLibraryFunctions_endWithinTheBudget() throws {
        let attacks: [(String, String)] = [
            ("utf8.len", #"local len, s = utf8.len, ("\xe4\xb8\x80"):rep(2e6) while true do len(s) end"#),
            ("utf8.offset", #"local off, s = utf8.offset, ("\xe4\xb8\x80"):rep(2e6) while true do off(s, 1e9) end"#),
            ("utf8.codepoint", #"local cp, s = utf8.codepoint, ("a"):rep(2e5) while true do cp(s, 1, -1) end"#),
            ("string.upper", #"local up, s = string.upper, ("a"):rep(4e6) while true do up(s) end"#),
            ("string.reverse", #"local rev, s = string.reverse, ("a"):rep(4e6) while true do rev(s) end"#),
            ("string.format", #"local fmt, s = string.format, ("a"):rep(4e6) while true do fmt("%s", s) end"#),
            ("string.byte", #"local byte, s = string.byte, ("a"):rep(2e5) while true do byte(s, 1, -1) end"#),
            ("table.unpack", #"local unpack, t = table.unpack, {} for i = 1, 2e5 do t[i] = i end while true do unpack(t) end"#),
        ]
        for (name, code) in attacks {
            finishes(within: 10, name) {
                try self.assertAttackFails(code, saying: ["budget"], within: 0.4 + 0.1, name)
            }
        }
    }

    /// 400 log calls of a 15 MB string take about 0.1 s when each copies the 4 KiB it
    /// writes, seconds when each copies the string. The plugin gets a 2 s budget so a
    /// loaded machine (the suite beside parallel builds) does not trip the default one.
    func test_aLogCallOfAHugeString_copiesOnlyWhatItWrites() throws {
        try assertAttackFails(#"""
        local s = ("x"):rep(1.5e7)
        for i = 1, 200 do print(s) moonlet.log.err(i, s) end
        error("logged")
        """#, saying: ["logged"], within: 1.0, timeoutMs: 2000)
    }

    // MARK: 6, 7. the collector and the compiler

    func test_weakKeyedTables_areRefused_soAnEphemeronChainCannotMakeTheCollectorQuadratic() throws {
        finishes(within: 20, "ephemeron chain") {
            try self.assertAttackFails(#"""
            local ok, e = pcall(setmetatable, {}, { __mode = "k" })
            assert(not ok and e:find("__mode"), "a weak-keyed table was accepted")
            assert(not pcall(setmetatable, {}, { __mode = "kv" }), "an ephemeron table was accepted")
            local weakValues = setmetatable({}, { __mode = "v" })   -- weak values stay allowed
            local w = weakValues
            pcall(function() w = setmetatable({}, { __mode = "k" }) end)
            local last = {}
            for i = 1, 4e4 do local k = {}; w[last] = k; last = k end
            error("chain built")
            """#, saying: ["chain built"], within: 1)
        }
    }

    func test_compilingIsChargedToTheBudget_soQuadraticSourcesEndInTime() throws {
        finishes(within: 60, "quadratic load") {
            try self.assertAttackFails(#"""
            local src = "return " .. ("a or "):rep(13000) .. "a"   -- under load's 64 KiB
            assert(#src <= 65536)
            while true do load(src) end
            """#, saying: ["budget"], within: 0.4)
            let (_, _, big) = try self.attack(#"local f, e = load("return " .. ("a or "):rep(1e5) .. "a") assert(f == nil) error(e)"#)
            XCTAssertTrue(big.contains("larger than 65536"), big)
        }
        finishes(within: 60, "quadratic plugin file") {
            let t0 = Date()
            XCTAssertThrowsError(try self.chain([self.spec("quadratic", "local x = " + String(repeating: "a or ", count: 100_000) + "a\nreturn {}")]))
            // Loading has a wall-clock budget of its own (LuaLimits.loadTimeoutMs, 1 s).
            XCTAssertLessThan(Date().timeIntervalSince(t0), 2)
            XCTAssertTrue(self.host.statuses().first { $0.name == "quadratic" }?.lastError?.contains("budget") ?? true)
        }
    }

    // MARK: 8. __close after a failed call

    func test_closeHandlersLeftByAFailedCall_runUnderASmallBudget() throws {
        finishes(within: 5, "__close loop after an error") {
            // A huge instruction budget: only a wall clock can end the __close loop.
            let c = try self.chain([self.spec("closer", #"""
            return { on_request = function(s)
              local g <close> = setmetatable({}, { __close = function() while true do end end })
              error("boom")
            end }
            """#, maxInstructions: 1 << 50)])
            let s = self.stream()
            let t0 = Date()
            XCTAssertEqual(c.runRequest(s), .respond)
            XCTAssertLessThan(Date().timeIntervalSince(t0), 0.4 + 2 * Double(LuaVM.closeBudgetMs) / 1000)
            self.finish(s, c)
        }
    }

    // MARK: 11. cross-plugin tampering

    func test_sVarsMetatableIsLocked_andEachPluginHasItsOwnRandomGenerator() throws {
        let c = try chain([
            spec("a", #"""
            return { on_request = function(s)
              local ok, e = pcall(setmetatable, s.vars, { __index = function() while true do end end })
              assert(not ok and e:find("protected metatable"), tostring(e))
              assert(getmetatable(s.vars) == false)
              s.vars.random = math.random
              s.vars.a = "set by a"
            end }
            """#),
            spec("b", #"""
            return { on_request = function(s)
              assert(s.vars.random ~= math.random, "plugins draw from one generator")
              assert(math.randomseed == nil)
              local x = math.random(1, 6)
              s.request.headers:set("x-b", s.vars.a .. " " .. tostring(s.vars.missing))
            end }
            """#),
        ])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue, host.statuses().compactMap { $0.lastError }.joined(separator: "; "))
        XCTAssertEqual(s.request.first("x-b"), "set by a nil")
        finish(s, c)
    }

    // MARK: 10. error messages

    func test_aHugeErrorMessage_isCutBeforeItIsLoggedAndKept() throws {
        let (action, _, err) = try attack(#"error(("x"):rep(4e6))"#)
        XCTAssertEqual(action, .respond)
        XCTAssertLessThan(err.utf8.count, LuaAPI.maxLogLine + 200)
        XCTAssertTrue(err.contains("xxxx"), err)
    }
}
