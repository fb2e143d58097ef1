import MoonletCore
import Yams
#if canImport(Foundation)
import Foundation
#endif

/// The Telemetry resources (telemetry.istio.io v1 / v1alpha1) and the mesh config's
/// telemetry keys, compiled for one workload at config load: what the builtin
/// `istio-accesslog` and `istio-tracing` filters do, and the metric overrides the
/// `istio-stats` filter applies.
///
/// Scoping is Istio's: a Telemetry in the root namespace without a selector is the mesh
/// default, one in the workload's namespace without a selector the namespace default,
/// one whose `selector.matchLabels` match the workload's labels (in its namespace) the
/// workload's. Per section (`accessLogging`, `tracing`, `metrics`) the most specific
/// level that has the section wins; for `tracing`, fields the winner leaves unset
/// (`randomSamplingPercentage`, `providers`, `customTags`, `disableSpanReporting`) come
/// from the next level down, as Istio merges them. Two resources of one level: the
/// first by name is used, and a note says so (Istio takes the oldest).
public struct TelemetryPolicy: Sendable {
    /// Which side of the sidecar a section applies to (`match.mode`).
    public enum Mode: String, Sendable { case clientAndServer = "CLIENT_AND_SERVER", client = "CLIENT", server = "SERVER" }

    /// One access log destination: a file (or /dev/stdout) and its compiled format text.
    public struct AccessLogOutput: Sendable, Equatable {
        /// Provider name (`envoy` or an envoyFileAccessLog extension provider).
        public var provider: String
        public var path: String
        /// `text` holds an Envoy format string; `labels` JSON keys to format strings.
        public var text: String?
        public var labels: [(String, String)]?
        public static func == (a: Self, b: Self) -> Bool {
            a.provider == b.provider && a.path == b.path && a.text == b.text
                && a.labels?.map { $0.0 + "\u{0}" + $0.1 } == b.labels?.map { $0.0 + "\u{0}" + $0.1 }
        }
    }

    public struct AccessLogging: Sendable {
        public var enabled = false
        public var mode: Mode = .clientAndServer
        public var outputs: [AccessLogOutput] = []
        /// `filter.expression`, compiled; nil logs every stream.
        public var filter: AccessLogFilter?
        /// Where it came from ("mesh config accessLogFile", "Telemetry istio-system/mesh-default").
        public var source = "default (off)"
    }

    /// A trace collector: Zipkin v2 JSON or OTLP/HTTP JSON.
    public struct TraceCollector: Sendable, Equatable {
        public enum Format: String, Sendable { case zipkin, otlp }
        public var provider: String
        public var address: String
        public var format: Format
        public var maxTagLength: Int?
    }

    /// A Telemetry `customTags` entry.
    public struct CustomTag: Sendable, Equatable {
        public enum Kind: String, Sendable { case literal, header, environment }
        public var tag: String
        public var kind: Kind
        /// literal: the value; header / environment: the name.
        public var value: String
        public var defaultValue: String?
    }

    public struct Tracing: Sendable {
        /// Whether the tracing filter runs (propagation and spans).
        public var enabled = false
        public var mode: Mode = .clientAndServer
        /// Percent of new traces recorded (Istio's default 1.0).
        public var samplingPercent: Double = 1.0
        public var collectors: [TraceCollector] = []
        public var disableSpanReporting = false
        public var customTags: [CustomTag] = []
        public var source = "default (off)"
    }

    /// A `tagOverrides` entry: remove a label, or set it from a request attribute or a literal.
    public enum TagOverride: Sendable, Equatable {
        case remove
        case attribute(String)
        case literal(String)
    }

    /// A `metrics[].overrides[]` entry.
    public struct MetricOverride: Sendable, Equatable {
        /// Istio metric enum (`REQUEST_COUNT`...) or custom metric name; nil = ALL_METRICS.
        public var metric: String?
        public var mode: Mode = .clientAndServer
        public var disabled: Bool?
        /// Tag name to operation, in file order.
        public var tags: [(String, TagOverride)] = []
        public static func == (a: Self, b: Self) -> Bool {
            a.metric == b.metric && a.mode == b.mode && a.disabled == b.disabled && a.tags.count == b.tags.count
                && zip(a.tags, b.tags).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        }
    }

