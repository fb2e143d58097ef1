import XCTest
import MoonletCore
@testable import MoonletConfig

final class RoutingTests: XCTestCase {
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

    /// The route table of `endpoints` plus `extra` YAML, for a workload with `labels`.
    static func load(_ extra: String, labels: [String: String] = [:]) throws -> RouteTable {
        let dir = NSTemporaryDirectory() + "moonlet-route-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try (endpoints + "\n---\n" + extra).write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        return try ConfigLoader().load(paths: [dir], namespace: "default", labels: labels).get().routes
    }

    func table(_ vs: String, file: StaticString = #filePath, line: UInt = #line) -> RouteTable? {
        do { return try Self.load(vs) } catch { XCTFail("\(error)", file: file, line: line); return nil }
    }

    /// A VirtualService for host svc with `http` as its route list (indented two spaces).
    static func vs(_ http: String) -> String {
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: svc, namespace: default}\nspec:\n  hosts: [svc]\n  http:\n" + http
    }
    func vs(_ http: String) -> String { Self.vs(http) }

    var rng = Xoshiro256(seed: SystemRandomNumberGenerator())

    func route(_ t: RouteTable, _ path: String = "/", method: String = "GET", host: String = "svc", headers: [String: String] = [:], port: Int = 0) -> RouteOutcome {
        var r = RouteRequest(method: method, path: path, authority: host) { headers[$0] }
        r.port = port
        return t.route(r, random: &rng)
    }

    func subset(_ o: RouteOutcome) -> String? {
        if case .forward(let f) = o { return f.subset }
        return nil
    }

    func test_matchFields_eachDecideTheRoute() throws {
        let t = try XCTUnwrap(table(vs("""
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
          - match: [{uri: {exact: /CASE}, ignoreUriCase: true}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{authority: {prefix: svc.default}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{port: 8080, withoutHeaders: {x-skip: {}}}]
            route: [{destination: {host: svc, subset: v2}}]
          - route: [{destination: {host: svc, subset: v1}}]
        """)))
        let cases: [(String, String, [String: String], String, Int, String)] = [
            ("/exact", "GET", [:], "svc", 0, "v2"),
            ("/exact/more", "GET", [:], "svc", 0, "v1"),
            ("/api/x", "POST", [:], "svc", 0, "v2"),
            ("/api/x", "GET", [:], "svc", 0, "v1"),          // AND: method must match too
            ("/items/42", "GET", [:], "svc", 0, "v2"),
            ("/items/42/x", "GET", [:], "svc", 0, "v1"),     // regex is a full match
            ("/", "GET", ["x-user": "admin"], "svc", 0, "v2"),
            ("/", "GET", ["x-flag": ""], "svc", 0, "v2"),     // OR between match entries; {} = present
            ("/", "GET", ["x-user": "bob"], "svc", 0, "v1"),
            ("/q?a=2&debug=1", "GET", [:], "svc", 0, "v2"),
            ("/q?debug=0", "GET", [:], "svc", 0, "v1"),
            ("/case", "GET", [:], "svc", 0, "v2"),
            ("/", "GET", [:], "svc.default.svc.cluster.local", 0, "v2"),
            ("/", "GET", [:], "svc", 8080, "v2"),
            ("/", "GET", ["x-skip": "1"], "svc", 8080, "v1"),
        ]
        for (path, method, headers, host, port, want) in cases {
            XCTAssertEqual(subset(route(t, path, method: method, host: host, headers: headers, port: port)), want, "\(method) \(path) \(headers) \(host):\(port)")
        }
    }

    func test_hostForms_shortQualifiedFQDNAndPort_allResolve() throws {
        let t = try XCTUnwrap(table(vs("  - route: [{destination: {host: svc, subset: v1}}]\n")))
        for h in ["svc", "svc:8080", "SVC", "svc.default", "svc.default.svc", "svc.default.svc.cluster.local", "svc.default.svc.cluster.local:80"] {
            XCTAssertEqual(subset(route(t, host: h)), "v1", h)
        }
        guard case .noRoute = route(t, host: "other") else { return XCTFail("unknown host must be NR") }
    }

    func test_weightedRoute_splits90To10() throws {
        let t = try XCTUnwrap(table(vs("""
          - route:
            - {destination: {host: svc, subset: v1}, weight: 90}
            - {destination: {host: svc, subset: v2}, weight: 10}
        """)))
        var v2 = 0
        for _ in 0..<10_000 { if subset(route(t)) == "v2" { v2 += 1 } }
        XCTAssertEqual(Double(v2) / 10_000, 0.10, accuracy: 0.015)
    }

    func test_forward_resolvesSubsetEndpointsAndPorts() throws {
        let t = try XCTUnwrap(table(vs("  - route: [{destination: {host: svc, subset: v2}}]\n    timeout: 1.5s\n")))
        guard case .forward(let f) = route(t) else { return XCTFail() }
        XCTAssertEqual(f.upstream.endpointCount, 1)
        XCTAssertEqual(f.upstream.endpoint(0).address, "10.0.0.2")
        XCTAssertEqual(f.upstream.endpoint(0).port, 9002)
        XCTAssertEqual(f.cluster, "outbound|8080|v2|svc.default.svc.cluster.local")
        XCTAssertEqual(f.timeoutMs, 1500)
    }

    func test_redirectDirectResponseRewriteAndAbort() throws {
        let t = try XCTUnwrap(table(vs("""
          - match: [{uri: {prefix: /old/}}]
            redirect: {uri: /new, authority: example.com}
          - match: [{uri: {exact: /health}}]
            directResponse: {status: 200, body: {string: ok}}
          - match: [{uri: {prefix: /v1/}}]
            rewrite: {uri: /api/, authority: backend}
            route: [{destination: {host: svc, subset: v1}}]
          - match: [{uri: {prefix: /re/}}]
            rewrite: {uriRegexRewrite: {match: "^/re/(.*)$", rewrite: "/x/\\\\1"}}
            route: [{destination: {host: svc, subset: v1}}]
          - match: [{uri: {prefix: /broken}}]
            fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
            route: [{destination: {host: svc, subset: v1}}]
          - match: [{uri: {prefix: /half}}]
            fault: {abort: {httpStatus: 500, percentage: {value: 50}}}
            route: [{destination: {host: svc, subset: v1}}]
        """)))
        guard case .redirect(301, let loc) = route(t, "/old/x") else { return XCTFail() }
        XCTAssertEqual(loc, "http://example.com/new")
        guard case .direct(200, "ok") = route(t, "/health") else { return XCTFail() }
        guard case .forward(let f) = route(t, "/v1/users?id=3") else { return XCTFail() }
        XCTAssertEqual(f.rewrittenPath, "/api/users?id=3")
        XCTAssertEqual(f.rewrittenAuthority, "backend")
        guard case .forward(let g) = route(t, "/re/a/b") else { return XCTFail() }
        XCTAssertEqual(g.rewrittenPath, "/x/a/b")
        guard case .abort(503) = route(t, "/broken") else { return XCTFail() }
        var aborted = 0
        for _ in 0..<4000 { if case .abort = route(t, "/half") { aborted += 1 } }
        XCTAssertEqual(Double(aborted) / 4000, 0.5, accuracy: 0.05)
    }

    func test_noVirtualService_defaultRouteCoversAllEndpoints() throws {
        let t = try XCTUnwrap(table("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"))
        guard case .forward(let f) = route(t) else { return XCTFail() }
        XCTAssertEqual(Set((0..<f.upstream.endpointCount).map { f.upstream.endpoint($0).address }), ["10.0.0.1", "10.0.0.2"])
        XCTAssertEqual(f.cluster, "outbound|8080||svc.default.svc.cluster.local")
    }

    func test_destinationRulePolicy_subsetOverridesTopLevel() throws {
        let dir = NSTemporaryDirectory() + "moonlet-route-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let base = RoutingTests.endpoints.components(separatedBy: "\n---\n").dropLast().joined(separator: "\n---\n")
        let text = base + """

        ---
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: svc, namespace: default}
        spec:
          host: svc
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {http: {maxRequestsPerConnection: 10}}}
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
        """
        try text.write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        let t = try ConfigLoader().load(paths: [dir]).get().routes
        let svc = try XCTUnwrap(t.services["svc.default.svc.cluster.local"])
        XCTAssertEqual(svc.clusters["v1|8080"]?.policy, .roundRobin)
        XCTAssertEqual(svc.clusters["v2|8080"]?.policy, .random)
        XCTAssertEqual(svc.clusters["v2|8080"]?.maxRequestsPerConnection, 10)
        XCTAssertEqual(svc.clusters["|8080"]?.policy, .roundRobin)
    }

    func test_upstreamProtocol_followsIstio_portProtocolThenH2UpgradePolicyThenDownstream() {
        func choice(_ name: String, _ proto: String = "", _ http: (String, ConfigValue)? = nil) -> UpstreamProtocol {
            let v = http.map { ConfigValue.map([("connectionPool", .map([("http", .map([$0]))]))]) }
            return ClusterInfo.upstreamProtocol(ClusterPolicy.from(v, subset: nil), port: ServicePort(number: 80, name: name, protocolName: proto, targetPort: nil))
        }
        XCTAssertEqual(choice("http"), .http1)
        XCTAssertEqual(choice("http-web"), .http1)
        XCTAssertEqual(choice("grpc-api"), .http2)
        XCTAssertEqual(choice("http2"), .http2)
        XCTAssertEqual(choice("web", "GRPC"), .http2, "the protocol field wins over the name")
        XCTAssertEqual(choice("web"), .likeDownstream, "an undeclared port speaks what the client spoke")
        XCTAssertEqual(choice("http", "", ("h2UpgradePolicy", .string("UPGRADE"))), .http2)
        XCTAssertEqual(choice("web", "", ("h2UpgradePolicy", .string("DO_NOT_UPGRADE"))), .http1)
        XCTAssertEqual(choice("http", "", ("useClientProtocol", .bool(true))), .likeDownstream)
        XCTAssertEqual(choice("grpc", "", ("h2UpgradePolicy", .string("DO_NOT_UPGRADE"))), .http2, "a gRPC port is HTTP/2 whatever the policy")
        let bad = ConfigLoader().loadText("""
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: svc, namespace: default}
        spec:
          host: svc
          trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: SOMETIMES}}}
        """, file: "dr.yaml", baseDir: "/")
        XCTAssertTrue(bad.errors.contains { $0.description.contains("spec.trafficPolicy.connectionPool.http.h2UpgradePolicy: unsupported value \"SOMETIMES\"") },
                      "\(bad.errors.map(\.description))")
    }

    func test_validation_reportsEveryErrorWithPlace() {
        let text = """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: bad, namespace: default}
        spec:
          hosts: [svc]
          http:
          - match: [{uri: {regex: "("}}]
            route:
            - {destination: {host: svc, subset: v1}, weight: 60}
            - {destination: {host: svc, subset: v2}, weight: 30}
            timeout: 10 seconds
            bogus: 1
        """
        let r = ConfigLoader().loadText(text, file: "vs.yaml", baseDir: "/")
        let all = r.errors.map(\.description)
        XCTAssertTrue(all.contains { $0.hasPrefix("vs.yaml:7:") && $0.contains("VirtualService default/bad: spec.http[0].match[0].uri.regex: bad regex") }, "\(all)")
        XCTAssertTrue(all.contains { $0.contains("spec.http[0].route: total destination weight 90 != 100") }, "\(all)")
        XCTAssertTrue(all.contains { $0.hasPrefix("vs.yaml:11:") && $0.contains("spec.http[0].timeout: invalid duration") }, "\(all)")
        XCTAssertTrue(all.contains { $0.hasPrefix("vs.yaml:12:5:") && $0.contains("spec.http[0].bogus: unknown field") }, "\(all)")
    }

    func test_undefinedSubset_isAnErrorWhenTheHostHasADestinationRule() {
        let dir = NSTemporaryDirectory() + "moonlet-route-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try! (Self.endpoints + "\n---\n" + vs("  - route: [{destination: {host: svc, subset: v3}}]\n")).write(toFile: dir + "/all.yaml", atomically: true, encoding: .utf8)
        guard case .failure(let e) = ConfigLoader().load(paths: [dir]) else { return XCTFail("accepted undefined subset") }
        XCTAssertTrue(e.description.contains("subset \"v3\" is not defined by DestinationRule default/svc"), e.description)
    }

    func test_durations_parseAsIstioWritesThem() {
        XCTAssertEqual(TrafficDecoder.parseDuration("30s"), 30_000)
        XCTAssertEqual(TrafficDecoder.parseDuration("1.5s"), 1_500)
        XCTAssertEqual(TrafficDecoder.parseDuration("100ms"), 100)
        XCTAssertEqual(TrafficDecoder.parseDuration("2m"), 120_000)
        XCTAssertNil(TrafficDecoder.parseDuration("10"))
        XCTAssertNil(TrafficDecoder.parseDuration("-1s"))
    }
}

