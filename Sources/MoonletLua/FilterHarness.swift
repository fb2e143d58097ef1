import CLua
import MoonletCore
import MoonletConfig
import MoonletTelemetry
import NIOCore
import NIOConcurrencyHelpers
import Logging
#if canImport(Foundation)
import Foundation
#endif

// MARK: - Offline filter tests (`moonlet filter test`)
//
// A filter runs here in the same sandbox, API and budgets as in the proxy: the plugin is
// validated by `LuaHost.prepare` and loaded into a `LuaVM` as a `LuaPluginInstance`, the
// code the event loops run. What the proxy does around the filter chain (parse, dispatch
// upstream, frame a local reply) is simulated without sockets, in the proxy's order:
// on_request, on_request_body (whole body), then, unless the filter answered locally, the
// case's simulated upstream response, on_response, on_response_body, and on_log.

/// One expected header of a case: a value, or nil for "must be absent".
public typealias ExpectedHeader = (name: String, value: String?)

/// What a case expects; nil fields are not checked.
public struct FilterCaseExpectation: Sendable {
    /// The status the client gets.
    public var status: Int?
    /// A subset of the response headers the client gets (nil value: absent).
    public var responseHeaders: [ExpectedHeader]?
    /// The body the client gets.
    public var body: String?
    /// A subset of the headers the upstream gets (nil value: absent).
    public var upstreamRequestHeaders: [ExpectedHeader]?
    /// The path (request target) the upstream gets.
    public var upstreamPath: String?
    /// Substrings each found in some log line of the case.
    public var logs: [String]?
    /// Metric values at the end of the case, by the key a case gives
    /// (`FilterHarness.metricValue`: `name`, `name{label="v"}`, `name_count`, `name_sum`).
    public var metrics: [(name: String, value: Double)]?
    /// What the filter sent with `moonlet.http.call` / `httpCall`, in order (nil: unchecked).
    public var calls: [ExpectedCall]?
    /// A substring of a Lua error the case expects (without it, any Lua error or budget
    /// abort fails the case).
    public var luaError: String?
    public init() {}
}

/// One case of a CASES.yaml file.
public struct FilterTestCase: Sendable {
    public var name: String
    /// Line of the case in its file.
    public var line: Int
    public var method = "GET"
    public var path = "/"
    public var headers: [(name: String, value: String)] = []
    public var body = ""
    public var principal = ""
    public var address = "127.0.0.1:40000"
    /// The simulated upstream response (200, no headers, empty body when nil).
    public var upstream: (status: Int, headers: [(name: String, value: String)], body: String)?
    public var expect = FilterCaseExpectation()
    /// `variant:` the experiment arm the filter runs as (what `moonlet.variant()`
    /// returns in this case); nil: none.
    public var variant: String?
    /// `calls:` the stubs that answer the filter's `moonlet.http.call`s, in order.
    public var calls: [StubCall] = []
    public init(name: String, line: Int) { self.name = name; self.line = line }
}

/// A parsed CASES.yaml.
public struct FilterTestSuite: Sendable {
    /// `pluginConfig` of the file (nil when absent).
    public var pluginConfig: ConfigValue?
    public var cases: [FilterTestCase] = []

    /// Parses CASES.yaml text; every problem is reported as `file:line:col: field: message`.
    public static func parse(_ text: String, file: String) throws -> FilterTestSuite {
        var errors: [ConfigError] = []
        let docs = try YAMLReader.positionedDocuments(text, file: file)
        guard docs.count == 1 else {
            throw ConfigErrors([ConfigError(file: file, line: 1, column: 1, message: docs.isEmpty ? "empty file: expected a mapping with `cases`" : "one YAML document expected, found \(docs.count)")])
        }
        let root = docs[0]
        var p = CaseParser(file: file)
        let suite = p.suite(root)
        errors += p.errors
        if !errors.isEmpty { throw ConfigErrors(errors) }
        return suite
    }
}

/// Walks the CASES.yaml nodes, collecting errors with their positions.
struct CaseParser {
    let file: String
    var errors: [ConfigError] = []

