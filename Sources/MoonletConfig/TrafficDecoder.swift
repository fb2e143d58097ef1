import MoonletRegex
import MoonletCore
#if canImport(Foundation)
import Foundation
#endif

/// Decodes and validates Istio traffic resources with Istio's rules (Galley's role).
/// Every error carries `file:line:col: Kind ns/name: field.path: message`; decoding
/// goes on after an error so all of them are reported.
struct TrafficDecoder {
    let file: String
    let resource: String
    let namespace: String
    var errors: [ConfigError] = []
    /// Fields that are valid Istio but that Moonlet does not apply ("file:line: resource:
    /// field: why"): shown by `moonlet validate` and logged at load, never dropped silently.
    var notApplied: [String] = []

    init(file: String, resource: String, namespace: String) {
        self.file = file; self.resource = resource; self.namespace = namespace
    }

    mutating func err(_ n: PositionedNode?, _ field: String, _ msg: String, line: Int? = nil, col: Int? = nil) {
        errors.append(ConfigError(file: file, line: line ?? n?.line ?? 0, column: col ?? n?.column ?? 0, resource: resource, field: field, message: msg))
    }

    mutating func notApplied(_ n: PositionedNode, _ field: String, _ why: String) {
        notApplied.append("\(file):\(n.line): \(resource): \(field): \(why)")
    }

    /// Reports unknown keys of a mapping; returns false when `n` is not a mapping.
    @discardableResult
    mutating func fields(_ n: PositionedNode, _ path: String, _ known: Set<String>) -> Bool {
        guard let m = n.mapping else { err(n, path, "must be a mapping"); return false }
        for e in m where !known.contains(e.key) {
            err(nil, path.isEmpty ? e.key : "\(path).\(e.key)", "unknown field", line: e.keyLine, col: e.keyColumn)
        }
        return true
    }

    mutating func string(_ n: PositionedNode?, _ path: String) -> String? {
        guard let n else { return nil }
        guard case .scalar = n.node, let s = n.scalarString else { err(n, path, "must be a string"); return nil }
        return s
    }

    mutating func int(_ n: PositionedNode?, _ path: String, range: ClosedRange<Int>? = nil) -> Int? {
        guard let n else { return nil }
        guard case .int(let i) = n.value else { err(n, path, "must be an integer"); return nil }
        if let range, !range.contains(i) { err(n, path, "must be between \(range.lowerBound) and \(range.upperBound)"); return nil }
        return i
    }

    mutating func stringList(_ n: PositionedNode?, _ path: String) -> [String] {
        guard let n else { return [] }
        guard let seq = n.sequence else { err(n, path, "must be a list of strings"); return [] }
        return seq.enumerated().compactMap { string($0.element, "\(path)[\($0.offset)]") }
    }

    mutating func labels(_ n: PositionedNode?, _ path: String) -> [String: String] {
        guard let n else { return [:] }
        guard let m = n.mapping else { err(n, path, "must be a mapping of strings"); return [:] }
        var out: [String: String] = [:]
        for e in m {
            let v = e.value.value.stringValue ?? ""
            if e.key.contains("*") || v.contains("*") { err(nil, "\(path).\(e.key)", "wildcard is not supported in selector", line: e.keyLine, col: e.keyColumn) }
            out[e.key] = v
        }
        return out
    }

    /// Istio durations: "30s", "1.5s", "100ms", "1m", "1h", "10us" → milliseconds.
    mutating func duration(_ n: PositionedNode?, _ path: String) -> Int? {
        guard let n, let s = string(n, path) else { return nil }
        guard let ms = Self.parseDuration(s) else { err(n, path, "invalid duration \"\(s)\" (expected e.g. 30s, 1.5s, 100ms)"); return nil }
        return ms
    }

    /// Lowercase alphanumerics and '-', starting and ending alphanumeric, at most 63.
    static func isDNS1123Label(_ s: String) -> Bool {
        let b = Array(s.utf8)
        guard !b.isEmpty, b.count <= 63 else { return false }
        func alnum(_ c: UInt8) -> Bool { (c >= 97 && c <= 122) || (c >= 48 && c <= 57) }
        return alnum(b.first!) && alnum(b.last!) && b.allSatisfy { alnum($0) || $0 == 45 }
    }