/// Istio's bookinfo VirtualServices behave as Istio's documentation describes.
final class BookinfoRoutingTests: XCTestCase {
    var rng = Xoshiro256(seed: SystemRandomNumberGenerator())

    func load(_ files: [String]) throws -> RouteTable {
        let root = ConformanceTests.root + "/samples/bookinfo/networking"
        guard FileManager.default.fileExists(atPath: root) else { throw XCTSkip("conformance data not found") }
        let dir = NSTemporaryDirectory() + "moonlet-bookinfo-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for f in files { try FileManager.default.copyItem(atPath: "\(root)/\(f)", toPath: "\(dir)/\(f)") }
        var se = ""
        for svc in ["reviews", "ratings", "details", "productpage"] {
            se += "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: \(svc)}\nspec:\n  hosts: [\(svc)]\n  resolution: STATIC\n  ports: [{number: 9080, name: http}]\n  workloadSelector: {labels: {app: \(svc)}}\n---\n"
            for v in ["v1", "v2", "v3"] {
                se += "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: \(svc)-\(v)}\nspec: {address: 127.0.0.1, ports: {http: 9080}, labels: {app: \(svc), version: \(v)}}\n---\n"
            }
        }
        try se.write(toFile: dir + "/services.yaml", atomically: true, encoding: .utf8)
        return try ConfigLoader().load(paths: [dir]).get().routes
    }