    /// The metrics section of the winning Telemetry, for the stats filter.
    public struct Metrics: Sendable {
        public var providers: [String] = []
        public var overrides: [MetricOverride] = []
        public var source = "default"
    }

    public var accessLogging = AccessLogging()
    public var tracing = Tracing()
    public var metrics = Metrics()
    /// Things read but not applied (a provider Moonlet has no collector for, two
    /// resources at one level...), for a logged note.
    public var notes: [String] = []

    public init() {}
}

/// `accessLogging[].filter.expression`: the CEL forms Moonlet evaluates. A conjunction
/// (`&&`) of comparisons of `response.code` (an integer; ==, !=, <, <=, >, >=) or
/// `request.method` (a quoted string; == or !=), or the constants `true` / `false`.
/// Anything else is refused with "unsupported".
public struct AccessLogFilter: Sendable, Equatable {
    public struct Clause: Sendable, Equatable {
        /// "response.code" or "request.method".
        public var attribute: String
        public var op: String
        public var number: Int?
        public var text: String?
    }
    /// Every clause must hold; empty: always true.
    public var clauses: [Clause]
    /// `false`: never logs.
    public var never = false

    public static func parse(_ expression: String) throws -> AccessLogFilter {
        let trimmed = expression.trimmingSpaces
        func unsupported(_ why: String) -> ConfigError {
            ConfigError(file: "", line: 0, column: 0, message: "filter expression \"\(expression)\": \(why) (Moonlet supports `response.code OP N` and `request.method == \"GET\"` joined with &&)")
        }
        if trimmed.isEmpty { throw unsupported("empty") }
        for (token, what) in [("||", "||"), ("(", "parentheses"), ("?", "the conditional operator")] where trimmed.contains(token) {
            throw unsupported("\(what) is unsupported")
        }
        var out = AccessLogFilter(clauses: [])
        for raw in trimmed.components(separatedBy: "&&") {
            let term = raw.trimmingSpaces
            if term == "true" { continue }
            if term == "false" { out.never = true; continue }
            guard let op = ["==", "!=", ">=", "<=", ">", "<"].first(where: { term.contains($0) }),
                  let r = term.range(of: op) else { throw unsupported("\"\(term)\" is unsupported") }
            let lhs = String(term[..<r.lowerBound]).trimmingSpaces
            let rhs = String(term[r.upperBound...]).trimmingSpaces
            switch lhs {
            case "response.code":
                guard let n = Int(rhs) else { throw unsupported("response.code compares with an integer, not \"\(rhs)\"") }
                out.clauses.append(Clause(attribute: lhs, op: op, number: n, text: nil))
            case "request.method":
                guard op == "==" || op == "!=" else { throw unsupported("request.method supports == and != only") }
                guard rhs.count >= 2, let q = rhs.first, q == "\"" || q == "'", rhs.last == q else {
                    throw unsupported("request.method compares with a quoted string, not \(rhs)")
                }
                out.clauses.append(Clause(attribute: lhs, op: op, number: nil, text: String(rhs.dropFirst().dropLast())))
            default:
                throw unsupported("\"\(lhs)\" is unsupported")
            }
        }
        return out
    }

    /// Lua data for istio-accesslog: a list of {attr, op, value}, or false for `never`.
    public var configValue: ConfigValue {
        if never { return .bool(false) }
        return .array(clauses.map { c in
            .map([("attr", .string(c.attribute == "response.code" ? "code" : "method")), ("op", .string(c.op)),
                  ("value", c.number.map { .int($0) } ?? .string(c.text ?? ""))])
        })
    }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" || f == "\n" { s.removeFirst() }
        while let l = s.last, l == " " || l == "\t" || l == "\n" { s.removeLast() }
        return String(s)
    }
}

