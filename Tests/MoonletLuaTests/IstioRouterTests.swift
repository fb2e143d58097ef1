import XCTest
import NIOCore
import Logging
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// Drives plugins/istio-router.lua (the builtin) over a configuration snapshot, one
/// stream at a time, without sockets: what it wrote on the stream is the decision.
class RouterHarness: XCTestCase {
    static let endpoints = """
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: svc, namespace: default}
    spec:
      hosts: [svc]
      resolution: STATIC
      ports: [{number: 8080, name: http}]
      workloadSelector: {labels: {app: svc}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {name: svc-v1, namespace: default}
    spec: {address: 10.0.0.1, ports: {http: 9001}, labels: {app: svc, version: v1}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: WorkloadEntry
    metadata: {name: svc-v2, namespace: default}
    spec: {address: 10.0.0.2, ports: {http: 9002}, labels: {app: svc, version: v2}}
    ---
    apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {name: svc, namespace: default}
    spec:
      host: svc
      subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """

    /// A VirtualService for host svc with `http` as its route list (indented two spaces).
    static func vs(_ http: String) -> String {
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: svc, namespace: default}\nspec:\n  hosts: [svc]\n  http:\n" + http
    }

    var lua: LuaHost!
    var runtime: LuaLoopRuntime!
    var chain: FilterChain!
    var snap: ConfigSnapshot!
    var nextID: UInt64 = 1

    /// Loads `yaml` (a directory of one file) and the builtin router for it.
    func configure(_ yaml: String, labels: [String: String] = [:], specs: [LuaPluginSpec] = [.builtinRouter], dir: String? = nil) throws {
        let d = dir ?? NSTemporaryDirectory() + "moonlet-router-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        try yaml.write(toFile: d + "/all.yaml", atomically: true, encoding: .utf8)
        snap = try ConfigLoader().load(paths: [d + "/all.yaml"], namespace: "default", labels: labels).get()
        lua = LuaHost(logger: Logger(label: "test"))
        runtime = LuaLoopRuntime(host: lua, metrics: nil)
        chain = FilterChain(runtime.filters(for: try lua.prepare(specs).get()))
    }

    /// The endpoints of the fixture plus `extra`.
    func configure(vs extra: String, labels: [String: String] = [:]) throws {
        try configure(Self.endpoints + "\n---\n" + extra, labels: labels)
    }

    /// Runs one request through the router; the returned stream holds the decision.
    @discardableResult
    func route(_ path: String = "/", method: String = "GET", host: String = "svc", headers: [(String, String)] = [], port: Int = 0) -> ProxyStream {
        var raw = "\(method) \(path) HTTP/1.1\r\nHost: \(host)\r\n"
        for (n, v) in headers { raw += "\(n): \(v)\r\n" }
        raw += "\r\n"
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: raw)) else { fatalError("bad request \(raw)") }
        nextID += 1
        let s = ProxyStream(id: nextID, request: h, source: PeerInfo(address: "10.1.2.3:4567"), filterCount: 0, startNanos: 0)
        s.config = snap
        s.destination.port = port
        _ = chain.runRequest(s)
        chain.runLog(s)
        runtime.endStream(s)
        s.end()
        return s
    }

    /// The subset a request was sent to, nil when answered locally.
    func subset(_ s: ProxyStream) -> String? { s.localReply == nil && !s.route.cluster.isEmpty ? s.route.subset : nil }
}