    func subset(_ t: RouteTable, _ host: String, _ headers: [String: String] = [:]) -> RouteOutcome {
        t.route(RouteRequest(method: "GET", path: "/", authority: host) { headers[$0] }, random: &rng)
    }

    func test_reviewsJasonRoute_sendsJasonToV2_othersToV3() throws {
        let t = try load(["destination-rule-all.yaml", "virtual-service-reviews-jason-v2-v3.yaml"])
        guard case .forward(let j) = subset(t, "reviews", ["end-user": "jason"]), case .forward(let o) = subset(t, "reviews", ["end-user": "ann"]) else { return XCTFail() }
        XCTAssertEqual(j.subset, "v2")
        XCTAssertEqual(o.subset, "v3")
    }

    func test_reviews50v3_splitsEvenly() throws {
        let t = try load(["destination-rule-all.yaml", "virtual-service-reviews-50-v3.yaml"])
        var v3 = 0
        for _ in 0..<4000 { if case .forward(let f) = subset(t, "reviews"), f.subset == "v3" { v3 += 1 } }
        XCTAssertEqual(Double(v3) / 4000, 0.5, accuracy: 0.04)
    }

    func test_ratingsAbortForJason_andDelayForJason() throws {
        let t = try load(["destination-rule-all.yaml", "virtual-service-ratings-test-abort.yaml"])
        guard case .abort(500) = subset(t, "ratings", ["end-user": "jason"]) else { return XCTFail("jason gets the abort") }
        guard case .forward = subset(t, "ratings", ["end-user": "ann"]) else { return XCTFail() }
        let d = try load(["destination-rule-all.yaml", "virtual-service-ratings-test-delay.yaml"])
        guard case .forward(let f) = subset(d, "ratings", ["end-user": "jason"]) else { return XCTFail() }
        XCTAssertEqual(f.delayMs, 7000)
        guard case .forward(let g) = subset(d, "ratings", ["end-user": "ann"]) else { return XCTFail() }
        XCTAssertNil(g.delayMs)
    }
}