    static func parseDuration(_ s: String) -> Int? {
        let units: [(String, Double)] = [("ms", 1), ("us", 0.001), ("µs", 0.001), ("ns", 0.000001), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
        for (u, f) in units where s.hasSuffix(u) {
            let num = s.dropLast(u.count)
            guard !num.isEmpty, num.allSatisfy({ $0.isNumber || $0 == "." }), let v = Double(num), v >= 0 else { return nil }
            return Int((v * f).rounded(.up))
        }
        return nil
    }

    mutating func stringMatch(_ n: PositionedNode, _ path: String) -> StringMatch? {
        guard fields(n, path, ["exact", "prefix", "regex"]) else { return nil }
        let m = n.mapping!
        if m.isEmpty { return nil }
        if m.count > 1 { err(n, path, "only one of exact, prefix or regex may be set"); return nil }
        let e = m[0]
        guard let v = string(e.value, "\(path).\(e.key)") else { return nil }
        switch e.key {
        case "exact": return StringMatch(kind: .exact, value: v)
        case "prefix": return StringMatch(kind: .prefix, value: v)
        default:
            do { return StringMatch(kind: .regex, value: v, regex: try CompiledRegex(v, anchored: true)) } catch {
                err(e.value, "\(path).regex", "\(error)"); return nil
            }
        }
    }

    /// headers / withoutHeaders / queryParams: name → StringMatch ({} = present).
    mutating func namedMatches(_ n: PositionedNode?, _ path: String, lowercaseNames: Bool) -> [(String, StringMatch?)] {
        guard let n else { return [] }
        guard let m = n.mapping else { err(n, path, "must be a mapping"); return [] }
        var out: [(String, StringMatch?)] = []
        for e in m {
            let name = lowercaseNames ? e.key.lowercased() : e.key
            if lowercaseNames && !HeaderValidationLite.isToken(e.key) { err(nil, "\(path).\(e.key)", "invalid header name", line: e.keyLine, col: e.keyColumn); continue }
            out.append((name, stringMatch(e.value, "\(path).\(e.key)")))
        }
        return out
    }

    // MARK: VirtualService

    static let httpRouteFields: Set<String> = ["name", "match", "route", "redirect", "directResponse", "delegate", "rewrite", "timeout", "retries", "fault", "mirror", "mirrors", "mirrorPercentage", "mirrorPercent", "mirror_percent", "corsPolicy", "headers", "websocketUpgrade", "appendHeaders", "removeResponseHeaders", "appendResponseHeaders", "appendRequestHeaders", "removeRequestHeaders"]
    static let matchFields: Set<String> = ["name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels", "gateways", "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace", "statPrefix"]

    mutating func virtualService(_ spec: PositionedNode, name: String, line: Int) -> VirtualServiceSpec? {
        guard fields(spec, "spec", ["hosts", "gateways", "http", "tls", "tcp", "exportTo"]) else { return nil }
        let hosts = stringList(spec.child("hosts"), "spec.hosts")
        if hosts.isEmpty { err(spec.child("hosts") ?? spec, "spec.hosts", "Required value: at least one host") }
        for (i, h) in hosts.enumerated() where h.isEmpty || h.contains("/") { err(spec.child("hosts")?.sequence?[i], "spec.hosts[\(i)]", "invalid host \"\(h)\"") }
        var routes: [HTTPRouteRule] = []
        if let http = spec.child("http") {
            guard let seq = http.sequence else { err(http, "spec.http", "must be a list"); return nil }
            for (i, r) in seq.enumerated() {
                if let rule = httpRoute(r, "spec.http[\(i)]") { routes.append(rule) }
            }
        }
        return VirtualServiceSpec(name: name, namespace: namespace, hosts: hosts, gateways: stringList(spec.child("gateways"), "spec.gateways"),
                                  http: routes, file: file, line: line)
    }

    mutating func httpRoute(_ n: PositionedNode, _ path: String) -> HTTPRouteRule? {
        guard fields(n, path, Self.httpRouteFields) else { return nil }
        var r = HTTPRouteRule()
        r.name = string(n.child("name"), "\(path).name") ?? ""
        if let ms = n.child("match") {
            guard let seq = ms.sequence else { err(ms, "\(path).match", "must be a list"); return nil }
            for (i, m) in seq.enumerated() { if let mm = routeMatch(m, "\(path).match[\(i)]") { r.matches.append(mm) } }
        }
        if let rs = n.child("route") {
            guard let seq = rs.sequence else { err(rs, "\(path).route", "must be a list"); return nil }
            var total = 0
            for (i, d) in seq.enumerated() {
                let p = "\(path).route[\(i)]"
                guard fields(d, p, ["destination", "weight", "headers"]) else { continue }
                guard let dest = d.child("destination") else { err(d, "\(p).destination", "Required value"); continue }
                guard let (host, subset, port) = destination(dest, "\(p).destination") else { continue }
                var weight = 0
                if let w = d.child("weight") { weight = int(w, "\(p).weight", range: 0...100) ?? 0 }
                else if seq.count == 1 { weight = 100 }
                if d.child("headers") != nil { headerOps(d.child("headers")!, "\(p).headers", into: &r) }
                total += weight
                r.destinations.append(RouteDestination(host: host, fqdn: HostName.canonical(host, namespace: namespace), subset: subset, port: port, weight: weight))
            }
            if seq.count > 1 || r.destinations.first?.weight != 100 {
                if total != 100 && !(seq.count > 1 && r.destinations.allSatisfy { $0.weight == 0 }) {
                    err(rs, "\(path).route", "total destination weight \(total) != 100")
                }
                if seq.count > 1 && r.destinations.allSatisfy({ $0.weight == 0 }) {
                    // Istio: unset weights on several destinations split evenly.
                    let each = 100 / r.destinations.count
                    for k in r.destinations.indices { r.destinations[k].weight = each + (k < 100 % r.destinations.count ? 1 : 0) }
                }
            }
            var acc = 0
            for d in r.destinations { acc += d.weight; r.cumulativeWeights.append(acc) }
            r.totalWeight = acc
        }
        if let red = n.child("redirect") {
            if fields(red, "\(path).redirect", ["uri", "authority", "port", "derivePort", "scheme", "redirectCode"]) {
                var rd = Redirect()
                rd.uri = string(red.child("uri"), "\(path).redirect.uri")
                rd.authority = string(red.child("authority"), "\(path).redirect.authority")
                rd.scheme = string(red.child("scheme"), "\(path).redirect.scheme")
                rd.port = int(red.child("port"), "\(path).redirect.port", range: 1...65535)
                if let c = red.child("redirectCode") {
                    rd.code = int(c, "\(path).redirect.redirectCode") ?? 301
                    if ![301, 302, 303, 307, 308].contains(rd.code) { err(c, "\(path).redirect.redirectCode", "must be 301, 302, 303, 307 or 308") }
                }
                r.redirect = rd
            }
        }
        if let dr = n.child("directResponse") {
            if fields(dr, "\(path).directResponse", ["status", "body"]) {
                let st = int(dr.child("status"), "\(path).directResponse.status", range: 200...599) ?? 200
                if dr.child("status") == nil { err(dr, "\(path).directResponse.status", "Required value") }
                var body = ""
                if let b = dr.child("body") {
                    if fields(b, "\(path).directResponse.body", ["string", "bytes"]) {
                        if let s = string(b.child("string"), "\(path).directResponse.body.string") { body = s }
                        else if let s = string(b.child("bytes"), "\(path).directResponse.body.bytes") {
                            body = Data(base64Encoded: s).map { String(decoding: $0, as: UTF8.self) } ?? ""
                        }
                    }
                }
                r.directResponse = (st, body)
            }
        }
        let actions = [r.destinations.isEmpty ? 0 : 1, r.redirect == nil ? 0 : 1, r.directResponse == nil ? 0 : 1, n.child("delegate") == nil ? 0 : 1].reduce(0, +)
        if actions == 0 { err(n, path, "one of route, redirect, directResponse or delegate is required") }
        if actions > 1 { err(n, path, "only one of route, redirect, directResponse or delegate may be set") }
        if n.child("delegate") != nil { err(n.child("delegate"), "\(path).delegate", "delegate is not supported yet") }
        if let rw = n.child("rewrite") {
            if fields(rw, "\(path).rewrite", ["uri", "authority", "uriRegexRewrite"]) {
                var w = Rewrite()
                w.uri = string(rw.child("uri"), "\(path).rewrite.uri")
                w.authority = string(rw.child("authority"), "\(path).rewrite.authority")
                if let rr = rw.child("uriRegexRewrite"), fields(rr, "\(path).rewrite.uriRegexRewrite", ["match", "rewrite"]) {
                    if w.uri != nil { err(rr, "\(path).rewrite", "uri and uriRegexRewrite cannot both be set") }
                    if let m = string(rr.child("match"), "\(path).rewrite.uriRegexRewrite.match") {
                        do { w.regex = try CompiledRegex(m) } catch { err(rr.child("match"), "\(path).rewrite.uriRegexRewrite.match", "\(error)") }
                    }
                    w.regexRewrite = string(rr.child("rewrite"), "\(path).rewrite.uriRegexRewrite.rewrite") ?? ""
                }
                r.rewrite = w
            }
        }
        if let t = n.child("timeout") { r.timeoutMs = duration(t, "\(path).timeout") }
        if let rt = n.child("retries"), fields(rt, "\(path).retries", ["attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"]) {
            r.retries = RetrySpec(attempts: int(rt.child("attempts"), "\(path).retries.attempts", range: 0...Int(Int32.max)) ?? 2,
                                  perTryTimeoutMs: duration(rt.child("perTryTimeout"), "\(path).retries.perTryTimeout") ?? 0,
                                  retryOn: string(rt.child("retryOn"), "\(path).retries.retryOn") ?? "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes")
        }
        if let f = n.child("fault"), fields(f, "\(path).fault", ["delay", "abort"]) {
            var fault = Fault()
            if let a = f.child("abort"), fields(a, "\(path).fault.abort", ["httpStatus", "grpcStatus", "http2Error", "percentage"]) {
                fault.abortStatus = int(a.child("httpStatus"), "\(path).fault.abort.httpStatus", range: 200...599)
                if fault.abortStatus == nil && a.child("httpStatus") == nil { err(a, "\(path).fault.abort.httpStatus", "Required value (grpcStatus and http2Error are not supported)") }
                fault.abortPercent = percentage(a.child("percentage"), "\(path).fault.abort.percentage") ?? 100
            }
            if let d = f.child("delay"), fields(d, "\(path).fault.delay", ["fixedDelay", "exponentialDelay", "percentage", "percent"]) {
                fault.delayMs = duration(d.child("fixedDelay"), "\(path).fault.delay.fixedDelay")
                if d.child("fixedDelay") == nil { err(d, "\(path).fault.delay.fixedDelay", "Required value") }
                fault.delayPercent = percentage(d.child("percentage"), "\(path).fault.delay.percentage") ?? Double(int(d.child("percent"), "\(path).fault.delay.percent", range: 0...100) ?? 100)
            }
            r.fault = fault
        }
        var mirrorNodes: [(PositionedNode, String, Double)] = []
        if let m = n.child("mirror") {
            let pct = percentage(n.child("mirrorPercentage"), "\(path).mirrorPercentage") ?? Double(int(n.child("mirrorPercent"), "\(path).mirrorPercent", range: 0...100) ?? 100)
            mirrorNodes.append((m, "\(path).mirror", pct))
        }
        if let ms = n.child("mirrors")?.sequence {
            for (i, m) in ms.enumerated() where fields(m, "\(path).mirrors[\(i)]", ["destination", "percentage"]) {
                if let d = m.child("destination") { mirrorNodes.append((d, "\(path).mirrors[\(i)].destination", percentage(m.child("percentage"), "\(path).mirrors[\(i)].percentage") ?? 100)) }
            }
        }
        for (m, p, pct) in mirrorNodes {
            if let (h, sub, port) = destination(m, p) {
                r.mirrors.append(Mirror(host: h, fqdn: HostName.canonical(h, namespace: namespace), subset: sub, port: port, percent: pct))
            }
        }
        if let h = n.child("headers") { headerOps(h, "\(path).headers", into: &r) }
        if let c = n.child("corsPolicy") { r.cors = cors(c, "\(path).corsPolicy") }
        return r
    }

    mutating func cors(_ n: PositionedNode, _ path: String) -> CorsPolicy? {
        guard fields(n, path, ["allowOrigins", "allowOrigin", "allowMethods", "allowHeaders", "exposeHeaders", "maxAge", "allowCredentials", "unmatchedPreflights"]) else { return nil }
        var c = CorsPolicy()
        for (i, o) in (n.child("allowOrigins")?.sequence ?? []).enumerated() {
            if let m = stringMatch(o, "\(path).allowOrigins[\(i)]") { c.allowOrigins.append(m) }
        }
        for o in stringList(n.child("allowOrigin"), "\(path).allowOrigin") {
            c.allowOrigins.append(o == "*" ? StringMatch(kind: .prefix, value: "") : StringMatch(kind: .exact, value: o))
        }
        c.allowMethods = stringList(n.child("allowMethods"), "\(path).allowMethods").joined(separator: ",")
        c.allowHeaders = stringList(n.child("allowHeaders"), "\(path).allowHeaders").joined(separator: ",")
        c.exposeHeaders = stringList(n.child("exposeHeaders"), "\(path).exposeHeaders").joined(separator: ",")
        if let m = n.child("maxAge") { c.maxAgeSeconds = duration(m, "\(path).maxAge").map { $0 / 1000 } }
        if let a = n.child("allowCredentials") { if case .bool(let b) = a.value { c.allowCredentials = b } else { err(a, "\(path).allowCredentials", "must be a boolean") } }
        return c
    }

    mutating func percentage(_ n: PositionedNode?, _ path: String) -> Double? {
        guard let n else { return nil }
        guard fields(n, path, ["value"]) else { return nil }
        let v: Double
        switch n.child("value")?.value {
        case .int(let i)?: v = Double(i)
        case .double(let d)?: v = d
        default: err(n, path + ".value", "must be a number"); return nil
        }
        if v < 0 || v > 100 { err(n, path + ".value", "must be between 0 and 100"); return nil }
        return v
    }

    mutating func destination(_ n: PositionedNode, _ path: String) -> (String, String, Int?)? {
        guard fields(n, path, ["host", "subset", "port"]) else { return nil }
        guard let host = string(n.child("host"), "\(path).host"), !host.isEmpty else { err(n, "\(path).host", "Required value"); return nil }
        let subset = string(n.child("subset"), "\(path).subset") ?? ""
        var port: Int? = nil
        if let p = n.child("port"), fields(p, "\(path).port", ["number"]) { port = int(p.child("number"), "\(path).port.number", range: 1...65535) }
        return (host, subset, port)
    }

    mutating func headerOps(_ n: PositionedNode, _ path: String, into r: inout HTTPRouteRule) {
        guard fields(n, path, ["request", "response"]) else { return }
        for side in ["request", "response"] {
            guard let s = n.child(side) else { continue }
            guard fields(s, "\(path).\(side)", ["set", "add", "remove"]) else { continue }
            var ops = HeaderOps()
            for op in ["set", "add"] {
                guard let m = s.child(op) else { continue }
                guard let mm = m.mapping else { err(m, "\(path).\(side).\(op)", "must be a mapping"); continue }
                for e in mm {
                    let v = e.value.value.stringValue ?? ""
                    if !HeaderValidationLite.isToken(e.key) || v.contains(where: { $0 == "\r" || $0 == "\n" || $0 == "\0" }) {
                        err(e.value, "\(path).\(side).\(op).\(e.key)", "invalid header name or value"); continue
                    }
                    if op == "set" { ops.sets.append((e.key.lowercased(), v)) } else { ops.adds.append((e.key.lowercased(), v)) }
                }
            }
            ops.removes = stringList(s.child("remove"), "\(path).\(side).remove").map { $0.lowercased() }
            if side == "request" { r.requestHeaders = ops } else { r.responseHeaders = ops }
        }
    }

    mutating func routeMatch(_ n: PositionedNode, _ path: String) -> RouteMatch? {
        guard fields(n, path, Self.matchFields) else { return nil }
        var m = RouteMatch()
        if let u = n.child("uri") { m.uri = stringMatch(u, "\(path).uri") }
        if let u = n.child("scheme") { m.scheme = stringMatch(u, "\(path).scheme") }
        if let u = n.child("method") { m.method = stringMatch(u, "\(path).method") }
        if let u = n.child("authority") { m.authority = stringMatch(u, "\(path).authority") }
        m.headers = namedMatches(n.child("headers"), "\(path).headers", lowercaseNames: true)
        m.withoutHeaders = namedMatches(n.child("withoutHeaders"), "\(path).withoutHeaders", lowercaseNames: true)
        m.queryParams = namedMatches(n.child("queryParams"), "\(path).queryParams", lowercaseNames: false)
        if let i = n.child("ignoreUriCase") { if case .bool(let b) = i.value { m.ignoreUriCase = b } else { err(i, "\(path).ignoreUriCase", "must be a boolean") } }
        m.port = int(n.child("port"), "\(path).port", range: 1...65535)
        m.sourceLabels = labels(n.child("sourceLabels"), "\(path).sourceLabels")
        m.sourceNamespace = string(n.child("sourceNamespace"), "\(path).sourceNamespace")
        return m
    }

    // MARK: DestinationRule

    mutating func destinationRule(_ spec: PositionedNode, name: String, line: Int) -> DestinationRuleSpec? {
        guard fields(spec, "spec", ["host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"]) else { return nil }
        guard let host = string(spec.child("host"), "spec.host"), !host.isEmpty else { err(spec, "spec.host", "Required value"); return nil }
        var subsets: [Subset] = []
        var names = Set<String>()
        for (i, s) in (spec.child("subsets")?.sequence ?? []).enumerated() {
            let p = "spec.subsets[\(i)]"
            guard fields(s, p, ["name", "labels", "trafficPolicy"]) else { continue }
            guard let n = string(s.child("name"), "\(p).name"), !n.isEmpty else { err(s, "\(p).name", "Required value"); continue }
            if !names.insert(n).inserted { err(s.child("name"), "\(p).name", "Duplicate value: subset \(n)") }
            // A subset's trafficPolicy is a whole TrafficPolicy: checked as the top level is.
            if let tp = s.child("trafficPolicy") { trafficPolicy(tp, "\(p).trafficPolicy") }
            subsets.append(Subset(name: n, labels: labels(s.child("labels"), "\(p).labels"), trafficPolicy: s.child("trafficPolicy")?.value))
        }
        if let tp = spec.child("trafficPolicy") { trafficPolicy(tp, "spec.trafficPolicy") }
        return DestinationRuleSpec(name: name, namespace: namespace, host: host, fqdn: HostName.canonical(host, namespace: namespace),
                                   subsets: subsets, trafficPolicy: spec.child("trafficPolicy")?.value, file: file, line: line)
    }

    /// The parts of trafficPolicy validated now (the rest is decoded by the balancer).
    mutating func trafficPolicy(_ n: PositionedNode, _ path: String) {
        guard fields(n, path, ["loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings", "tunnel", "proxyProtocol", "retryBudget"]) else { return }
        for k in ["tunnel", "proxyProtocol", "retryBudget"] { if let c = n.child(k) { notApplied(c, "\(path).\(k)", "not applied by moonlet, ignored") } }
        for k in ["localityLbSetting", "warmup"] {
            if let c = n.child("loadBalancer")?.child(k) { notApplied(c, "\(path).loadBalancer.\(k)", "not applied by moonlet, ignored") }
        }
        if let lb = n.child("loadBalancer"), lb.child("simple") != nil && lb.child("consistentHash") != nil {
            err(lb, "\(path).loadBalancer", "only one of simple or consistentHash may be set")
        }
        if let ch = n.child("loadBalancer")?.child("consistentHash"), fields(ch, "\(path).loadBalancer.consistentHash", ["httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName", "ringHash", "maglev", "minimumRingSize", "localityLbSetting"]) {
            let keys = ["httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"].filter { ch.child($0) != nil }
            if keys.count > 1 { err(ch, "\(path).loadBalancer.consistentHash", "only one hash key may be set, got \(keys.joined(separator: ", "))") }
            if let c = ch.child("httpCookie"), fields(c, "\(path).loadBalancer.consistentHash.httpCookie", ["name", "path", "ttl", "attributes"]) {
                if c.child("name") == nil { err(c, "\(path).loadBalancer.consistentHash.httpCookie.name", "Required value") }
                _ = duration(c.child("ttl"), "\(path).loadBalancer.consistentHash.httpCookie.ttl")
            }
        }
        if let simple = n.child("loadBalancer")?.child("simple") {
            let v = string(simple, "\(path).loadBalancer.simple") ?? ""
            if LBPolicy(istio: v) == nil { err(simple, "\(path).loadBalancer.simple", "unsupported value \"\(v)\" (ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH)") }
        }
        if let t = n.child("tls") { clientTLS(t, "\(path).tls") }
        for (i, pl) in (n.child("portLevelSettings")?.sequence ?? []).enumerated() {
            let pp = "\(path).portLevelSettings[\(i)]"
            guard fields(pl, pp, ["port", "loadBalancer", "connectionPool", "outlierDetection", "tls"]) else { continue }
            if pl.child("port")?.child("number") == nil { err(pl, "\(pp).port.number", "Required value") }
            if let t = pl.child("tls") { clientTLS(t, "\(pp).tls") }
        }
        if let m = n.child("connectionPool")?.child("http")?.child("maxRequestsPerConnection") {
            _ = int(m, "\(path).connectionPool.http.maxRequestsPerConnection", range: 0...Int(Int32.max))
        }
        if let h = n.child("connectionPool")?.child("http")?.child("h2UpgradePolicy") {
            let v = string(h, "\(path).connectionPool.http.h2UpgradePolicy") ?? ""
            if !["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"].contains(v) {
                err(h, "\(path).connectionPool.http.h2UpgradePolicy", "unsupported value \"\(v)\" (DEFAULT, DO_NOT_UPGRADE, UPGRADE)")
            }
        }
        if let od = n.child("outlierDetection"), fields(od, "\(path).outlierDetection", ["consecutiveErrors", "consecutive5xxErrors", "consecutiveGatewayErrors", "consecutiveLocalOriginFailures", "splitExternalLocalOriginErrors", "interval", "baseEjectionTime", "maxEjectionPercent", "minHealthPercent"]) {
            for k in ["consecutive5xxErrors", "consecutiveGatewayErrors", "consecutiveLocalOriginFailures", "consecutiveErrors"] { _ = int(od.child(k), "\(path).outlierDetection.\(k)", range: 0...Int(Int32.max)) }
            for k in ["maxEjectionPercent", "minHealthPercent"] { _ = int(od.child(k), "\(path).outlierDetection.\(k)", range: 0...100) }
            for k in ["interval", "baseEjectionTime"] { _ = duration(od.child(k), "\(path).outlierDetection.\(k)") }
        }
        if let lb = n.child("loadBalancer"), let w = lb.child("warmup") {
            let p = "\(path).loadBalancer.warmup"
            if fields(w, p, ["duration", "minimumPercent", "aggression"]) {
                if w.child("duration") == nil { err(w, "\(p).duration", "Required value") } else { _ = duration(w.child("duration"), "\(p).duration") }
                if let mp = w.child("minimumPercent") {
                    let v: Double? = { if case .double(let d) = mp.value { return d }; if case .int(let i) = mp.value { return Double(i) }; return nil }()
                    if v == nil || v! < 0 || v! > 100 { err(mp, "\(p).minimumPercent", "Invalid value: must be between 0 and 100") }
                }
                if let ag = w.child("aggression") {
                    let v: Double? = { if case .double(let d) = ag.value { return d }; if case .int(let i) = ag.value { return Double(i) }; return nil }()
                    if v == nil || v! < 1 { err(ag, "\(p).aggression", "Invalid value: must be at least 1") }
                }
            }
        }
    }

    /// ClientTLSSettings: mode enum, MUTUAL needs its files, ISTIO_MUTUAL takes none.
    mutating func clientTLS(_ t: PositionedNode, _ path: String) {
        guard fields(t, path, ["mode", "clientCertificate", "privateKey", "caCertificates", "credentialName", "subjectAltNames", "sni", "insecureSkipVerify", "caCrl"]) else { return }
        let mode = string(t.child("mode"), "\(path).mode") ?? "DISABLE"
        if UpstreamTLS.Mode(rawValue: mode) == nil {
            err(t.child("mode"), "\(path).mode", "Unsupported value: \"\(mode)\": supported values: \"DISABLE\", \"SIMPLE\", \"MUTUAL\", \"ISTIO_MUTUAL\"")
        }
        if t.child("credentialName") != nil {
            err(t.child("credentialName"), "\(path).credentialName", "not supported by moonlet (Kubernetes secrets); use clientCertificate, privateKey and caCertificates files")
        } else if mode == "MUTUAL" && (t.child("clientCertificate") == nil || t.child("privateKey") == nil) {
            err(t, path, "MUTUAL requires clientCertificate and privateKey")
        }
        if mode == "ISTIO_MUTUAL", let f = ["clientCertificate", "privateKey", "caCertificates"].first(where: { t.child($0) != nil }) {
            err(t.child(f), "\(path).\(f)", "cannot be set with ISTIO_MUTUAL (the workload certificate is used)")
        }
        _ = stringList(t.child("subjectAltNames"), "\(path).subjectAltNames")
        if let c = t.child("caCrl") {
            notApplied(c, "\(path).caCrl", "certificate revocation lists are not checked by moonlet: a revoked certificate is still accepted")
        }
    }

    // MARK: ServiceEntry / WorkloadEntry

    mutating func endpoint(_ n: PositionedNode, _ path: String, requireAddress: Bool) -> Endpoint? {
        guard fields(n, path, ["address", "ports", "labels", "network", "locality", "weight", "serviceAccount"]) else { return nil }
        let addr = string(n.child("address"), "\(path).address") ?? ""
        // An address may be left out when the endpoint names its network (reached through a gateway).
        if addr.isEmpty && requireAddress && n.child("network") == nil { err(n, "\(path).address", "Address is required") }
        if addr.hasPrefix("unix://") {
            let p = String(addr.dropFirst(7))
            if !p.hasPrefix("/") && !p.hasPrefix("@") { err(n.child("address"), "\(path).address", "UDS must be an absolute path or abstract socket") }
            else if p.hasSuffix("/") { err(n.child("address"), "\(path).address", "UDS may not be a dir") }
            if n.child("ports") != nil { err(n.child("ports"), "\(path).ports", "UDS may not include ports") }
        }
        var ports: [String: Int] = [:]
        if let pm = n.child("ports")?.mapping {
            for e in pm {
                if !Self.isDNS1123Label(e.key) { err(nil, "\(path).ports", "Invalid value: port name \"\(e.key)\" is not a DNS-1123 label", line: e.keyLine, col: e.keyColumn); continue }
                guard case .int(let v) = e.value.value, (1...65535).contains(v) else { err(e.value, "\(path).ports.\(e.key)", "port must be between 1-65535"); continue }
                ports[e.key] = v
            }
        }
        let w = int(n.child("weight"), "\(path).weight", range: 0...Int(UInt32.max)) ?? 1
        return Endpoint(address: addr, ports: ports, labels: labels(n.child("labels"), "\(path).labels"),
                        serviceAccount: string(n.child("serviceAccount"), "\(path).serviceAccount") ?? "", weight: max(1, w))
    }

    mutating func workloadEntry(_ spec: PositionedNode, name: String) -> WorkloadEntrySpec? {
        guard let e = endpoint(spec, "spec", requireAddress: true) else { return nil }
        return WorkloadEntrySpec(name: name, namespace: namespace, endpoint: e)
    }

    mutating func serviceEntry(_ spec: PositionedNode, name: String, line: Int) -> ServiceEntrySpec? {
        guard fields(spec, "spec", ["hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector", "exportTo", "subjectAltNames"]) else { return nil }
        let hosts = stringList(spec.child("hosts"), "spec.hosts")
        if hosts.isEmpty { err(spec.child("hosts") ?? spec, "spec.hosts", "Required value") }
        for (i, h) in hosts.enumerated() where h == "*" { err(spec.child("hosts")?.sequence?[i], "spec.hosts[\(i)]", "hostname cannot be wildcard") }
        var seenHosts = Set<String>()
        for (i, h) in hosts.enumerated() where !seenHosts.insert(h).inserted { err(spec.child("hosts")?.sequence?[i], "spec.hosts[\(i)]", "Duplicate value: \(h)") }
        let resolution = string(spec.child("resolution"), "spec.resolution") ?? "NONE"
        if !["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"].contains(resolution) { err(spec.child("resolution"), "spec.resolution", "unsupported value \(resolution)") }
        let addresses = stringList(spec.child("addresses"), "spec.addresses")
        if addresses.contains(where: { $0.contains("/") }) && !["NONE", "STATIC"].contains(resolution) {
            err(spec.child("addresses"), "spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types")
        }
        var ports: [ServicePort] = []
        var numbers = Set<Int>(), portNames = Set<String>()
        for (i, p) in (spec.child("ports")?.sequence ?? []).enumerated() {
            let path = "spec.ports[\(i)]"
            guard fields(p, path, ["number", "protocol", "name", "targetPort"]) else { continue }
            guard case .int(let num)? = p.child("number")?.value, (1...65535).contains(num) else { err(p.child("number") ?? p, "\(path).number", "port must be between 1-65535"); continue }
            if !numbers.insert(num).inserted { err(p.child("number"), "\(path).number", "port number cannot be duplicated") }
            let pn = string(p.child("name"), "\(path).name") ?? ""
            if !pn.isEmpty && !portNames.insert(pn).inserted { err(p.child("name"), "\(path).name", "Duplicate value: port name \(pn)") }
            var target: Int? = nil
            if let t = p.child("targetPort") {
                guard case .int(let tv) = t.value, (1...65535).contains(tv) else { err(t, "\(path).targetPort", "port must be between 1-65535"); continue }
                target = tv
            }
            ports.append(ServicePort(number: num, name: pn, protocolName: string(p.child("protocol"), "\(path).protocol") ?? "", targetPort: target))
        }
        var endpoints: [Endpoint] = []
        for (i, e) in (spec.child("endpoints")?.sequence ?? []).enumerated() {
            if let ep = endpoint(e, "spec.endpoints[\(i)]", requireAddress: true) { endpoints.append(ep) }
        }
        var selector: [String: String]? = nil
        if let ws = spec.child("workloadSelector") {
            if fields(ws, "spec.workloadSelector", ["labels"]) { selector = labels(ws.child("labels"), "spec.workloadSelector.labels") }
            if spec.child("endpoints") != nil { err(ws, "spec", "only one of WorkloadSelector or Endpoints can be set") }
        }
        if resolution == "NONE" && !endpoints.isEmpty { err(spec.child("endpoints"), "spec.endpoints", "NONE mode cannot set endpoints") }
        if resolution == "DNS_ROUND_ROBIN" && endpoints.count > 1 { err(spec.child("endpoints"), "spec.endpoints", "DNS_ROUND_ROBIN mode cannot have multiple endpoints") }
        return ServiceEntrySpec(name: name, namespace: namespace, hosts: hosts, ports: ports, resolution: resolution,
                                endpoints: endpoints, workloadSelector: selector, file: file, line: line)
    }
}

/// Token check without depending on MoonletHTTP from here.
enum HeaderValidationLite {
    static func isToken(_ s: String) -> Bool {
        if s.isEmpty { return false }
        for b in s.utf8 {
            switch b {
            case 48...57, 65...90, 97...122: continue
            default: if !"!#$%&'*+-.^_`|~".utf8.contains(b) { return false }
            }
        }
        return true
    }
}

// MARK: - Security and telemetry resources (validated now, enforced with their features)

extension TrafficDecoder {
    static let mtlsModes: Set<String> = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]

