import XCTest
import NIOCore
import Logging
import MoonletCore
import MoonletConfig
import MoonletTelemetry
@testable import MoonletLua

/// The builtin istio-authz filter evaluated in a VM on ProxyStreams (no sockets): the
/// policies are loaded through the config loader and compiled as `moonlet run` does.
final class AuthzFilterTests: XCTestCase {
    var host: LuaHost!
    var runtime: LuaLoopRuntime!
    var metrics: MetricsShard!
    var nextID: UInt64 = 1
    /// The conformance proxy: namespace foo, app=httpbin, version=v1.
    let httpbin = WorkloadIdentity(namespace: "foo", labels: ["app": "httpbin", "version": "v1"])

    override func setUp() {
        host = LuaHost(logger: Logger(label: "test"))
        metrics = MetricsShard()
        runtime = LuaLoopRuntime(host: host, metrics: metrics)
    }

    /// A request as the authz filter sees it on the inbound listener.
    struct Req {
        var method = "GET"
        var path = "/"
        var host = "httpbin.foo"
        var principal = ""
        var address = "10.0.0.9:41000"
        var port = 8000
        var headers: [(String, String)] = []
        var listener: ListenerRole = .inbound
    }

    /// `luaOnly`: the filter's source with its native compilation (authz.rules,
    /// authz.decider) switched off, so every rule is evaluated by its Lua loop.
    func chain(_ yaml: String, workload: WorkloadIdentity? = nil, trustDomain: String = "cluster.local", aliases: [String] = [],
               extra: [LuaPluginSpec] = [], luaOnly: Bool = false, file: StaticString = #filePath, line: UInt = #line) throws -> FilterChain? {
        let r = ConfigLoader().loadText(yaml, file: "in.yaml", baseDir: "/")
        XCTAssertEqual(r.errors.map(\.description), [], file: file, line: line)
        let c = AuthorizationCompiler.compile(r.istio, workload: workload ?? httpbin, trustDomain: trustDomain, aliases: aliases)
        guard let conf = c.config else { return nil }
        var authz = LuaPluginSpec.builtinAuthz(conf)
        if luaOnly {
            let source = BuiltinPlugins.istioAuthz
                .replacingOccurrences(of: "out.native = A.rules(out)", with: "out.native = nil")
                .replacingOccurrences(of: "out.decider = A.decider(out.deny, out.allow)", with: "out.decider = nil")
            XCTAssertNotEqual(source, BuiltinPlugins.istioAuthz, "the native switches moved", file: file, line: line)
            let path = NSTemporaryDirectory() + "moonlet-authz-lua-only-\(UUID().uuidString).lua"
            try source.write(toFile: path, atomically: true, encoding: .utf8)
            authz = LuaPluginSpec(name: "istio-authz-lua-only", namespace: "", path: path, phase: authz.phase, priority: authz.priority,
                                  pluginConfig: conf, failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil,
                                  timeoutMs: nil, file: "test", line: 1)
        }
        let gen = try host.prepare([authz] + extra).get()
        return FilterChain(runtime.filters(for: gen))
    }

