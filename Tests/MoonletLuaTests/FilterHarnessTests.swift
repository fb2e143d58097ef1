import XCTest
import MoonletConfig
@testable import MoonletLua

/// `moonlet filter test`'s harness: a filter and a CASES.yaml, run offline in the proxy's
/// sandbox (FilterTestCommand.run is what the CLI prints and exits with).
final class FilterHarnessTests: XCTestCase {
    var dir: String!

    override func setUp() {
        dir = NSTemporaryDirectory() + "moonlet-filtertest-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func write(_ name: String, _ text: String) -> String {
        let p = dir + "/" + name
        try! text.write(toFile: p, atomically: true, encoding: .utf8)
        return p
    }

    /// Adds x-user from the API key with a configured prefix, answers 401 without a key,
    /// marks responses, logs and counts.
    let apiKeyFilter = """
    local f = {}
    function f.on_request(s, conf)
      local key = s.request.headers:get("x-api-key")
      if not key then
        moonlet.metrics.counter("apikey_missing", 1)
        moonlet.log.warn("no api key for " .. s.request.path)
        return s:respond(401, "missing key\\n", { ["www-authenticate"] = "ApiKey" })
      end
      s.request.headers:set("x-user", conf.prefix .. key)
      s.request.headers:remove("x-api-key")
      if s.request.path == "/old" then s.request.path = "/new" end
    end
    function f.on_response(s, conf)
      s.response.headers:set("x-filter", "1")
      s.response.headers:remove("x-internal")
    end
    return f
    """