/// VirtualService match kinds, host forms, weights and actions, through istio-router.lua.
final class IstioRouterTests: RouterHarness {
    func test_matchKinds_eachDecideTheRoute_tableDriven() throws {
        try configure(vs: Self.vs("""
          - match: [{uri: {exact: /exact}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{uri: {prefix: /api/}, method: {exact: POST}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{uri: {regex: "/items/[0-9]+"}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{headers: {x-user: {prefix: adm}}}, {headers: {x-flag: {}}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{queryParams: {debug: {exact: "1"}}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{queryParams: {name: {exact: "a b"}}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{uri: {exact: /CASE}, ignoreUriCase: true}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{authority: {prefix: svc.default}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{port: 8080, withoutHeaders: {x-skip: {}}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{scheme: {exact: https}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{headers: {x-env: {regex: "prod|stage"}}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{method: {regex: "PUT|PATCH"}}]
            route: [{destination: {host: svc, subset: v2}}]
          - route: [{destination: {host: svc, subset: v1}}]
        """))
        let cases: [(String, String, [(String, String)], String, Int, String)] = [
            ("/exact", "GET", [], "svc", 0, "v2"),
            ("/exact/more", "GET", [], "svc", 0, "v1"),
            ("/exact?x=1", "GET", [], "svc", 0, "v2"),        // the query is not part of the uri
            ("/api/x", "POST", [], "svc", 0, "v2"),
            ("/api/x", "GET", [], "svc", 0, "v1"),          // AND: method must match too
            ("/items/42", "GET", [], "svc", 0, "v2"),
            ("/items/42/x", "GET", [], "svc", 0, "v1"),     // regex is a full match
            ("/", "GET", [("x-user", "admin")], "svc", 0, "v2"),
            ("/", "GET", [("X-Flag", "")], "svc", 0, "v2"),   // OR between match entries; {} = present
            ("/", "GET", [("x-user", "bob")], "svc", 0, "v1"),
            ("/q?a=2&debug=1", "GET", [], "svc", 0, "v2"),
            ("/q?debug=0", "GET", [], "svc", 0, "v1"),
            ("/q?name=a%20b", "GET", [], "svc", 0, "v2"),   // query values are percent-decoded
            ("/case", "GET", [], "svc", 0, "v2"),
            ("/", "GET", [], "svc.default.svc.cluster.local", 0, "v2"),
            ("/", "GET", [], "svc", 8080, "v2"),
            ("/", "GET", [("x-skip", "1")], "svc", 8080, "v1"),
            ("/", "GET", [], "svc", 0, "v1"),               // scheme is http
            ("/", "GET", [("x-env", "stage")], "svc", 0, "v2"),
            ("/", "GET", [("x-env", "staged")], "svc", 0, "v1"),
            ("/", "PATCH", [], "svc", 0, "v2"),
        ]
        for (path, method, headers, host, port, want) in cases {
            let s = route(path, method: method, host: host, headers: headers, port: port)
            XCTAssertEqual(subset(s), want, "\(method) \(path) \(headers) \(host):\(port)")
        }
    }

    func test_hostForms_shortQualifiedFQDNAndPort_allResolve_andAnUnknownHostIs404NR() throws {
        try configure(vs: Self.vs("  - route: [{destination: {host: svc, subset: v1}}]\n"))
        for h in ["svc", "svc:8080", "SVC", "svc.default", "svc.default.svc", "svc.default.svc.cluster.local", "svc.default.svc.cluster.local:80"] {
            XCTAssertEqual(subset(route(host: h)), "v1", h)
        }
        let s = route(host: "other")
        XCTAssertEqual(s.localReply?.status, 404)
        XCTAssertTrue(s.responseFlags.contains(.noRouteFound))
    }

    func test_noRuleMatching_is404NR() throws {
        try configure(vs: Self.vs("  - match: [{uri: {prefix: /only}}]\n    route: [{destination: {host: svc, subset: v1}}]\n"))
        let s = route("/else")
        XCTAssertEqual(s.localReply?.status, 404)
        XCTAssertTrue(s.responseFlags.contains(.noRouteFound))
    }

    func test_weightedRoute_splits90To10() throws {
        try configure(vs: Self.vs("""
          - route:
            - {destination: {host: svc, subset: v1}, weight: 90}
            - {destination: {host: svc, subset: v2}, weight: 10}
        """))
        var v2 = 0
        for _ in 0..<10_000 { if subset(route()) == "v2" { v2 += 1 } }
        XCTAssertEqual(Double(v2) / 10_000, 0.10, accuracy: 0.015)
    }