    mutating func err(_ n: PositionedNode?, _ field: String, _ msg: String, line: Int? = nil, col: Int? = nil) {
        errors.append(ConfigError(file: file, line: line ?? n?.line ?? 1, column: col ?? n?.column ?? 1, field: field, message: msg))
    }

    /// The entries of a mapping, refusing keys outside `allowed`.
    mutating func fields(_ n: PositionedNode, _ field: String, _ allowed: [String]) -> [(key: String, keyLine: Int, keyColumn: Int, value: PositionedNode)]? {
        guard let m = n.mapping else { err(n, field, "must be a mapping"); return nil }
        var out: [(key: String, keyLine: Int, keyColumn: Int, value: PositionedNode)] = []
        for e in m {
            let f = field.isEmpty ? e.key : field + "." + e.key
            if allowed.contains(e.key) { out.append(e) } else { err(nil, f, "unknown field (expected one of: \(allowed.joined(separator: ", ")))", line: e.keyLine, col: e.keyColumn) }
        }
        return out
    }

    /// A scalar as written (`1` is "1", `true` is "true"); null, lists and maps are refused.
    mutating func string(_ n: PositionedNode, _ field: String) -> String? {
        guard let raw = n.scalarString, n.value != .null else { err(n, field, "must be a string"); return nil }
        return raw
    }

    mutating func int(_ n: PositionedNode, _ field: String, range: ClosedRange<Int>? = nil) -> Int? {
        guard case .int(let i) = n.value else { err(n, field, "must be an integer"); return nil }
        if let r = range, !r.contains(i) { err(n, field, "must be in \(r.lowerBound)...\(r.upperBound), got \(i)"); return nil }
        return i
    }

    /// A body: a string (an empty or absent value is the empty body).
    mutating func body(_ n: PositionedNode, _ field: String) -> String? {
        if n.value == .null { return "" }
        return string(n, field)
    }

    /// Header map: name → scalar (`nullable`: a null value stands for "absent").
    mutating func headers(_ n: PositionedNode, _ field: String, nullable: Bool) -> [(name: String, value: String?)]? {
        if n.value == .null { return [] }
        guard let m = n.mapping else { err(n, field, "must be a mapping of header names to values"); return nil }
        var out: [(name: String, value: String?)] = []
        for e in m {
            let f = "\(field).\(e.key)"
            guard HeaderValidation.isToken(e.key) else { err(nil, f, "not a valid header name", line: e.keyLine, col: e.keyColumn); continue }
            if e.value.value == .null {
                if nullable { out.append((e.key.lowercased(), nil)) } else { err(e.value, f, "must be a string") }
                continue
            }
            guard let v = string(e.value, f) else { continue }
            out.append((e.key.lowercased(), v))
        }
        return out
    }

    mutating func suite(_ root: PositionedNode) -> FilterTestSuite {
        var s = FilterTestSuite()
        guard let top = fields(root, "", ["pluginConfig", "cases"]) else { return s }
        var casesNode: PositionedNode?
        for e in top {
            switch e.key {
            case "pluginConfig":
                if e.value.value != .null && e.value.mapping == nil { err(e.value, "pluginConfig", "must be a mapping") } else { s.pluginConfig = e.value.value }
            default: casesNode = e.value
            }
        }
        guard let cn = casesNode else { err(root, "cases", "missing: a list of cases"); return s }
        guard let list = cn.sequence, !list.isEmpty else { err(cn, "cases", "must be a non-empty list"); return s }
        var names: Set<String> = []
        for (i, c) in list.enumerated() {
            if let tc = testCase(c, "cases[\(i)]") {
                if !names.insert(tc.name).inserted { err(c, "cases[\(i)].name", "duplicate case name \"\(tc.name)\"") }
                s.cases.append(tc)
            }
        }
        return s
    }