    func test_passingCases_exit0_andSummarize() throws {
        let lua = write("apikey.lua", apiKeyFilter)
        let cases = write("apikey.cases.yaml", """
        pluginConfig: {prefix: "u-"}
        cases:
        - name: passes the user upstream
          request: {method: GET, path: /x, headers: {x-api-key: k1}, body: "", source: {principal: cluster.local/ns/a/sa/b, address: "10.0.0.1:5000"}}
          upstream: {status: 200, headers: {content-type: text/plain, x-internal: secret}, body: ok}
          expect:
            status: 200
            response_headers: {x-filter: "1", content-type: text/plain, x-internal: null}
            body: ok
            upstream_request_headers: {x-user: u-k1, x-api-key: null}
            upstream_path: /x
        - name: rewrites the old path
          request: {path: /old, headers: {x-api-key: k2}}
          expect: {upstream_path: /new, upstream_request_headers: {x-user: u-k2}}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
        XCTAssertEqual(out.output, "2 passed, 0 failed\n")
    }

    func test_aCaseNamingAVariant_runsTheFilterAsThatArm_andWithoutOneVariantIsNil() throws {
        let lua = write("arm.lua", """
        return { on_request = function(s)
          local v = moonlet.variant()
          if v == "candidate" then return s:respond(403, "new rule") end
          s.request.headers:set("x-arm", tostring(v))
        end }
        """)
        let cases = write("arm.cases.yaml", """
        cases:
        - name: the candidate denies
          variant: candidate
          request: {path: /x}
          expect: {status: 403, body: new rule}
        - name: the control passes
          variant: control
          request: {path: /x}
          expect: {status: 200, upstream_request_headers: {x-arm: control}}
        - name: no experiment
          request: {path: /x}
          expect: {status: 200, upstream_request_headers: {x-arm: "nil"}}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
        XCTAssertEqual(out.output, "3 passed, 0 failed\n")
    }

    func test_failingCase_exits1_namingTheCaseTheFieldExpectedAndGot() throws {
        let lua = write("apikey.lua", apiKeyFilter)
        let cases = write("apikey.cases.yaml", """
        pluginConfig: {prefix: "u-"}
        cases:
        - name: good one
          request: {path: /x, headers: {x-api-key: k1}}
          expect: {status: 200}
        - name: wrong user prefix
          request: {path: /x, headers: {x-api-key: k1}}
          expect:
            upstream_request_headers: {x-user: user-k1}
            response_headers: {x-filter: "2", x-absent: null, x-missing: "v"}
            status: 201
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 1, out.output)
        XCTAssertTrue(out.output.contains("apikey.cases.yaml:6: wrong user prefix"), out.output)
        XCTAssertFalse(out.output.contains("good one"), out.output)
        XCTAssertTrue(out.output.contains("upstream_request_headers.x-user:\n    expected: \"user-k1\"\n    got:      \"u-k1\""), out.output)
        XCTAssertTrue(out.output.contains("response_headers.x-filter:\n    expected: \"2\"\n    got:      \"1\""), out.output)
        XCTAssertTrue(out.output.contains("response_headers.x-missing:\n    expected: \"v\"\n    got:      absent"), out.output)
        XCTAssertFalse(out.output.contains("x-absent"), out.output)
        XCTAssertTrue(out.output.contains("status:\n    expected: 201\n    got:      200"), out.output)
        XCTAssertTrue(out.output.hasSuffix("1 passed, 1 failed\n"), out.output)
    }

    func test_localReply_skipsTheUpstream_andGoesThroughOnResponse() throws {
        let lua = write("apikey.lua", apiKeyFilter)
        let cases = write("c.yaml", """
        pluginConfig: {prefix: "u-"}
        cases:
        - name: no key is 401
          request: {path: /secret}
          upstream: {status: 200, body: "never seen"}
          expect:
            status: 401
            body: "missing key\\n"
            response_headers: {www-authenticate: ApiKey, x-filter: "1", content-type: text/plain}
            logs: ["no api key for /secret"]
            metrics: {apikey_missing: 1, moonlet_lua_executions_total: 2}
        - name: a local reply has no upstream request
          request: {path: /secret}
          expect: {upstream_path: /secret}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 1, out.output)
        XCTAssertFalse(out.output.contains("no key is 401"), out.output)
        XCTAssertTrue(out.output.contains("a local reply has no upstream request"), out.output)
        XCTAssertTrue(out.output.contains("upstream_path:\n    expected: \"/secret\"\n    got:      none: local reply 401"), out.output)
    }

    func test_localReplyToAGRPCRequest_isAGRPCErrorAsTheProxyWritesIt() throws {
        let lua = write("apikey.lua", apiKeyFilter)
        let cases = write("c.yaml", """
        pluginConfig: {prefix: "u-"}
        cases:
        - name: no key on a gRPC call is UNAUTHENTICATED in a trailers-only 200
          request: {method: POST, path: /pkg.Svc/Get, headers: {content-type: application/grpc, te: trailers}}
          expect:
            status: 200
            body: ""
            response_headers: {content-type: application/grpc, grpc-status: "16", grpc-message: missing key, www-authenticate: ApiKey, x-filter: "1"}
        - name: grpc-web is not gRPC
          request: {method: POST, path: /pkg.Svc/Get, headers: {content-type: application/grpc-web}}
          expect: {status: 401, response_headers: {grpc-status: null}}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
    }

    /// The harness composes local replies with the proxy's own builder (LocalReplyBuilder).
    let replyEditor = """
    local f = {}
    function f.on_request(s, conf)
      return s:respond(401, "no\\n", { ["x-reply"] = "1" })
    end
    function f.on_response(s, conf)
      s.response.headers:set("x-added", "1")
      local mode = s.request.headers:get("x-mode")
      if mode == "respond" then
        return s:respond(403, "forbidden\\n")
      elseif mode == "huge" then
        local h = {}
        for i = 1, 8 do h["x-big-" .. i] = string.rep("a", 16 * 1024) end
        return s:respond(200, "too big a head", h)
      end
    end
    return f
    """

    func test_aResponseFilterChangingAGRPCLocalReplysStatus_dropsTheHeadersItAdded_asTheProxyDoes() throws {
        let lua = write("edit.lua", replyEditor)
        let cases = write("c.yaml", """
        cases:
        - name: an added header stays while the status does
          request: {path: /x}
          expect: {status: 401, body: "no\\n", response_headers: {x-added: "1", x-reply: "1"}}
        - name: a replaced reply with the same final status keeps the added header
          request: {path: /x, headers: {x-mode: respond}}
          expect: {status: 403, body: "forbidden\\n", response_headers: {x-added: "1"}}
        - name: on a gRPC call the replaced reply becomes a gRPC error, and the added header goes
          request: {method: POST, path: /pkg.Svc/Get, headers: {content-type: application/grpc, x-mode: respond}}
          expect: {status: 200, body: "", response_headers: {grpc-status: "7", x-added: null}}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
    }

    func test_aLocalReplyThatLocalReplyCheckRefuses_isTheProxysClean500() throws {
        let lua = write("edit.lua", replyEditor)
        let cases = write("c.yaml", """
        cases:
        - name: a reply whose head is over the limit becomes 500
          request: {path: /x, headers: {x-mode: huge}}
          expect: {status: 500, body: "invalid local reply\\n", response_headers: {x-added: null, x-big-1: null}}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
    }

    func test_responseStopAndBuffer_givesOnResponseBodyTheWholeUpstreamBody_whichItMayReplace() throws {
        let lua = write("rb.lua", """
        local f = {}
        function f.on_response(s, conf)
          if s.request.headers:get("x-early") and s.response.status == 200 then s.response:set_body("early") end
          return moonlet.STOP_AND_BUFFER
        end
        function f.on_response_body(s, conf, chunk, eos)
          if not eos or s.response.status ~= 200 then return end
          if s.response:body() == "bad" then return s:respond(502, "refused\\n") end
          s.response:set_body("[" .. s.response:body() .. "]")
        end
        return f
        """)
        let cases = write("c.yaml", """
        cases:
        - name: rewritten
          request: {path: /x}
          upstream: {status: 200, body: ok}
          expect: {status: 200, body: "[ok]", response_headers: {content-length: "4"}}
        - name: replaced by a local reply
          request: {path: /x}
          upstream: {status: 200, body: bad}
          expect: {status: 502, body: "refused\\n"}
        - name: set_body outside the call with the whole body raises
          request: {path: /x, headers: {x-early: "1"}}
          upstream: {status: 200, body: ok}
          expect: {status: 500, lua_error: "only in on_response_body with the whole body"}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
    }

    func test_logsAndMetricsExpectations_reportWhatWasLoggedAndCounted() throws {
        let lua = write("m.lua", """
        return {
          on_request = function(s) moonlet.log.info("saw " .. s.request.method); moonlet.metrics.counter("seen", 2) end,
          on_log = function(s) moonlet.metrics.counter("logged", 1) end,
        }
        """)
        let cases = write("c.yaml", """
        cases:
        - name: counts
          request: {method: POST, path: /a, body: "hi"}
          expect: {logs: ["saw POST"], metrics: {seen: 2, moonlet_lua_logged: 1, moonlet_lua_errors_total: 0}}
        - name: wrong counts
          request: {method: PUT, path: /a}
          expect: {logs: ["saw POST"], metrics: {seen: 1, never: 0}}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 1, out.output)
        XCTAssertFalse(out.output.contains(": counts\n"), out.output)
        XCTAssertTrue(out.output.contains("logs:\n    expected: a line containing \"saw POST\""), out.output)
        XCTAssertTrue(out.output.contains("saw PUT"), out.output)
        XCTAssertTrue(out.output.contains("metrics.seen:\n    expected: 1\n    got:      2"), out.output)
        // A name the filter never registered nor counted is an error, not "got 0".
        XCTAssertTrue(out.output.contains("metrics.never:\n    expected: 0\n    got:      no metric never: the filter never registered or counted it"), out.output)
    }

    func test_runawayFilter_isAbortedByTheBudget_andReportedAsAFailedCase() throws {
        let lua = write("spin.lua", "return { on_request = function(s) while true do end end }")
        let cases = write("c.yaml", """
        cases:
        - name: spins
          request: {path: /}
          expect: {status: 200}
        - name: spins but expects it
          request: {path: /}
          expect: {status: 500, lua_error: "on_request", metrics: {moonlet_lua_aborted_total: 1}}
        """)
        let start = Date()
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertLessThan(Date().timeIntervalSince(start), 30)
        XCTAssertEqual(out.exitCode, 1, out.output)
        XCTAssertTrue(out.output.contains("c.yaml:2: spins\n"), out.output)
        XCTAssertTrue(out.output.contains("lua error:\n    expected: none\n    got:      plugin spin: on_request:"), out.output)
        XCTAssertTrue(out.output.contains("status:\n    expected: 200\n    got:      500"), out.output)
        XCTAssertTrue(out.output.hasSuffix("1 passed, 1 failed\n"), out.output)
    }

    func test_stopAndBuffer_givesOnRequestBodyTheWholeBody() throws {
        let lua = write("b.lua", """
        local f = {}
        function f.on_request(s) return moonlet.STOP_AND_BUFFER end
        function f.on_request_body(s, conf, chunk, eos)
          if eos and chunk:find("forbidden", 1, true) then return s:respond(400, "bad body") end
          s.request.headers:set("x-body-len", tostring(#(s.request:body() or "")))
        end
        function f.on_response_body(s, conf, chunk, eos) if eos then moonlet.log.info("response done") end end
        return f
        """)
        let cases = write("c.yaml", """
        cases:
        - name: clean body goes upstream
          request: {method: POST, path: /u, body: "hello world"}
          upstream: {status: 201, body: created}
          expect: {status: 201, body: created, upstream_request_headers: {x-body-len: "11"}, logs: [response done]}
        - name: forbidden body is refused
          request: {method: POST, path: /u, body: "a forbidden word"}
          expect: {status: 400, body: bad body}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
    }

    func test_badCasesFile_getsFileLineErrors_andExit2() throws {
        let lua = write("f.lua", "return {}")
        let cases = write("bad.yaml", """
        cases:
        - name: one
          request: {path: /, colour: red}
          expect:
            status: two
            response_headers: [a]
        - request: {path: /}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 2, out.output)
        XCTAssertTrue(out.output.contains("bad.yaml:3:22: cases[0].request.colour: unknown field"), out.output)
        XCTAssertTrue(out.output.contains("bad.yaml:5:13: cases[0].expect.status: must be an integer"), out.output)
        XCTAssertTrue(out.output.contains("bad.yaml:6:23: cases[0].expect.response_headers: must be a mapping"), out.output)
        XCTAssertTrue(out.output.contains("bad.yaml:7:3: cases[1].name: missing"), out.output)
        let syntax = write("syntax.yaml", "cases:\n- name: [unclosed\n")
        let out2 = FilterTestCommand.run(filter: lua, cases: syntax)
        XCTAssertEqual(out2.exitCode, 2, out2.output)
        XCTAssertTrue(out2.output.hasPrefix("\(syntax):3:"), out2.output)
        XCTAssertTrue(out2.output.contains("YAML:"), out2.output)
    }

    func test_filterWithASyntaxError_exits2_namingItsLine() throws {
        let lua = write("broken.lua", "local f = {}\nfunction f.on_request(s)\n  if then\nend\nreturn f\n")
        let cases = write("c.yaml", "cases:\n- name: x\n  request: {path: /}\n  expect: {status: 200}\n")
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 2, out.output)
        XCTAssertTrue(out.output.contains("broken.lua:3:"), out.output)
    }

    func test_pluginConfigFlag_takesALuaPluginResourceOrAMapping_overTheCasesFile() throws {
        let lua = write("apikey.lua", apiKeyFilter)
        let cases = write("c.yaml", """
        pluginConfig: {prefix: "file-"}
        cases:
        - name: prefix from the flag
          request: {path: /x, headers: {x-api-key: k}}
          expect: {upstream_request_headers: {x-user: flag-k}}
        """)
        let plain = write("conf.yaml", "prefix: flag-\n")
        XCTAssertEqual(FilterTestCommand.run(filter: lua, cases: cases, pluginConfig: plain).exitCode, 0)
        let resource = write("apikey.yaml", """
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata: {name: apikey}
        spec:
          url: file://apikey.lua
          pluginConfig: {prefix: flag-}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases, pluginConfig: resource)
        XCTAssertEqual(out.exitCode, 0, out.output)
        let bad = write("bad.yaml", "apiVersion: moonlet.io/v1alpha1\nkind: LuaPlugin\nmetadata: {name: x}\nspec:\n  url: file://apikey.lua\n  phase: LATER\n")
        let out2 = FilterTestCommand.run(filter: lua, cases: cases, pluginConfig: bad)
        XCTAssertEqual(out2.exitCode, 2, out2.output)
        XCTAssertTrue(out2.output.contains("bad.yaml:6:10: LuaPlugin"), out2.output)
    }

    func test_casesAreIsolated_eachRunsInAFreshVM() throws {
        let lua = write("count.lua", """
        local n = 0
        return { on_request = function(s) n = n + 1; s.request.headers:set("x-n", tostring(n)) end }
        """)
        let cases = write("c.yaml", """
        cases:
        - {name: first, request: {path: /}, expect: {upstream_request_headers: {x-n: "1"}}}
        - {name: second, request: {path: /}, expect: {upstream_request_headers: {x-n: "1"}}}
        """)
        XCTAssertEqual(FilterTestCommand.run(filter: lua, cases: cases).exitCode, 0)
    }

    func test_generatedSkeleton_passesItsOwnCases_andItsLuaPluginLoads() throws {
        let paths = try FilterSkeleton.write(name: "my-filter", dir: dir + "/new")
        XCTAssertEqual(paths.map { ($0 as NSString).lastPathComponent }, ["my-filter.lua", "my-filter.cases.yaml", "my-filter.yaml"])
        let out = FilterTestCommand.run(filter: paths[0], cases: paths[1])
        XCTAssertEqual(out.exitCode, 0, out.output)
        XCTAssertEqual(out.output, "2 passed, 0 failed\n")
        let withResource = FilterTestCommand.run(filter: paths[0], cases: paths[1], pluginConfig: paths[2])
        XCTAssertEqual(withResource.exitCode, 0, withResource.output)
        let loaded = ConfigLoader().loadText(try String(contentsOfFile: paths[2], encoding: .utf8), file: paths[2], baseDir: dir + "/new")
        XCTAssertTrue(loaded.errors.isEmpty, "\(loaded.errors)")
        XCTAssertEqual(loaded.plugins.first?.path, dir + "/new/my-filter.lua")
        XCTAssertThrowsError(try FilterSkeleton.write(name: "my-filter", dir: dir + "/new"))
        XCTAssertThrowsError(try FilterSkeleton.write(name: "My_Filter", dir: dir + "/new2"))
    }
}
