import XCTest
import NIOCore
@testable import MoonletProxy
import MoonletConfig
import MoonletCore
import MoonletTLS
import Crypto

/// The untrusted edge: request targets and Host, local replies that would break framing,
/// stalled request bodies, X-Forwarded-Client-Cert, the admin listener.
final class EdgeTests: XCTestCase {
    var up: TestUpstream!
    override func setUpWithError() throws { up = try TestUpstream { r in TestUpstream.Reply(body: "ok \(r.uri)") } }
    override func tearDown() { up?.stop() }

    // MARK: request targets and Host (RFC 9112 §3.2)

    func test_absoluteFormTarget_isForwardedInOriginForm_withItsAuthorityAsHost() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "who.lua": "return { on_response = function(s) s.response.headers:set('x-authority', s.request.authority); s.response.headers:set('x-path', s.request.path) end }",
            "who.yaml": ProxyFixture.plugin("who"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("GET http://other.example/abs?x=1 HTTP/1.1\r\nHost: original.example\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("x-authority"), "other.example", "filters see the target's authority")
        XCTAssertEqual(r.header("x-path"), "/abs?x=1")
        c.send("GET https://Other.Example:8443 HTTP/1.1\r\nHost: original.example\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        XCTAssertEqual(up.seen.map(\.uri), ["/abs?x=1", "/"], "the upstream gets origin-form")
        XCTAssertEqual(up.seen.map { $0.headers["host"] }, [["other.example"], ["Other.Example:8443"]], "one Host: the target's authority")
    }

    func test_absoluteFormTarget_isRoutedByItsAuthority() throws {
        let px = try ProxyFixture(appPort: 1, files: ["svc.yaml": meshService("catalog", ports: [up.port])])
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        c.send("GET http://catalog/items HTTP/1.1\r\nHost: unknown.example\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200, r.body)
        XCTAssertEqual(r.body, "ok /items")
        XCTAssertEqual(up.seen.first?.headers["host"], ["catalog"])
    }

    /// A fragment is never part of a request: with one, `/admin#x` got past a route's
    /// exact `/admin` and reached the app as it was (HTTP/2 :path: below).
    func test_targetThatIsNotOriginAbsoluteOrAsteriskForm_orHasAFragment_gets400_andNothingReachesTheApp() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        for line in ["GET abc HTTP/1.1", "GET * HTTP/1.1", "GET ftp://x/y HTTP/1.1", "GET http://user@x/y HTTP/1.1", "CONNECT /x HTTP/1.1",
                     "GET /admin#x HTTP/1.1", "GET /internal#/x HTTP/1.1", "GET /# HTTP/1.1", "GET http://app/a#b HTTP/1.1"] {
            let c = try RawClient(port: px.inbound)
            c.send("\(line)\r\nHost: app\r\n\r\n")
            XCTAssertEqual(c.read()?.status, 400, line)
            XCTAssertTrue(c.isClosed(), line)
        }
        XCTAssertEqual(up.seen.count, 0)
    }

    func test_invalidHostValues_get400_andNothingReachesTheApp() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        for host in ["a@b", "a, b", "a/b c", ":99999"] {
            let c = try RawClient(port: px.inbound)
            c.send("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n")
            XCTAssertEqual(c.read()?.status, 400, host)
        }
        XCTAssertEqual(up.seen.count, 0)
    }

    func test_http10RequestWithoutHost_isForwardedWithTheDestinationsHost_neverAnEmptyOne() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("GET /old HTTP/1.0\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        let c2 = try RawClient(port: px.inbound)
        c2.send("GET /empty HTTP/1.1\r\nHost:\r\n\r\n")
        XCTAssertEqual(c2.read()?.status, 200)
        XCTAssertEqual(up.seen.map { $0.headers["host"] }, [["127.0.0.1:\(up.port)"], ["127.0.0.1:\(up.port)"]])
    }

    /// HTTP/2: a request with neither :authority nor host, or an absolute-form :path, gets 400.
    /// Sends the connection preface, SETTINGS and `frames`; returns the first `bytes`
    /// bytes of stream 1's response HEADERS block (:status first) and the frames seen,
    /// for messages.
    static func h2ResponseStart(_ c: RawClient, _ frames: [UInt8], bytes: Int) -> (start: [UInt8]?, seen: String) {
        c.send(HTTP2Tests.preface + HTTP2Tests.frame(4, 0, 0) + frames)
        let got = HTTP2Tests.readFrames(c) { fs in fs.contains { $0.stream == 1 && ($0.type == 3 || $0.type == 1) } }
        let headers = got.first { $0.type == 1 && $0.stream == 1 }
        return (headers.map { Array($0.payload.prefix(bytes)) }, "\(got.map { ($0.type, $0.stream) })")
    }

    /// :status 400 is static-table index 12.
    static let status400: [UInt8] = [0x8c]
    /// A :status not in the static table: literal without indexing, name index 8.
    static func literalStatus(_ code: String) -> [UInt8] { [0x08, 3] + Array(code.utf8) }

    func test_http2RequestWithoutAuthority_withAnAbsolutePath_orWithAFragment_gets400() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let cases: [(String, [UInt8])] = [
            ("no :authority, no host", [0x82, 0x86, 0x84]),
            ("absolute :path", [0x82, 0x86, 0x41, 1, UInt8(ascii: "a"), 0x04, 12] + Array("http://x/abs".utf8)),
            // /admin#x got past a route's exact /admin.
            ("fragment in :path", [0x82, 0x86, 0x41, 1, UInt8(ascii: "a"), 0x04, 8] + Array("/admin#x".utf8)),
        ]
        for (what, block) in cases {
            let c = try RawClient(port: px.inbound)
            let r = Self.h2ResponseStart(c, HTTP2Tests.frame(1, 0x5, 1, block), bytes: 1)
            XCTAssertEqual(r.start, Self.status400, "\(what): \(r.seen)")
        }
        XCTAssertEqual(up.seen.count, 0)
    }