extension TelemetryPolicy {
    /// Istio's default access log providers: `envoy` is the mesh config's file
    /// (accessLogFile, else /dev/stdout) with its encoding and format.
    static func envoyOutput(_ mesh: MeshConfigFile) -> AccessLogOutput {
        let t = mesh.telemetry
        let path = (t.accessLogFile ?? "").isEmpty ? "/dev/stdout" : t.accessLogFile!
        if t.accessLogEncoding == .json {
            // Istio's JSON with a custom accessLogFormat: the format is a JSON object of
            // key -> operator; Moonlet takes Istio's keys unless the format is set.
            if let f = t.accessLogFormat, !f.isEmpty, let labels = jsonLabels(f) { return AccessLogOutput(provider: "envoy", path: path, labels: labels) }
            return AccessLogOutput(provider: "envoy", path: path, labels: AccessLogFormatKeys.istioJSON)
        }
        let text = (t.accessLogFormat ?? "").isEmpty ? AccessLogFormatKeys.istioText : t.accessLogFormat!
        return AccessLogOutput(provider: "envoy", path: path, text: text)
    }

    /// `{"key": "%OP%", ...}` (a flat JSON object of strings) as ordered labels.
    static func jsonLabels(_ s: String) -> [(String, String)]? {
        guard let node = try? Yams.compose(yaml: s), case .mapping(let m) = node else { return nil }
        var out: [(String, String)] = []
        for (k, v) in m { guard let key = k.string, case .scalar = v, let t = v.string else { return nil }; out.append((key, t)) }
        return out
    }

    /// Every Telemetry resource compiled alone, for a workload of its namespace that its
    /// selector selects (`moonlet validate`: what `moonlet run` would refuse or note).
    /// `outputs`: every access log output they (and the mesh config alone) would open, for
    /// the caller to compile their formats.
    public static func validate(_ istio: [IstioResource], mesh: MeshConfigFile) -> (errors: [ConfigError], notes: [String], outputs: [AccessLogOutput]) {
        var errors: [ConfigError] = [], notes: [String] = [], outputs: [AccessLogOutput] = []
        switch compile([], mesh: mesh, workload: WorkloadIdentity(rootNamespace: mesh.rootNamespace)) {
        case .success(let p): outputs += p.accessLogging.outputs
        case .failure(let e): errors += e.errors
        }
        for r in istio where r.kind == "Telemetry" {
            var labels: [String: String] = [:]
            if case .map(let m)? = r.spec["selector"]?["matchLabels"] { for (k, v) in m { labels[k] = v.stringValue ?? "" } }
            let ns = r.namespace.isEmpty ? "default" : r.namespace
            let w = WorkloadIdentity(namespace: ns, serviceAccount: "default", labels: labels, rootNamespace: mesh.rootNamespace)
            switch compile([r], mesh: mesh, workload: w) {
            case .success(let p): notes += p.notes; outputs += p.accessLogging.outputs.filter { !outputs.contains($0) }
            case .failure(let e): errors += e.errors
            }
        }
        return (errors, notes, outputs)
    }

