import XCTest
@testable import MoonletConfig

/// `moonlet validate` refuses every unknown field and value, at every depth, with its place.
final class StrictValidationTests: XCTestCase {
    /// Errors of one or more documents read together, as `moonlet validate` reads them.
    func errors(_ yaml: String) -> [String] {
        let dir = NSTemporaryDirectory() + "moonlet-strict-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try! yaml.write(toFile: dir + "/c.yaml", atomically: true, encoding: .utf8)
        switch ConfigLoader().load(paths: [dir]) {
        case .success: return []
        case .failure(let e): return e.errors.map { $0.description.replacingOccurrences(of: dir + "/", with: "") }
        }
    }

    /// Each (document, error) case: the document gets exactly that one error.
    func assertEachReportsOnly(_ cases: [(String, String)], file: StaticString = #filePath, line: UInt = #line) {
        for (yaml, want) in cases { XCTAssertEqual(errors(yaml), [want], yaml, file: file, line: line) }
    }

    func notes(_ yaml: String) throws -> [String] {
        let dir = NSTemporaryDirectory() + "moonlet-strict-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try yaml.write(toFile: dir + "/c.yaml", atomically: true, encoding: .utf8)
        return try ConfigLoader().load(paths: [dir]).get().skipped.map { $0.replacingOccurrences(of: dir + "/", with: "") }
    }

    static func vs(_ route: String, retries: String = "") -> String {
        """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: r}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: \(route)
        \(retries)
        """
    }
    static let rule = """
    apiVersion: networking.istio.io/v1beta1
    kind: DestinationRule
    metadata: {name: reviews}
    spec:
      host: reviews
      subsets: [{name: v1, labels: {version: v1}}]
    """

    /// The reported scenario: no ServiceEntry for the host, and its DestinationRule does
    /// not define the subset. It passed with a note; it is an error, at the subset.
    func test_routeSubsetTheDestinationRuleDoesNotDefine_isAnError_evenWithoutAServiceEntry() {
        let e = errors(Self.vs("{host: reviews, subset: v3}") + "\n---\n" + Self.rule)
        XCTAssertEqual(e, ["c.yaml:8:44: VirtualService default/r: spec.http[0].route[0].destination.subset: subset \"v3\" is not defined by DestinationRule default/reviews for host reviews.default.svc.cluster.local"])
    }

    func test_routeSubsetThatNoDestinationRuleDefines_isAnError() {
        let e = errors(Self.vs("{host: reviews, subset: v1}"))
        XCTAssertEqual(e, ["c.yaml:8:44: VirtualService default/r: spec.http[0].route[0].destination.subset: subset \"v1\" is not defined: no DestinationRule for host reviews.default.svc.cluster.local"])
    }

    /// A defined subset of a host with no ServiceEntry may be a Kubernetes Service in a
    /// real mesh: valid, with a note that Moonlet has no endpoints for it.
    func test_definedSubsetOfAHostWithoutServiceEntry_isValid_withANote() throws {
        let n = try notes(Self.vs("{host: reviews, subset: v1}") + "\n---\n" + Self.rule)
        XCTAssertTrue(n.contains("c.yaml:8: VirtualService default/r: spec.http[0].route[0].destination.subset: no ServiceEntry for host reviews.default.svc.cluster.local: moonlet has no endpoints for it, requests routed there get 503 UH"), "\(n)")
    }

    func test_retryOnWithAnUnknownPolicy_isAnError_listingTheValidOnes() {
        let e = errors(Self.vs("{host: reviews}", retries: "    retries: {attempts: 2, retryOn: \"5xx,bogus\"}"))
        XCTAssertEqual(e.count, 1, "\(e)")
        XCTAssertTrue((e.first ?? "").hasPrefix("c.yaml:9:37: VirtualService r: spec.http[0].retries.retryOn: \"bogus\" is not a valid retryOn policy; valid: 5xx, gateway-error, reset, reset-before-request, connect-failure, envoy-ratelimited, retriable-4xx, refused-stream, retriable-status-codes, retriable-headers, http3-post-connect-failure, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or an HTTP status code"), "\(e)")
        XCTAssertEqual(errors(Self.vs("{host: reviews}", retries: "    retries: {attempts: 2, retryOn: \"503,retriable-4xx,unavailable,connect-failure\"}")), [])
        XCTAssertEqual(errors(Self.vs("{host: reviews}", retries: "    retries: {attempts: 2, retryOn: \"599\"}")).count, 1, "a status code without a name, as Istio")
        XCTAssertEqual(errors(Self.vs("{host: reviews}", retries: "    retries: {attempts: 0, retryOn: 5xx}")),
                       ["c.yaml:9:37: VirtualService r: spec.http[0].retries.retryOn: http retry policy configured when attempts are set to 0 (disabled)"])
    }

