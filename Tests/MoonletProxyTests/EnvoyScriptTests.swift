import XCTest
import NIOCore
import NIOHTTP1
@testable import MoonletProxy
import MoonletConfig

/// Envoy Lua scripts (envoy_on_request / envoy_on_response) run as LuaPlugins, through
/// the proxy with real sockets. The scripts follow the examples of Envoy's Lua filter
/// documentation.
final class EnvoyScriptTests: XCTestCase {
    var app: TestUpstream!

    override func setUpWithError() throws {
        app = try TestUpstream { r in
            var reply = TestUpstream.Reply()
            reply.headers = [("x-upstream-secret", "s"), ("x-app", "1")]
            reply.body = "app:\(r.body)"
            return reply
        }
    }
    override func tearDown() { app?.stop() }

    func proxy(_ script: String, extra: String = "", files: [String: String] = [:], logger: CapturedLog? = nil,
               tweak: (inout ProxySettings) -> Void = { _ in }) throws -> ProxyFixture {
        var all = files
        all["envoy.lua"] = script
        all["envoy.yaml"] = ProxyFixture.plugin("envoy", extra)
        return try ProxyFixture(appPort: app.port, files: all, concurrency: 1, logger: logger?.logger, tweak: tweak)
    }

    func testEnvoyScriptReadsAndEditsHeadersAndPseudoHeaders_andPassesDynamicMetadataToTheResponse() throws {
        let px = try proxy("""
        function envoy_on_request(request_handle)
          local h = request_handle:headers()
          h:add("x-method", h:get(":method"))
          h:add("x-authority", h:get(":authority"))
          h:add("x-scheme", h:get(":scheme"))
          h:add("x-multi-count", h:getNumValues("x-multi"))
          h:add("x-multi-joined", h:get("x-multi"))
          h:add("x-multi-second", h:getAtIndex("x-multi", 1))
          h:add("x-none", tostring(h:get("x-absent")) .. "," .. tostring(h:getAtIndex("x-multi", 5)))
          h:replace("x-replace", "new")
          h:remove("x-secret")
          local names = {}
          for k, v in pairs(h) do names[#names + 1] = k end
          h:add("x-names", table.concat(names, " "))
          local info = request_handle:streamInfo()
          info:dynamicMetadata():set("envoy.filters.http.lua", "request.info", { path = h:get(":path") })
          h:replace(":path", "/rewritten" .. h:get(":path"))
          h:add("x-proto", info:protocol())
          h:add("x-remote", info:downstreamDirectRemoteAddress())
          h:add("x-local", info:downstreamLocalAddress())
          h:add("x-ssl", tostring(request_handle:connection():ssl()))
          h:add("x-b64", request_handle:base64Escape("hi\\0there"))
          h:add("x-meta", request_handle:metadata():get("greeting"))
          h:add("x-ts", tostring(request_handle:timestamp() > 1600000000000))
          h:add("x-trailers", tostring(request_handle:trailers()))
          request_handle:logInfo("Path: " .. h:get(":path"))
        end

        function envoy_on_response(response_handle)
          local h = response_handle:headers()
          h:add("x-status-seen", h:get(":status"))
          local meta = response_handle:streamInfo():dynamicMetadata():get("envoy.filters.http.lua")["request.info"]
          h:add("x-original-path", meta.path)
          h:remove("x-upstream-secret")
        end
        """, extra: "  pluginConfig:\n    greeting: hello\n")
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/p?q=1", headers: "x-multi: a\r\nx-multi: b\r\nx-replace: old\r\nx-secret: 1\r\n"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("x-status-seen"), "200")
        XCTAssertEqual(r.header("x-original-path"), "/p?q=1")
        XCTAssertNil(r.header("x-upstream-secret"))
        XCTAssertEqual(r.header("x-app"), "1")
        let seen = try XCTUnwrap(app.seen.first)
        XCTAssertEqual(seen.uri, "/rewritten/p?q=1")
        XCTAssertEqual(seen.headers["x-method"], ["GET"])
        XCTAssertEqual(seen.headers["x-authority"], ["app"])
        XCTAssertEqual(seen.headers["x-scheme"], ["http"])
        XCTAssertEqual(seen.headers["x-multi-count"], ["2"])
        XCTAssertEqual(seen.headers["x-multi-joined"], ["a,b"])
        XCTAssertEqual(seen.headers["x-multi-second"], ["b"])
        XCTAssertEqual(seen.headers["x-none"], ["nil,nil"])
        XCTAssertEqual(seen.headers["x-replace"], ["new"])
        XCTAssertFalse(seen.headers.contains(name: "x-secret"))
        let names = seen.headers["x-names"].first ?? ""
        XCTAssertTrue(names.hasPrefix(":authority :path :method :scheme "), names)
        XCTAssertTrue(names.contains("x-multi"), names)
        XCTAssertEqual(seen.headers["x-proto"], ["HTTP/1.1"])
        XCTAssertTrue(seen.headers["x-remote"].first?.hasPrefix("127.0.0.1:") ?? false)
        XCTAssertEqual(seen.headers["x-local"], ["127.0.0.1:\(px.inbound)"])
        XCTAssertEqual(seen.headers["x-ssl"], ["nil"])
        XCTAssertEqual(seen.headers["x-b64"], ["aGkAdGhlcmU="])
        XCTAssertEqual(seen.headers["x-meta"], ["hello"])
        XCTAssertEqual(seen.headers["x-ts"], ["true"])
        XCTAssertEqual(seen.headers["x-trailers"], ["nil"])
    }