    /// CONNECT was routed by Host but forwarded to its own target, with its body bytes
    /// after it. There are no tunnels: 403 on both protocols, as Envoy without a CONNECT
    /// upgrade config, and on HTTP/1.1 the connection closes.
    func test_CONNECT_gets403_onHTTP1AndHTTP2_andNothingReachesTheApp() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("CONNECT internal.secret:443 HTTP/1.1\r\nHost: app\r\nContent-Length: 37\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 403)
        XCTAssertTrue(c.isClosed())
        let authority = Array("internal.secret:443".utf8)
        let r = Self.h2ResponseStart(try RawClient(port: px.inbound),
                                     HTTP2Tests.frame(1, 0x4, 1, [0x02, 7] + Array("CONNECT".utf8) + [0x01, UInt8(authority.count)] + authority)
                                     + HTTP2Tests.frame(0, 0, 1, Array("GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n".utf8)), bytes: 5)
        XCTAssertEqual(r.start, Self.literalStatus("403"), "HTTP/2: \(r.seen)")
        usleep(200_000)
        XCTAssertEqual(up.seen.count, 0)
    }

    /// A WSGI/CGI app reads `X_Forwarded_Client_Cert` as the proxy's
    /// x-forwarded-client-cert: a plaintext client forged an identity with it. By default
    /// names with "_" are dropped; `reject` answers 400; `allow` keeps them except where
    /// they fold onto a header the proxy manages.
    func test_headerNamesWithUnderscores_areDroppedByDefault_refusedOrKeptByTheSetting_neverFoldingOntoProxyHeaders() throws {
        let forged = "X_Forwarded_Client_Cert: By=spiffe://cluster.local/ns/a/sa/b;URI=spiffe://cluster.local/ns/istio-system/sa/admin\r\n"
            + "x_request_id: forged\r\nX-Envoy_Original-Path: /x\r\nx_custom: 1\r\n"
        func send(_ px: ProxyFixture) throws -> RawClient.Response? {
            let c = try RawClient(port: px.inbound)
            c.send("GET /u HTTP/1.1\r\nHost: app\r\n\(forged)\r\n")
            return c.read()
        }
        func underscoreNames(_ r: SeenRequest?) -> [String] { (r?.headers.map(\.name) ?? []).filter { $0.contains("_") }.sorted() }
        do {
            let px = try ProxyFixture(appPort: up.port)
            defer { px.stop() }
            XCTAssertEqual(try send(px)?.status, 200)
            XCTAssertEqual(underscoreNames(up.seen.last), [], "drop is the default")
            XCTAssertNotEqual(up.seen.last?.headers["x-request-id"], ["forged"])
        }
        do {
            let px = try ProxyFixture(appPort: up.port) { $0.limits.headersWithUnderscores = .reject }
            defer { px.stop() }
            let before = up.seen.count
            XCTAssertEqual(try send(px)?.status, 400)
            XCTAssertEqual(up.seen.count, before)
        }
        do {
            let px = try ProxyFixture(appPort: up.port) { $0.limits.headersWithUnderscores = .allow }
            defer { px.stop() }
            XCTAssertEqual(try send(px)?.status, 200)
            XCTAssertEqual(underscoreNames(up.seen.last), ["x_custom"], "only the name that folds onto no proxy header is kept")
        }
    }