    func stream(_ q: Req) -> ProxyStream {
        var raw = "\(q.method) \(q.path) HTTP/1.1\r\nHost: \(q.host)\r\n"
        for (n, v) in q.headers { raw += "\(n): \(v)\r\n" }
        raw += "\r\n"
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: raw)) else { fatalError(raw) }
        nextID += 1
        var peer = PeerInfo(address: q.address)
        peer.principal = q.principal
        if let r = q.principal.range(of: "/ns/") { peer.namespace = String(q.principal[r.upperBound...].prefix { $0 != "/" }) }
        let s = ProxyStream(id: nextID, request: h, source: peer, filterCount: 0, startNanos: 0)
        s.listener = q.listener
        s.destination.port = q.port
        return s
    }

    /// True when the request passes; on a denial checks Envoy's RBAC reply.
    func allowed(_ c: FilterChain?, _ q: Req, file: StaticString = #filePath, line: UInt = #line) -> Bool {
        guard let c else { return true }
        let s = stream(q)
        defer { c.runLog(s); runtime.endStream(s); s.end() }
        switch c.runRequest(s) {
        case .respond:
            XCTAssertEqual(s.localReply?.status, 403, file: file, line: line)
            XCTAssertEqual(s.localReply?.body, "RBAC: access denied", file: file, line: line)
            XCTAssertTrue(s.localReply?.headers.contains { $0.name == "content-type" && $0.value == "text/plain" } == true, file: file, line: line)
            XCTAssertTrue(s.responseFlags.contains(.rbacAccessDenied), file: file, line: line)
            XCTAssertEqual(s.responseFlags.envoyString, "RBAC", file: file, line: line)
            return false
        default:
            return true
        }
    }

    // MARK: semantics

    let seed = """
    apiVersion: security.istio.io/v1beta1
    kind: AuthorizationPolicy
    metadata: {name: order-service-policy, namespace: production}
    spec:
      selector: {matchLabels: {app: order-service}}
      action: ALLOW
      rules:
      - from:
        - source: {principals: ["cluster.local/ns/production/sa/frontend"]}
        to:
        - operation: {methods: ["GET", "POST"], paths: ["/api/order/*"]}
    """

    func test_seedPolicy_allowsFrontendGetAndPost_onOrderPaths_andDeniesTheRest() throws {
        let c = try chain(seed, workload: WorkloadIdentity(namespace: "production", labels: ["app": "order-service"]))
        let fe = "cluster.local/ns/production/sa/frontend"
        XCTAssertTrue(allowed(c, Req(method: "GET", path: "/api/order/1", principal: fe)))
        XCTAssertTrue(allowed(c, Req(method: "POST", path: "/api/order/1?x=1", principal: fe)))
        XCTAssertFalse(allowed(c, Req(method: "DELETE", path: "/api/order/1", principal: fe)))
        XCTAssertFalse(allowed(c, Req(method: "GET", path: "/admin", principal: fe)))
        XCTAssertFalse(allowed(c, Req(method: "GET", path: "/api/order/1", principal: "cluster.local/ns/production/sa/other")))
        XCTAssertFalse(allowed(c, Req(method: "GET", path: "/api/order/1", principal: "")))
    }

    /// The proxy normalizes the path before filters (mesh config pathNormalization); the
    /// filter matches the path it is given, as Envoy's RBAC does: under Istio's default
    /// BASE a "//" is not merged, so "//api/order/1" is not under "/api/order/*".
    func test_pathRules_matchThePathAsGiven_likeEnvoysRBAC() throws {
        let c = try chain(seed, workload: WorkloadIdentity(namespace: "production", labels: ["app": "order-service"]))!
        let fe = "cluster.local/ns/production/sa/frontend"
        let s = stream(Req(method: "GET", path: "//api/order/1", principal: fe))
        XCTAssertEqual(c.runRequest(s), .respond)
        XCTAssertEqual(s.vars["response_code_details"], "rbac_access_denied_matched_policy[none]")
        c.runLog(s); runtime.endStream(s); s.end()
        let denyAdmin = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec: {action: DENY, rules: [{to: [{operation: {paths: ["/admin"]}}]}]}
        """)
        XCTAssertFalse(allowed(denyAdmin, Req(path: "/admin")))
        XCTAssertTrue(allowed(denyAdmin, Req(path: "//admin")), "as Istio under BASE; MERGE_SLASHES merges it before the filter")
    }

    func test_theOutboundListener_isNotAuthorized() throws {
        let c = try chain(seed, workload: WorkloadIdentity(namespace: "production", labels: ["app": "order-service"]))
        XCTAssertTrue(allowed(c, Req(method: "DELETE", path: "/admin", listener: .outbound)))
    }

    func test_policiesOfOtherNamespacesOrSelectors_doNotApply_rootNamespacePoliciesDo() throws {
        let wl = WorkloadIdentity(namespace: "staging", labels: ["app": "order-service"])
        XCTAssertNil(try chain(seed, workload: wl))
        XCTAssertNil(try chain(seed, workload: WorkloadIdentity(namespace: "production", labels: ["app": "frontend"])))
        let meshWide = seed.replacingOccurrences(of: "namespace: production", with: "namespace: istio-system")
        XCTAssertNotNil(try chain(meshWide, workload: wl))
        let customRoot = WorkloadIdentity(namespace: "staging", labels: ["app": "order-service"], rootNamespace: "mesh-root")
        XCTAssertNil(try chain(meshWide, workload: customRoot))
        XCTAssertNotNil(try chain(seed.replacingOccurrences(of: "namespace: production", with: "namespace: mesh-root"), workload: customRoot))
    }

    func test_denyIsEvaluatedBeforeAllow_andNamesTheMatchedPolicy() throws {
        let c = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-all, namespace: foo}
        spec: {rules: [{}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: no-admin, namespace: foo}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
        """)!
        XCTAssertTrue(allowed(c, Req(path: "/x")))
        let s = stream(Req(path: "/admin/x"))
        XCTAssertEqual(c.runRequest(s), .respond)
        XCTAssertEqual(s.vars["response_code_details"], "rbac_access_denied_matched_policy[ns[foo]-policy[no-admin]-rule[0]]")
        c.runLog(s); runtime.endStream(s); s.end()
        XCTAssertEqual(metrics.snapshot().counters["envoy_http_rbac_denied"], 1)
        XCTAssertEqual(metrics.snapshot().counters["envoy_http_rbac_allowed"], 1)
    }

    func test_fieldsOfOneSourceAreAnded_sourcesAreOred_andNotFieldsExclude() throws {
        let c = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - from:
            - source: {namespaces: ["ns-a"], notPrincipals: ["cluster.local/ns/ns-a/sa/bad"]}
            - source: {ipBlocks: ["192.168.0.0/16", "2001:db8::/32"], notIpBlocks: ["192.168.9.9"]}
            to:
            - operation: {notMethods: ["DELETE"], hosts: ["*.example.com"], ports: ["8000"]}
            when:
            - key: request.headers[X-Env]
              values: ["prod-*"]
              notValues: ["prod-legacy"]
        """)
        let h = [("x-env", "prod-eu")]
        XCTAssertTrue(allowed(c, Req(host: "API.Example.com", principal: "cluster.local/ns/ns-a/sa/good", headers: h)))
        XCTAssertFalse(allowed(c, Req(host: "api.example.com", principal: "cluster.local/ns/ns-a/sa/bad", headers: h)))
        XCTAssertTrue(allowed(c, Req(host: "api.example.com", address: "192.168.1.2:5000", headers: h)))
        XCTAssertFalse(allowed(c, Req(host: "api.example.com", address: "192.168.9.9:5000", headers: h)))
        XCTAssertTrue(allowed(c, Req(host: "api.example.com", address: "2001:db8::1:5000", headers: h)))
        XCTAssertFalse(allowed(c, Req(host: "api.example.com", address: "10.1.1.1:5000", headers: h)))
        XCTAssertFalse(allowed(c, Req(method: "DELETE", host: "api.example.com", principal: "cluster.local/ns/ns-a/sa/good", headers: h)))
        XCTAssertFalse(allowed(c, Req(host: "example.org", principal: "cluster.local/ns/ns-a/sa/good", headers: h)))
        XCTAssertFalse(allowed(c, Req(host: "api.example.com", principal: "cluster.local/ns/ns-a/sa/good", port: 9000, headers: h)))
        XCTAssertFalse(allowed(c, Req(host: "api.example.com", principal: "cluster.local/ns/ns-a/sa/good", headers: [("x-env", "prod-legacy")])))
        XCTAssertFalse(allowed(c, Req(host: "api.example.com", principal: "cluster.local/ns/ns-a/sa/good")))
        // Several values are matched joined with "," (Envoy): "prod-eu,prod-legacy" is not "prod-legacy".
        XCTAssertTrue(allowed(c, Req(host: "api.example.com", principal: "cluster.local/ns/ns-a/sa/good", headers: h + [("x-env", "prod-legacy")])))
        XCTAssertFalse(allowed(c, Req(host: "api.example.com", principal: "cluster.local/ns/ns-a/sa/good", headers: [("x-env", "dev"), ("x-env", "prod-eu")])))
    }

    func test_whenConditions_onSourceAndDestination() throws {
        let c = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - when:
            - {key: source.ip, values: ["10.0.0.0/8"]}
            - {key: remote.ip, notValues: ["10.6.6.6"]}
            - {key: source.namespace, values: ["ns-*"]}
            - {key: source.principal, notValues: ["*/sa/bad"]}
            - {key: destination.port, values: ["8000"]}
            - {key: source.trustDomain, values: ["cluster.local"]}
        """)
        XCTAssertTrue(allowed(c, Req(principal: "cluster.local/ns/ns-a/sa/good")))
        XCTAssertFalse(allowed(c, Req(principal: "cluster.local/ns/ns-a/sa/bad")))
        XCTAssertFalse(allowed(c, Req(principal: "cluster.local/ns/ns-a/sa/good", address: "10.6.6.6:1")))
        XCTAssertFalse(allowed(c, Req(principal: "cluster.local/ns/other/sa/good")))
        XCTAssertFalse(allowed(c, Req(principal: "other.td/ns/ns-a/sa/good")))
        XCTAssertFalse(allowed(c, Req(principal: "cluster.local/ns/ns-a/sa/good", port: 9000)))
    }

    func test_requestPrincipalsAndAuthConditions_withoutAVerifiedToken_neverMatch() throws {
        // s.auth comes from RequestAuthentication (another filter); without it there is
        // no request principal: ALLOW on one denies, notRequestPrincipals holds.
        let c = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - from: [{source: {requestPrincipals: ["*"]}}]
          - when: [{key: "request.auth.claims[groups]", values: ["admin"]}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: d, namespace: foo}
        spec:
          action: DENY
          rules:
          - from: [{source: {notRequestPrincipals: ["*"]}}]
            to: [{operation: {paths: ["/private"]}}]
        """)
        XCTAssertFalse(allowed(c, Req(path: "/")))
        XCTAssertFalse(allowed(c, Req(path: "/private")))
    }

    func test_pathMatchers_exactPrefixSuffixAndTemplates_ignoreTheQuery() throws {
        let c = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - to: [{operation: {paths: ["/exact", "/prefix/*", "*/suffix", "/t/{*}/x", "/m/{**}/end"]}}]
        """)
        for p in ["/exact", "/exact?q=1", "/prefix/a/b", "/a/b/suffix", "/t/one/x", "/m/a/b/c/end", "/m/a/end"] {
            XCTAssertTrue(allowed(c, Req(path: p)), p)
        }
        for p in ["/exact/", "/prefix", "/a/suffix/", "/t/one/two/x", "/t//x", "/m//end", "/m/end", "/exactly"] {
            XCTAssertFalse(allowed(c, Req(path: p)), p)
        }
    }

    func test_emptySpec_deniesAll_emptyRuleAllowsAll() throws {
        let none = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-all, namespace: foo}
        spec: {}
        """)
        XCTAssertFalse(allowed(none, Req()))
        let all = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-all, namespace: foo}
        spec: {rules: [{}]}
        """)
        XCTAssertTrue(allowed(all, Req()))
    }

    func test_auditMarksTheRequest_andDryRunOnlyCounts() throws {
        let probe = spec("probe", """
        local f = {}
        function f.on_request(s)
          s.request.headers:set("x-audit", s.vars.access_log_hint or "-")
          s.request.headers:set("x-shadow", s.vars.istio_dry_run_deny_shadow_engine_result or "-")
          s.request.headers:set("x-shadow-id", s.vars.istio_dry_run_deny_shadow_effective_policy_id or "-")
        end
        return f
        """)
        let c = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: audit, namespace: foo}
        spec: {action: AUDIT, rules: [{to: [{operation: {methods: ["DELETE"]}}]}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: dry, namespace: foo, annotations: {istio.io/dry-run: "true"}}
        spec: {action: DENY, rules: [{to: [{operation: {methods: ["DELETE"]}}]}]}
        """, extra: [probe])!
        let s = stream(Req(method: "DELETE"))
        XCTAssertEqual(c.runRequest(s), .continue)
        XCTAssertEqual(s.request.first("x-audit"), "true")
        XCTAssertEqual(s.request.first("x-shadow"), "denied")
        XCTAssertEqual(s.request.first("x-shadow-id"), "ns[foo]-policy[dry]-rule[0]")
        c.runLog(s); runtime.endStream(s); s.end()
        XCTAssertTrue(allowed(c, Req(method: "GET")))
        let counters = metrics.snapshot().counters
        XCTAssertEqual(counters["envoy_http_rbac_istio_dry_run_deny_shadow_denied"], 1)
        XCTAssertEqual(counters["envoy_http_rbac_istio_dry_run_deny_shadow_allowed"], 1)
        XCTAssertNil(counters["envoy_http_rbac_denied"])
    }

    func spec(_ name: String, _ code: String) -> LuaPluginSpec {
        let path = NSTemporaryDirectory() + "moonlet-authz-\(UUID().uuidString)-\(name).lua"
        try! code.write(toFile: path, atomically: true, encoding: .utf8)
        return LuaPluginSpec(name: name, namespace: "", path: path, phase: "UNSPECIFIED_PHASE", priority: 0, pluginConfig: .map([]),
                             failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "test", line: 1)
    }

    func test_requestAuthFields_readSAuth_asRequestAuthenticationWillSetIt() throws {
        // RequestAuthentication (istio-authn) sets s.auth; here the filter's code runs on
        // stand-in streams (tables with an `auth` field): a call that ends in authz.deny
        // raises (a table is not a stream), so it reads "deny". With real tokens through
        // the proxy: AuthorizationWithJWTTests.
        let r = ConfigLoader().loadText("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: jwt, namespace: foo}
        spec:
          rules:
          - from: [{source: {requestPrincipals: ["https://issuer.example/*"], notRequestPrincipals: ["*/banned"]}}]
            when:
            - {key: request.auth.audiences, values: ["orders"]}
            - {key: request.auth.presenter, values: ["web-*"]}
            - {key: "request.auth.claims[groups]", values: ["admin"]}
            - {key: "request.auth.claims[org][tier]", notValues: ["free"]}
        """, file: "in.yaml", baseDir: "/")
        XCTAssertEqual(r.errors.map(\.description), [])
        let conf = AuthorizationCompiler.compile(r.istio, workload: httpbin).config!
        let dir = NSTemporaryDirectory() + "moonlet-authz-auth-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try BuiltinPlugins.istioAuthz.write(toFile: dir + "/authz_under_test.lua", atomically: true, encoding: .utf8)
        try """
        local authz = require("authz_under_test")
        local f = {}
        function f.configure(c) return authz.configure(c) end
        local function stand_in(auth)
          return { listener = "inbound", vars = {}, auth = auth,
            request = { method = "GET", path = "/", authority = "h", headers = { get_all = function() return {} end } },
            source = { principal = "", namespace = "", address = "10.0.0.1:1" }, destination = { port = 8000, address = "" } }
        end
        local good = { principal = "https://issuer.example/alice", audiences = { "billing", "orders" }, presenter = "web-app",
                       claims = { groups = { "dev", "admin" }, org = { tier = "gold" } } }
        local function with(k, v) local a = {}; for key, val in pairs(good) do a[key] = val end; a[k] = v; return a end
        function f.on_request(s, conf)
          local cases = { good, nil, with("principal", "https://issuer.example/banned"), with("principal", "https://other/alice"),
            with("audiences", { "billing" }), with("presenter", "cli"), with("claims", { groups = "admin", org = { tier = "gold" } }),
            with("claims", { groups = { "dev" } }), with("claims", { groups = { "admin" }, org = { tier = "free" } }) }
          local out = {}
          for i = 1, 9 do
            local ok = pcall(authz.on_request, stand_in(cases[i]), conf)
            out[i] = ok and "allow" or "deny"
          end
          s.request.headers:set("x-r", table.concat(out, ","))
        end
        return f
        """.write(toFile: dir + "/probe.lua", atomically: true, encoding: .utf8)
        let probe = LuaPluginSpec(name: "probe", namespace: "", path: dir + "/probe.lua", phase: "UNSPECIFIED_PHASE", priority: 0, pluginConfig: conf,
                                  failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "test", line: 1)
        let c = FilterChain(runtime.filters(for: try host.prepare([probe]).get()))
        let s = stream(Req())
        _ = c.runRequest(s)
        XCTAssertEqual(s.request.first("x-r"), "allow,deny,deny,deny,deny,deny,allow,deny,deny")
        c.runLog(s); runtime.endStream(s); s.end()
    }

    func test_unavailableConditions_failClosed_asIstioDoes() throws {
        // An ALLOW rule that needs an attribute Moonlet cannot read never matches; a DENY
        // rule ignores the condition (and so denies more).
        let r = ConfigLoader().loadText("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: a, namespace: foo}
        spec:
          rules: [{when: [{key: "experimental.envoy.filters.a.b[c]", values: ["x"]}]}]
        """, file: "in.yaml", baseDir: "/")
        let compiled = AuthorizationCompiler.compile(r.istio, workload: httpbin)
        XCTAssertTrue(compiled.notes.contains { $0.contains("never matches") }, "\(compiled.notes)")
        let allow = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: a, namespace: foo}
        spec:
          rules: [{when: [{key: "connection.sni", values: ["*"]}]}]
        """)
        XCTAssertFalse(allowed(allow, Req()))
        let deny = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: d, namespace: foo}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: ["/x"]}}], when: [{key: "experimental.envoy.filters.a.b[c]", values: ["x"]}]}]
        """)
        XCTAssertFalse(allowed(deny, Req(path: "/x")))
        XCTAssertTrue(allowed(deny, Req(path: "/y")))
    }

    func test_matchersAreTaggedUserdata_aTableIsRefused() throws {
        let gen = try host.prepare([spec("t", """
        local f = {}
        function f.on_request(s)
          local ok = pcall(moonlet.authz.test, {}, "x")
          local m = moonlet.authz.cidr("10.0.0.0/8")
          local ok2 = pcall(moonlet.authz.cidr, "10.0.0.0/33")
          s.request.headers:set("x-r", tostring(ok) .. tostring(ok2) .. tostring(moonlet.authz.test(m, "10.2.3.4:80"))
            .. tostring(moonlet.authz.test(m, "[::ffff:10.2.3.4]:80")) .. tostring(getmetatable(m)))
        end
        return f
        """)]).get()
        let c = FilterChain(runtime.filters(for: gen))
        let s = stream(Req())
        _ = c.runRequest(s)
        XCTAssertEqual(s.request.first("x-r"), "falsefalsetruetruefalse")
        c.runLog(s); runtime.endStream(s); s.end()
    }

    // MARK: conformance (Istio's builder testdata: input policies, Envoy RBAC goldens)

    static var conformance: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("shared/conformance/authz").path
    }

    /// Per case: requests and the decision its Envoy golden gives them (read off the
    /// `*-out*.yaml` RBAC policies: ALLOW filter = allowed when a policy matches, DENY =
    /// denied when one matches).
    /// `rename`: values of the input replaced before loading (method names with brackets are
    /// not HTTP tokens, so they cannot be sent).
    struct Case { var name: String; var input: String; var td: String = "cluster.local"; var aliases: [String] = []; var rename: [(String, String)] = []; var requests: [(Req, Bool)] }

    static let p = "cluster.local/ns/foo/sa/x"
    static let cases: [Case] = [
        Case(name: "allow-empty-rule", input: "http/allow-empty-rule-in.yaml", requests: [(Req(), true), (Req(method: "DELETE", path: "/any"), true)]),
        Case(name: "allow-nil-rule", input: "http/allow-nil-rule-in.yaml", requests: [(Req(), false), (Req(principal: p), false)]),
        Case(name: "deny-empty-rule", input: "http/deny-empty-rule-in.yaml", requests: [(Req(), false), (Req(path: "/x", principal: p), false)]),
        // paths and notPaths both contain "*" (.+): the notPaths side never holds.
        Case(name: "allow-path", input: "http/allow-path-in.yaml", requests: [(Req(path: "/exact"), false), (Req(path: "/other"), false)]),
        Case(name: "deny-and-allow", input: "http/deny-and-allow-in.yaml", requests: [
            (Req(principal: "allow"), true), (Req(principal: "deny"), false), (Req(principal: "other"), false), (Req(), false)]),
        Case(name: "multiple-policies", input: "http/multiple-policies-in.yaml", requests: [
            (Req(method: "GET", path: "/x"), true), (Req(method: "PUT", path: "/v1"), true), (Req(method: "PUT", host: "httpbin.org"), true),
            (Req(method: "PUT", host: "HTTPBIN.ORG"), true), (Req(method: "PUT", path: "/v3", host: "x.org"), false),
            (Req(method: "PUT", path: "/v3", host: "x.org", port: 90), true), (Req(method: "PUT", path: "/v3", host: "x.org", principal: "principals2"), true),
            (Req(method: "PUT", path: "/v3", host: "x.org", principal: "td/ns/namespaces1/sa/a"), true),
            (Req(method: "PUT", path: "/v3", host: "x.org", address: "5.6.7.8:9"), true),
            (Req(method: "PUT", path: "/v3", host: "x.org", headers: [("X-ABC", "abc2")]), true),
            (Req(method: "PUT", path: "/v3", host: "x.org", headers: [("X-ABC", "abc3")]), false)]),
        Case(name: "single-policy", input: "http/single-policy-in.yaml", requests: [
            // Every source needs a requestPrincipal (a verified JWT: no s.auth yet), so nothing is allowed.
            (Req(principal: "rule[1]-from[0]-principal[1]", address: "10.1.0.2:1", port: 9101), false),
            (Req(), false)]),
        Case(name: "dry-run-allow-and-deny", input: "http/dry-run-allow-and-deny-in.yaml", requests: [(Req(path: "/deny"), true), (Req(path: "/x"), true)]),
        Case(name: "dry-run-allow", input: "http/dry-run-allow-in.yaml", requests: [(Req(path: "/x"), true)]),
        Case(name: "dry-run-mix", input: "http/dry-run-mix-in.yaml", requests: [(Req(path: "/allow"), false), (Req(path: "/another"), true), (Req(path: "/x"), false)]),
        Case(name: "audit-full-rule", input: "http/audit-full-rule-in.yaml", requests: [(Req(method: "DELETE", path: "/admin"), true)]),
        Case(name: "trust-domains-field", input: "http/trust-domains-in.yaml", requests: [
            (Req(principal: "cluster.local/ns/a/sa/b"), true), (Req(principal: "another.local/ns/a/sa/b"), true),
            (Req(principal: "other.td/ns/a/sa/b"), true), // second source: notTrustDomains
            (Req(principal: "bad-td/ns/a/sa/b"), false), (Req(principal: "untrusted/ns/a/sa/b"), false), (Req(), true)]),
        Case(name: "trust-domain-one-alias", input: "http/simple-policy-td-aliases-in.yaml", td: "td1", aliases: ["cluster.local"],
             rename: [("rule[0]-to[0]-method[0]", "M0"), ("rule[1]-to[0]-method[0]", "M1")], requests: [
            (Req(method: "M1", principal: "td1/ns/rule[1]/sa/from[0]-principal[0]"), true),
            (Req(method: "M1", principal: "cluster.local/ns/rule[1]/sa/from[0]-principal[0]"), true),
            (Req(method: "M1", principal: "td2/ns/rule[1]/sa/from[0]-principal[0]"), false),
            (Req(method: "M0", principal: "td1/ns/rule[0]/sa/from[0]-principal[0]"), true),
            (Req(method: "M0", principal: "td1/ns/rule[0]/sa/from[1]-principal[1]"), false), // needs namespace rule[0]-from[1]-ns[0]
        ]),
        Case(name: "trust-domain-multiple-aliases", input: "http/simple-policy-multiple-td-aliases-in.yaml", td: "td1", aliases: ["cluster.local", "some-td"], requests: [
            (Req(method: "GET", principal: "some-td/ns/rule[0]/sa/from[0]-principal[0]"), true),
            (Req(method: "GET", principal: "td1/ns/rule[0]/sa/from[0]-principal[0]"), true),
            (Req(method: "GET", principal: "nope/ns/rule[0]/sa/from[0]-principal[0]"), false)]),
        Case(name: "trust-domain-wildcard-in-principal", input: "http/simple-policy-principal-with-wildcard-in.yaml", td: "td1", aliases: ["foobar"], requests: [
            (Req(principal: "any/ns/x/sa/y"), true), (Req(), false)]),
        Case(name: "trust-domain-aliases-in-source-principal", input: "http/td-aliases-source-principal-in.yaml", td: "new-td", aliases: ["old-td", "some-trustdomain"], requests: [
            (Req(principal: "x/ns/istio-system/sa/y"), true), (Req(principal: "x/ns/foo/sa/y"), false), (Req(), false)]),
        Case(name: "tcp-deny-both-http-tcp", input: "tcp/deny-both-http-tcp-in.yaml", requests: []),
        Case(name: "tcp-allow-only-http", input: "tcp/allow-only-http-in.yaml", requests: []),
    ]

    /// Calls `body` with each conformance case and its input policies (renames applied).
    func forEachConformanceCase(_ body: (Case, String) throws -> Void) throws {
        let root = Self.conformance
        guard FileManager.default.fileExists(atPath: root) else { throw XCTSkip("conformance data not found at \(root)") }
        for k in Self.cases {
            var yaml = try String(contentsOfFile: "\(root)/\(k.input)", encoding: .utf8)
            for (from, to) in k.rename { yaml = yaml.replacingOccurrences(of: from, with: to) }
            try body(k, yaml)
        }
    }

    func test_istioBuilderConformanceCases_decideAsTheirEnvoyGoldens() throws {
        var checked = 0
        try forEachConformanceCase { k, yaml in
            let c = try chain(yaml, trustDomain: k.td, aliases: k.aliases)
            for (i, (q, want)) in k.requests.enumerated() {
                XCTAssertEqual(allowed(c, q), want, "\(k.name) request \(i): \(q.method) \(q.path) principal=\(q.principal)")
                checked += 1
            }
        }
        XCTAssertGreaterThanOrEqual(checked, 35)
    }

    func test_nativeRuleEvaluation_decidesEveryConformanceRequestAsTheLuaLoop() throws {
        // authz.rules / authz.decider compile the common rules natively; the filter's Lua
        // loop is the reference. Both must give the same answer on every case, including
        // the ones the native path takes (principals, methods, paths, hosts, ports, IPs).
        var checked = 0
        try forEachConformanceCase { k, yaml in
            let native = try chain(yaml, trustDomain: k.td, aliases: k.aliases)
            let lua = try chain(yaml, trustDomain: k.td, aliases: k.aliases, luaOnly: true)
            var probes = k.requests.map(\.0)
            probes += [Req(), Req(method: "DELETE", path: "/admin"), Req(path: "/v1?x=1"), Req(address: "1.2.3.4:5"), Req(port: 90)]
            for (i, q) in probes.enumerated() {
                XCTAssertEqual(allowed(native, q), allowed(lua, q), "\(k.name) request \(i): \(q.method) \(q.path) principal=\(q.principal)")
                checked += 1
            }
        }
        XCTAssertGreaterThanOrEqual(checked, 100)
    }

    func test_seedPolicy_isDecidedByOneNativeCall() throws {
        // The seed's policy (principal, methods, path prefix) takes the native path: the
        // compiled configuration carries a decider.
        let c = try chain("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: order, namespace: foo}
        spec:
          selector: {matchLabels: {app: httpbin}}
          action: ALLOW
          rules:
          - from: [{source: {principals: ["cluster.local/ns/foo/sa/frontend"]}}]
            to: [{operation: {methods: ["GET", "POST"], paths: ["/api/order/*"]}}]
        """)
        let fe = "cluster.local/ns/foo/sa/frontend"
        XCTAssertTrue(allowed(c, Req(method: "GET", path: "/api/order/1", principal: fe)))
        XCTAssertFalse(allowed(c, Req(method: "DELETE", path: "/api/order/1", principal: fe)))
        XCTAssertFalse(allowed(c, Req(method: "GET", path: "/admin", principal: fe)))
        XCTAssertFalse(allowed(c, Req(method: "GET", path: "/api/order/1", principal: "cluster.local/ns/foo/sa/other")))
        let counters = metrics.snapshot().counters
        XCTAssertEqual(counters["envoy_http_rbac_allowed"], 1)
        XCTAssertEqual(counters["envoy_http_rbac_denied"], 3)
        XCTAssertTrue(BuiltinPlugins.istioAuthz.contains("out.decider = A.decider(out.deny, out.allow)"))
    }

    func test_embeddedAuthz_isThePluginsFile() throws {
        let file = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("plugins/istio-authz.lua")
        XCTAssertEqual(try String(contentsOf: file, encoding: .utf8), BuiltinPlugins.istioAuthz)
    }
}