    mutating func mtlsMode(_ n: PositionedNode?, _ path: String) {
        guard let n else { return }
        guard fields(n, path, ["mode"]) else { return }
        if let m = n.child("mode"), let v = string(m, "\(path).mode"), !Self.mtlsModes.contains(v) {
            err(m, "\(path).mode", "Unsupported value: \"\(v)\": supported values: \"UNSET\", \"DISABLE\", \"PERMISSIVE\", \"STRICT\"")
        }
    }

    /// PeerAuthentication: mode enums, portLevelMtls needs a selector, is not empty, has valid ports.
    mutating func peerAuthentication(_ spec: PositionedNode) {
        guard fields(spec, "spec", ["selector", "mtls", "portLevelMtls"]) else { return }
        if let sel = spec.child("selector"), fields(sel, "spec.selector", ["matchLabels"]) { _ = labels(sel.child("matchLabels"), "spec.selector.matchLabels") }
        mtlsMode(spec.child("mtls"), "spec.mtls")
        guard let plm = spec.child("portLevelMtls") else { return }
        guard let m = plm.mapping else { err(plm, "spec.portLevelMtls", "must be a mapping"); return }
        if spec.child("selector") == nil { err(plm, "spec.portLevelMtls", "portLevelMtls requires selector") }
        if m.isEmpty { err(plm, "spec.portLevelMtls", "spec.portLevelMtls in body should have at least 1 properties") }
        for e in m {
            guard let port = UInt64(e.key) else {
                err(nil, "spec.portLevelMtls.\(e.key)", "type conversion error from string to uint32: \"\(e.key)\"", line: e.keyLine, col: e.keyColumn); continue
            }
            if port < 1 || port > 65535 { err(nil, "spec.portLevelMtls.\(e.key)", "port must be between 1-65535", line: e.keyLine, col: e.keyColumn) }
            mtlsMode(e.value, "spec.portLevelMtls.\(e.key)")
        }
    }