    /// Compiles the Telemetry resources that apply to `workload`, with the mesh config's
    /// access log and tracing keys and extension providers. Errors (an unknown provider
    /// kind for a section, an unsupported CEL expression) name the resource's file:line.
    public static func compile(_ istio: [IstioResource], mesh: MeshConfigFile, workload: WorkloadIdentity) -> Result<TelemetryPolicy, ConfigErrors> {
        var p = TelemetryPolicy()
        var errors: [ConfigError] = []
        // Levels: 0 mesh, 1 namespace, 2 workload.
        var levels: [[IstioResource]] = [[], [], []]
        for r in istio where r.kind == "Telemetry" {
            let ns = r.namespace.isEmpty ? workload.namespace : r.namespace
            var labels: [String: String] = [:]
            if case .map(let m)? = r.spec["selector"]?["matchLabels"] { for (k, v) in m { labels[k] = v.stringValue ?? "" } }
            let hasSelector = r.spec["selector"] != nil
            if r.spec["targetRef"] != nil || r.spec["targetRefs"] != nil {
                p.notes.append("\(r.file):\(r.line): Telemetry \(ns)/\(r.name): targetRef(s) select gateways and waypoints, not sidecars: not applied")
                continue
            }
            if ns == workload.rootNamespace && !hasSelector { levels[0].append(r) }
            else if ns == workload.namespace && !hasSelector { levels[1].append(r) }
            else if ns == workload.namespace && labels.allSatisfy({ workload.labels[$0.key] == $0.value }) { levels[2].append(r) }
        }
        for i in levels.indices {
            levels[i].sort { $0.name < $1.name }
            if levels[i].count > 1 {
                p.notes.append("Telemetry: \(levels[i].map { "\($0.namespace)/\($0.name)" }.joined(separator: ", ")) apply at the same level; \(levels[i][0].name) is used (Istio takes the oldest)")
                levels[i] = [levels[i][0]]
            }
        }
        let ordered = levels.flatMap { $0 }   // least to most specific
        // A provider the mesh config does not define is skipped, as istiod skips it
        // (the resource is valid; the provider may be defined later): a logged note.
        func unknownProvider(_ r: IstioResource, _ path: String, _ name: String) -> String {
            "\(r.file):\(r.line): Telemetry \(r.namespace)/\(r.name): \(path).providers: provider \"\(name)\" is not among the mesh config's extensionProviders: skipped, as Istio skips it"
        }
        func err(_ r: IstioResource, _ field: String, _ msg: String) {
            errors.append(ConfigError(file: r.file, line: r.line, column: 1, resource: "Telemetry \(r.namespace)/\(r.name)", field: field, message: msg))
        }
        if mesh.telemetry.accessLogEncoding == .json, let f = mesh.telemetry.accessLogFormat, !f.isEmpty, jsonLabels(f) == nil {
            errors.append(ConfigError(file: "mesh config", line: 0, column: 0, field: "accessLogFormat",
                                      message: "with accessLogEncoding JSON the format must be a JSON object of strings ({\"key\": \"%OPERATOR%\", ...})"))
        }
        let providers = Dictionary(mesh.extensionProviders.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })

        // Access logging: mesh config accessLogFile is the default; the most specific
        // Telemetry with accessLogging replaces it.
        if let f = mesh.telemetry.accessLogFile, !f.isEmpty {
            p.accessLogging.enabled = true
            p.accessLogging.outputs = [envoyOutput(mesh)]
            p.accessLogging.source = "mesh config accessLogFile"
        }
        if let r = ordered.last(where: { $0.spec["accessLogging"] != nil }), case .array(let entries)? = r.spec["accessLogging"] {
            var a = AccessLogging()
            a.source = "Telemetry \(r.namespace)/\(r.name)"
            for (i, e) in entries.enumerated() {
                let path = "spec.accessLogging[\(i)]"
                if let m = e["match"]?["mode"]?.stringValue { a.mode = Mode(rawValue: m) ?? .clientAndServer }
                if case .bool(true)? = e["disabled"] { continue }
                var names: [String] = []
                if case .array(let ps)? = e["providers"] { names = ps.compactMap { $0["name"]?.stringValue } }
                if names.isEmpty { names = ["envoy"] }   // Istio's default provider
                for n in names {
                    if n == "envoy" { a.outputs.append(envoyOutput(mesh)); continue }
                    guard let prov = providers[n] else { p.notes.append(unknownProvider(r, path, n)); continue }
                    guard case .envoyFileAccessLog(let fl) = prov.kind else {
                        p.notes.append("\(r.file):\(r.line): \(a.source): \(path): provider \"\(n)\" is \(prov.kindName), not an access log Moonlet writes: ignored")
                        continue
                    }
                    if let labels = fl.labels {
                        a.outputs.append(AccessLogOutput(provider: n, path: fl.path, labels: labels.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }))
                    } else {
                        a.outputs.append(AccessLogOutput(provider: n, path: fl.path, text: fl.text ?? AccessLogFormatKeys.istioText))
                    }
                }
                if let x = e["filter"]?["expression"]?.stringValue {
                    do { a.filter = try AccessLogFilter.parse(x) } catch let e as ConfigError { err(r, "\(path).filter.expression", e.message) } catch {}
                }
            }
            a.enabled = !a.outputs.isEmpty
            p.accessLogging = a
        }

        // Tracing: the mesh config's defaultConfig.tracing (sampling, zipkin address) and
        // enableTracing, then the Telemetry levels.
        let t = mesh.telemetry
        if let z = t.zipkinAddress { p.tracing.collectors = [TraceCollector(provider: "zipkin", address: z, format: .zipkin)] }
        if let s = t.tracingSampling { p.tracing.samplingPercent = s }
        if t.enableTracing == true || t.zipkinAddress != nil || t.tracingSampling != nil {
            p.tracing.enabled = true
            p.tracing.source = "mesh config"
        }
        var tracingSeen = false
        for r in ordered {
            guard case .array(let entries)? = r.spec["tracing"] else { continue }
            tracingSeen = true
            p.tracing.source = "Telemetry \(r.namespace)/\(r.name)"
            for (i, e) in entries.enumerated() {
                let path = "spec.tracing[\(i)]"
                if let m = e["match"]?["mode"]?.stringValue { p.tracing.mode = Mode(rawValue: m) ?? .clientAndServer }
                switch e["randomSamplingPercentage"] {
                case .int(let v)?: p.tracing.samplingPercent = Double(v)
                case .double(let v)?: p.tracing.samplingPercent = v
                default: break
                }
                if case .bool(let b)? = e["disableSpanReporting"] { p.tracing.disableSpanReporting = b }
                if e["useRequestIdForTraceSampling"] != nil {
                    p.notes.append("\(r.file):\(r.line): \(p.tracing.source): \(path).useRequestIdForTraceSampling: not applied (sampling is random per new trace)")
                }
                if case .array(let ps)? = e["providers"] {
                    var cs: [TraceCollector] = []
                    for n in ps.compactMap({ $0["name"]?.stringValue }) {
                        guard let prov = providers[n] else { p.notes.append(unknownProvider(r, path, n)); continue }
                        switch prov.kind {
                        case .zipkin(let z): cs.append(TraceCollector(provider: n, address: "\(z.service):\(z.port)", format: .zipkin, maxTagLength: z.maxTagLength))
                        case .opentelemetry(let o): cs.append(TraceCollector(provider: n, address: "\(o.service):\(o.port)", format: .otlp))
                        default: err(r, "\(path).providers", "provider \"\(n)\" is \(prov.kindName), not a tracing provider")
                        }
                    }
                    p.tracing.collectors = cs
                }
                if case .map(let tags)? = e["customTags"] {
                    var out = p.tracing.customTags.filter { old in !tags.contains { $0.0 == old.tag } }
                    for (tag, v) in tags {
                        if let l = v["literal"] { out.append(CustomTag(tag: tag, kind: .literal, value: l["value"]?.stringValue ?? "", defaultValue: nil)) }
                        else if let h = v["header"] { out.append(CustomTag(tag: tag, kind: .header, value: (h["name"]?.stringValue ?? "").lowercased(), defaultValue: h["defaultValue"]?.stringValue)) }
                        else if let en = v["environment"] { out.append(CustomTag(tag: tag, kind: .environment, value: en["name"]?.stringValue ?? "", defaultValue: en["defaultValue"]?.stringValue)) }
                    }
                    p.tracing.customTags = out
                }
            }
        }
        if tracingSeen { p.tracing.enabled = t.enableTracing != false || !p.tracing.collectors.isEmpty }
        if t.enableTracing == false && !tracingSeen { p.tracing.enabled = false }

        // Metrics: every level's overrides, mesh then namespace then workload, in order
        // (Istio's mergeMetrics: a later override of a metric replaces its `disabled` and
        // the tags it names); `providers` from the most specific level that names them.
        var m = Metrics()
        var sources: [String] = []
        for r in ordered {
            guard case .array(let entries)? = r.spec["metrics"] else { continue }
            let src = "Telemetry \(r.namespace)/\(r.name)"
            sources.append(src)
            for (i, e) in entries.enumerated() {
                if case .array(let ps)? = e["providers"] {
                    for n in ps.compactMap({ $0["name"]?.stringValue }) where n != "prometheus" {
                        p.notes.append("\(r.file):\(r.line): \(src): spec.metrics[\(i)].providers: \"\(n)\": Moonlet exposes Prometheus metrics only; ignored")
                    }
                    m.providers = ps.compactMap { $0["name"]?.stringValue }
                }
                if e["reportingInterval"] != nil { p.notes.append("\(r.file):\(r.line): \(src): spec.metrics[\(i)].reportingInterval: not applied (metrics are read at scrape time)") }
                guard case .array(let os)? = e["overrides"] else { continue }
                for (oi, o) in os.enumerated() {
                    let path = "spec.metrics[\(i)].overrides[\(oi)]"
                    var mo = MetricOverride()
                    mo.metric = o["match"]?["metric"]?.stringValue ?? o["match"]?["customMetric"]?.stringValue
                    if mo.metric == "ALL_METRICS" { mo.metric = nil }
                    if let name = mo.metric {
                        if o["match"]?["customMetric"] != nil {
                            p.notes.append("\(r.file):\(r.line): \(src): \(path).match.customMetric \"\(name)\": Moonlet has no custom Istio metrics; this override is not applied")
                        } else if Self.tcpMetricNames[name] != nil {
                            p.notes.append("\(r.file):\(r.line): \(src): \(path).match.metric \(name): overrides of Istio's TCP metrics are not applied (the TCP proxy records them with the standard labels)")
                        } else if Self.httpMetricNames[name] == nil {
                            err(r, "\(path).match.metric", "\"\(name)\" is not an Istio metric (ALL_METRICS, REQUEST_COUNT, REQUEST_DURATION, REQUEST_SIZE, RESPONSE_SIZE, TCP_*, GRPC_*)")
                        }
                    }
                    if let md = o["match"]?["mode"]?.stringValue { mo.mode = Mode(rawValue: md) ?? .clientAndServer }
                    if case .bool(let b)? = o["disabled"] { mo.disabled = b }
                    if case .map(let tags)? = o["tagOverrides"] {
                        for (tag, tv) in tags {
                            guard let c0 = tag.utf8.first, !(48...57).contains(c0), !tag.hasPrefix("__"),
                                  tag.utf8.allSatisfy({ ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 95 }) else {
                                err(r, "\(path).tagOverrides.\(tag)", "\"\(tag)\" is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"); continue
                            }
                            let op = tv["operation"]?.stringValue ?? "UPSERT"
                            guard op == "UPSERT" || op == "REMOVE" else { err(r, "\(path).tagOverrides.\(tag).operation", "\"\(op)\" is unsupported: UPSERT or REMOVE"); continue }
                            if op == "REMOVE" { mo.tags.append((tag, .remove)); continue }
                            let v = (tv["value"]?.stringValue ?? "").trimmingSpaces
                            do { mo.tags.append((tag, try tagValue(v))) } catch let e as ConfigError { err(r, "\(path).tagOverrides.\(tag).value", e.message) } catch {}
                        }
                    }
                    m.overrides.append(mo)
                }
            }
        }
        if !sources.isEmpty {
            // Istio drops "ALL_METRICS disabled" once any later override follows it (a
            // namespace re-enabling what the mesh level turned off): so does Moonlet.
            var kept: [MetricOverride] = []
            for (i, o) in m.overrides.enumerated() where !(o.metric == nil && o.disabled == true && i < m.overrides.count - 1) { kept.append(o) }
            m.overrides = kept
            m.source = sources.joined(separator: ", ")
            if let last = m.overrides.last, last.metric == nil, last.disabled == true {
                p.notes.append("\(m.source): ALL_METRICS disabled turns off Istio's HTTP metrics; the TCP families (istio_tcp_*) are recorded by the TCP proxy and stay on")
            }
            p.metrics = m
        }
        if !errors.isEmpty { return .failure(ConfigErrors(errors)) }
        return .success(p)
    }

    /// Istio's HTTP metric enum names and the series they name (what istio-stats records).
    public static let httpMetricNames: [String: String] = [
        "REQUEST_COUNT": "istio_requests_total", "REQUEST_DURATION": "istio_request_duration_milliseconds",
        "REQUEST_SIZE": "istio_request_bytes", "RESPONSE_SIZE": "istio_response_bytes",
        // Moonlet records no per-message gRPC metrics: overrides of them have nothing to apply to.
        "GRPC_REQUEST_MESSAGES": "", "GRPC_RESPONSE_MESSAGES": "",
    ]
    public static let tcpMetricNames: [String: String] = [
        "TCP_OPENED_CONNECTIONS": "istio_tcp_connections_opened_total", "TCP_CLOSED_CONNECTIONS": "istio_tcp_connections_closed_total",
        "TCP_SENT_BYTES": "istio_tcp_sent_bytes_total", "TCP_RECEIVED_BYTES": "istio_tcp_received_bytes_total",
    ]

    /// Request and peer attributes a tag override may name (Istio's attribute vocabulary
    /// that Moonlet knows at the stats filter).
    public static let tagAttributes: Set<String> = [
        "request.method", "request.host", "request.path", "request.url_path", "request.scheme", "request.protocol", "request.useragent",
        "request.id", "request.referer", "request.size", "request.total_size", "response.code", "response.code_details", "response.flags",
        "response.size", "response.total_size", "response.grpc_status", "source.address", "source.port", "destination.address",
        "destination.port", "connection.mtls", "connection.requested_server_name", "upstream.address", "upstream.port",
        "xds.cluster_name", "xds.route_name",
    ]

    /// A tagOverrides UPSERT value: a quoted literal ("'v'" or "\"v\""), or an attribute
    /// name Moonlet knows. Other CEL is refused.
    static func tagValue(_ v: String) throws -> TagOverride {
        if v.count >= 2, let q = v.first, q == "\"" || q == "'", v.last == q {
            let inner = v.dropFirst().dropLast()
            if !inner.contains(q) { return .literal(String(inner)) }
        }
        if tagAttributes.contains(v) { return .attribute(v) }
        if v.hasPrefix("request.headers['") && v.hasSuffix("']") || v.hasPrefix("request.headers[\"") && v.hasSuffix("\"]") {
            return .attribute("request.headers." + v.dropFirst(17).dropLast(2).lowercased())
        }
        throw ConfigError(file: "", line: 0, column: 0, message: "\"\(v)\" is unsupported: Moonlet takes an attribute name (request.method, request.host, response.code, ...), request.headers['name'], or a quoted literal ('value'), not other CEL")
    }
}