    mutating func testCase(_ n: PositionedNode, _ field: String) -> FilterTestCase? {
        let before = errors.count
        guard let m = fields(n, field, ["name", "request", "upstream", "expect", "variant", "calls"]) else { return nil }
        var name: String?
        if let nn = n.child("name") { name = string(nn, field + ".name") } else { err(n, field + ".name", "missing") }
        var c = FilterTestCase(name: name ?? "", line: n.line)
        for e in m {
            let f = field + "." + e.key
            switch e.key {
            case "request": request(e.value, f, &c)
            case "upstream": upstream(e.value, f, &c)
            case "expect": expect(e.value, f, &c)
            case "variant": c.variant = string(e.value, f)
            case "calls": if let v = calls(e.value, f) { c.calls = v }
            default: break
            }
        }
        if n.child("request") == nil { err(n, field + ".request", "missing") }
        return errors.count == before ? c : nil
    }

    mutating func request(_ n: PositionedNode, _ field: String, _ c: inout FilterTestCase) {
        guard let m = fields(n, field, ["method", "path", "headers", "body", "source"]) else { return }
        for e in m {
            let f = field + "." + e.key
            switch e.key {
            case "method":
                if let v = string(e.value, f) {
                    if v.isEmpty || !HeaderValidation.isToken(v) { err(e.value, f, "not a valid method") } else { c.method = v }
                }
            case "path":
                if let v = string(e.value, f) {
                    let ok = v.utf8.withContiguousStorageIfAvailable { HTTPHeadParser.isOriginForm(UnsafeRawBufferPointer($0)) } ?? false
                    if ok { c.path = v } else { err(e.value, f, "must be origin-form: \"/\", then visible ASCII without \"#\"") }
                }
            case "headers":
                if let h = headers(e.value, f, nullable: false) {
                    for x in h where ["content-length", "transfer-encoding"].contains(x.name) { err(e.value, f + "." + x.name, "set by the harness from body") }
                    c.headers = h.map { ($0.name, $0.value ?? "") }
                }
            case "body": if let b = body(e.value, f) { c.body = b }
            default:
                guard let sm = fields(e.value, f, ["principal", "address"]) else { continue }
                for x in sm {
                    guard let v = string(x.value, f + "." + x.key) else { continue }
                    if x.key == "principal" { c.principal = v } else { c.address = v }
                }
            }
        }
    }

    mutating func upstream(_ n: PositionedNode, _ field: String, _ c: inout FilterTestCase) {
        guard let m = fields(n, field, ["status", "headers", "body"]) else { return }
        var u: (status: Int, headers: [(name: String, value: String)], body: String) = (200, [], "")
        for e in m {
            let f = field + "." + e.key
            switch e.key {
            case "status": if let v = int(e.value, f, range: 100...599) { u.status = v }
            case "headers":
                if let h = headers(e.value, f, nullable: false) {
                    for x in h where ["content-length", "transfer-encoding"].contains(x.name) { err(e.value, f + "." + x.name, "set by the harness from body") }
                    u.headers = h.map { ($0.name, $0.value ?? "") }
                }
            default: if let b = body(e.value, f) { u.body = b }
            }
        }
        c.upstream = u
    }

    mutating func expect(_ n: PositionedNode, _ field: String, _ c: inout FilterTestCase) {
        guard let m = fields(n, field, ["status", "response_headers", "body", "upstream_request_headers", "upstream_path", "logs", "metrics", "lua_error", "calls"]) else { return }
        var x = FilterCaseExpectation()
        for e in m {
            let f = field + "." + e.key
            switch e.key {
            case "status": x.status = int(e.value, f, range: 100...599)
            case "response_headers": x.responseHeaders = headers(e.value, f, nullable: true)
            case "body": x.body = body(e.value, f)
            case "upstream_request_headers": x.upstreamRequestHeaders = headers(e.value, f, nullable: true)
            case "upstream_path": x.upstreamPath = string(e.value, f)
            case "logs":
                guard let list = e.value.sequence else { err(e.value, f, "must be a list of strings"); continue }
                var out: [String] = []
                for (i, l) in list.enumerated() { if let v = string(l, "\(f)[\(i)]") { out.append(v) } }
                x.logs = out
            case "metrics":
                guard let mm = e.value.mapping else { err(e.value, f, "must be a mapping of metric names to numbers"); continue }
                var out: [(name: String, value: Double)] = []
                for kv in mm {
                    switch kv.value.value {
                    case .int(let i): out.append((kv.key, Double(i)))
                    case .double(let d) where d.isFinite: out.append((kv.key, d))
                    default: err(kv.value, "\(f).\(kv.key)", "must be a number")
                    }
                }
                x.metrics = out
            case "calls": x.calls = expectedCalls(e.value, f)
            default: x.luaError = string(e.value, f)
            }
        }
        c.expect = x
    }
}

