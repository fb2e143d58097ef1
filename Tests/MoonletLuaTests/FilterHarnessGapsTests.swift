import XCTest
import MoonletConfig
@testable import MoonletLua

/// `moonlet filter test` beyond plain filters: callouts served from `calls:` stubs,
/// `expect.calls`, metrics of every kind by their Prometheus names, experiment arms of a
/// LuaPlugin resource, and a filter directory that `moonlet validate` accepts.
final class FilterHarnessGapsTests: XCTestCase {
    var dir: String!

    override func setUp() {
        dir = NSTemporaryDirectory() + "moonlet-filtergaps-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func write(_ name: String, _ text: String) -> String {
        let p = dir + "/" + name
        try! text.write(toFile: p, atomically: true, encoding: .utf8)
        return p
    }

    /// Asks an auth service; 403 when it says no, 503 when it cannot be reached; passes
    /// the user it returns upstream.
    let authFilter = """
    local f = {}
    function f.on_request(s)
      local res, err = moonlet.http.call("http://auth/check", {
        method = "POST", headers = { ["x-token"] = s.request.headers:get("x-token") }, body = s.request.path })
      if not res then return s:respond(503, "auth unavailable: " .. err) end
      if res.status ~= 200 then return s:respond(403, "denied") end
      s.request.headers:set("x-user", res.headers["x-user"] or "?")
      local res2 = moonlet.http.call("outbound|80||quota.default.svc.cluster.local", { path = "/q" })
      if res2 and res2.status == 429 then return s:respond(429, "quota") end
    end
    return f
    """