    func test_forward_resolvesSubsetEndpointsPortsTimeoutAndRetries() throws {
        try configure(vs: Self.vs("""
          - route: [{destination: {host: svc, subset: v2}}]
            timeout: 1.5s
            retries: {attempts: 5, perTryTimeout: 200ms, retryOn: 5xx}
        """))
        let s = route()
        let c = try XCTUnwrap(s.route.upstreamCluster as? ClusterInfo)
        XCTAssertEqual(c.endpointCount, 1)
        XCTAssertEqual(c.endpoint(0).address, "10.0.0.2")
        XCTAssertEqual(c.endpoint(0).port, 9002)
        XCTAssertEqual(s.route.cluster, "outbound|8080|v2|svc.default.svc.cluster.local")
        XCTAssertEqual(s.route.port, 8080)
        XCTAssertEqual(s.route.host, "svc.default.svc.cluster.local")
        XCTAssertEqual(s.destination.service, "svc.default.svc.cluster.local")
        XCTAssertEqual(s.route.timeoutMs, 1500)
        XCTAssertEqual(s.route.retry?.attempts, 5)
        XCTAssertEqual(s.route.retry?.perTryTimeoutMs, 200)
        XCTAssertEqual(s.route.retry?.on5xx, true)
    }

    func test_redirectDirectResponseRewriteAndAbort() throws {
        try configure(vs: Self.vs("""
          - match: [{uri: {prefix: /old/}}]
            redirect: {uri: /new, authority: example.com}
          - match: [{uri: {prefix: /port/}}]
            redirect: {port: 8443, scheme: https, redirectCode: 302}
          - match: [{uri: {exact: /health}}]
            directResponse: {status: 200, body: {string: ok}}
          - match: [{uri: {prefix: /v1/}}]
            rewrite: {uri: /api/, authority: backend}
            route: [{destination: {host: svc, subset: v1}}]
          - match: [{uri: {prefix: /re/}}]
            rewrite: {uriRegexRewrite: {match: "^/re/(.*)$", rewrite: "/x/\\\\1"}}
            route: [{destination: {host: svc, subset: v1}}]
          - match: [{uri: {exact: /whole}}]
            rewrite: {uri: /replaced}
            route: [{destination: {host: svc, subset: v1}}]
          - match: [{uri: {prefix: /broken}}]
            fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
            route: [{destination: {host: svc, subset: v1}}]
          - match: [{uri: {prefix: /half}}]
            fault: {abort: {httpStatus: 500, percentage: {value: 50}}}
            route: [{destination: {host: svc, subset: v1}}]
          - match: [{uri: {prefix: /slow}}]
            fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}}
            route: [{destination: {host: svc, subset: v1}}]
        """))
        let r = route("/old/x")
        XCTAssertEqual(r.localReply?.status, 301)
        XCTAssertTrue(r.localReply?.headers.contains { $0 == ("location", "http://example.com/new") } ?? false, "\(String(describing: r.localReply?.headers))")
        let p = route("/port/a?b=1", host: "Svc:80")
        XCTAssertEqual(p.localReply?.status, 302)
        XCTAssertTrue(p.localReply?.headers.contains { $0 == ("location", "https://svc:8443/port/a?b=1") } ?? false, "\(String(describing: p.localReply?.headers))")
        let d = route("/health")
        XCTAssertEqual(d.localReply?.status, 200)
        XCTAssertEqual(d.localReply?.body, "ok")
        let f = route("/v1/users?id=3")
        XCTAssertEqual(f.request.target, "/api/users?id=3")
        XCTAssertEqual(f.request.host, "backend")
        XCTAssertEqual(route("/re/a/b").request.target, "/x/a/b")
        XCTAssertEqual(route("/whole?q=1").request.target, "/replaced?q=1")
        let b = route("/broken")
        XCTAssertEqual(b.localReply?.status, 503)
        XCTAssertTrue(b.responseFlags.contains(.faultInjected))
        var aborted = 0
        for _ in 0..<4000 { if route("/half").localReply?.status == 500 { aborted += 1 } }
        XCTAssertEqual(Double(aborted) / 4000, 0.5, accuracy: 0.05)
        XCTAssertEqual(route("/slow").route.delayMs, 2000)
    }