/// One mismatch of a case.
public struct FilterTestFailure: Sendable, Equatable {
    public var field: String
    public var expected: String
    public var got: String
}

/// The outcome of one case.
public struct FilterCaseResult: Sendable {
    public var name: String
    public var line: Int
    public var failures: [FilterTestFailure]
    public var passed: Bool { failures.isEmpty }
    /// What the case produced (for messages and tests).
    public var status: Int
    public var body: String
    public var logs: [String]
}

/// The outcome of a run.
public struct FilterTestReport: Sendable {
    public var file: String
    public var results: [FilterCaseResult]
    public var passed: Int { results.filter(\.passed).count }
    public var failed: Int { results.count - passed }

    /// Each failing case with its fields (expected vs got), then the summary line.
    public var text: String {
        var o = ""
        for r in results where !r.passed {
            o += "FAIL \(file):\(r.line): \(r.name)\n"
            for f in r.failures {
                o += "  \(f.field):\n    expected: \(f.expected)\n    got:      \(f.got)\n"
            }
        }
        o += "\(passed) passed, \(failed) failed\n"
        return o
    }
}

/// Log lines of the filter, kept per case (the harness logs at every level).
final class CapturedLog: @unchecked Sendable {
    let lock = NIOLock()
    var lines: [String] = []
    func append(_ l: String) { lock.withLock { lines.append(l) } }
    func take() -> [String] { lock.withLock { let l = lines; lines = []; return l } }
}

struct CaptureLogHandler: LogHandler {
    let box: CapturedLog
    var logLevel: Logger.Level = .trace
    var metadata: Logger.Metadata = [:]
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
        box.append("[\(level)] \(message)")
    }
}

/// Runs the cases of a CASES.yaml against one Lua filter, offline.
public final class FilterHarness {
    public let spec: LuaPluginSpec
    let host: LuaHost
    let generation: LuaPluginGeneration
    let log = CapturedLog()
    var nextID: UInt64 = 0
    /// The experiment arms of the LuaPlugin resource given with --plugin-config (its
    /// `variants` by name, and `shadow`): a case's `variant:` runs that arm's file with
    /// its pluginConfig. Empty: no experiment, a case's `variant:` only names what
    /// `moonlet.variant()` returns.
    public var arms: [String: LuaPluginSpec] = [:]
    var armGenerations: [String: LuaPluginGeneration] = [:]

    /// Validates and compiles the filter as the proxy does (module code and `configure`
    /// run once). Throws `LuaPrepareError` naming the file and line on a bad filter.
    public init(spec: LuaPluginSpec, limits: LuaLimits = LuaLimits()) throws {
        self.spec = spec
        let box = log
        var logger = Logger(label: "moonlet.filter-test") { _ in CaptureLogHandler(box: box) }
        logger.logLevel = .trace
        host = LuaHost(logger: logger, limits: limits)
        switch host.prepare([spec]) {
        case .success(let g): generation = g
        case .failure(let e): throw e
        }
    }

    /// The plugin spec `moonlet filter test` runs: the filter file, its name (the file's
    /// base name), `pluginConfig`; a LuaPlugin resource given with --plugin-config lends
    /// its name, phase, failStrategy and limits; its variants and shadow are run by the
    /// cases that name them (`arms(of:)`, `FilterHarness.arms`), not by this spec.
    public static func spec(filter: String, pluginConfig: ConfigValue, from resource: LuaPluginSpec? = nil) -> LuaPluginSpec {
        let base = ((filter as NSString).lastPathComponent as NSString).deletingPathExtension
        var s = resource ?? LuaPluginSpec(name: base, namespace: "", path: filter, phase: "UNSPECIFIED_PHASE", priority: 0, pluginConfig: .map([]),
                                          failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil,
                                          file: filter, line: 1)
        s.path = filter
        s.pluginConfig = pluginConfig
        // The file under test is the filter of the cases without `variant:` (there
        // moonlet.variant() gives nil); the experiment's arms are `arms(of:)`.
        s.variants = []; s.shadow = nil; s.guardrail = nil
        return s
    }