final class RoutingExtrasTests: XCTestCase {
    var rng = Xoshiro256(seed: SystemRandomNumberGenerator())

    func table(_ http: String, labels: [String: String] = [:]) throws -> RouteTable {
        try RoutingTests.load(RoutingTests.vs(http), labels: labels)
    }

    func test_corsPolicy_answersPreflight_andTagsAllowedOrigins() throws {
        let t = try table("""
          - corsPolicy:
              allowOrigins: [{exact: "https://app.example"}]
              allowMethods: [GET, POST]
              allowHeaders: [x-token]
              exposeHeaders: [x-trace]
              maxAge: 24h
              allowCredentials: true
            route: [{destination: {host: svc, subset: v1}}]
        """)
        let pre = ["origin": "https://app.example", "access-control-request-method": "POST"]
        guard case .preflight(let h) = t.route(RouteRequest(method: "OPTIONS", path: "/", authority: "svc") { pre[$0] }, random: &rng) else { return XCTFail() }
        XCTAssertTrue(h.contains { $0 == ("access-control-allow-methods", "GET,POST") })
        XCTAssertTrue(h.contains { $0 == ("access-control-max-age", "86400") })
        let get = ["origin": "https://app.example"]
        guard case .forward(let f) = t.route(RouteRequest(method: "GET", path: "/", authority: "svc") { get[$0] }, random: &rng) else { return XCTFail() }
        XCTAssertTrue(f.corsHeaders.contains { $0 == ("access-control-allow-origin", "https://app.example") })
        let other = ["origin": "https://evil.example"]
        guard case .forward(let g) = t.route(RouteRequest(method: "GET", path: "/", authority: "svc") { other[$0] }, random: &rng) else { return XCTFail() }
        XCTAssertTrue(g.corsHeaders.isEmpty)
    }

