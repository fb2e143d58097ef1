import Yams

/// A mesh config extension provider. `envoyExtAuthzHttp` providers are applied: the
/// AuthorizationPolicies with action CUSTOM that name them are enforced by the builtin
/// istio-authz filter (docs/security.md). `envoyExtAuthzGrpc` is parsed and refused (a
/// CUSTOM policy naming it denies every request). zipkin, opentelemetry and
/// envoyFileAccessLog apply when a Telemetry resource names them (TelemetryPolicy); a
/// kind Moonlet does not apply is listed in
/// `MeshConfigFile.notApplied` with "parsed, not applied yet".
public struct MeshExtensionProvider: Sendable, Equatable {
    public var name: String
    public var kind: Kind

    public enum Kind: Sendable, Equatable {
        case envoyExtAuthzHttp(ExtAuthzHTTP)
        /// Istio's `envoyExtAuthzGrpc` (service, port): not supported, refused.
        case envoyExtAuthzGrpc(service: String, port: Int)
        case envoyFileAccessLog(FileAccessLog)
        case zipkin(Zipkin)
        case opentelemetry(OpenTelemetry)
    }

    /// Istio's `envoyExtAuthzHttp` (authorization CUSTOM).
    public struct ExtAuthzHTTP: Sendable, Equatable {
        public var service = ""
        public var port = 0
        /// `timeout` in milliseconds (nil: Envoy's default, 600s in Istio).
        public var timeoutMs: Int?
        public var pathPrefix: String?
        public var failOpen = false
        /// `statusOnError` as an HTTP status (Istio's default 403).
        public var statusOnError = 403
        public var includeRequestHeadersInCheck: [String] = []
        public var headersToUpstreamOnAllow: [String] = []
        public var headersToDownstreamOnDeny: [String] = []
        public var headersToDownstreamOnAllow: [String] = []
        /// `includeRequestBodyInCheck` was set: not supported (the check request has no
        /// body), noted at load.
        public var includeRequestBodyInCheck = false
        public var includeAdditionalHeadersInCheck: [String: String] = [:]
        public init() {}
    }

    /// Istio's `envoyFileAccessLog`: path and either a text format or JSON labels.
    public struct FileAccessLog: Sendable, Equatable {
        public var path = ""
        public var text: String?
        public var labels: [String: String]?
        public init() {}
    }

    public struct Zipkin: Sendable, Equatable {
        public var service = ""
        public var port = 0
        public var maxTagLength: Int?
        public init() {}
    }

    public struct OpenTelemetry: Sendable, Equatable {
        public var service = ""
        public var port = 0
        public init() {}
    }

    public var kindName: String {
        switch kind {
        case .envoyExtAuthzHttp: return "envoyExtAuthzHttp"
        case .envoyExtAuthzGrpc: return "envoyExtAuthzGrpc"
        case .envoyFileAccessLog: return "envoyFileAccessLog"
        case .zipkin: return "zipkin"
        case .opentelemetry: return "opentelemetry"
        }
    }
}

/// Telemetry and traffic keys of MeshConfig. The access log keys, enableTracing and
/// defaultConfig.tracing apply through TelemetryPolicy (istio-accesslog, istio-tracing);
/// outboundTrafficPolicy is parsed and checked, not applied yet.
public struct MeshTelemetrySettings: Sendable, Equatable {
    public var accessLogFile: String?
    public enum AccessLogEncoding: String, Sendable, Equatable { case text = "TEXT", json = "JSON" }
    public var accessLogEncoding: AccessLogEncoding?
    public var accessLogFormat: String?
    /// `defaultConfig.tracing.sampling`, percent (0 to 100).
    public var tracingSampling: Double?
    /// `defaultConfig.tracing.zipkin.address`, host:port.
    public var zipkinAddress: String?
    public var enableTracing: Bool?
    public enum OutboundTrafficPolicy: String, Sendable, Equatable { case allowAny = "ALLOW_ANY", registryOnly = "REGISTRY_ONLY" }
    /// `outboundTrafficPolicy.mode` (applied: intercepted traffic to no known service goes
    /// to PassthroughCluster with ALLOW_ANY, the default, or BlackHoleCluster with REGISTRY_ONLY).
    public var outboundTrafficPolicy: OutboundTrafficPolicy?
    /// `protocolDetectionTimeout` in ms (applied): how long an intercepted connection's
    /// first bytes are awaited before it is served as TCP. nil: Istio's default 0, no timeout.
    public var protocolDetectionTimeoutMs: Int?
    public init() {}
}