    /// The arms of a resource's experiment, each as a plugin of its own file and
    /// pluginConfig (the shadow under the name "shadow").
    public static func arms(of resource: LuaPluginSpec?) -> [String: LuaPluginSpec] {
        guard let r = resource else { return [:] }
        var out: [String: LuaPluginSpec] = [:]
        func arm(_ path: String, _ config: ConfigValue) -> LuaPluginSpec {
            var a = r
            a.path = path; a.pluginConfig = config
            a.variants = []; a.shadow = nil; a.guardrail = nil
            return a
        }
        for v in r.variants { out[v.name] = arm(v.path, v.pluginConfig) }
        if let sh = r.shadow { out["shadow"] = arm(sh.path, sh.pluginConfig) }
        return out
    }

    /// Runs every case; one fresh VM per case (nothing a case leaves in module state
    /// reaches the next; `moonlet.shared` dicts are process-wide, as in the proxy).
    public func run(_ suite: FilterTestSuite, file: String) -> FilterTestReport {
        FilterTestReport(file: file, results: suite.cases.map(run))
    }

    /// Runs one case through the phases, in the proxy's order, and compares.
    public func run(_ c: FilterTestCase) -> FilterCaseResult {
        _ = log.take()
        let shard = MetricsShard()
        let runtime = LuaLoopRuntime(host: host, metrics: shard)
        var gen = generation
        var plugin = spec
        if let v = c.variant, !arms.isEmpty {
            guard let a = arms[v] else {
                let known = arms.keys.sorted().joined(separator: ", ")
                return FilterCaseResult(name: c.name, line: c.line, failures: [FilterTestFailure(field: "variant", expected: "one of the LuaPlugin's variants: \(known)", got: "\(Self.quote(v)) in case \(Self.quote(c.name))")],
                                        status: 0, body: "", logs: [])
            }
            plugin = a
            if let g = armGenerations[v] { gen = g } else {
                switch host.prepare([a]) {
                case .success(let g): gen = g; armGenerations[v] = g
                case .failure(let e):
                    return FilterCaseResult(name: c.name, line: c.line, failures: [FilterTestFailure(field: "load", expected: "variant \(v) loads", got: "\(e)")],
                                            status: 0, body: "", logs: log.take())
                }
            }
        }
        let filters = runtime.filters(for: gen)
        let client = StubHTTPClient(stubs: c.calls)
        runtime.vm.httpClient = client
        var failures: [FilterTestFailure] = []
        guard !filters.isEmpty else {
            let lines = log.take()
            return FilterCaseResult(name: c.name, line: c.line, failures: [FilterTestFailure(field: "load", expected: "the filter loads", got: lines.last ?? "load failed")],
                                    status: 0, body: "", logs: lines)
        }
        let chain = FilterChain(filters)
        var raw = "\(c.method) \(c.path) HTTP/1.1\r\n"
        if !c.headers.contains(where: { $0.name == "host" }) { raw += "host: localhost\r\n" }
        for h in c.headers { raw += "\(h.name): \(h.value)\r\n" }
        if !c.body.isEmpty { raw += "content-length: \(c.body.utf8.count)\r\n" }
        raw += "\r\n"
        var parser = HTTPHeadParser()
        guard case .complete(var head, _) = parser.parseRequest(ByteBuffer(string: raw)) else {
            return FilterCaseResult(name: c.name, line: c.line, failures: [FilterTestFailure(field: "request", expected: "a valid HTTP request", got: "the request head does not parse: \(raw.debugDescription)")],
                                    status: 0, body: "", logs: [])
        }
        head.markFiltersStart()
        nextID += 1
        var peer = PeerInfo(address: c.address)
        peer.principal = c.principal
        if let r = c.principal.range(of: "/ns/") { peer.namespace = String(c.principal[r.upperBound...].prefix { $0 != "/" }) }
        let s = ProxyStream(id: nextID, request: head, source: peer, filterCount: chain.filters.count, startNanos: LuaPluginInstance.nanos())
        s.requestBodyBytes = Int64(c.body.utf8.count)
        if let v = c.variant { runtime.vm.runAsVariant(v, plugin: plugin, stream: s.id) }

        // Request phases (a phase waiting in moonlet.http.call is resumed with its stub's answer).
        var upstreamRequest: HTTPHead?
        var clientBody = ""
        let resumer = HarnessResumer(chain: chain)
        var action = chain.runRequest(s)
        if action == .pause { action = resumer.drive(s, action, client: client) ?? .continue }
        if action != .respond && s.localReply == nil {
            if action == .stopAndBuffer {
                let b = ByteBuffer(string: c.body)
                s.bufferedRequestBody = b
                let a = chain.runRequestBody(s, chunk: b, endOfStream: true)
                if a == .pause { _ = resumer.drive(s, a, client: client) }
            } else if chain.wantsRequestBody {
                if !c.body.isEmpty { _ = chain.runRequestBody(s, chunk: ByteBuffer(string: c.body), endOfStream: false) }
                if s.localReply == nil { _ = chain.runRequestBody(s, chunk: ByteBuffer(), endOfStream: true) }
            }
        }
        if s.localReply == nil {
            // What goes upstream, then the simulated upstream's response.
            upstreamRequest = s.request
            s.upstreamHost = "127.0.0.1:8080"
            let u: (status: Int, headers: [(name: String, value: String)], body: String) = c.upstream ?? (status: 200, headers: [], body: "")
            var rr = "HTTP/1.1 \(u.status) \(Self.reason(u.status))\r\n"
            for h in u.headers { rr += "\(h.name): \(h.value)\r\n" }
            rr += "content-length: \(u.body.utf8.count)\r\n\r\n"
            var rp = HTTPHeadParser()
            if case .complete(var rh, _) = rp.parseResponse(ByteBuffer(string: rr), requestWasHead: s.request.isHead) {
                rh.stripHopByHop()
                rh.removeAll(of: .server)
                LocalReplyBuilder.applyRouteResponseEdits(s, to: &rh)
                rh.markFiltersStart()
                s.response = rh
                var responseAction = chain.runResponse(s)
                if responseAction == .pause { responseAction = resumer.drive(s, responseAction, client: client) ?? .continue }
                if responseAction == .respond, s.localReply != nil {
                    s.response = nil
                } else if responseAction == .stopAndBuffer {
                    // As the proxy: the whole body once, which a filter may replace.
                    s.bufferedResponseBody = ByteBuffer(string: s.request.isHead ? "" : u.body)
                    if chain.runBufferedResponseBody(s) == .respond, s.localReply != nil {
                        s.response = nil
                    } else {
                        let b = s.bufferedResponseBody ?? ByteBuffer()
                        clientBody = String(decoding: b.readableBytesView, as: UTF8.self)
                        s.responseBodyBytes = Int64(b.readableBytes)
                        if !s.request.isHead, var h = s.response.take() {
                            _ = h.remove("content-length")
                            h.addLowercased("content-length", String(b.readableBytes))
                            s.response = h
                        }
                    }
                    s.bufferedResponseBody = nil
                } else {
                    s.responseBodyBytes = Int64(u.body.utf8.count)
                    if chain.wantsResponseBody {
                        if !u.body.isEmpty { chain.runResponseBody(s, chunk: ByteBuffer(string: u.body), endOfStream: false) }
                        chain.runResponseBody(s, chunk: ByteBuffer(), endOfStream: true)
                    }
                    clientBody = s.request.isHead ? "" : u.body
                }
                // The filters' edits are held to LocalReplyCheck as in the proxy: a head
                // that would break the client's framing becomes a clean 500.
                if let edited = s.response, LocalReplyCheck.problem(edited, limits: ProxyLimits()) != nil {
                    s.response = nil
                    s.localReply = LocalReplyCheck.replacement
                }
            } else {
                failures.append(FilterTestFailure(field: "upstream", expected: "a valid HTTP response", got: "the upstream head does not parse: \(rr.debugDescription)"))
            }
        }
        if s.localReply != nil { clientBody = localReply(s, chain) }
        while client.runNext() {}      // asynchronous calls (Envoy httpCall, asynchronous = true)
        chain.runLog(s)
        runtime.endStream(s)
        let lines = log.take()
        let stats = shard.snapshot()
        s.end()

        // Compare.
        let x = c.expect
        let status = s.response?.status ?? s.status
        func fail(_ f: String, _ e: String, _ g: String) { failures.append(FilterTestFailure(field: f, expected: e, got: g)) }
        let luaErrors = lines.filter { $0.hasPrefix("[error] plugin \(plugin.name): ") }
        if let want = x.luaError {
            if !luaErrors.contains(where: { $0.contains(want) }) { fail("lua_error", Self.quote(want), luaErrors.isEmpty ? "no Lua error" : luaErrors.joined(separator: " | ")) }
        } else if let first = luaErrors.first {
            fail("lua error", "none", String(first.dropFirst("[error] ".count)))
        }
        if let want = x.status, want != status { fail("status", "\(want)", "\(status)") }
        if let want = x.body, want != clientBody { fail("body", Self.quote(want), Self.quote(clientBody)) }
        if let want = x.responseHeaders {
            compareHeaders(want, s.response, "response_headers", &failures)
        }
        if let want = x.upstreamRequestHeaders {
            if let ur = upstreamRequest { compareHeaders(want, ur, "upstream_request_headers", &failures) }
            else { fail("upstream_request_headers", "a request upstream", "none: local reply \(status)") }
        }
        if let want = x.upstreamPath {
            if let ur = upstreamRequest { if ur.target != want { fail("upstream_path", Self.quote(want), Self.quote(ur.target)) } }
            else { fail("upstream_path", Self.quote(want), "none: local reply \(status)") }
        }
        for want in x.logs ?? [] where !lines.contains(where: { $0.contains(want) }) {
            fail("logs", "a line containing \(Self.quote(want))", lines.isEmpty ? "no log lines" : lines.map { Self.quote($0) }.joined(separator: ", "))
        }
        for (name, want) in x.metrics ?? [] {
            switch Self.metricValue(name, stats, plugin: plugin.name, registry: host.userMetrics) {
            case .success(let got):
                if abs(got - want) > 1e-9 * max(1, abs(want)) { fail("metrics.\(name)", Self.metricText(want), Self.metricText(got)) }
            case .failure(let e): fail("metrics.\(name)", Self.metricText(want), e.message)
            }
        }
        compareCalls(x.calls, client, &failures)
        return FilterCaseResult(name: c.name, line: c.line, failures: failures, status: status, body: clientBody, logs: lines)
    }