extension TelemetryPolicy {
    /// istio-accesslog's pluginConfig: outputs, filter and mode (plugins/istio-accesslog.lua).
    public var accessLogPluginConfig: ConfigValue {
        var kv: [(String, ConfigValue)] = []
        kv.append(("outputs", .array(accessLogging.outputs.map { o in
            if let labels = o.labels {
                return .map([("path", .string(o.path)), ("labels", .array(labels.map { .array([.string($0.0), .string($0.1)]) }))])
            }
            return .map([("path", .string(o.path)), ("text", .string(o.text ?? AccessLogFormatKeys.istioText))])
        })))
        if let f = accessLogging.filter { kv.append(("filter", f.configValue)) }
        kv.append(("mode", .string(accessLogging.mode.rawValue)))
        return .map(kv)
    }

    /// istio-stats's pluginConfig (plugins/istio-stats.lua): the metrics section's
    /// overrides in order, each `{metric = "istio_requests_total" | nil (all), mode,
    /// disabled = true | false | nil, tags = {{tag, op = "remove" | "literal" | "attribute",
    /// value}}}`. Overrides of metrics istio-stats does not record (TCP, custom) are left
    /// out (the compile noted them). Empty when there is no metrics section.
    public var statsPluginConfig: ConfigValue {
        var list: [ConfigValue] = []
        for o in metrics.overrides {
            var kv: [(String, ConfigValue)] = []
            if let name = o.metric {
                guard let series = Self.httpMetricNames[name], !series.isEmpty else { continue }
                kv.append(("metric", .string(series)))
            }
            kv.append(("mode", .string(o.mode.rawValue)))
            if let d = o.disabled { kv.append(("disabled", .bool(d))) }
            kv.append(("tags", .array(o.tags.map { tag, op in
                switch op {
                case .remove: return .map([("tag", .string(tag)), ("op", .string("remove"))])
                case .literal(let v): return .map([("tag", .string(tag)), ("op", .string("literal")), ("value", .string(v))])
                case .attribute(let a): return .map([("tag", .string(tag)), ("op", .string("attribute")), ("value", .string(a))])
                }
            })))
            list.append(.map(kv))
        }
        if list.isEmpty { return .map([]) }
        return .map([("metrics", .array(list)), ("source", .string(metrics.source))])
    }