/// Parsing of the keys above, for `MeshConfigFile.parse`: `err` records a file:line error,
/// `note` a key read but not applied.
struct MeshConfigKeysParser {
    let err: (Node?, String, String) -> Void
    let note: (String) -> Void

    static let notYet = "parsed, not applied yet"

    func string(_ n: Node, _ field: String) -> String? {
        guard case .scalar = n, let s = n.string, !s.isEmpty else { err(n, field, "expected a non-empty string"); return nil }
        return s
    }

    func port(_ n: Node, _ field: String) -> Int? {
        guard let s = n.string, let p = Int(s), (1...65535).contains(p) else { err(n, field, "expected a port number (1 to 65535)"); return nil }
        return p
    }

    func bool(_ n: Node, _ field: String) -> Bool? {
        switch n.string ?? "" {
        case "true", "True", "TRUE": return true
        case "false", "False", "FALSE": return false
        default: err(n, field, "expected true or false"); return nil
        }
    }

    func stringList(_ n: Node, _ field: String) -> [String] {
        guard case .sequence(let seq) = n else { err(n, field, "expected a list of strings"); return [] }
        return seq.enumerated().compactMap { string($0.element, "\(field)[\($0.offset)]") }
    }

    func stringMap(_ n: Node, _ field: String) -> [String: String] {
        guard case .mapping(let m) = n else { err(n, field, "expected a mapping of strings"); return [:] }
        var out: [String: String] = [:]
        for (k, v) in m {
            guard let key = k.string, !key.isEmpty else { err(k, field, "expected a string key"); continue }
            guard case .scalar = v, let s = v.string else { err(v, "\(field).\(key)", "expected a string"); continue }
            out[key] = s
        }
        return out
    }

    /// A protobuf duration as Istio writes it: "10s", "0.5s", "250ms", "1m", "1h".
    func durationMs(_ n: Node, _ field: String) -> Int? {
        let s = n.string ?? ""
        for (suffix, scale) in [("ms", 1.0), ("s", 1000.0), ("m", 60_000.0), ("h", 3_600_000.0)] where s.hasSuffix(suffix) {
            if let v = Double(s.dropLast(suffix.count)), v >= 0, v.isFinite { return Int(v * scale) }
            break
        }
        err(n, field, "expected a duration such as 10s, 0.5s or 250ms")
        return nil
    }

    func unknown(_ field: String) { note(field) }

    /// `extensionProviders`: a list of {name, <one provider kind>}.
    func extensionProviders(_ v: Node) -> [MeshExtensionProvider] {
        guard case .sequence(let seq) = v else { err(v, "extensionProviders", "expected a list of providers"); return [] }
        var out: [MeshExtensionProvider] = []
        var names: Set<String> = []
        for (i, e) in seq.enumerated() {
            let field = "extensionProviders[\(i)]"
            guard case .mapping(let m) = e else { err(e, field, "expected a mapping with name and one provider"); continue }
            var name: String?
            var kinds: [(String, Node)] = []
            for (k, pv) in m {
                let key = k.string ?? ""
                switch key {
                case "name":
                    name = string(pv, "\(field).name")
                    if let n = name, !names.insert(n).inserted { err(pv, "\(field).name", "duplicate provider name \"\(n)\""); name = nil }
                case "envoyExtAuthzHttp", "envoyExtAuthzGrpc", "envoyFileAccessLog", "zipkin", "opentelemetry": kinds.append((key, pv))
                default: note("\(field).\(key) (provider kind not supported)")
                }
            }
            if m["name"] == nil { err(e, "\(field).name", "missing (every provider has a name)") }
            guard kinds.count <= 1 else { err(e, field, "more than one provider kind (\(kinds.map(\.0).joined(separator: ", ")))"); continue }
            guard let first = kinds.first else { continue }
            let (kindName, body) = first
            let kfield = "\(field).\(kindName)"
            guard case .mapping(let km) = body else { err(body, kfield, "expected a mapping"); continue }
            var kind: MeshExtensionProvider.Kind?
            switch kindName {
            case "envoyExtAuthzHttp": kind = extAuthz(km, body, kfield).map { MeshExtensionProvider.Kind.envoyExtAuthzHttp($0) }
            case "envoyExtAuthzGrpc": kind = serviceAndPort(km, body, kfield).map { MeshExtensionProvider.Kind.envoyExtAuthzGrpc(service: $0.0, port: $0.1) }
            case "envoyFileAccessLog": kind = fileAccessLog(km, body, kfield).map { MeshExtensionProvider.Kind.envoyFileAccessLog($0) }
            case "zipkin": kind = zipkin(km, body, kfield).map { MeshExtensionProvider.Kind.zipkin($0) }
            default: kind = otel(km, body, kfield).map { MeshExtensionProvider.Kind.opentelemetry($0) }
            }
            if let name, let kind {
                out.append(MeshExtensionProvider(name: name, kind: kind))
                switch kindName {
                case "envoyExtAuthzHttp": break  // applied: AuthorizationPolicy CUSTOM
                case "envoyExtAuthzGrpc": note("\(field) (envoyExtAuthzGrpc \"\(name)\": not supported; an AuthorizationPolicy CUSTOM naming it denies every request of the workloads it selects)")
                default: break  // access log and tracing providers apply through Telemetry (TelemetryPolicy)
                }
            }
        }
        return out
    }