    func test_calloutFilter_isServedFromTheCaseStubsInOrder_andExpectCallsChecksWhatWasSent() throws {
        let lua = write("auth.lua", authFilter)
        let cases = write("auth.cases.yaml", """
        cases:
        - name: allowed
          request: {path: /x, headers: {x-token: t1}}
          calls:
          - target: http://auth/check
            method: POST
            response: {status: 200, headers: {x-user: alice}}
          - {target: "outbound|80||quota.default.svc.cluster.local", path: /q, response: {status: 200}}
          expect:
            status: 200
            upstream_request_headers: {x-user: alice}
            calls:
            - {target: http://auth/check, method: POST, path: /check, headers: {x-token: t1, x-other: null}, body: /x}
            - {target: "outbound|80||quota.default.svc.cluster.local", method: GET, path: /q}
        - name: denied
          request: {path: /x, headers: {x-token: bad}}
          calls: [{target: http://auth/check, response: {status: 401}}]
          expect: {status: 403, body: denied, calls: [{path: /check}]}
        - name: over quota
          request: {path: /x}
          calls:
          - {target: http://auth/check, response: {status: 200}}
          - {target: "outbound|80||quota.default.svc.cluster.local", response: {status: 429}}
          expect: {status: 429}
        - name: auth times out
          request: {path: /x}
          calls: [{target: http://auth/check, error: timeout}]
          expect: {status: 503, body: "auth unavailable: timeout"}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
        XCTAssertEqual(out.output, "4 passed, 0 failed\n")
    }

    func test_aCallWithoutAStub_failsTheCaseNamingTheCall_andExpectCallsReportsDifferences() throws {
        let lua = write("auth.lua", authFilter)
        let cases = write("c.yaml", """
        cases:
        - name: no stubs
          request: {path: /x}
          expect: {status: 503}
        - name: wrong expectations
          request: {path: /x, headers: {x-token: t1}}
          calls:
          - {target: http://auth/check, method: GET, response: {status: 200}}
          - {target: http://auth/check, response: {status: 200}}
          - {target: "outbound|80||quota.default.svc.cluster.local", response: {status: 200}}
          expect:
            calls:
            - {method: PUT, headers: {x-token: t2}}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 1, out.output)
        XCTAssertTrue(out.output.contains("FAIL \(cases):2: no stubs"), out.output)
        XCTAssertTrue(out.output.contains("the filter called POST http://auth/check, and no unused stub matches it"), out.output)
        // The GET stub does not answer a POST: the second stub does.
        XCTAssertTrue(out.output.contains("expect.calls:\n    expected: 1 call(s)\n    got:      2: POST http://auth/check; GET outbound|80||quota.default.svc.cluster.local path /q"), out.output)
        XCTAssertTrue(out.output.contains("calls[0].method:\n    expected: \"PUT\"\n    got:      \"POST\""), out.output)
        XCTAssertTrue(out.output.contains("calls[0].headers.x-token:\n    expected: \"t2\"\n    got:      \"t1\""), out.output)
    }

    func test_badCallsStubs_areFileErrors() throws {
        let lua = write("auth.lua", authFilter)
        let cases = write("c.yaml", """
        cases:
        - name: a
          request: {path: /x}
          calls:
          - {method: GET, response: {status: 200}}
          - {target: http://a, response: {status: 200}, error: boom}
          - {target: http://a, respone: {}}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 2, out.output)
        XCTAssertTrue(out.output.contains("cases[0].calls[0].target: missing"), out.output)
        XCTAssertTrue(out.output.contains("response and error are exclusive"), out.output)
        XCTAssertTrue(out.output.contains("cases[0].calls[2].respone: unknown field"), out.output)
    }

    func test_anEnvoyScriptsHttpCall_isServedByClusterName_andARepeatedHeaderIsItsLastValueUnlessDuplicatesAreAsked() throws {
        let lua = write("env.lua", """
        function envoy_on_request(h)
          local hdrs, body = h:httpCall("outbound|80||auth.default.svc.cluster.local",
            {[":method"] = "GET", [":path"] = "/check", [":authority"] = "auth"}, "", 500)
          h:logInfo("status=" .. hdrs[":status"] .. " key=" .. tostring(hdrs["key"]) .. " body=" .. tostring(body))
          local all = h:httpCall("outbound|80||auth.default.svc.cluster.local",
            {[":method"] = "GET", [":path"] = "/check", [":authority"] = "auth"}, "", {timeout_ms = 500, return_duplicate_headers = true})
          h:logInfo("list=" .. table.concat(all["key"], "|") .. " single=" .. type(all["foo"]))
        end
        """)
        let cases = write("env.cases.yaml", """
        cases:
        - name: httpCall
          request: {path: /x}
          calls:
          - {target: "outbound|80||auth.default.svc.cluster.local", path: /check, response: {status: 200, headers: {foo: bar, key: [value_0, value_1, value_2]}, body: yes}}
          - {target: "outbound|80||auth.default.svc.cluster.local", response: {status: 200, headers: {foo: bar, key: [value_0, value_1, value_2]}}}
          expect:
            logs: ["status=200 key=value_2 body=yes", "list=value_0|value_1|value_2 single=string"]
            calls: [{headers: {host: auth}}, {method: GET}]
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
    }

    func test_aCallInOnResponse_isServedToo_andTheResponseWaitsForIt() throws {
        let lua = write("audit.lua", """
        return { on_response = function(s)
          local res, err = moonlet.http.call("http://audit/log", { method = "POST", body = tostring(s.response.status) })
          s.response.headers:set("x-audit", res and tostring(res.status) or err)
        end }
        """)
        let cases = write("audit.cases.yaml", """
        cases:
        - name: audited
          request: {path: /x}
          upstream: {status: 202, body: accepted}
          calls: [{target: http://audit/log, response: {status: 204}}]
          expect: {status: 202, body: accepted, response_headers: {x-audit: "204"}, calls: [{method: POST, path: /log, body: "202"}]}
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 0, out.output)
    }

    func test_metricsExpectations_readLabelledCountersGaugesAndHistograms_andAnUnknownNameIsAnError() throws {
        let lua = write("m.lua", """
        local hits_a = moonlet.metrics.counter("hits", {route = "a"})
        local hits_b = moonlet.metrics.counter("hits", {route = "b", code = "200"})
        local depth = moonlet.metrics.gauge("depth")
        local lat = moonlet.metrics.histogram("lat_seconds", {route = "a"}, {0.1, 1})
        local plain = moonlet.metrics.counter("plain")
        return { on_request = function(s)
          hits_a:inc(); hits_a:inc(); hits_b:inc(3)
          depth:set(2.5)
          lat:observe(0.5); lat:observe(0.25)
          plain:inc()
          moonlet.metrics.counter("legacy", 4)
        end }
        """)
        let cases = write("m.cases.yaml", """
        cases:
        - name: values
          request: {path: /x}
          expect:
            metrics:
              hits: 5
              'hits{route="a"}': 2
              'hits{code="200", route="b"}': 3
              depth: 2.5
              lat_seconds_count: 2
              'lat_seconds_sum{route="a"}': 0.75
              plain: 1
              legacy: 4
              moonlet_lua_legacy: 4
              moonlet_lua_executions_total: 1
        - name: wrong
          request: {path: /x}
          expect:
            metrics:
              hits: 4
              hitz: 0
              lat_seconds: 2
              'hits{route="c"}': 1
        """)
        let out = FilterTestCommand.run(filter: lua, cases: cases)
        XCTAssertEqual(out.exitCode, 1, out.output)
        XCTAssertFalse(out.output.contains(": values\n"), out.output)
        XCTAssertTrue(out.output.contains("metrics.hits:\n    expected: 4\n    got:      5"), out.output)
        XCTAssertTrue(out.output.contains("metrics.hitz:\n    expected: 0\n    got:      no metric hitz: the filter never registered or counted it (its metrics: depth, hits, lat_seconds, plain)"), out.output)
        XCTAssertTrue(out.output.contains("lat_seconds is a histogram: expect lat_seconds_count or lat_seconds_sum"), out.output)
        XCTAssertTrue(out.output.contains("no series hits{route=\"c\"} (series of hits: hits{route=\"a\"}, hits{code=\"200\",route=\"b\"})"), out.output)
    }

    func test_aCaseNamingAVariant_runsThatArmsFileWithItsOwnPluginConfig_andAnUnknownVariantIsAnError() throws {
        let v1 = write("v1.lua", """
        local f = {}
        function f.configure(cfg) return { prefix = cfg.prefix or "none-" } end
        function f.on_request(s, conf) s.request.headers:set("x-user", conf.prefix .. "k"); s.request.headers:set("x-arm", "v1 " .. tostring(moonlet.variant())) end
        return f
        """)
        _ = write("v2.lua", """
        local f = {}
        function f.configure(cfg) return { prefix = cfg.prefix or "none-" } end
        function f.on_request(s, conf) s.request.headers:set("x-user", conf.prefix .. "k"); s.request.headers:set("x-arm", "v2 " .. tostring(moonlet.variant())) end
        return f
        """)
        let resource = write("exp.yaml", """
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata: {name: exp}
        spec:
          pluginConfig: {prefix: base-}
          variants:
          - {name: control, url: "file://v1.lua", weight: 90, pluginConfig: {prefix: c-}}
          - {name: candidate, url: "file://v2.lua", weight: 10}
          shadow: {url: "file://v2.lua", pluginConfig: {prefix: s-}}
        """)
        let cases = write("exp.cases.yaml", """
        cases:
        - name: control
          variant: control
          request: {path: /x}
          expect: {upstream_request_headers: {x-user: c-k, x-arm: v1 control}}
        - name: candidate
          variant: candidate
          request: {path: /x}
          expect: {upstream_request_headers: {x-user: base-k, x-arm: v2 candidate}}
        - name: shadow
          variant: shadow
          request: {path: /x}
          expect: {upstream_request_headers: {x-user: s-k}}
        - name: no arm runs the file under test, with the resource's pluginConfig (its first arm's)
          request: {path: /x}
          expect: {upstream_request_headers: {x-user: c-k, x-arm: v1 nil}}
        """)
        let out = FilterTestCommand.run(filter: v1, cases: cases, pluginConfig: resource)
        XCTAssertEqual(out.exitCode, 0, out.output)
        XCTAssertEqual(out.output, "4 passed, 0 failed\n")

        let bad = write("bad.cases.yaml", """
        cases:
        - name: typo
          variant: candidat
          request: {path: /x}
        """)
        let out2 = FilterTestCommand.run(filter: v1, cases: bad, pluginConfig: resource)
        XCTAssertEqual(out2.exitCode, 1, out2.output)
        XCTAssertTrue(out2.output.contains("variant:\n    expected: one of the LuaPlugin's variants: candidate, control, shadow\n    got:      \"candidat\" in case \"typo\""), out2.output)
    }

    func test_aFilterDirectoryFromFilterNew_validates_itsCasesFileSkippedWithANote() throws {
        let paths = try FilterSkeleton.write(name: "gate", dir: dir + "/conf")
        XCTAssertTrue(ConfigLoader.isTestCaseFile(paths[1]))
        XCTAssertEqual(ConfigLoader.yamlFiles(at: dir + "/conf"), [dir + "/conf/gate.yaml"])
        XCTAssertEqual(ConfigLoader.testCaseFiles(at: dir + "/conf"), [dir + "/conf/gate.cases.yaml"])
        switch ConfigLoader().load(paths: [dir + "/conf"], securityScope: .anyWorkload) {
        case .failure(let e): XCTFail("\(e)")
        case .success(let snap):
            XCTAssertEqual(snap.plugins.map(\.name), ["gate"])
            XCTAssertTrue(snap.skipped.contains { $0.contains("gate.cases.yaml: skipped: a filter's test cases") }, "\(snap.skipped)")
        }
        // A cases file named on its own is still read (and refused: it is not a resource).
        XCTAssertEqual(ConfigLoader.yamlFiles(at: paths[1]), [paths[1]])
    }
}