    func test_headerEdits_requestNow_responseRecorded_andAppliedToLocalRepliesToo() throws {
        try configure(vs: Self.vs("""
          - match: [{uri: {exact: /direct}}]
            directResponse: {status: 418, body: {string: tea}}
            headers: {response: {set: {x-resp: direct}}}
          - match: [{uri: {exact: /moved}}]
            redirect: {uri: /new}
            headers: {response: {add: {x-resp: moved}}}
          - route: [{destination: {host: svc, subset: v1}}]
            headers:
              request: {set: {x-set: "1"}, add: {x-add: "2"}, remove: [x-drop]}
              response: {set: {x-r: a}, add: {x-r2: b}, remove: [server-timing]}
        """))
        let s = route(headers: [("x-drop", "1"), ("x-set", "0")])
        XCTAssertEqual(s.request.first("x-set"), "1")
        XCTAssertEqual(s.request.first("x-add"), "2")
        XCTAssertNil(s.request.first("x-drop"))
        XCTAssertTrue(s.route.responseSet.contains { $0 == ("x-r", "a") })
        XCTAssertTrue(s.route.responseAdd.contains { $0 == ("x-r2", "b") })
        XCTAssertEqual(s.route.responseRemove, ["server-timing"])
        let d = route("/direct")
        XCTAssertEqual(d.localReply?.status, 418)
        XCTAssertTrue(d.route.responseSet.contains { $0 == ("x-resp", "direct") })
        let m = route("/moved")
        XCTAssertEqual(m.localReply?.status, 301)
        XCTAssertTrue(m.route.responseAdd.contains { $0 == ("x-resp", "moved") })
    }

    func test_noVirtualService_defaultRouteCoversAllEndpoints() throws {
        try configure(Self.endpoints)
        let s = route()
        let c = try XCTUnwrap(s.route.upstreamCluster as? ClusterInfo)
        XCTAssertEqual(Set((0..<c.endpointCount).map { c.endpoint($0).address }), ["10.0.0.1", "10.0.0.2"])
        XCTAssertEqual(s.route.cluster, "outbound|8080||svc.default.svc.cluster.local")
        XCTAssertEqual(s.route.retry, .istioDefault)
    }

    func test_destinationWithoutEndpoints_is503UH_namingItsCluster() throws {
        try configure(vs: """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: svc, namespace: default}
        spec:
          hosts: [svc]
          http: [{route: [{destination: {host: nowhere.example.com}}]}]
        """)
        let s = route()
        XCTAssertEqual(s.localReply?.status, 503)
        XCTAssertTrue(s.responseFlags.contains(.noHealthyUpstream))
        XCTAssertEqual(s.route.cluster, "outbound|0||nowhere.example.com")
    }

    func test_aRouteAnEarlierFilterChose_isLeftAlone() throws {
        let dir = NSTemporaryDirectory() + "moonlet-router-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try "local f = {}\nfunction f.on_request(s) s.route.cluster = \"outbound|8080|v2|svc.default.svc.cluster.local\" end\nreturn f\n"
            .write(toFile: dir + "/pick.lua", atomically: true, encoding: .utf8)
        let pick = LuaPluginSpec(name: "pick", namespace: "", path: dir + "/pick.lua", phase: "UNSPECIFIED_PHASE", priority: 10, pluginConfig: .map([]),
                                 failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "t", line: 1)
        try configure(Self.endpoints + "\n---\n" + Self.vs("  - route: [{destination: {host: svc, subset: v1}}]\n"), specs: [pick, .builtinRouter])
        let s = route()
        XCTAssertEqual(s.route.cluster, "outbound|8080|v2|svc.default.svc.cluster.local")
        XCTAssertNil(s.localReply)
    }