    func test_unknownFieldInsideAnAuthorizationPolicyOperation_isAnError_withItsPlace() {
        let e = errors("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-admin}
        spec:
          action: DENY
          rules:
          - to:
            - operation:
                paths: ["/admin"]
                pathz: ["/admin/*"]
        """)
        XCTAssertEqual(e, ["c.yaml:10:9: AuthorizationPolicy deny-admin: spec.rules[0].to[0].operation.pathz: unknown field"])
    }

    /// One unknown field at the deepest level of each kind Moonlet reads: every one is
    /// reported, with its line and column.
    func test_unknownFieldsAtEveryDepth_ofEveryKind_areErrorsWithTheirPlace() {
        let cases: [(String, String)] = [
            ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: h\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 1, bogus: 1}",
             "c.yaml:8:32: DestinationRule d: spec.trafficPolicy.connectionPool.tcp.bogus: unknown field"),
            ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: h\n  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 80}\n      outlierDetection: {interval: 1s, bogus: 1}",
             "c.yaml:9:40: DestinationRule d: spec.trafficPolicy.portLevelSettings[0].outlierDetection.bogus: unknown field"),
            ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: h\n  subsets:\n  - name: v1\n    trafficPolicy: {loadBalancer: {simple: RANDOM, bogus: 1}}",
             "c.yaml:8:52: DestinationRule d: spec.subsets[0].trafficPolicy.loadBalancer.bogus: unknown field"),
            ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: h\n  trafficPolicy: {loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 8, bogus: 1}}}}",
             "c.yaml:6:82: DestinationRule d: spec.trafficPolicy.loadBalancer.consistentHash.ringHash.bogus: unknown field"),
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [h]\n  http:\n  - route: [{destination: {host: h}}]\n    headers: {request: {set: {x: y}, bogus: 1}}",
             "c.yaml:8:38: VirtualService v: spec.http[0].headers.request.bogus: unknown field"),
            ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s, bogus: 1}\nspec:\n  hosts: [h]",
             "c.yaml:3:21: ServiceEntry s: metadata.bogus: unknown field"),
            ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  rules:\n  - from:\n    - source: {principals: [x], bogus: [y]}",
             "c.yaml:7:33: AuthorizationPolicy a: spec.rules[0].from[0].source.bogus: unknown field"),
            ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  rules:\n  - when:\n    - {key: source.ip, values: [1.2.3.4], bogus: 1}",
             "c.yaml:7:43: AuthorizationPolicy a: spec.rules[0].when[0].bogus: unknown field"),
            ("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t}\nspec:\n  accessLogging:\n  - filter: {expression: 'true', bogus: 1}",
             "c.yaml:6:34: Telemetry t: spec.accessLogging[0].filter.bogus: unknown field"),
            ("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t}\nspec:\n  tracing:\n  - customTags:\n      env: {environment: {name: N, bogus: 1}}",
             "c.yaml:7:36: Telemetry t: spec.tracing[0].customTags.env.environment.bogus: unknown field"),
            ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: a}, bogus: 1}",
             "c.yaml:5:37: PeerAuthentication p: spec.selector.bogus: unknown field"),
        ]
        assertEachReportsOnly(cases)
    }

    func test_badValuesAtDepth_areErrorsWithTheirPlace() {
        let cases: [(String, String)] = [
            ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: h\n  trafficPolicy: {connectionPool: {http: {useClientProtocol: yes please}}}",
             "c.yaml:6:62: DestinationRule d: spec.trafficPolicy.connectionPool.http.useClientProtocol: must be a boolean"),
            ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: h\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: many}}}",
             "c.yaml:6:58: DestinationRule d: spec.trafficPolicy.connectionPool.tcp.maxConnections: must be an integer"),
            ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n  hosts: [h]\n  location: SOMEWHERE",
             "c.yaml:6:13: ServiceEntry s: spec.location: Unsupported value: \"SOMEWHERE\": supported values: \"MESH_EXTERNAL\", \"MESH_INTERNAL\""),
            ("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t}\nspec:\n  accessLogging:\n  - match: {mode: BOTH}",
             "c.yaml:6:19: Telemetry t: spec.accessLogging[0].match.mode: Unsupported value: \"BOTH\": supported values: \"CLIENT_AND_SERVER\", \"CLIENT\", \"SERVER\""),
            ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  rules:\n  - to:\n    - operation: {methods: GET}",
             "c.yaml:7:28: AuthorizationPolicy a: spec.rules[0].to[0].operation.methods: must be a list of strings"),
            ("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, labels: {app: {nested: 1}}}\nspec: {address: 10.0.0.1}",
             "c.yaml:3:35: WorkloadEntry w: metadata.labels.app: must be a string (quote it)"),
            ("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: 10.0.0.1, labels: {version: 2}}",
             "c.yaml:4:45: WorkloadEntry w: spec.labels.version: must be a string, got 2 (quote it)"),
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [h]\n  http:\n  - route: [{destination: {host: h}}]\n    headers: {response: {set: {x-a: {b: c}}}}",
             "c.yaml:8:37: VirtualService v: spec.http[0].headers.response.set.x-a: must be a string"),
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [h]\n  http:\n  - directResponse: {status: 200, body: {bytes: \"not base64!\"}}",
             "c.yaml:7:49: VirtualService v: spec.http[0].directResponse.body.bytes: illegal base64 data"),
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [h]\n  http:\n  - match: [{headers: {x-a: {exact: true}}}]\n    route: [{destination: {host: h}}]",
             "c.yaml:7:37: VirtualService v: spec.http[0].match[0].headers.x-a.exact: must be a string, got true (quote it)"),
            ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n  hosts: [h]\n  addresses: [1.2.3.4, 300.1.1.1]",
             "c.yaml:6:24: ServiceEntry s: spec.addresses[1]: 300.1.1.1 is not a valid IP"),
            ("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s}\nspec:\n  hosts: [h]\n  addresses: [10.0.0.0/33]",
             "c.yaml:6:15: ServiceEntry s: spec.addresses[0]: \"10.0.0.0/33\" is not a valid CIDR block"),
            ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [h]\n  http:\n  - route: [{destination: {host: h}}]\n    mirrors: {destination: {host: h}}",
             "c.yaml:8:14: VirtualService v: spec.http[0].mirrors: must be a list"),
        ]
        assertEachReportsOnly(cases)
    }

    func test_luaPluginMatchAndPluginName_areChecked_thenRefusedUntilApplied_andVariantsAreChecked() throws {
        let dir = NSTemporaryDirectory() + "moonlet-strict-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "return {}".write(toFile: dir + "/f.lua", atomically: true, encoding: .utf8)
        func load(_ extra: String, url: Bool = true) -> ConfigLoader.TextResult {
            ConfigLoader().loadText("apiVersion: moonlet.io/v1alpha1\nkind: LuaPlugin\nmetadata: {name: p}\nspec:\n" + (url ? "  url: file://f.lua\n" : "") + extra, file: "p.yaml", baseDir: dir)
        }
        let bad = load("  match: [{mode: SERVER, ports: [{number: 80, name: http}]}]\n")
        XCTAssertEqual(bad.errors.map(\.description), ["p.yaml:6:47: LuaPlugin p: spec.match[0].ports[0].name: unknown field"])
        let badVariant = load("  variants: [{name: b, wieght: 10}]\n", url: false)
        XCTAssertEqual(badVariant.errors.map(\.description), ["p.yaml:5:24: LuaPlugin p: spec.variants[0].wieght: unknown field",
                                                              "p.yaml:5:14: LuaPlugin p: spec.variants[0].url: missing",
                                                              "p.yaml:5:14: LuaPlugin p: spec.variants[0].weight: missing"])
        // Well-formed, but not applied: refused with file:line, never dropped.
        let wellFormed = load("  match: [{mode: SERVER, ports: [{number: 80}]}]\n")
        XCTAssertEqual(wellFormed.plugins.count, 0)
        XCTAssertTrue(wellFormed.errors.map(\.description).contains { $0.hasPrefix("p.yaml:6:10: LuaPlugin p: spec.match: not supported yet") }, "\(wellFormed.errors)")
        let both = load("  variants: [{name: b, url: file://f.lua, weight: 100}]\n")
        XCTAssertTrue(both.errors.map(\.description).contains { $0.hasPrefix("p.yaml:5:8: LuaPlugin p: spec.url: give either spec.url or spec.variants") }, "\(both.errors)")
        let sum = load("  variants: [{name: a, url: file://f.lua, weight: 10}, {name: b, url: file://f.lua, weight: 80}]\n", url: false)
        XCTAssertTrue(sum.errors.map(\.description).contains { $0.hasPrefix("p.yaml:5:13: LuaPlugin p: spec.variants: weights must sum to 100, got 90") }, "\(sum.errors)")
        let sticky = load("  variants: [{name: a, url: file://f.lua, weight: 100}]\n  stickyBy: user\n", url: false)
        XCTAssertTrue(sticky.errors.map(\.description).contains { $0.hasPrefix("p.yaml:6:13: LuaPlugin p: spec.stickyBy: must be header:NAME") }, "\(sticky.errors)")
        let good = load("  variants: [{name: a, url: file://f.lua, weight: 90}, {name: b, url: f.lua, weight: 10, pluginConfig: {x: 1}}]\n  stickyBy: header:X-User\n  shadow: {url: file://f.lua}\n  guardrail: {metric: error_rate, maxIncrease: 0.02, minRequests: 50, action: rollback}\n", url: false)
        XCTAssertEqual(good.errors, [])
        let p = try XCTUnwrap(good.plugins.first)
        XCTAssertEqual(p.variants.map(\.name), ["a", "b"])
        XCTAssertEqual(p.variants.map(\.weight), [90, 10])
        XCTAssertEqual(p.variants[1].pluginConfig, .map([("x", .int(1))]))
        XCTAssertEqual(p.stickyBy, .header("x-user"))
        XCTAssertEqual(p.shadow?.path, dir + "/f.lua")
        XCTAssertEqual(p.guardrail?.maxIncrease, 0.02)
        XCTAssertEqual(p.guardrail?.minRequests, 50)
        let named = load("  pluginName: x\n")
        XCTAssertTrue(named.errors.map(\.description).contains { $0.hasPrefix("p.yaml:6:15: LuaPlugin p: spec.pluginName: not supported") }, "\(named.errors)")
        XCTAssertEqual(load("").errors, [])
    }
}
