import XCTest
import NIOCore
import Logging
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// The Envoy script adapter's load-time side (EnvoyCompat.swift) and moonlet.timer's
/// bounds, without a proxy: what is refused, and the message that names it.
final class EnvoyCompatTests: XCTestCase {
    var dir: String!
    var host: LuaHost!

    override func setUp() {
        dir = NSTemporaryDirectory() + "moonlet-envoy-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        host = LuaHost(logger: Logger(label: "test"))
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func spec(_ name: String, _ code: String) -> LuaPluginSpec {
        let path = "\(dir!)/\(name).lua"
        try! code.write(toFile: path, atomically: true, encoding: .utf8)
        return LuaPluginSpec(name: name, namespace: "", path: path, phase: "UNSPECIFIED_PHASE", priority: 0, pluginConfig: .map([]),
                             failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "test", line: 1)
    }

    func prepareError(_ code: String) -> String? {
        switch host.prepare([spec("p", code)]) {
        case .success: return nil
        case .failure(let e): return e.description
        }
    }

    func testScanFindsMethodCallsOutsideCommentsAndStrings() {
        let src = """
        -- h:commentCall()
        --[[ h:longComment() ]]
        local s = "h:inString()" .. 'h:single()' .. [==[ h:long() ]==]
        function envoy_on_request(h)
          h:headers():add("a", "b")
          h:logInfo "text"
          h : body ( )
          goto done
          ::done::
        end
        """
        let calls = EnvoyCompat.scan(src).calls
        XCTAssertEqual(calls.map(\.0), ["headers", "add", "logInfo", "body"])
        XCTAssertEqual(calls.map(\.1), [5, 5, 6, 7])
        XCTAssertTrue(EnvoyCompat.scan(src).usesBody)
        XCTAssertFalse(EnvoyCompat.scan("function envoy_on_request(h) h:headers() end").usesBody)
    }

    func testAnEnvoyScriptUsingAFunctionMoonletLacks_isRefusedAtLoadNamingTheFunctionAndItsLine() throws {
        let err = try XCTUnwrap(prepareError("""
        function envoy_on_response(h)
          h:headers():add("x", "1")
          h:headers():setHttp1ReasonPhrase("Nope")
        end
        """))
        XCTAssertTrue(err.contains("p.lua:3"), err)
        XCTAssertTrue(err.contains("'setHttp1ReasonPhrase' is not supported by Moonlet"), err)
        let err2 = try XCTUnwrap(prepareError("function envoy_on_request(h)\n local k = h:importPublicKey('x', 1)\nend\n"))
        XCTAssertTrue(err2.contains("'importPublicKey'"), err2)
    }

    func testASupportedEnvoyScriptLoads_andAScriptThatAlsoReturnsAModuleIsRefused() throws {
        XCTAssertNil(prepareError("""
        function envoy_on_request(h) h:headers():add("x", h:streamInfo():protocol()) end
        function envoy_on_response(h) h:logInfo("done") end
        """))
        let err = try XCTUnwrap(prepareError("function envoy_on_request(h) end\nreturn { on_request = function() end }"))
        XCTAssertTrue(err.contains("must not return a module"), err)
    }

    func testTimerBounds_intervalAndCountAreCheckedAtLoad() throws {
        let tooShort = try XCTUnwrap(prepareError("moonlet.timer.every(0.001, function() end)\nreturn {}"))
        XCTAssertTrue(tooShort.contains("seconds must be 0.01"), tooShort)
        let notFn = try XCTUnwrap(prepareError("moonlet.timer.after(1, 'x')\nreturn {}"))
        XCTAssertTrue(notFn.contains("fn must be a function"), notFn)
        let tooMany = try XCTUnwrap(prepareError("for i = 1, 65 do moonlet.timer.every(1, function() end) end\nreturn {}"))
        XCTAssertTrue(tooMany.contains("at most 64 live timers"), tooMany)
        XCTAssertNil(prepareError("for i = 1, 64 do moonlet.timer.every(1, function() end) end\nreturn {}"))
    }

    func testATimerMadeInAFilterPhase_isAnError() throws {
        let gen = try host.prepare([spec("p", """
        return { on_request = function(s)
          local ok, err = pcall(moonlet.timer.after, 1, function() end)
          s.request.headers:set("x-err", tostring(err))
        end }
        """)]).get()
        let runtime = LuaLoopRuntime(host: host, metrics: nil)
        let chain = FilterChain(runtime.filters(for: gen))
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: a\r\n\r\n")) else { return XCTFail() }
        let s = ProxyStream(id: 7, request: h, source: PeerInfo(address: "127.0.0.1:1"), filterCount: 0, startNanos: 0)
        _ = chain.runRequest(s)
        XCTAssertTrue(s.request.first("x-err")?.contains("not in a filter phase") ?? false, s.request.first("x-err") ?? "nil")
        runtime.endStream(s); s.end()
    }
    func testAnEnvoyScriptRunsUnderTheOfflineFilterHarness() throws {
        let lua = "\(dir!)/f.lua", cases = "\(dir!)/f.cases.yaml"
        try """
        function envoy_on_request(h)
          local key = h:headers():get("x-api-key")
          if not key then h:respond({[":status"] = "401"}, "missing key") end
          h:headers():add("x-user", h:metadata():get("prefix") .. key)
          local b = h:body()
          if b then h:headers():add("x-len", b:length()) end
        end
        function envoy_on_response(h) h:headers():add("x-filter", "envoy") end
        """.write(toFile: lua, atomically: true, encoding: .utf8)
        try """
        pluginConfig: {prefix: "u-"}
        cases:
        - name: passes the user upstream
          request: {method: POST, path: /x, headers: {x-api-key: k1}, body: hello}
          expect: {status: 200, response_headers: {x-filter: envoy}, upstream_request_headers: {x-user: u-k1, x-len: "5"}}
        - name: no key
          request: {path: /x}
          expect: {status: 401, body: missing key, response_headers: {x-filter: envoy}}
        """.write(toFile: cases, atomically: true, encoding: .utf8)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
        XCTAssertEqual(out.output, "2 passed, 0 failed\n")
    }

    func testABodyReadInsideOneEnvoyFunction_buffersThatFlowOnly_andOneInAHelperBuffersBoth() {
        let src = """
        local function helper(h) return h:body() end          -- line 1
        function envoy_on_request(h)                          -- line 2
          h:body()
        end
        function envoy_on_response(h)                         -- line 5
          h:trailers()
        end
        """
        let scan = EnvoyCompat.scan(src)
        XCTAssertEqual(scan.bufferingLines, [1, 3, 6])
        let req = 2...4, resp = 5...7
        XCTAssertTrue(EnvoyCompat.ScanResult(calls: [("body", 3)]).buffering(request: req, response: resp) == (true, false))
        XCTAssertTrue(EnvoyCompat.ScanResult(calls: [("trailers", 6)]).buffering(request: req, response: resp) == (false, true))
        XCTAssertTrue(scan.buffering(request: req, response: resp) == (true, true), "the helper's call buffers both")
        XCTAssertTrue(EnvoyCompat.ScanResult(calls: [("headers", 3)]).buffering(request: req, response: resp) == (false, false))
    }

    func testAnEnvoyScriptRewritesTheResponseBodyUnderTheOfflineFilterHarness() throws {
        let lua = "\(dir!)/r.lua", cases = "\(dir!)/r.cases.yaml"
        try """
        function envoy_on_request(h) h:headers():add("x-req", "1") end
        function envoy_on_response(h)
          local b = h:body()
          h:headers():add("x-len", b:length())
          b:setBytes("<" .. b:getBytes(0, b:length()) .. ">")
        end
        """.write(toFile: lua, atomically: true, encoding: .utf8)
        try """
        cases:
        - name: rewrites the body, its length follows
          request: {path: /x}
          upstream: {status: 200, body: hello}
          expect: {status: 200, body: "<hello>", response_headers: {x-len: "5", content-length: "7"}, upstream_request_headers: {x-req: "1"}}
        """.write(toFile: cases, atomically: true, encoding: .utf8)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.output, "1 passed, 0 failed\n")
    }
}