    func testRespondWith403EndsTheScript_andNothingGoesUpstream() throws {
        let px = try proxy("""
        function envoy_on_request(request_handle)
          if request_handle:headers():get("x-deny") then
            request_handle:respond({[":status"] = "403", ["upstream_foo"] = "bar"}, "nope")
            request_handle:headers():add("x-after-respond", "ran")
          end
          request_handle:headers():add("x-allowed", "yes")
        end
        """)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let denied = try XCTUnwrap(get(c, headers: "x-deny: 1\r\n"))
        XCTAssertEqual(denied.status, 403)
        XCTAssertEqual(denied.body, "nope")
        XCTAssertEqual(denied.header("upstream_foo"), "bar")
        XCTAssertEqual(app.seen.count, 0)
        XCTAssertEqual(get(c)?.status, 200)
        XCTAssertEqual(app.seen.first?.headers["x-allowed"], ["yes"])
        XCTAssertFalse(app.seen.first?.headers.contains(name: "x-after-respond") ?? true)
        let plugins = adminGet(px.admin, "/plugins")?.body ?? ""
        XCTAssertTrue(plugins.contains("\"errors\":0"), plugins)
    }

    func testAScriptErrorIsLoggedAndCounted_andTheRequestContinuesAsInEnvoy() throws {
        let log = CapturedLog()
        let px = try proxy("""
        function envoy_on_request(request_handle)
          request_handle:headers():add("x-before", "1")
          local t = nil
          request_handle:headers():add("x-crash", t.field)
        end
        function envoy_on_response(response_handle)
          response_handle:headers():add("x-resp", "1")
          local missing = nil
          response_handle:headers():add("x-size", missing.length)
        end
        """, logger: log)
        defer { px.stop() }
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound)))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("x-resp"), "1")
        XCTAssertNil(r.header("x-size"))
        XCTAssertEqual(app.seen.first?.headers["x-before"], ["1"])
        XCTAssertTrue(log.contains("envoy_on_request: "), log.all.joined(separator: "\n"))
        XCTAssertTrue(log.contains("envoy.lua:4:"), log.all.joined(separator: "\n"))
        XCTAssertTrue(log.contains("envoy_on_response: "), log.all.joined(separator: "\n"))
        let plugins = adminGet(px.admin, "/plugins")?.body ?? ""
        XCTAssertTrue(plugins.contains("\"errors\":2"), plugins)
    }

    func testBodyReadsTheWholeRequestBody_andSetBytesReplacesIt() throws {
        let px = try proxy("""
        function envoy_on_request(request_handle)
          local body = request_handle:body()
          if body == nil then
            request_handle:headers():add("request_body_size", "none")
            return
          end
          request_handle:headers():add("request_body_size", body:length())
          request_handle:headers():add("request_body_head", body:getBytes(0, 5))
          if request_handle:headers():get("x-replace") then
            body:setBytes("replaced:" .. body:getBytes(0, body:length()))
          end
          for chunk in request_handle:bodyChunks() do
            request_handle:headers():add("x-chunk", chunk:length())
          end
        end
        """)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 11\r\n\r\nhello world")
        XCTAssertEqual(c.read()?.body, "app:hello world")
        XCTAssertEqual(app.seen.last?.headers["request_body_size"], ["11"])
        XCTAssertEqual(app.seen.last?.headers["request_body_head"], ["hello"])
        XCTAssertEqual(app.seen.last?.headers["x-chunk"], ["11"])
        c.send("POST /b HTTP/1.1\r\nHost: app\r\nx-replace: 1\r\nContent-Length: 11\r\n\r\nhello world")
        XCTAssertEqual(c.read()?.body, "app:replaced:hello world")
        XCTAssertEqual(app.seen.last?.headers["content-length"], ["20"])
        c.send("POST /c HTTP/1.1\r\nHost: app\r\nx-replace: 1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        XCTAssertEqual(c.read()?.body, "app:replaced:hello world")
        XCTAssertEqual(get(c, "/d")?.status, 200)
        XCTAssertEqual(app.seen.last?.headers["request_body_size"], ["none"])
    }

    func testHttpCallToAClusterReturnsHeadersAndBody_asInEnvoysExample() throws {
        let callee = try TestUpstream { r in
            var reply = TestUpstream.Reply()
            reply.headers = [("foo", "from-callee")]
            reply.body = "got:\(r.method):\(r.uri):\(r.body)"
            return reply
        }
        defer { callee.stop() }
        let refusing = try RefusingPort()
        let px = try proxy("""
        function envoy_on_request(request_handle)
          local headers, body = request_handle:httpCall(
            "outbound|80||lua-cluster.example.com",
            {
              [":method"] = "POST",
              [":path"] = "/check",
              [":authority"] = "lua_cluster",
              ["set-cookie"] = { "lang=lua; Path=/", "type=binding; Path=/" }
            },
            "hello world",
            5000)
          request_handle:httpCall("lua-cluster.example.com", {[":method"] = "POST", [":path"] = "/async", [":authority"] = "lua_cluster"},
            "fire and forget", 1000, true)
          request_handle:headers():add("upstream_foo", headers["foo"])
          request_handle:headers():add("upstream_status", headers[":status"])
          request_handle:headers():add("upstream_body", body)
          if request_handle:headers():get("x-fail") then
            local h2, b2 = request_handle:httpCall("down.example.com",
              {[":method"] = "GET", [":path"] = "/", [":authority"] = "x"}, nil, {timeout_ms = 1000, asynchronous = false})
            request_handle:headers():add("failed_status", h2[":status"])
            request_handle:headers():add("failed_body", b2)
          end
        end
        """, files: ["svc.yaml": meshService("lua-cluster.example.com", ports: [callee.port]),
                     "down.yaml": meshService("down.example.com", ports: [refusing.port])])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c)?.status, 200)
        let seen = try XCTUnwrap(app.seen.last)
        XCTAssertEqual(seen.headers["upstream_foo"], ["from-callee"])
        XCTAssertEqual(seen.headers["upstream_status"], ["200"])
        XCTAssertEqual(seen.headers["upstream_body"], ["got:POST:/check:hello world"])
        // The asynchronous call is sent; the script did not wait for it.
        XCTAssertTrue((0..<300).contains { _ in usleep(10_000); return callee.seen.contains { $0.uri == "/async" && $0.body == "fire and forget" } })
        let call = try XCTUnwrap(callee.seen.first { $0.uri == "/check" })
        XCTAssertEqual(call.headers["host"], ["lua_cluster"])
        XCTAssertEqual(call.headers["set-cookie"], ["lang=lua; Path=/", "type=binding; Path=/"])
        // A call that fails gets Envoy's 503 (the script goes on).
        XCTAssertEqual(get(c, headers: "x-fail: 1\r\n")?.status, 200)
        XCTAssertEqual(app.seen.last?.headers["failed_status"], ["503"])
        XCTAssertEqual(app.seen.last?.headers["failed_body"], ["upstream failure"])
    }

    func testAsynchronousHttpCallsInFlightAreBounded_andSetBytesIsBoundedByTheBufferedBodyLimit() throws {
        // Nothing waits for an asynchronous httpCall, so only this bound keeps a script
        // from opening connections (and copying bodies) without end.
        let slow = try TestUpstream { _ in var r = TestUpstream.Reply(); r.delayMs = 3000; return r }
        defer { slow.stop() }
        let px = try proxy("""
        function envoy_on_request(h)
          if h:headers():get("x-big") then
            local ok, err = pcall(function() h:body():setBytes(string.rep("A", 2 * 1024 * 1024)) end)
            h:headers():add("x-set", tostring(ok) .. ":" .. tostring(err))
            return
          end
          local sent, refused = 0, 0
          for i = 1, 100 do
            local ok = pcall(h.httpCall, h, "slow.example.com", {[":method"] = "POST", [":path"] = "/f", [":authority"] = "a"}, "x", 5000, true)
            if ok then sent = sent + 1 else refused = refused + 1 end
          end
          h:headers():add("x-sent", sent)
          h:headers():add("x-refused", refused)
        end
        """, files: ["svc.yaml": meshService("slow.example.com", ports: [slow.port])])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c)?.status, 200)
        XCTAssertEqual(app.seen.last?.headers["x-sent"], ["64"])
        XCTAssertEqual(app.seen.last?.headers["x-refused"], ["36"])
        c.send("POST /b HTTP/1.1\r\nHost: app\r\nx-big: 1\r\nContent-Length: 5\r\n\r\nhello")
        XCTAssertEqual(c.read()?.body, "app:hello")
        let set = app.seen.last?.headers["x-set"].first ?? ""
        XCTAssertTrue(set.hasPrefix("false:") && set.contains("larger than the proxy's buffered body bound"), set)
    }

    func testSslOverMutualTLS_givesThePeersSpiffeID_andPlaintextGivesNil() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let px = try proxy("""
        function envoy_on_response(response_handle)
          local ssl = response_handle:connection():ssl()
          local h = response_handle:headers()
          if ssl == nil then h:add("x-tls", "plain"); return end
          h:add("x-tls", tostring(ssl:peerCertificatePresented()))
          h:add("x-peer-san", ssl:uriSanPeerCertificate()[1])
          h:add("x-local-san", ssl:uriSanLocalCertificate()[1])
          h:add("x-same", tostring(response_handle:streamInfo():downstreamSslConnection() ~= nil))
        end
        """, files: ["pa.yaml": peerAuthentication("mesh", namespace: "istio-system", mode: "PERMISSIVE")]) { s in
            s.certsDirectory = try? pki.issue("production", "orders")
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
        }
        defer { px.stop() }
        let tls = try tlsRequest(port: px.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM).get()
        XCTAssertEqual(tls.status, 200)
        XCTAssertEqual(tls.headers.first(name: "x-tls"), "true")
        XCTAssertEqual(tls.headers.first(name: "x-peer-san"), "spiffe://cluster.local/ns/default/sa/frontend")
        XCTAssertEqual(tls.headers.first(name: "x-local-san"), "spiffe://cluster.local/ns/production/sa/orders")
        XCTAssertEqual(tls.headers.first(name: "x-same"), "true")
        XCTAssertEqual(get(try RawClient(port: px.inbound))?.header("x-tls"), "plain")
    }

    func testSetUpstreamOverrideHost_afterTheRouterPicksTheNamedEndpoint() throws {
        let other = try TestUpstream { _ in var r = TestUpstream.Reply(); r.body = "other"; return r }
        defer { other.stop() }
        let svc = meshService("pinned.example.com", ports: [app.port, other.port])
        let px = try proxy("""
        function envoy_on_request(request_handle)
          local pin = request_handle:headers():get("x-pin")
          if pin then request_handle:setUpstreamOverrideHost(pin, true) end
        end
        """, extra: "  phase: STATS\n", files: ["svc.yaml": svc])
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        for _ in 0..<4 {
            c.send("GET / HTTP/1.1\r\nHost: pinned.example.com\r\nx-pin: 127.0.0.1:\(other.port)\r\n\r\n")
            XCTAssertEqual(c.read()?.body, "other")
        }
        c.send("GET / HTTP/1.1\r\nHost: pinned.example.com\r\nx-pin: 10.9.9.9\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 503)
        // The script unchanged, in the default phase (before Istio's router, as Envoy's Lua
        // filter runs before its router): the router pins the host once it chose the cluster.
        let early = try proxy("""
        function envoy_on_request(request_handle)
          local pin = request_handle:headers():get("x-pin")
          if pin then request_handle:setUpstreamOverrideHost(pin, request_handle:headers():get("x-strict") ~= nil) end
        end
        """, files: ["svc.yaml": svc])
        defer { early.stop() }
        let e = try RawClient(port: early.outbound)
        for _ in 0..<4 {
            e.send("GET / HTTP/1.1\r\nHost: pinned.example.com\r\nx-pin: 127.0.0.1:\(other.port)\r\n\r\n")
            XCTAssertEqual(e.read()?.body, "other")
        }
        e.send("GET / HTTP/1.1\r\nHost: pinned.example.com\r\nx-pin: 10.9.9.9\r\nx-strict: 1\r\n\r\n")
        XCTAssertEqual(e.read()?.status, 503, "strict: not an endpoint of the routed cluster")
        e.send("GET / HTTP/1.1\r\nHost: pinned.example.com\r\nx-pin: 10.9.9.9\r\n\r\n")
        XCTAssertEqual(e.read()?.status, 200, "not strict: the balancer picks")
    }

    // MARK: SDK audit (issue 20): Envoy behaviours the adapter lacked

    func testRespondWithAListValue_sendsOneHeaderLinePerValue_asEnvoyDoesForSetCookie() throws {
        let px = try proxy("""
        function envoy_on_request(request_handle)
          request_handle:respond({[":status"] = "403", ["set-cookie"] = {"a=1; Path=/", "b=2; Path=/"}}, "nope")
        end
        """)
        defer { px.stop() }
        let r = try XCTUnwrap(get(try RawClient(port: px.inbound)))
        XCTAssertEqual(r.status, 403)
        XCTAssertEqual(r.all("set-cookie"), ["a=1; Path=/", "b=2; Path=/"])
        XCTAssertEqual(r.body, "nope")
    }

    func testReplacingStatusInEnvoyOnResponse_changesTheUpstreamsStatus_butNotToOrFromABodilessOne() throws {
        let px = try proxy("""
        function envoy_on_response(response_handle)
          local h = response_handle:headers()
          h:replace(":status", "201")
          h:add("x-seen", h:get(":status"))
          local ok, err = pcall(h.replace, h, ":status", "204")
          h:add("x-204", tostring(ok))
        end
        """)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c))
        XCTAssertEqual(r.status, 201)
        XCTAssertEqual(r.header("x-seen"), "201")
        XCTAssertEqual(r.header("x-204"), "false")
        XCTAssertEqual(r.body, "app:")
        // The connection goes on: the body's framing was kept.
        XCTAssertEqual(get(c)?.status, 201)
    }

    func testLogMethods_nameTheScriptsLine_notTheAdapters() throws {
        let log = CapturedLog()
        let px = try proxy("""
        function envoy_on_request(request_handle)
          request_handle:logInfo("first")
          request_handle:log(3, "second")
        end
        """, logger: log)
        defer { px.stop() }
        XCTAssertEqual(get(try RawClient(port: px.inbound))?.status, 200)
        XCTAssertTrue(log.contains("envoy.lua:2: first"), log.all.joined(separator: "\n"))
        XCTAssertTrue(log.contains("envoy.lua:3: second"), log.all.joined(separator: "\n"))
        XCTAssertFalse(log.contains("envoy-adapter"), log.all.joined(separator: "\n"))
    }

    func testStreamInfo_givesTheClientsSNI_overMutualTLS_andEmptyOnPlaintext() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        for mode in ["PERMISSIVE", "STRICT"] {
            let px = try proxy("""
            function envoy_on_response(response_handle)
              response_handle:headers():add("x-sni", "[" .. response_handle:streamInfo():requestedServerName() .. "]")
            end
            """, files: ["pa.yaml": peerAuthentication("mesh", namespace: "istio-system", mode: mode)]) { s in
                s.certsDirectory = try? pki.issue("production", "orders")
                s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
            }
            defer { px.stop() }
            let tls = try tlsRequest(port: px.inbound, certDir: try pki.issue("default", "frontend"), rootPEM: pki.ca.rootCertPEM,
                                     serverName: "orders.production.svc.cluster.local").get()
            XCTAssertEqual(tls.status, 200, mode)
            XCTAssertEqual(tls.headers.first(name: "x-sni"), "[orders.production.svc.cluster.local]", mode)
            if mode == "PERMISSIVE" { XCTAssertEqual(get(try RawClient(port: px.inbound))?.header("x-sni"), "[]") }
        }
    }

    func testStreamInfoRouteName_isTheVirtualServiceRoutesName_orDefault_asRouteNameLogsIt() throws {
        let vs = """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: named}
        spec:
          hosts: [named.example.com]
          http:
          - name: to-app
            match: [{uri: {prefix: /named}}]
            route: [{destination: {host: named.example.com}}]
          - route: [{destination: {host: named.example.com}}]
        """
        let px = try proxy("""
        function envoy_on_response(response_handle)
          response_handle:headers():add("x-route", "[" .. response_handle:streamInfo():routeName() .. "]")
        end
        """, extra: "  phase: STATS\n", files: ["svc.yaml": meshService("named.example.com", ports: [app.port], extra: vs),
                                                "plain.yaml": meshService("plain.example.com", ports: [app.port])])
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        c.send("GET /named HTTP/1.1\r\nHost: named.example.com\r\n\r\n")
        XCTAssertEqual(c.read()?.header("x-route"), "[to-app]")
        c.send("GET /other HTTP/1.1\r\nHost: named.example.com\r\n\r\n")
        XCTAssertEqual(c.read()?.header("x-route"), "[]")
        c.send("GET / HTTP/1.1\r\nHost: plain.example.com\r\n\r\n")
        XCTAssertEqual(c.read()?.header("x-route"), "[default]")
    }

    func testHttpCallInEnvoyOnResponse_waitsAndTheResponseGoesOnAfterIt_asInEnvoy() throws {
        let callee = try TestUpstream { _ in
            var r = TestUpstream.Reply(); r.headers = [("x-verdict", "tag-me")]; r.body = "ok"; r.delayMs = 200; return r
        }
        defer { callee.stop() }
        let px = try proxy("""
        function envoy_on_response(response_handle)
          local headers, body = response_handle:httpCall("http://127.0.0.1:\(callee.port)",
            {[":method"] = "GET", [":path"] = "/verdict", [":authority"] = "policy"}, "", 2000)
          response_handle:headers():add("x-verdict", headers["x-verdict"] .. "/" .. tostring(body))
        end
        """)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        for _ in 0..<2 {
            let r = try XCTUnwrap(get(c))
            XCTAssertEqual(r.status, 200)
            XCTAssertEqual(r.header("x-verdict"), "tag-me/ok")
            XCTAssertEqual(r.body, "app:")
        }
        XCTAssertEqual(callee.seen.last?.uri, "/verdict")
    }
}