    func test_inboundListener_isNotRouted() throws {
        try configure(vs: Self.vs("  - route: [{destination: {host: svc, subset: v1}}]\n"))
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: svc\r\n\r\n")) else { return XCTFail() }
        let s = ProxyStream(id: 99, request: h, source: PeerInfo(address: "10.0.0.9:1"), filterCount: 0, startNanos: 0)
        s.config = snap
        s.listener = .inbound
        XCTAssertEqual(chain.runRequest(s), .continue)
        XCTAssertEqual(s.route.cluster, "")
        XCTAssertNil(s.localReply)
        runtime.endStream(s); s.end()
    }
}

/// Istio's bookinfo VirtualServices behave as Istio's documentation describes.
final class BookinfoRoutingTests: RouterHarness {
    static var conformance: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("shared/conformance").path
    }

    func load(_ files: [String]) throws {
        let root = Self.conformance + "/samples/bookinfo/networking"
        guard FileManager.default.fileExists(atPath: root) else { throw XCTSkip("conformance data not found") }
        var yaml = try files.map { try String(contentsOfFile: "\(root)/\($0)", encoding: .utf8) }.joined(separator: "\n---\n")
        for svc in ["reviews", "ratings", "details", "productpage"] {
            yaml += "\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: \(svc)}\nspec:\n  hosts: [\(svc)]\n  resolution: STATIC\n  ports: [{number: 9080, name: http}]\n  workloadSelector: {labels: {app: \(svc)}}\n"
            for v in ["v1", "v2", "v3"] {
                yaml += "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: \(svc)-\(v)}\nspec: {address: 127.0.0.1, ports: {http: 9080}, labels: {app: \(svc), version: \(v)}}\n"
            }
        }
        try configure(yaml)
    }

    func test_reviewsJasonRoute_sendsJasonToV2_othersToV3() throws {
        try load(["destination-rule-all.yaml", "virtual-service-reviews-jason-v2-v3.yaml"])
        XCTAssertEqual(subset(route(host: "reviews", headers: [("end-user", "jason")])), "v2")
        XCTAssertEqual(subset(route(host: "reviews", headers: [("end-user", "ann")])), "v3")
    }

    func test_reviews50v3_splitsEvenly() throws {
        try load(["destination-rule-all.yaml", "virtual-service-reviews-50-v3.yaml"])
        var v3 = 0
        for _ in 0..<4000 { if subset(route(host: "reviews")) == "v3" { v3 += 1 } }
        XCTAssertEqual(Double(v3) / 4000, 0.5, accuracy: 0.04)
    }

    func test_ratingsAbortForJason_andDelayForJason() throws {
        try load(["destination-rule-all.yaml", "virtual-service-ratings-test-abort.yaml"])
        XCTAssertEqual(route(host: "ratings", headers: [("end-user", "jason")]).localReply?.status, 500, "jason gets the abort")
        XCTAssertNotNil(subset(route(host: "ratings", headers: [("end-user", "ann")])))
        try load(["destination-rule-all.yaml", "virtual-service-ratings-test-delay.yaml"])
        XCTAssertEqual(route(host: "ratings", headers: [("end-user", "jason")]).route.delayMs, 7000)
        XCTAssertEqual(route(host: "ratings", headers: [("end-user", "ann")]).route.delayMs, 0)
    }
}

final class RoutingExtrasTests: RouterHarness {
    func test_corsPolicy_answersPreflight_andTagsAllowedOrigins() throws {
        try configure(vs: Self.vs("""
          - corsPolicy:
              allowOrigins: [{exact: "https://app.example"}]
              allowMethods: [GET, POST]
              allowHeaders: [x-token]
              exposeHeaders: [x-trace]
              maxAge: 24h
              allowCredentials: true
            route: [{destination: {host: svc, subset: v1}}]
        """))
        let pre = route(method: "OPTIONS", headers: [("origin", "https://app.example"), ("access-control-request-method", "POST")])
        XCTAssertEqual(pre.localReply?.status, 200)
        XCTAssertTrue(pre.route.responseAdd.contains { $0 == ("access-control-allow-methods", "GET,POST") }, "\(pre.route.responseAdd)")
        XCTAssertTrue(pre.route.responseAdd.contains { $0 == ("access-control-max-age", "86400") })
        let get = route(headers: [("origin", "https://app.example")])
        XCTAssertNil(get.localReply)
        XCTAssertTrue(get.route.responseAdd.contains { $0 == ("access-control-allow-origin", "https://app.example") })
        XCTAssertTrue(get.route.responseAdd.contains { $0 == ("access-control-expose-headers", "x-trace") })
        let other = route(headers: [("origin", "https://evil.example")])
        XCTAssertTrue(other.route.responseAdd.isEmpty)
    }