    /// AuthorizationPolicy: action enum and the source rules Istio checks.
    mutating func authorizationPolicy(_ spec: PositionedNode) {
        guard fields(spec, "spec", ["selector", "targetRef", "targetRefs", "rules", "action", "provider"]) else { return }
        if let a = spec.child("action"), let v = string(a, "spec.action"), !["ALLOW", "DENY", "AUDIT", "CUSTOM"].contains(v) {
            err(a, "spec.action", "Unsupported value: \"\(v)\"")
        }
        for (ri, r) in (spec.child("rules")?.sequence ?? []).enumerated() {
            for (fi, f) in (r.child("from")?.sequence ?? []).enumerated() {
                guard let src = f.child("source") else { continue }
                if src.child("serviceAccounts") != nil && (src.child("namespaces") != nil || src.child("principals") != nil) {
                    err(src, "spec.rules[\(ri)].from[\(fi)].source", "Cannot set serviceAccounts with namespaces or principals")
                }
            }
        }
    }

    /// Telemetry: provider names, custom metric names and tag override operations.
    mutating func telemetry(_ spec: PositionedNode) {
        guard fields(spec, "spec", ["selector", "targetRef", "targetRefs", "tracing", "metrics", "accessLogging"]) else { return }
        for (mi, m) in (spec.child("metrics")?.sequence ?? []).enumerated() {
            for (pi, p) in (m.child("providers")?.sequence ?? []).enumerated() where (p.child("name")?.scalarString ?? "").isEmpty {
                err(p, "spec.metrics[\(mi)].providers[\(pi)].name", "name in body should be at least 1 chars long")
            }
            for (oi, o) in (m.child("overrides")?.sequence ?? []).enumerated() {
                let path = "spec.metrics[\(mi)].overrides[\(oi)]"
                if let cm = o.child("match")?.child("customMetric"), (cm.scalarString ?? "").isEmpty {
                    err(cm, "\(path).match.customMetric", "customMetric in body should be at least 1 chars long")
                }
                for e in o.child("tagOverrides")?.mapping ?? [] {
                    let op = e.value.child("operation")?.scalarString ?? "UPSERT"
                    let hasValue = e.value.child("value") != nil
                    if op == "UPSERT" && !hasValue { err(e.value, "\(path).tagOverrides.\(e.key)", "value must be set when operation is UPSERT") }
                    if op == "REMOVE" && hasValue { err(e.value, "\(path).tagOverrides.\(e.key)", "value must not be set when operation is REMOVE") }
                }
            }
        }
    }
}