    func test_sourceLabels_matchTheLocalWorkload() throws {
        let vs = """
          - match: [{sourceLabels: {app: canary-client}, sourceNamespace: default}]
            route: [{destination: {host: svc, subset: v2}}]
          - route: [{destination: {host: svc, subset: v1}}]
        """
        let canary = try table(vs, labels: ["app": "canary-client"])
        let plain = try table(vs, labels: ["app": "web"])
        guard case .forward(let a) = canary.route(RouteRequest(method: "GET", path: "/", authority: "svc") { _ in nil }, random: &rng),
              case .forward(let b) = plain.route(RouteRequest(method: "GET", path: "/", authority: "svc") { _ in nil }, random: &rng) else { return XCTFail() }
        XCTAssertEqual(a.subset, "v2")
        XCTAssertEqual(b.subset, "v1")
    }

    func test_mirror_isChosenWithItsPercentage() throws {
        let t = try table("""
          - route: [{destination: {host: svc, subset: v1}}]
            mirror: {host: svc, subset: v2}
            mirrorPercentage: {value: 50}
        """)
        var mirrored = 0
        for _ in 0..<2000 {
            guard case .forward(let f) = t.route(RouteRequest(method: "GET", path: "/", authority: "svc:8080") { _ in nil }, random: &rng) else { return XCTFail() }
            if let m = f.mirrors.first {
                mirrored += 1
                XCTAssertEqual(m.authority, "svc-shadow")
                XCTAssertEqual(m.cluster.name, "outbound|8080|v2|svc.default.svc.cluster.local")
            }
        }
        XCTAssertEqual(Double(mirrored) / 2000, 0.5, accuracy: 0.06)
    }
}

/// A route regex that PCRE2 gives up on (its backtracking limit) must not read as "no
/// match": a rule that denies would be skipped and the request routed on (fail open).
final class RouteRegexLimitTests: XCTestCase {
    func test_aRouteRegexAtItsMatchLimit_answers500_insteadOfFallingThroughToTheNextRule() throws {
        let t = try RoutingTests.load(RoutingTests.vs("""
          - match: [{headers: {x-user: {regex: "(a+)+b"}}}]
            directResponse: {status: 403, body: {string: denied}}
          - route: [{destination: {host: svc, subset: v1}}]
        """))
        var rng = Xoshiro256(seed: SystemRandomNumberGenerator())
        func outcome(_ user: String) -> RouteOutcome {
            t.route(RouteRequest(method: "GET", path: "/", authority: "svc") { $0 == "x-user" ? user : nil }, random: &rng)
        }
        // Sanity: an ordinary value that matches is denied, one that does not is routed.
        guard case .direct(status: 403, _) = outcome("aab") else { return XCTFail("the deny rule did not match aab") }
        guard case .forward = outcome("zzz") else { return XCTFail("a non-matching value was not routed") }
        // Catastrophic backtracking: 30 a's, then "bx" (b present, so PCRE2 cannot rule it out early).
        let evil = String(repeating: "a", count: 30) + "bx"
        guard case .direct(let status, let body) = outcome(evil) else { return XCTFail("a regex at its match limit fell through to the next rule") }
        XCTAssertEqual(status, 500)
        XCTAssertTrue(body.contains("match limit"), body)
    }
}