    func serviceAndPort(_ m: Node.Mapping, _ node: Node, _ field: String) -> (String, Int)? {
        let s = m["service"].flatMap { string($0, "\(field).service") }
        let p = m["port"].flatMap { port($0, "\(field).port") }
        if m["service"] == nil { err(node, "\(field).service", "missing") }
        if m["port"] == nil { err(node, "\(field).port", "missing") }
        guard let s, let p else { return nil }
        return (s, p)
    }

    func extAuthz(_ m: Node.Mapping, _ node: Node, _ field: String) -> MeshExtensionProvider.ExtAuthzHTTP? {
        var a = MeshExtensionProvider.ExtAuthzHTTP()
        var ok = true
        if let sp = serviceAndPort(m, node, field) { a.service = sp.0; a.port = sp.1 } else { ok = false }
        for (k, v) in m {
            let key = k.string ?? "", f = "\(field).\(key)"
            switch key {
            case "service", "port": break
            case "timeout": if let t = durationMs(v, f) { a.timeoutMs = t } else { ok = false }
            case "pathPrefix":
                guard let p = string(v, f), p.hasPrefix("/") else { err(v, f, "expected a path starting with /"); ok = false; continue }
                a.pathPrefix = p
            case "failOpen": if let b = bool(v, f) { a.failOpen = b } else { ok = false }
            case "statusOnError":
                guard let s = v.string, let code = Int(s), (200...599).contains(code) else { err(v, f, "expected an HTTP status (200 to 599)"); ok = false; continue }
                a.statusOnError = code
            case "includeRequestHeadersInCheck": a.includeRequestHeadersInCheck = stringList(v, f)
            case "headersToUpstreamOnAllow": a.headersToUpstreamOnAllow = stringList(v, f)
            case "headersToDownstreamOnDeny": a.headersToDownstreamOnDeny = stringList(v, f)
            case "headersToDownstreamOnAllow": a.headersToDownstreamOnAllow = stringList(v, f)
            case "includeRequestBodyInCheck":
                a.includeRequestBodyInCheck = true
                note("\(f) (not supported: the check request is sent without the request body)")
            case "includeAdditionalHeadersInCheck": a.includeAdditionalHeadersInCheck = stringMap(v, f)
            default: note("\(f) (not supported)")
            }
        }
        return ok ? a : nil
    }

    func fileAccessLog(_ m: Node.Mapping, _ node: Node, _ field: String) -> MeshExtensionProvider.FileAccessLog? {
        var l = MeshExtensionProvider.FileAccessLog()
        guard let p = m["path"] else { err(node, "\(field).path", "missing"); return nil }
        guard let path = string(p, "\(field).path") else { return nil }
        l.path = path
        for (k, v) in m {
            let key = k.string ?? "", f = "\(field).\(key)"
            switch key {
            case "path": break
            case "logFormat":
                guard case .mapping(let fm) = v else { err(v, f, "expected a mapping with text or labels"); return nil }
                if fm["text"] != nil && fm["labels"] != nil { err(v, f, "text and labels are exclusive"); return nil }
                for (fk, fv) in fm {
                    switch fk.string ?? "" {
                    case "text": guard case .scalar = fv, let t = fv.string else { err(fv, "\(f).text", "expected a string"); return nil }; l.text = t
                    case "labels": l.labels = stringMap(fv, "\(f).labels")
                    default: note("\(f).\(fk.string ?? "") (not supported)")
                    }
                }
            default: note("\(f) (not supported)")
            }
        }
        return l
    }