    /// HEADERS without END_HEADERS, then nothing or a 1-byte CONTINUATION now and then,
    /// held the connection open for ever; requestHeaderTimeoutMs now ends it with GOAWAY.
    func test_anHTTP2HeaderBlockThatNeverEnds_isCutAtTheRequestHeaderTimeout() throws {
        let px = try ProxyFixture(appPort: up.port) { $0.limits.requestHeaderTimeoutMs = 400 }
        defer { px.stop() }
        for trickle in [false, true] {
            let c = try RawClient(port: px.inbound, timeoutSeconds: 5)
            let start = Date()
            c.send(HTTP2Tests.preface + HTTP2Tests.frame(4, 0, 0) + HTTP2Tests.frame(1, 0, 1, [0x82, 0x86]))
            if trickle { for _ in 0..<6 { usleep(150_000); c.send(HTTP2Tests.frame(9, 0, 1, [0x84])) } }
            let (types, closedAfter) = HTTP2Tests.readUntilClosed(c, within: 4)
            XCTAssertTrue(types.contains(7), "trickle \(trickle): GOAWAY, got \(types)")
            XCTAssertNotNil(closedAfter, "trickle \(trickle)")
            XCTAssertLessThan(Date().timeIntervalSince(start), 3, "trickle \(trickle)")
        }
    }