    func test_sourceLabels_matchTheLocalWorkload() throws {
        let vs = Self.vs("""
          - match: [{sourceLabels: {app: canary-client}, sourceNamespace: default}]
            route: [{destination: {host: svc, subset: v2}}]
          - route: [{destination: {host: svc, subset: v1}}]
        """)
        try configure(vs: vs, labels: ["app": "canary-client"])
        XCTAssertEqual(subset(route()), "v2")
        try configure(vs: vs, labels: ["app": "web"])
        XCTAssertEqual(subset(route()), "v1")
    }

    func test_mirror_isChosenWithItsPercentage() throws {
        try configure(vs: Self.vs("""
          - route: [{destination: {host: svc, subset: v1}}]
            mirror: {host: svc, subset: v2}
            mirrorPercentage: {value: 50}
        """))
        var mirrored = 0
        for _ in 0..<2000 {
            let s = route(host: "svc:8080")
            if let m = s.route.mirrors.first {
                mirrored += 1
                XCTAssertEqual(m.authority, "svc-shadow")
                XCTAssertEqual((m.cluster as? ClusterInfo)?.name, "outbound|8080|v2|svc.default.svc.cluster.local")
            }
        }
        XCTAssertEqual(Double(mirrored) / 2000, 0.5, accuracy: 0.06)
    }

    func test_consistentHash_keysFromHeaderQueryAndSourceIp_andACookieIsGeneratedWithItsTtl() throws {
        func dr(_ hash: String) -> String {
            Self.endpoints.components(separatedBy: "\n---\n").dropLast().joined(separator: "\n---\n") + """

            ---
            apiVersion: networking.istio.io/v1beta1
            kind: DestinationRule
            metadata: {name: svc, namespace: default}
            spec:
              host: svc
              trafficPolicy: {loadBalancer: {consistentHash: \(hash)}}
            """
        }
        try configure(dr("{httpHeaderName: x-user}"))
        XCTAssertEqual(route(headers: [("x-user", "ann")]).route.hashKey, HashRing.hash("ann"))
        XCTAssertNil(route().route.hashKey)
        try configure(dr("{httpQueryParameterName: u}"))
        XCTAssertEqual(route("/?u=b%20c").route.hashKey, HashRing.hash("b c"))
        try configure(dr("{useSourceIp: true}"))
        XCTAssertEqual(route().route.hashKey, HashRing.hash("10.1.2.3"))
        try configure(dr("{httpCookie: {name: sticky, ttl: 60s}}"))
        XCTAssertEqual(route(headers: [("cookie", "a=1; sticky=xyz")]).route.hashKey, HashRing.hash("xyz"))
        let fresh = route()
        let cookie = try XCTUnwrap(fresh.route.responseAdd.first { $0.0 == "set-cookie" }?.1)
        XCTAssertTrue(cookie.hasPrefix("sticky=") && cookie.contains("Max-Age=60") && cookie.contains("HttpOnly"), cookie)
        let value = String(cookie.dropFirst("sticky=".count).prefix { $0 != ";" })
        XCTAssertEqual(fresh.route.hashKey, HashRing.hash(value))
    }
}