    func compareHeaders(_ want: [ExpectedHeader], _ head: HTTPHead?, _ field: String, _ failures: inout [FilterTestFailure]) {
        for (n, v) in want {
            let got = head?.all(n) ?? []
            let gotText = got.isEmpty ? "absent" : got.map { Self.quote($0) }.joined(separator: ", ")
            if let v {
                if got.joined(separator: ", ") != v && !(got.count == 1 && got[0] == v) { failures.append(FilterTestFailure(field: "\(field).\(n)", expected: Self.quote(v), got: gotText)) }
            } else if !got.isEmpty {
                failures.append(FilterTestFailure(field: "\(field).\(n)", expected: "absent", got: gotText))
            }
        }
    }

    /// The local reply through the response filters, as the proxy sends it: the proxy's
    /// own builder (LocalReplyBuilder: LocalReplyCheck, the gRPC mapping, on_response,
    /// the header retention rule, the head limits). Returns the body the client gets.
    func localReply(_ s: ProxyStream, _ chain: FilterChain) -> String {
        guard s.localReply != nil else { return "" }
        let (_, body) = LocalReplyBuilder.build(s, chain: chain, limits: ProxyLimits(), requestWasHead: s.request.isHead,
                                                allocator: ByteBufferAllocator()) { _ in }
        guard let body else { return "" }
        return String(decoding: body.readableBytesView, as: UTF8.self)
    }