    /// A filter could set an authority or path the edge itself refuses (port 99999, an
    /// empty port, absolute-form, "*", no leading "/", a fragment): the parser's rules
    /// now apply to s.request.authority, headers:set("host") and s.request.path.
    func test_luaAuthorityHostAndPath_areCheckedWithTheParsersRules() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "set.lua": """
            return { on_request = function(s)
              local what, v = s.request.headers:get("x-what"), s.request.headers:get("x-v")
              local ok = pcall(function()
                if what == "authority" then s.request.authority = v
                elseif what == "host" then s.request.headers:set("host", v)
                else s.request.path = v end
              end)
              return s:respond(200, ok and "accepted" or "refused")
            end }
            """,
            "set.yaml": ProxyFixture.plugin("set"),
        ])
        defer { px.stop() }
        func verdict(_ what: String, _ v: String) throws -> String? {
            let c = try RawClient(port: px.inbound)
            return get(c, "/", headers: "x-what: \(what)\r\nx-v: \(v)\r\n")?.body
        }
        for v in ["beta.local:99999", "beta.local:", "a@b", "a,b"] {
            XCTAssertEqual(try verdict("authority", v), "refused", "authority \(v)")
            XCTAssertEqual(try verdict("host", v), "refused", "host \(v)")
        }
        for v in ["http://evil/x", "*", "abc", "/a#b"] { XCTAssertEqual(try verdict("path", v), "refused", "path \(v)") }
        for v in ["beta.local:8080", "beta.local", "[::1]:80"] { XCTAssertEqual(try verdict("authority", v), "accepted", v) }
        XCTAssertEqual(try verdict("path", "/ok?x=1"), "accepted")
        XCTAssertEqual(up.seen.count, 0)
    }

    // MARK: local replies that would break framing

    static let badReplies = """
    local f = {}
    function f.on_request(s)
      local case = s.request.headers:get("x-case")
      if case == "many" then
        local h = {}
        for i = 1, 120 do h["x-h" .. i] = "v" end
        return s:respond(200, "intended body", h)
      elseif case == "huge" then
        return s:respond(200, "intended body", { ["x-big"] = ("a"):rep(70 * 1024) })
      elseif case == "ctl" then
        return s:respond(200, "intended body", { ["x-a"] = "a\\1b", ["x-b"] = "a\\127b" })
      elseif case == "edge-size" then
        -- Under the old estimate of the head's size, just over the real one.
        local h = {}
        for i = 1, 4 do h["x-b" .. i] = ("a"):rep(15336) end
        return s:respond(200, "intended body", h)
      elseif case == "te" then
        return s:respond(200, "5\\r\\nhello\\r\\n0\\r\\n\\r\\n", { ["transfer-encoding"] = "chunked" })
      elseif case then
        return s:respond(200, "intended body")
      end
    end
    function f.on_response(s)
      local case = s.request.headers:get("x-case") or s.request.headers:get("x-late")
      if case == "ctl-late" then s.response.headers:set("x-c", "a\\1b") end
      if case == "interim" then s.response.status = 100 end
      if case == "no-content" then s.response.status = 204 end
      if case == "many-late" then for i = 1, 120 do s.response.headers:set("x-h" .. i, "v") end end
      if case == "huge-late" then for i = 1, 5 do s.response.headers:set("x-big" .. i, ("a"):rep(15 * 1024)) end end
    end
    return f
    """

    static let badCases = ["many", "huge", "ctl", "edge-size", "te", "interim", "many-late", "huge-late"]

    /// Each bad local reply becomes one clean 500 (or, for 204, a head without
    /// content-length and no body): the next request on the same connection is answered
    /// as itself, so nothing of the intended reply is read as a response. (s:respond's
    /// own argument checks may refuse some of these first; the 500 is the same.)
    func test_localRepliesThatWouldBreakFraming_becomeACleanResponse_andTheConnectionStaysInSync() throws {
        let px = try ProxyFixture(appPort: up.port, files: ["bad.lua": Self.badReplies, "bad.yaml": ProxyFixture.plugin("bad")])
        defer { px.stop() }
        for what in Self.badCases {
            let c = try RawClient(port: px.inbound)
            c.send("GET /bad HTTP/1.1\r\nHost: app\r\nx-case: \(what)\r\n\r\nGET /next HTTP/1.1\r\nHost: app\r\n\r\n")
            let r = try XCTUnwrap(c.read(), what)
            XCTAssertEqual(r.status, 500, what)
            XCTAssertFalse(r.body.contains("intended") || r.body.contains("hello"), "\(what): \(r.body)")
            XCTAssertNil(r.header("transfer-encoding"), what)
            let next = try XCTUnwrap(c.read(), what)
            XCTAssertEqual(next.status, 200, what)
            XCTAssertEqual(next.body, "ok /next", what)
        }
        let c = try RawClient(port: px.inbound)
        c.send("GET /bad HTTP/1.1\r\nHost: app\r\nx-case: no-content\r\n\r\nGET /next HTTP/1.1\r\nHost: app\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 204)
        XCTAssertNil(r.header("content-length"), "a 204 has no content-length")
        XCTAssertEqual(c.read()?.body, "ok /next", "nothing of the 204's intended body was sent")
        XCTAssertEqual(up.seen.map(\.uri), Array(repeating: "/next", count: Self.badCases.count + 1))
        let metrics = adminGet(px.admin, "/stats/prometheus")?.body ?? ""
        XCTAssertTrue(metrics.contains("moonlet_local_reply_invalid_total"), "the proxy's own check caught the late edits")
    }

    func test_localRepliesThatWouldBreakFraming_becomeA500_overHTTP2() throws {
        let px = try ProxyFixture(appPort: up.port, files: ["bad.lua": Self.badReplies, "bad.yaml": ProxyFixture.plugin("bad")])
        defer { px.stop() }
        for what in Self.badCases {
            let out = try runTool("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-H", "x-case: \(what)", "-w", " %{http_code}",
                                           "http://127.0.0.1:\(px.inbound)/bad"])
            XCTAssertTrue(out.hasSuffix(" 500") && !out.contains("intended"), "\(what): \(out)")
        }
    }

    /// The proxy's own check of a local reply, on replies built without the Lua binding
    /// (whose argument checks refuse most of these first in the tests above): each bad
    /// reply is named, a good one passes.
    func test_localReplyCheck_refusesBadRepliesBuiltWithoutTheBinding() {
        let limits = ProxyLimits()
        var many: [(name: String, value: String)] = []
        for i in 1...120 { many.append((name: "x-h\(i)", value: "v")) }
        let bad: [(String, LocalReply)] = [
            ("interim", LocalReply(status: 100, body: "")),
            ("out of range", LocalReply(status: 600, body: "")),
            ("many", LocalReply(status: 200, body: "b", headers: many)),
            ("huge", LocalReply(status: 200, body: "b", headers: [("x-big", String(repeating: "a", count: 70 * 1024))])),
            ("te", LocalReply(status: 200, body: "b", headers: [("transfer-encoding", "chunked")])),
            ("trailer", LocalReply(status: 200, body: "b", headers: [("trailer", "x")])),
            ("expect", LocalReply(status: 200, body: "b", headers: [("expect", "100-continue")])),
            ("ctl", LocalReply(status: 200, body: "b", headers: [("x-a", "a\u{1}b")])),
            ("del", LocalReply(status: 200, body: "b", headers: [("x-a", "a\u{7f}b")])),
            ("name", LocalReply(status: 200, body: "b", headers: [("x a", "v")])),
        ]
        for (what, r) in bad { XCTAssertNotNil(LocalReplyCheck.problem(r, limits: limits), what) }
        XCTAssertNil(LocalReplyCheck.problem(LocalReply(status: 200, body: "b", headers: [("x-a", "a\tb")]), limits: limits))
    }

    /// Response filters on an upstream response could add 120 headers or an 80 KB head
    /// (or a control character) with no check; the local-reply head check now applies
    /// there too: one clean 500 before a byte is written, and the connection stays in sync.
    func test_responseFilterEditsOfAnUpstreamResponse_thatBreakTheHeadLimits_becomeAClean500() throws {
        let px = try ProxyFixture(appPort: up.port, files: ["bad.lua": Self.badReplies, "bad.yaml": ProxyFixture.plugin("bad")])
        defer { px.stop() }
        for what in ["many-late", "huge-late", "ctl-late"] {
            let c = try RawClient(port: px.inbound)
            // x-late: the request goes upstream (on_request does not answer it).
            c.send("GET /up HTTP/1.1\r\nHost: app\r\nx-late: \(what)\r\n\r\nGET /next HTTP/1.1\r\nHost: app\r\n\r\n")
            let r = try XCTUnwrap(c.read(), what)
            XCTAssertEqual(r.status, 500, what)
            XCTAssertFalse(r.body.contains("ok /up"), what)
            XCTAssertEqual(c.read()?.body, "ok /next", what)
        }
    }

    /// An upstream response the parser took (up to 100 header lines), that no filter
    /// edited, is forwarded as it is when filters are configured: the proxy's own lines
    /// are not counted against the limit.
    func test_anUneditedUpstreamResponseWith98Headers_isForwarded_whenAFilterIsConfigured() throws {
        let many = try TestUpstream { _ in TestUpstream.Reply(headers: (1...97).map { ("x-h\($0)", "v") }, body: "ok many") }
        defer { many.stop() }
        let px = try ProxyFixture(appPort: many.port, files: ["bad.lua": Self.badReplies, "bad.yaml": ProxyFixture.plugin("bad")])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/many"))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.body, "ok many")
        XCTAssertEqual(r.header("x-h97"), "v")
    }

    /// The proxy's own lines sized by the client (its x-forwarded-for merged with the
    /// peer's address) do not use up what a filter may add: a 16 KiB set still works
    /// after a 50 KiB x-forwarded-for.
    func test_aClientsLargeForwardedFor_doesNotUseUpWhatAFilterMayAdd() throws {
        let lua = """
        local f = {}
        function f.on_request(s) s.request.headers:set("x-big", ("b"):rep(16 * 1024)) end
        return f
        """
        let px = try ProxyFixture(appPort: up.port, files: ["big.lua": lua, "big.yaml": ProxyFixture.plugin("big")])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let r = try XCTUnwrap(get(c, "/big", headers: "x-forwarded-for: \(String(repeating: "1", count: 50 * 1024))\r\n"))
        XCTAssertEqual(r.status, 200, r.body)
        XCTAssertEqual(up.seen.first?.headers["x-big"].first?.count, 16 * 1024)
    }

    /// A peer certificate from the mesh root with CR LF in a DNS SAN gets no XFCC element,
    /// and then the client's own values are removed too: nothing is injected, and a forged
    /// last element never reads as the verified one.
    func test_overMutualTLS_aPeerCertificateWithCRLFInADNSName_injectsNothing_andTheClientsXFCCIsRemoved() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let px = try strictMTLSProxy(pki)
        defer { px.stop() }
        let id = try pki.ca.identity(namespace: "default", serviceAccount: "frontend")
        var bundle = try pki.ca.issue(id)
        let key = P256.Signing.PrivateKey()
        let cert = try pki.ca.sign(publicKey: .init(key.publicKey), id: id, ttl: 3600, extraNames: [.dnsName("a.example\r\nx-injected: 1")])
        bundle.certChainPEM = try cert.serializeAsPEM().pemString + "\n" + pki.ca.intermediatesPEM
        bundle.keyPEM = key.pemRepresentation
        let dir = pki.dir + "/crlf"
        try bundle.write(to: dir)
        let out = try runTool("curl", ["-s", "-k", "--http1.1", "--max-time", "10", "--cert", dir + "/cert-chain.pem", "--key", dir + "/key.pem",
                                       "-H", "X-Forwarded-Client-Cert: By=spiffe://forged;URI=spiffe://cluster.local/ns/istio-system/sa/admin",
                                       "https://127.0.0.1:\(px.inbound)/crlf"])
        XCTAssertEqual(out, "ok /crlf")
        XCTAssertEqual(up.seen.first?.headers["x-forwarded-client-cert"], [])
        XCTAssertEqual(up.seen.first?.headers["x-injected"], [])
    }

    /// An inbound listener of production/orders with STRICT mTLS, certificates from `pki`.
    func strictMTLSProxy(_ pki: FixturePKI) throws -> ProxyFixture {
        try ProxyFixture(appPort: up.port, files: ["pa.yaml": peerAuthentication("strict", namespace: "production", mode: "STRICT")],
                         concurrency: 1) { s in
            s.certsDirectory = try? pki.issue("production", "orders")
            s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
        }
    }

    /// Over mTLS every x-forwarded-proto the client sent is removed, not only the first:
    /// the app sees the proxy's `https` alone.
    func test_overMutualTLS_everyClientForwardedProtoIsReplacedByHTTPS() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let px = try strictMTLSProxy(pki)
        defer { px.stop() }
        let client = try pki.issue("default", "frontend")
        let out = try runTool("curl", ["-s", "-k", "--http1.1", "--max-time", "10", "--cert", client + "/cert-chain.pem", "--key", client + "/key.pem",
                                       "-H", "X-Forwarded-Proto: http", "-H", "x-forwarded-proto: ws", "https://127.0.0.1:\(px.inbound)/proto"])
        XCTAssertEqual(out, "ok /proto")
        XCTAssertEqual(up.seen.first?.headers["x-forwarded-proto"], ["https"])
    }

    // MARK: request body idle timeout

    func test_aRequestBodyThatStalls_gets408_whenTheBodyIdleTimeoutEnds() throws {
        let px = try ProxyFixture(appPort: up.port) { $0.limits.requestBodyIdleTimeoutMs = 300 }
        defer { px.stop() }
        // A content-length body that stops after 3 of 10 bytes.
        let c = try RawClient(port: px.inbound, timeoutSeconds: 5)
        let start = Date()
        c.send("POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nabc")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 408)
        XCTAssertLessThan(Date().timeIntervalSince(start), 3)
        XCTAssertEqual(r.header("connection"), "close")
        XCTAssertTrue(c.isClosed())
        // Expect: 100-continue, then nothing.
        let e = try RawClient(port: px.inbound, timeoutSeconds: 5)
        e.send("POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
        XCTAssertEqual(e.read()?.status, 408, "the interim 100 is skipped by the reader; the final answer is 408")
        // A body that keeps coming in time is not cut.
        let slow = try RawClient(port: px.inbound, timeoutSeconds: 5)
        slow.send("POST /slow HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\n\r\n")
        for b in ["a", "b", "c", "d"] { usleep(150_000); slow.send(b) }
        XCTAssertEqual(slow.read()?.body, "ok /slow")
        let metrics = adminGet(px.admin, "/stats/prometheus")?.body ?? ""
        XCTAssertTrue(metrics.contains("response_code=\"408\""), metrics)
        XCTAssertTrue(metrics.contains("response_flags=\"SI\""), metrics)
    }

    /// One body byte before each idle timeout kept a request open for ever; the whole
    /// request must now arrive within requestTimeoutMs of its head (408), on both protocols.
    func test_aRequestBodyTricklingInBeforeEachIdleTimeout_gets408_whenTheRequestTimeoutEnds() throws {
        let px = try ProxyFixture(appPort: up.port) { $0.limits.requestBodyIdleTimeoutMs = 400; $0.limits.requestTimeoutMs = 1200 }
        defer { px.stop() }
        func trickle(_ c: RawClient, _ frame: @escaping ([UInt8]) -> [UInt8]) -> () -> Void {
            final class Stop: @unchecked Sendable { let lock = NSLock(); var stopped = false }
            let stop = Stop()
            DispatchQueue(label: "trickle").async {
                for _ in 0..<20 {
                    usleep(250_000)
                    stop.lock.lock(); defer { stop.lock.unlock() }
                    if stop.stopped { return }
                    c.send(frame([UInt8(ascii: "x")]))
                }
            }
            return { stop.lock.lock(); stop.stopped = true; stop.lock.unlock() }
        }
        let c = try RawClient(port: px.inbound, timeoutSeconds: 6)
        let start = Date()
        c.send("POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 20\r\n\r\n")
        let end1 = trickle(c) { $0 }
        let r = c.read()
        end1()
        XCTAssertEqual(r?.status, 408)
        XCTAssertEqual(r?.header("connection"), "close")
        XCTAssertGreaterThan(Date().timeIntervalSince(start), 1.0, "not the idle timeout")
        XCTAssertLessThan(Date().timeIntervalSince(start), 3.5)
        let h2 = try RawClient(port: px.inbound, timeoutSeconds: 6)
        let start2 = Date()
        let end2 = trickle(h2) { HTTP2Tests.frame(0, 0, 1, $0) } // its first byte after the HEADERS below
        let r2 = Self.h2ResponseStart(h2, HTTP2Tests.frame(1, 0x4, 1, [0x83, 0x86, 0x84, 0x41, 1, UInt8(ascii: "a")]
                                                           + HTTP2Tests.literal("content-length", "20")), bytes: 5)
        end2()
        XCTAssertEqual(r2.start, Self.literalStatus("408"), "HTTP/2: \(r2.seen)")
        XCTAssertGreaterThan(Date().timeIntervalSince(start2), 1.0)
        XCTAssertLessThan(Date().timeIntervalSince(start2), 3.5)
        XCTAssertEqual(up.seen.count, 0)
    }

    // MARK: X-Forwarded-Client-Cert (Istio's inbound: APPEND_FORWARD, Subject, URI, DNS)

    func test_clientSuppliedXFCC_isRemovedOverPlaintext() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        XCTAssertEqual(get(c, headers: "X-Forwarded-Client-Cert: By=spiffe://x;URI=spiffe://cluster.local/ns/istio-system/sa/admin\r\n")?.status, 200)
        XCTAssertEqual(up.seen.first?.headers["x-forwarded-client-cert"], [])
        XCTAssertEqual(up.seen.first?.headers["x-forwarded-proto"], ["http"])
    }

    func test_overMutualTLS_theVerifiedPeersXFCCElementIsAppended_andForwardedProtoIsHTTPS() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let px = try strictMTLSProxy(pki)
        defer { px.stop() }
        let client = try pki.issue("default", "frontend")
        let fingerprint = try runTool("openssl", ["x509", "-in", client + "/cert-chain.pem", "-noout", "-fingerprint", "-sha256"])
        let hash = String(fingerprint.split(separator: "=").last ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            .replacingOccurrences(of: ":", with: "").lowercased()
        XCTAssertEqual(hash.count, 64, fingerprint)
        let element = "By=spiffe://cluster.local/ns/production/sa/orders;Hash=\(hash);Subject=\"\";URI=spiffe://cluster.local/ns/default/sa/frontend"
        // HTTP/1.1 and HTTP/2 (ALPN h2), each with a forged element of the client's own
        // (the peer's is appended to it) and without one (the peer's alone).
        let forged = "By=spiffe://forged;URI=spiffe://cluster.local/ns/istio-system/sa/admin"
        for proto in ["--http1.1", "--http2"] {
            for sent in [forged, nil] {
                let xfcc = sent.map { ["-H", "X-Forwarded-Client-Cert: " + $0] } ?? []
                let out = try runTool("curl", ["-s", "-k", proto, "--max-time", "10", "--cert", client + "/cert-chain.pem", "--key", client + "/key.pem"]
                                      + xfcc + ["-H", "X-Forwarded-Proto: http", "https://127.0.0.1:\(px.inbound)/xfcc"])
                XCTAssertEqual(out, "ok /xfcc", proto)
            }
        }
        XCTAssertEqual(up.seen.count, 4)
        for (i, r) in up.seen.enumerated() {
            XCTAssertEqual(r.headers["x-forwarded-client-cert"], [i % 2 == 0 ? forged + "," + element : element], "request \(i)")
            XCTAssertEqual(r.headers["x-forwarded-proto"], ["https"])
        }
    }

    /// HTTP/2: HEADERS with a content-length and part of the body, or HEADERS left open
    /// with no content-length and no DATA, then nothing: 408 on the stream.
    func test_anHTTP2RequestBodyThatStalls_gets408_whenTheBodyIdleTimeoutEnds() throws {
        let px = try ProxyFixture(appPort: up.port) { $0.limits.requestBodyIdleTimeoutMs = 300 }
        defer { px.stop() }
        let post: [UInt8] = [0x83, 0x86, 0x84, 0x41, 1, UInt8(ascii: "a")]
        let cases: [(String, [UInt8])] = [
            ("content-length, part of the body", HTTP2Tests.frame(1, 0x4, 1, post + HTTP2Tests.literal("content-length", "10"))
                + HTTP2Tests.frame(0, 0, 1, Array("abc".utf8))),
            ("open HEADERS, no DATA", HTTP2Tests.frame(1, 0x4, 1, post)),
        ]
        for (what, frames) in cases {
            let start = Date()
            let r = Self.h2ResponseStart(try RawClient(port: px.inbound), frames, bytes: 5)
            XCTAssertEqual(r.start, Self.literalStatus("408"), "\(what): \(r.seen)")
            XCTAssertLessThan(Date().timeIntervalSince(start), 3, what)
        }
    }

    // MARK: admin

    /// With `--bind 0.0.0.0` the admin API stays on loopback; the Prometheus and health
    /// ports follow --bind and answer only their own paths (no config dump, no reload).
    func test_adminAPI_bindsToLoopback_whenTheListenersBindToEveryAddress() throws {
        let px = try ProxyFixture(appPort: up.port) { s in
            s.bindAddress = "0.0.0.0"
            s.prometheusPort = freePort()
            s.healthPort = freePort()
        }
        defer { px.stop() }
        XCTAssertEqual(px.server.listeners.first?.localAddress?.ipAddress, "0.0.0.0")
        XCTAssertEqual(px.server.adminChannels.map { $0.localAddress?.ipAddress }, ["127.0.0.1", "0.0.0.0", "0.0.0.0"])
        XCTAssertEqual(adminGet(px.admin, "/ready")?.status, 200)
        let prometheus = try XCTUnwrap(px.server.boundPorts["prometheus"]), health = try XCTUnwrap(px.server.boundPorts["health"])
        XCTAssertEqual(adminGet(prometheus, "/stats/prometheus")?.status, 200)
        XCTAssertEqual(adminGet(health, "/healthz/ready")?.status, 200)
        for port in [prometheus, health] {
            XCTAssertEqual(adminGet(port, "/config_dump")?.status, 404)
            XCTAssertEqual(adminGet(port, "/plugins/reload", method: "POST")?.status, 404)
        }
    }

    func test_adminPost_fromABrowserOnAnotherOrigin_isRefused() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        func post(_ headers: String) -> Int? {
            guard let c = try? RawClient(port: px.admin) else { return nil }
            c.send("POST /plugins/reload HTTP/1.1\r\n\(headers)Content-Length: 0\r\n\r\n")
            return c.read()?.status
        }
        let host = "127.0.0.1:\(px.admin)"
        XCTAssertEqual(post("Host: \(host)\r\nOrigin: http://evil.example\r\n"), 403)
        XCTAssertEqual(post("Host: \(host)\r\nOrigin: null\r\n"), 403)
        XCTAssertEqual(post("Host: \(host)\r\nSec-Fetch-Site: cross-site\r\n"), 403)
        // DNS rebinding: the page's own name pointed at 127.0.0.1.
        XCTAssertEqual(post("Host: evil.example:\(px.admin)\r\nOrigin: http://evil.example:\(px.admin)\r\n"), 403)
        XCTAssertEqual(post("Host: \(host)\r\nOrigin: http://\(host)\r\nSec-Fetch-Site: same-origin\r\n"), 200)
        XCTAssertEqual(post("Host: \(host)\r\n"), 200, "curl sends no Origin")
    }

    func test_configDump_redactsPluginConfigValuesNamedAsSecrets() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "p.lua": "return {}",
            "p.yaml": ProxyFixture.plugin("p", """
              pluginConfig:
                variant: b
                apiKey: sk-live-123
                login: {client_secret: hunter2, user: bob, tokens: [t1, t2]}
            """),
        ])
        defer { px.stop() }
        let dump = try XCTUnwrap(adminGet(px.admin, "/config_dump")).body
        XCTAssertTrue(dump.contains("\"variant\":\"b\""), dump)
        XCTAssertTrue(dump.contains("\"user\":\"bob\""), dump)
        XCTAssertTrue(dump.contains("\"apiKey\":\"[redacted]\""), dump)
        XCTAssertTrue(dump.contains("\"client_secret\":\"[redacted]\""), dump)
        for secret in ["sk-live-123", "hunter2", "t1"] { XCTAssertFalse(dump.contains(secret), secret) }
    }

    /// Key names the first redaction missed, passwords inside URLs, and the values of
    /// sensitive headers an Istio route sets or matches were shown by /config_dump.
    func test_configDump_redactsMoreSecretNames_passwordsInURLs_andSensitiveRouteHeaderValues() throws {
        let px = try ProxyFixture(appPort: up.port, files: [
            "p.lua": "return {}",
            "p.yaml": ProxyFixture.plugin("p", """
              pluginConfig:
                variant: b
                Authorization: s-authz
                bearer: s-bearer
                auth: s-auth
                pwd: s-pwd
                jwt: s-jwt
                cookie: s-cookie
                sessionId: s-session
                passphrase: s-pass
                hmac: s-hmac
                signature: s-sig
                clientCert: s-cert
                cache: "redis://user:s-redis@cache:6379/0"
                hook: "https://s-urltoken@hooks.example/x"
                docs: "https://docs.example/a@b"
            """),
            "vs.yaml": """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: vs, namespace: default}
            spec:
              hosts: [catalog]
              http:
              - match:
                - headers:
                    authorization: {exact: Bearer s-match}
                headers:
                  request:
                    set: {authorization: Bearer s-set, x-api-key: s-apikey, x-env: prod}
                route:
                - destination: {host: catalog}
            """,
        ])
        defer { px.stop() }
        let dump = try XCTUnwrap(adminGet(px.admin, "/config_dump")).body
        XCTAssertTrue(dump.contains("\"variant\":\"b\""), dump)
        XCTAssertTrue(dump.contains("redis://user:[redacted]@cache:6379/0"), dump)
        XCTAssertTrue(dump.contains("https://docs.example/a@b"), "an @ in the path is no userinfo")
        XCTAssertTrue(dump.contains("\"x-env\":\"prod\""), dump)
        XCTAssertTrue(dump.contains("VirtualService"), dump)
        XCTAssertFalse(dump.contains("s-"), dump)
    }

    /// /config_dump was readable by a page whose DNS name rebinds to 127.0.0.1: the admin
    /// API now checks Host on every request, not only on POST.
    func test_adminReads_addressedByAnyNameButLocalhostOrAnIP_areRefused() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        func status(_ host: String, _ path: String) -> Int? {
            guard let c = try? RawClient(port: px.admin) else { return nil }
            c.send("GET \(path) HTTP/1.1\r\nHost: \(host)\r\n\r\n")
            return c.read()?.status
        }
        for path in ["/config_dump", "/clusters", "/stats/prometheus", "/plugins", "/ready"] {
            XCTAssertEqual(status("attacker.example:\(px.admin)", path), 403, path)
            XCTAssertEqual(status("127.0.0.1:\(px.admin)", path), 200, path)
            XCTAssertEqual(status("localhost:\(px.admin)", path), 200, path)
            XCTAssertEqual(status("[::1]:\(px.admin)", path), 200, path)
        }
    }

    func test_clusters_onAnInboundOnlySidecar_saysNoClusters() throws {
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        XCTAssertEqual(adminGet(px.admin, "/clusters")?.body, "no clusters\n")
    }

    func test_aPortInUse_namesTheAddressTheListenerAndTheFlag() throws {
        let taken = try TestUpstream()
        defer { taken.stop() }
        XCTAssertThrowsError(try ProxyFixture(appPort: up.port) { $0.outboundPort = taken.port }) { e in
            let text = "\(e)"
            XCTAssertTrue(text.contains("127.0.0.1:\(taken.port)"), text)
            XCTAssertTrue(text.contains("outbound listener"), text)
            XCTAssertTrue(text.contains("--outbound-port"), text)
            XCTAssertTrue(text.contains("address already in use"), text)
        }
    }
}