    /// The names Istio reports a workload under, from its labels: the service
    /// (`<app>.<namespace>`, Istio's service cluster; `istio-proxy.<namespace>` without
    /// an app label), the canonical service and revision.
    public static func workloadNames(_ w: WorkloadIdentity) -> (service: String, canonicalService: String, canonicalRevision: String) {
        let l = w.labels
        let app = l["app"] ?? l["app.kubernetes.io/name"]
        let canonical = l["service.istio.io/canonical-name"] ?? l["app.kubernetes.io/name"] ?? l["app"] ?? w.serviceAccount
        let revision = l["service.istio.io/canonical-revision"] ?? l["app.kubernetes.io/version"] ?? l["version"] ?? "latest"
        return ("\(app ?? "istio-proxy").\(w.namespace)", canonical, revision)
    }

    /// istio-tracing's pluginConfig (plugins/istio-tracing.lua): sampling, collectors,
    /// reporting, mode, identity tags and custom tags. `podIP` and `podName` make Istio's
    /// node id `sidecar~IP~POD.NS~NS.svc.cluster.local`.
    public func tracingPluginConfig(workload w: WorkloadIdentity, meshID: String, appPort: Int, podIP: String, podName: String) -> ConfigValue {
        let names = Self.workloadNames(w)
        let t = tracing
        var kv: [(String, ConfigValue)] = [
            ("sampling", .double(t.samplingPercent)),
            ("report", .bool(!t.disableSpanReporting)),
            ("mode", .string(t.mode.rawValue)),
            ("service", .string(names.service)),
            ("canonical_service", .string(names.canonicalService)),
            ("canonical_revision", .string(names.canonicalRevision)),
            ("namespace", .string(w.namespace)),
            ("mesh_id", .string(meshID)),
            ("node_id", .string("sidecar~\(podIP)~\(podName).\(w.namespace)~\(w.namespace).svc.cluster.local")),
        ]
        if let app = w.labels["app"] { kv.append(("inbound_operation", .string("\(app).\(w.namespace).svc.cluster.local:\(appPort)/*"))) }
        kv.append(("collectors", .array(t.collectors.map { c in
            var m: [(String, ConfigValue)] = [("address", .string(c.address)), ("format", .string(c.format.rawValue))]
            if let n = c.maxTagLength { m.append(("max_tag_length", .int(n))) }
            return .map(m)
        })))
        kv.append(("custom_tags", .array(t.customTags.map { c in
            var m: [(String, ConfigValue)] = [("tag", .string(c.tag)), ("kind", .string(c.kind.rawValue)), ("value", .string(c.value))]
            if let d = c.defaultValue { m.append(("default", .string(d))) }
            return .map(m)
        })))
        return .map(kv)
    }
}
