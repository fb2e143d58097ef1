import XCTest
import NIOCore
import Logging
import MoonletCore
import MoonletConfig
@testable import MoonletLua

final class LuaFilterTests: XCTestCase {
    var dir: String!
    var runtime: LuaLoopRuntime!
    var host: LuaHost!
    var nextID: UInt64 = 1

    override func setUp() {
        dir = NSTemporaryDirectory() + "moonlet-lua-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var limits = LuaLimits()
        limits.timeoutMs = 200
        limits.maxMemoryBytes = 32 << 20
        host = LuaHost(logger: Logger(label: "test"), limits: limits)
        runtime = LuaLoopRuntime(host: host, metrics: nil)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func spec(_ name: String, _ code: String, fail: FailStrategy = .failClose, config: ConfigValue = .map([]), maxInstructions: Int? = nil,
              timeoutMs: Int? = nil) -> LuaPluginSpec {
        let path = "\(dir!)/\(name).lua"
        try! code.write(toFile: path, atomically: true, encoding: .utf8)
        return LuaPluginSpec(name: name, namespace: "", path: path, phase: "UNSPECIFIED_PHASE", priority: 0, pluginConfig: config,
                             failStrategy: fail, matchLabels: [:], maxInstructions: maxInstructions, maxMemoryBytes: nil, timeoutMs: timeoutMs, file: "test", line: 1)
    }

    func chain(_ specs: [LuaPluginSpec]) throws -> FilterChain {
        let gen = try host.prepare(specs).get()
        return FilterChain(runtime.filters(for: gen))
    }

    func stream(_ raw: String = "GET /p HTTP/1.1\r\nHost: svc\r\nX-In: 1\r\n\r\n") -> ProxyStream {
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: raw)) else { fatalError() }
        nextID += 1
        return ProxyStream(id: nextID, request: h, source: PeerInfo(address: "127.0.0.1:1"), filterCount: 0, startNanos: 0)
    }

    func response(_ s: ProxyStream, _ raw: String = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") {
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseResponse(ByteBuffer(string: raw), requestWasHead: false) else { fatalError() }
        s.response = h
    }

    func finish(_ s: ProxyStream, _ c: FilterChain) { c.runLog(s); runtime.endStream(s); s.end() }

    func test_aBuiltinsTrivialPhase_runsAsItsNativeShortcut_andTheSameSourceFromAFileRunsInLua() throws {
        // istio-tracing with one tracer for both sides: on_request is trace.start, which
        // configure hands over as conf.shortcuts.on_request (builtin:// sources only).
        let config: ConfigValue = .map([("sampling", .double(100))])
        var builtin = spec("istio-tracing", "return {}", config: config)
        builtin.path = "builtin://istio-tracing"
        let file = spec("my-tracing", BuiltinPlugins.istioTracing, config: config)
        let instances = runtime.filters(for: try host.prepare([builtin, file]).get()).compactMap { $0 as? LuaPluginInstance }
        let native = try XCTUnwrap(instances.first { $0.name == "istio-tracing" })
        let lua = try XCTUnwrap(instances.first { $0.name == "my-tracing" })
        XCTAssertEqual(native.nativeRequest, .traceStart(0))
        XCTAssertNil(lua.nativeRequest, "a plugin loaded from a file gets no shortcut")
        for f in [native, lua] {
            let s = stream()
            XCTAssertEqual(f.onRequest(s), .continue)
            let names = s.request.added.map(\.name)
            XCTAssertEqual(names.filter { $0 == "x-b3-traceid" }.count, 1, "\(f.name): \(names)")
            XCTAssertTrue(names.contains("traceparent"), "\(f.name): \(names)")
            finish(s, FilterChain([f]))
        }
    }

    func test_filterReadsAndEditsRequestAndResponseHeaders() throws {
        let c = try chain([spec("hdr", """
        local f = {}
        function f.on_request(s, conf)
          s.request.headers:set("x-seen-by", conf.tag)
          s.request.headers:add("x-multi", "a")
          s.request.headers:add("x-multi", "b")
          s.request.headers:remove("x-in")
          s.vars.method = s.request.method
        end
        function f.on_response(s, conf)
          s.response.headers:set("x-variant", s.vars.method .. ":" .. s.request.path)
        end
        return f
        """, config: .map([("tag", .string("moonlet"))]))])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue)
        XCTAssertEqual(s.request.first("x-seen-by"), "moonlet")
        XCTAssertEqual(s.request.all("x-multi"), ["a", "b"])
        XCTAssertNil(s.request.first("x-in"))
        response(s)
        _ = c.runResponse(s)
        XCTAssertEqual(s.response?.first("x-variant"), "GET:/p")
        finish(s, c)
    }

    func test_getIsCaseInsensitive_andGetAllAndPairsSeeEverything() throws {
        let c = try chain([spec("read", """
        return { on_request = function(s)
          local h = s.request.headers
          assert(h:get("X-IN") == "1")
          assert(h:get("host") == "svc")
          assert(h:get("missing") == nil)
          local n = 0
          for k, v in h:pairs() do n = n + 1 end
          s.vars.n = n
          s.request.headers:set("x-count", tostring(n))
          assert(#h:get_all("x-in") == 1)
        end }
        """)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue)
        XCTAssertEqual(s.request.first("x-count"), "2")
        finish(s, c)
    }

    func test_respondAnswersLocally_andStopsTheChain() throws {
        let c = try chain([
            spec("block", """
            return { on_request = function(s)
              if s.request.headers:get("x-in") then return s:respond(403, "no\\n", { ["content-type"] = "text/plain" }) end
            end }
            """),
            spec("after", "return { on_request = function(s) s.request.headers:set('x-after', '1') end }"),
        ])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .respond)
        XCTAssertEqual(s.localReply?.status, 403)
        XCTAssertEqual(s.localReply?.body, "no\n")
        XCTAssertNil(s.request.first("x-after"))
        finish(s, c)
    }

    func test_crlfInHeaderValue_raisesAndInjectsNothing() throws {
        let c = try chain([spec("inject", """
        return { on_request = function(s) s.request.headers:set("x-a", "v\\r\\nx-evil: 1") end }
        """, fail: .failOpen)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue)
        XCTAssertNil(s.request.first("x-a"))
        XCTAssertNil(s.request.first("x-evil"))
        XCTAssertTrue(host.statuses().first?.lastError?.contains("control character") ?? false, "\(host.statuses())")
        finish(s, c)
    }

    /// Each on_request `code` (fail-open plugin) raises a Lua error naming `error`: the
    /// request goes on with no local reply and no `header`.
    func assertRaisesAndChangesNothing(_ codes: [String], header: String, error: String, line: UInt = #line) throws {
        for (i, code) in codes.enumerated() {
            let c = try chain([spec("raise\(line)_\(i)", "return { on_request = function(s) \(code) end }", fail: .failOpen)])
            let s = stream()
            XCTAssertEqual(c.runRequest(s), .continue, code, line: line)
            XCTAssertNil(s.localReply, code, line: line)
            XCTAssertNil(s.request.first(header), code, line: line)
            XCTAssertTrue(host.statuses().contains { $0.lastError?.contains(error) ?? false }, "\(code): \(host.statuses())", line: line)
            finish(s, c)
        }
    }

    /// One list of framing and hop-by-hop headers (MoonletHTTP's ManagedHeaders) for the
    /// binding and the local-reply check: trailer is refused by s:respond and headers:set
    /// in the filter, not turned into a 500 by the proxy afterwards.
    func test_trailerAndExpect_areRefusedByTheBinding_asTheLocalReplyCheckRefusesThem() throws {
        try assertRaisesAndChangesNothing(["s:respond(200, \"b\", { trailer = \"x\" })", "s.request.headers:set(\"trailer\", \"x\")",
                                           "s:respond(200, \"b\", { expect = \"100-continue\" })"], header: "trailer", error: "managed by the proxy")
        XCTAssertTrue(ManagedHeaders.isFramingOrHopByHop("trailer") && ManagedHeaders.isFramingOrHopByHop("expect"))
    }

    /// s.request.authority and headers:set("host") both go through HTTPHead.setHost, by
    /// the parser's Host rule only (no length limit of their own): one Host line after,
    /// read back the same way by both.
    func test_settingTheAuthorityOrTheHostHeader_leavesOneHost_byTheParsersRuleAlone() throws {
        let long = String(repeating: "a", count: 300) + ".example:8080"
        for (i, code) in ["s.request.authority = v", "s.request.headers:set(\"host\", v)"].enumerated() {
            let c = try chain([spec("host\(i)", """
            return { on_request = function(s)
              local v = s.request.headers:get("x-v")
              \(code)
              s.request.headers:set("x-read", s.request.authority .. "|" .. s.request.headers:get("host"))
            end }
            """)])
            let s = stream("GET /p HTTP/1.1\r\nHost: svc\r\nX-V: \(long)\r\n\r\n")
            XCTAssertEqual(c.runRequest(s), .continue, "\(code): \(host.statuses())")
            XCTAssertEqual(s.request.host, long, code)
            XCTAssertEqual(s.request.hostIndex, -1, code)
            XCTAssertEqual(s.request.allFields().filter { $0.name.lowercased() == "host" }.map(\.value), [long], code)
            XCTAssertEqual(s.request.first("x-read"), long + "|" + long, code)
            finish(s, c)
        }
    }

    /// The binding checks values by the parser's rule: any control byte but HTAB, or DEL,
    /// is a Lua error under the plugin's failStrategy (not a 500 from the proxy's check later).
    func test_anyControlByteOrDELInAHeaderValue_raisesInTheFilter_forSetAddAndRespond() throws {
        try assertRaisesAndChangesNothing(["s.request.headers:set(\"x-a\", \"a\\1b\")", "s.request.headers:add(\"x-a\", \"a\\127b\")",
                                           "s:respond(200, \"b\", { [\"x-a\"] = \"a\\27b\" })"], header: "x-a", error: "control character")
        let c = try chain([spec("tab", "return { on_request = function(s) s.request.headers:set(\"x-a\", \"a\\tb\") end }", fail: .failOpen)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue)
        XCTAssertEqual(s.request.first("x-a"), "a\tb", "HTAB is allowed")
        finish(s, c)
    }

    func test_runawayLoop_isAborted_andFailsClosedWith500() throws {
        let c = try chain([spec("spin", "return { on_request = function(s) while true do end end }", maxInstructions: 5_000_000)])
        let s = stream()
        let t0 = Date()
        XCTAssertEqual(c.runRequest(s), .respond)
        XCTAssertEqual(s.localReply?.status, 500)
        XCTAssertLessThan(Date().timeIntervalSince(t0), 2)
        XCTAssertTrue(host.statuses().first?.lastError?.contains("budget") ?? false)
        finish(s, c)
        // The VM keeps serving afterwards.
        let c2 = try chain([spec("ok", "return { on_request = function(s) s.request.headers:set('x-ok', '1') end }")])
        let s2 = stream()
        XCTAssertEqual(c2.runRequest(s2), .continue)
        XCTAssertEqual(s2.request.first("x-ok"), "1")
        finish(s2, c2)
    }

    func test_wallClockBudget_abortsSlowCode() throws {
        let c = try chain([spec("slow", """
        return { on_request = function(s) local t = os.clock() while os.clock() - t < 5 do end end }
        """)])
        let s = stream()
        let t0 = Date()
        XCTAssertEqual(c.runRequest(s), .respond)
        XCTAssertLessThan(Date().timeIntervalSince(t0), 2)
        finish(s, c)
    }

    func test_memoryBomb_isStoppedAtTheCap() throws {
        let c = try chain([spec("bomb", """
        return { on_request = function(s)
          local t = {}
          for i = 1, 1e8 do t[i] = string.rep("x", 1024) .. i end
        end }
        """, fail: .failClose, maxInstructions: 1_000_000_000)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .respond)
        XCTAssertEqual(s.localReply?.status, 500)
        finish(s, c)
        XCTAssertLessThan(runtime.vm.memoryUsed, 48 << 20)
        let big = try chain([spec("bigrep", "return { on_request = function(s) local x = string.rep('x', 1e9) end }")])
        let s2 = stream()
        XCTAssertEqual(big.runRequest(s2), .respond)
        finish(s2, big)
    }

    func test_sandbox_hidesIoOsDebugAndBytecode() throws {
        let c = try chain([spec("sandbox", """
        return { on_request = function(s)
          assert(io == nil, "io"); assert(debug == nil, "debug"); assert(os.execute == nil, "os.execute")
          assert(os.getenv == nil, "getenv"); assert(dofile == nil and loadfile == nil, "files")
          assert(string.dump == nil, "dump")
          local fn, err = load("\\27Lua")
          assert(fn == nil and err:find("bytecode"), "bytecode")
          assert(load("return 1")() == 1)
          assert(type(os.time()) == "number")
          local ok, e = pcall(require, "nonexistent_mod")
          assert(not ok and e:find("not found"))
          s.request.headers:set("x-sandbox", "ok")
        end }
        """)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue, host.statuses().first?.lastError ?? "")
        XCTAssertEqual(s.request.first("x-sandbox"), "ok")
        finish(s, c)
    }

    func test_requireLoadsModulesFromThePluginDirectory() throws {
        try "return { greet = function() return 'hi' end }".write(toFile: dir + "/helper.lua", atomically: true, encoding: .utf8)
        let c = try chain([spec("user", "local h = require('helper'); return { on_request = function(s) s.request.headers:set('x-g', h.greet()) end }")])
        let s = stream()
        _ = c.runRequest(s)
        XCTAssertEqual(s.request.first("x-g"), "hi")
        finish(s, c)
    }

    func test_wrapperKeptPastItsStream_raisesInsteadOfCrashing() throws {
        let c = try chain([spec("keep", """
        local kept
        return { on_request = function(s)
          if kept then
            local ok, err = pcall(function() return kept.headers:get("host") end)
            s.request.headers:set("x-kept", ok and "reachable" or err)
          end
          kept = s.request
        end }
        """)])
        let s1 = stream(); _ = c.runRequest(s1); finish(s1, c)
        let s2 = stream(); _ = c.runRequest(s2)
        XCTAssertTrue(s2.request.first("x-kept")?.contains("object used outside of its stream") ?? false, s2.request.first("x-kept") ?? "nil")
        finish(s2, c)
    }

    func test_errorsNamePluginFileAndLine() throws {
        let c = try chain([spec("oops", "return {\non_request = function(s)\n  error('boom')\nend }", fail: .failOpen)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue)
        let e = host.statuses().first?.lastError ?? ""
        XCTAssertTrue(e.contains("oops") && e.contains("oops.lua:3") && e.contains("boom"), e)
        finish(s, c)
    }

    func test_compileErrorIsRejected_withFileAndLine() {
        let r = host.prepare([spec("bad", "return {\n on_request = function(s)\n  if then end\nend }")])
        guard case .failure(let e) = r else { return XCTFail("accepted bad Lua") }
        XCTAssertTrue(e.description.contains("bad.lua:3"), e.description)
    }

    func test_regexAndSharedDict() throws {
        let c = try chain([spec("re", """
        return { on_request = function(s)
          local m = moonlet.regex.match("/api/v2/users", "^/api/(v[0-9]+)/(\\\\w+)$")
          assert(m and m[1] == "v2" and m[2] == "users")
          local a, b = moonlet.regex.find("hello world", "wor")
          assert(a == 7 and b == 9)
          assert(moonlet.regex.gsub("a-b-c", "-", "+") == "a+b+c")
          local d = moonlet.shared("counts")
          assert(d:incr("k", 1, 0) == 1); assert(d:incr("k", 2) == 3)
          assert(d:cas("k", 3, 10)); assert(not d:cas("k", 3, 11)); assert(d:get("k") == 10)
          d:set("t", "v", 0.05)
          s.request.headers:set("x-t", d:get("t"))
          local ok = pcall(moonlet.regex.match, "x", "(")
          assert(not ok)
        end }
        """)])
        let s = stream()
        XCTAssertEqual(c.runRequest(s), .continue, host.statuses().first?.lastError ?? "")
        XCTAssertEqual(s.request.first("x-t"), "v")
        finish(s, c)
        usleep(80_000)
        XCTAssertNil(SharedDict.named("counts")?.get("t"))
    }

    func test_reloadKeepsInFlightStreamsOnTheirVersion() throws {
        let v1 = try chain([spec("ver", "return { on_request = function(s) end, on_response = function(s) s.response.headers:set('x-v', '1') end }")])
        let s = stream()
        _ = v1.runRequest(s)
        let v2 = try chain([spec("ver", "return { on_response = function(s) s.response.headers:set('x-v', '2') end }")])
        response(s)
        _ = v1.runResponse(s)           // the stream started on v1
        XCTAssertEqual(s.response?.first("x-v"), "1")
        finish(s, v1)
        let s2 = stream(); _ = v2.runRequest(s2); response(s2); _ = v2.runResponse(s2)
        XCTAssertEqual(s2.response?.first("x-v"), "2")
        finish(s2, v2)
    }
}