    static func reason(_ status: Int) -> String {
        switch status {
        case 200: return "OK"
        case 404: return "Not Found"
        case 500: return "Internal Server Error"
        case 503: return "Service Unavailable"
        default: return "Status"
        }
    }

    static func quote(_ s: String) -> String { JSON.quote(s) }
}

/// `moonlet filter test`: reads the files, runs the cases, and says what failed.
public enum FilterTestCommand {
    /// What a run ended with: the text to print and the exit code (0: every case passed,
    /// 1: a case failed, 2: a file could not be read or the filter did not load).
    public struct Outcome: Sendable {
        public var output: String
        public var exitCode: Int32
        public var report: FilterTestReport?
    }

    public static func run(filter: String, cases: String, pluginConfig: String? = nil, limits: LuaLimits = LuaLimits()) -> Outcome {
        func read(_ p: String) -> String? {
            FileManager.default.contents(atPath: p).flatMap { String(data: $0, encoding: .utf8) }
        }
        guard let casesText = read(cases) else { return Outcome(output: "\(cases): cannot read file\n", exitCode: 2) }
        guard FileManager.default.fileExists(atPath: filter) else { return Outcome(output: "\(filter): cannot read file\n", exitCode: 2) }
        let suite: FilterTestSuite
        do { suite = try FilterTestSuite.parse(casesText, file: cases) } catch { return Outcome(output: "\(error)\n", exitCode: 2) }
        var config = suite.pluginConfig ?? .map([])
        var resource: LuaPluginSpec?
        if let pc = pluginConfig {
            guard let text = read(pc) else { return Outcome(output: "\(pc): cannot read file\n", exitCode: 2) }
            switch loadPluginConfig(text, file: pc) {
            case .failure(let e): return Outcome(output: "\(e)\n", exitCode: 2)
            case .success(let (value, spec)): config = value; resource = spec
            }
        }
        let absolute = filter.hasPrefix("/") ? filter : FileManager.default.currentDirectoryPath + "/" + filter
        let harness: FilterHarness
        do { harness = try FilterHarness(spec: FilterHarness.spec(filter: absolute, pluginConfig: config, from: resource), limits: limits) } catch {
            return Outcome(output: "\(error)\n", exitCode: 2)
        }
        harness.arms = FilterHarness.arms(of: resource)
        let report = harness.run(suite, file: cases)
        return Outcome(output: report.text, exitCode: report.failed == 0 ? 0 : 1, report: report)
    }