/// A route regex that PCRE2 gives up on (its backtracking limit) must not read as "no
/// match": a rule that denies would be skipped and the request routed on (fail open).
final class RouteRegexLimitTests: RouterHarness {
    func test_aRouteRegexAtItsMatchLimit_answers500_insteadOfFallingThroughToTheNextRule() throws {
        try configure(vs: Self.vs("""
          - match: [{headers: {x-user: {regex: "(a+)+b"}}}]
            directResponse: {status: 403, body: {string: denied}}
          - route: [{destination: {host: svc, subset: v1}}]
        """))
        XCTAssertEqual(route(headers: [("x-user", "aab")]).localReply?.status, 403, "the deny rule did not match aab")
        XCTAssertEqual(subset(route(headers: [("x-user", "zzz")])), "v1", "a non-matching value was not routed")
        // Catastrophic backtracking: 30 a's, then "bx" (b present, so PCRE2 cannot rule it out early).
        let evil = route(headers: [("x-user", String(repeating: "a", count: 30) + "bx")])
        XCTAssertEqual(evil.localReply?.status, 500, "a regex at its match limit fell through to the next rule")
        XCTAssertTrue(evil.localReply?.body.contains("match limit") ?? false)
    }
}

/// The router primitives take handles (full userdata made at load); anything else,
/// or a handle of another kind or another snapshot, is a Lua error, never a crash.
final class RouterPrimitiveHardeningTests: RouterHarness {
    func test_forgedOrWrongUserdataPassedToAPrimitive_raisesALuaError() throws {
        let dir = NSTemporaryDirectory() + "moonlet-router-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try """
        local R = moonlet.router
        local f = {}
        local kept
        function f.on_request(s)
          local out = {}
          local function try(name, fn, ...)
            local ok, err = pcall(fn, ...)
            out[#out + 1] = name .. "=" .. (ok and "ok" or "error")
          end
          local vh = R.host(s)
          local rule = vh.rules[1]
          local matcher = rule.matches[1].headers[1][2]
          local target = rule.targets[1]
          try("good", R.test, matcher, "x")
          try("light", R.test, s, "x")
          try("lightheaders", R.test, s.request.headers, "x")
          try("table", R.test, {}, "x")
          try("dict", R.test, moonlet.shared("d"), "x")
          try("number", R.test, 42, "x")
          try("targetAsMatcher", R.test, target, "x")
          try("matcherAsTarget", R.forward, s, matcher)
          try("ruleAsTarget", R.forward, s, rule.ref)
          try("targetAsRule", R.pick, target)
          try("string", R.forward, s, "outbound|8080|v1|svc.default.svc.cluster.local")
          try("streamAsStream", R.match_header, s.request, "x", matcher)
          if kept then try("otherSnapshot", R.forward, s, kept) end
          kept = target
          return s:respond(200, table.concat(out, ","))
        end
        return f
        """.write(toFile: dir + "/forge.lua", atomically: true, encoding: .utf8)
        let forge = LuaPluginSpec(name: "forge", namespace: "", path: dir + "/forge.lua", phase: "UNSPECIFIED_PHASE", priority: 10, pluginConfig: .map([]),
                                  failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "t", line: 1)
        let yaml = Self.endpoints + "\n---\n" + Self.vs("  - match: [{headers: {x-a: {exact: b}}}]\n    route: [{destination: {host: svc, subset: v1}}]\n")
        try configure(yaml, specs: [forge])
        let first = route()
        XCTAssertEqual(first.localReply?.body, "good=ok,light=error,lightheaders=error,table=error,dict=error,number=error,targetAsMatcher=error,"
                       + "matcherAsTarget=error,ruleAsTarget=error,targetAsRule=error,string=error,streamAsStream=error")
        // A second snapshot (a reload): a handle kept from the first is refused.
        try yaml.write(toFile: dir + "/b.yaml", atomically: true, encoding: .utf8)
        snap = try ConfigLoader().load(paths: [dir + "/b.yaml"], namespace: "default", labels: [:]).get()
        let second = route()
        XCTAssertTrue(second.localReply?.body.hasSuffix(",otherSnapshot=error") ?? false, "\(String(describing: second.localReply?.body))")
        XCTAssertEqual(second.route.cluster, "", "nothing was written from a refused handle")
    }
}