    func zipkin(_ m: Node.Mapping, _ node: Node, _ field: String) -> MeshExtensionProvider.Zipkin? {
        var z = MeshExtensionProvider.Zipkin()
        var ok = true
        if let sp = serviceAndPort(m, node, field) { z.service = sp.0; z.port = sp.1 } else { ok = false }
        for (k, v) in m {
            let key = k.string ?? "", f = "\(field).\(key)"
            switch key {
            case "service", "port": break
            case "maxTagLength":
                guard let s = v.string, let n = Int(s), n >= 0 else { err(v, f, "expected a length (0 or more)"); ok = false; continue }
                z.maxTagLength = n
            default: note("\(f) (not supported)")
            }
        }
        return ok ? z : nil
    }

    func otel(_ m: Node.Mapping, _ node: Node, _ field: String) -> MeshExtensionProvider.OpenTelemetry? {
        var o = MeshExtensionProvider.OpenTelemetry()
        guard let sp = serviceAndPort(m, node, field) else { return nil }
        o.service = sp.0; o.port = sp.1
        for (k, _) in m where !["service", "port"].contains(k.string ?? "") { note("\(field).\(k.string ?? "") (not supported)") }
        return o
    }

    /// accessLogFile, accessLogEncoding, accessLogFormat, enableTracing,
    /// outboundTrafficPolicy, defaultConfig.tracing: returns false for a key it does not know.
    func telemetryKey(_ key: String, _ v: Node, into t: inout MeshTelemetrySettings) -> Bool {
        switch key {
        case "accessLogFile":
            guard case .scalar = v, let s = v.string else { err(v, key, "expected a path (or empty: no access log)"); return true }
            t.accessLogFile = s
        case "accessLogEncoding":
            guard let e = MeshTelemetrySettings.AccessLogEncoding(rawValue: v.string ?? "") else { err(v, key, "expected TEXT or JSON"); return true }
            t.accessLogEncoding = e
        case "accessLogFormat":
            guard case .scalar = v, let s = v.string else { err(v, key, "expected a format string"); return true }
            t.accessLogFormat = s
        case "enableTracing":
            t.enableTracing = bool(v, key)
            if t.enableTracing == nil { return true }
        case "outboundTrafficPolicy":
            guard case .mapping(let m) = v else { err(v, key, "expected a mapping with mode"); return true }
            for (k, mv) in m {
                guard k.string == "mode" else { note("\(key).\(k.string ?? "")"); continue }
                guard let mode = MeshTelemetrySettings.OutboundTrafficPolicy(rawValue: mv.string ?? "") else {
                    err(mv, "\(key).mode", "expected ALLOW_ANY or REGISTRY_ONLY"); continue
                }
                t.outboundTrafficPolicy = mode
            }
            return true
        case "protocolDetectionTimeout":
            if let ms = durationMs(v, key) { t.protocolDetectionTimeoutMs = ms }
            return true
        case "defaultConfig":
            guard case .mapping(let m) = v else { err(v, key, "expected a mapping (ProxyConfig)"); return true }
            for (k, dv) in m {
                let f = "\(key).\(k.string ?? "")"
                guard k.string == "tracing" else { note(f); continue }
                guard case .mapping(let tm) = dv else { err(dv, f, "expected a mapping"); continue }
                for (tk, tv) in tm {
                    let tf = "\(f).\(tk.string ?? "")"
                    switch tk.string ?? "" {
                    case "sampling":
                        guard let s = tv.string, let d = Double(s), d >= 0, d <= 100 else { err(tv, tf, "expected a percentage (0 to 100)"); continue }
                        t.tracingSampling = d
                    case "zipkin":
                        guard case .mapping(let zm) = tv else { err(tv, tf, "expected a mapping with address"); continue }
                        for (zk, zv) in zm {
                            guard zk.string == "address" else { note("\(tf).\(zk.string ?? "")"); continue }
                            let a = zv.string ?? ""
                            guard let colon = a.lastIndex(of: ":"), colon != a.startIndex, let p = Int(a[a.index(after: colon)...]), (1...65535).contains(p) else {
                                err(zv, "\(tf).address", "expected host:port"); continue
                            }
                            t.zipkinAddress = a
                        }
                    default: note(tf)
                    }
                }
            }
            return true
        default:
            return false
        }
        return true
    }
}