    /// --plugin-config FILE: a LuaPlugin resource (its spec.pluginConfig, and its name,
    /// phase, failStrategy and limits) or a plain mapping (the pluginConfig itself).
    static func loadPluginConfig(_ text: String, file: String) -> Result<(ConfigValue, LuaPluginSpec?), ConfigErrors> {
        let docs: [PositionedNode]
        do { docs = try YAMLReader.positionedDocuments(text, file: file) } catch let e as ConfigErrors { return .failure(e) } catch {
            return .failure(ConfigErrors([ConfigError(file: file, line: 0, column: 0, message: "\(error)")]))
        }
        guard docs.count == 1 else { return .failure(ConfigErrors([ConfigError(file: file, line: 1, column: 1, message: "one YAML document expected, found \(docs.count)")])) }
        let root = docs[0]
        if root.child("kind")?.scalarString == "LuaPlugin" {
            let r = ConfigLoader().loadText(text, file: file, baseDir: (file as NSString).deletingLastPathComponent)
            if !r.errors.isEmpty { return .failure(ConfigErrors(r.errors)) }
            guard let p = r.plugins.first else { return .failure(ConfigErrors([ConfigError(file: file, line: 1, column: 1, message: "no LuaPlugin found")])) }
            return .success((p.pluginConfig, p))
        }
        if root.value == .null { return .success((.map([]), nil)) }
        guard root.mapping != nil else { return .failure(ConfigErrors([ConfigError(file: file, line: root.line, column: root.column, message: "expected a LuaPlugin resource or a mapping (the pluginConfig)")])) }
        return .success((root.value, nil))
    }
}
