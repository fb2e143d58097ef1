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

    /// A string field. A number or boolean there is refused, as Kubernetes and Istio
    /// refuse it (quote it: `"8080"`, `"true"`); null counts as unset.
    mutating func string(_ n: PositionedNode?, _ path: String) -> String? {
        guard let n else { return nil }
        switch n.value {
        case .string(let s): return s
        case .null: return nil
        case .int, .double, .bool: err(n, path, "must be a string, got \(n.scalarString ?? "") (quote it)"); return nil
        default: err(n, path, "must be a string"); return nil
        }
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

    mutating func bool(_ n: PositionedNode?, _ path: String) -> Bool? {
        guard let n else { return nil }
        guard case .bool(let b) = n.value else { err(n, path, "must be a boolean"); return nil }
        return b
    }

    /// An integer or decimal number (a YAML int or float).
    func numberValue(_ n: PositionedNode) -> Double? {
        switch n.value {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }

    mutating func number(_ n: PositionedNode?, _ path: String, range: ClosedRange<Double>? = nil) -> Double? {
        guard let n else { return nil }
        guard let v = numberValue(n) else { err(n, path, "must be a number"); return nil }
        if let range, !range.contains(v) { err(n, path, "must be between \(range.lowerBound) and \(range.upperBound)"); return nil }
        return v
    }

    /// A string that must be one of `allowed` (Istio's enum message).
    mutating func enumValue(_ n: PositionedNode?, _ path: String, _ allowed: [String]) -> String? {
        guard let n, let v = string(n, path) else { return nil }
        guard allowed.contains(v) else {
            err(n, path, "Unsupported value: \"\(v)\": supported values: " + allowed.map { "\"\($0)\"" }.joined(separator: ", "))
            return nil
        }
        return v
    }

    /// The items of a list field (reported when it is not a list).
    mutating func list(_ n: PositionedNode?, _ path: String) -> [PositionedNode] {
        guard let n else { return [] }
        guard let seq = n.sequence else { err(n, path, "must be a list"); return [] }
        return seq
    }

    mutating func labels(_ n: PositionedNode?, _ path: String) -> [String: String] {
        guard let n else { return [:] }
        guard let m = n.mapping else { err(n, path, "must be a mapping of strings"); return [:] }
        var out: [String: String] = [:]
        for e in m {
            let v: String
            if e.value.value == .null { v = "" } else { guard let s = string(e.value, "\(path).\(e.key)") else { continue }; v = s }
            if e.key.hasByte("*") || v.hasByte("*") { err(nil, "\(path).\(e.key)", "wildcard is not supported in selector", line: e.keyLine, col: e.keyColumn) }
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
    /// See DNSLabel.isValid (MoonletCore).
    static func isDNS1123Label(_ s: String) -> Bool { DNSLabel.isValid(s) }

    static func parseDuration(_ s: String) -> Int? {
        let units: [(String, Double)] = [("ms", 1), ("us", 0.001), ("µs", 0.001), ("ns", 0.000001), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
        for (u, f) in units where s.hasSuffix(u) {
            let num = s.dropLast(u.count)
            guard !num.isEmpty, num.allSatisfy({ $0.isNumber || $0 == "." }), let v = Double(num), v >= 0 else { return nil }
            // A value past ~292 million years (or infinite) would trap the Int conversion.
            let ms = (v * f).rounded(.up)
            guard ms.isFinite, ms < 9.0e15 else { return nil }
            return Int(ms)
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
            if lowercaseNames && !HeaderValidation.isToken(e.key) { err(nil, "\(path).\(e.key)", "invalid header name", line: e.keyLine, col: e.keyColumn); continue }
            out.append((name, stringMatch(e.value, "\(path).\(e.key)")))
        }
        return out
    }

    // MARK: VirtualService

    /// HTTPRoute's fields, and the deprecated ones Istio's own test configuration still
    /// uses (`deprecatedRouteFields`).
    static let httpRouteFields: Set<String> = Set(["name", "match", "route", "redirect", "directResponse", "delegate", "rewrite", "timeout", "retries", "fault", "mirror", "mirrors", "mirrorPercentage", "mirrorPercent", "corsPolicy", "headers"])
        .union(deprecatedRouteFields)
    /// Fields Istio deprecated and no longer acts on: accepted, reported as not applied.
    static let deprecatedRouteFields = ["websocketUpgrade", "appendHeaders", "removeResponseHeaders", "appendResponseHeaders", "appendRequestHeaders", "removeRequestHeaders"]
    static let matchFields: Set<String> = ["name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels", "gateways", "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace", "statPrefix"]

    mutating func virtualService(_ spec: PositionedNode, name: String, line: Int) -> VirtualServiceSpec? {
        guard fields(spec, "spec", ["hosts", "gateways", "http", "tls", "tcp", "exportTo"]) else { return nil }
        let hosts = stringList(spec.child("hosts"), "spec.hosts")
        if hosts.isEmpty { err(spec.child("hosts") ?? spec, "spec.hosts", "Required value: at least one host") }
        for (i, h) in hosts.enumerated() where h.isEmpty || h.hasByte("/") { err(spec.child("hosts")?.sequence?[i], "spec.hosts[\(i)]", "invalid host \"\(h)\"") }
        var routes: [HTTPRouteRule] = []
        if let http = spec.child("http") {
            guard let seq = http.sequence else { err(http, "spec.http", "must be a list"); return nil }
            for (i, r) in seq.enumerated() {
                if let rule = httpRoute(r, "spec.http[\(i)]") { routes.append(rule) }
            }
        }
        var v = VirtualServiceSpec(name: name, namespace: namespace, hosts: hosts, gateways: stringList(spec.child("gateways"), "spec.gateways"),
                                   http: routes, file: file, line: line)
        v.exportTo = exportTo(spec.child("exportTo"))
        for (i, r) in list(spec.child("tcp"), "spec.tcp").enumerated() {
            if let rule = l4Route(r, "spec.tcp[\(i)]", tls: false, hosts: hosts) { v.tcp.append(rule) }
        }
        for (i, r) in list(spec.child("tls"), "spec.tls").enumerated() {
            if let rule = l4Route(r, "spec.tls[\(i)]", tls: true, hosts: hosts) { v.tls.append(rule) }
        }
        return v
    }

    // MARK: VirtualService tcp and tls

    /// L4MatchAttributes' fields (`tcp[].match[]`); `sourceSubnet` is refused (deprecated
    /// by Istio, not applied).
    static let tcpMatchFields: Set<String> = ["destinationSubnets", "port", "sourceLabels", "gateways", "sourceNamespace", "sourceSubnet"]
    /// TLSMatchAttributes' fields (`tls[].match[]`).
    static let tlsMatchFields: Set<String> = ["sniHosts", "destinationSubnets", "port", "sourceLabels", "gateways", "sourceNamespace"]

    /// One TCPRoute or TLSRoute (`tls`): its matches (a TLS route needs one, each with
    /// `sniHosts` within the VirtualService's hosts, as Istio validates) and its weighted
    /// destinations (at least one; several must weigh 100 in total).
    mutating func l4Route(_ n: PositionedNode, _ path: String, tls: Bool, hosts: [String]) -> L4RouteRule? {
        guard fields(n, path, ["match", "route"]) else { return nil }
        var r = L4RouteRule()
        var ok = true
        let matches = list(n.child("match"), "\(path).match")
        for (i, m) in matches.enumerated() {
            if let mm = l4Match(m, "\(path).match[\(i)]", tls: tls, hosts: hosts) { r.matches.append(mm) } else { ok = false }
        }
        if tls && matches.isEmpty { err(n.child("match") ?? n, "\(path).match", "Required value: a TLS route needs at least one match (with sniHosts)"); ok = false }
        let routes = list(n.child("route"), "\(path).route")
        if routes.isEmpty { err(n.child("route") ?? n, "\(path).route", "Required value: at least one destination"); return nil }
        var total = 0
        for (i, d) in routes.enumerated() {
            let p = "\(path).route[\(i)]"
            guard fields(d, p, ["destination", "weight"]) else { ok = false; continue }
            guard let dest = d.child("destination") else { err(d, "\(p).destination", "Required value"); ok = false; continue }
            guard let (host, subset, port) = destination(dest, "\(p).destination") else { ok = false; continue }
            if host.contains("*") { err(dest.child("host"), "\(p).destination.host", "a destination host cannot be a wildcard"); ok = false; continue }
            var weight = 0
            if let w = d.child("weight") { weight = int(w, "\(p).weight", range: 0...100) ?? 0 } else if routes.count == 1 { weight = 100 }
            total += weight
            r.destinations.append(RouteDestination(host: host, fqdn: HostName.canonical(host, namespace: namespace), subset: subset, port: port, weight: weight,
                                                   place: place(dest, "\(p).destination")))
        }
        if routes.count > 1 || (routes.count == 1 && r.destinations.first?.weight != 100) {
            if r.destinations.count > 1 && r.destinations.allSatisfy({ $0.weight == 0 }) {
                // Istio: unset weights on several destinations split evenly.
                let each = 100 / r.destinations.count
                for k in r.destinations.indices { r.destinations[k].weight = each + (k < 100 % r.destinations.count ? 1 : 0) }
            } else if total != 100 && !r.destinations.isEmpty {
                err(n.child("route"), "\(path).route", "total destination weight \(total) != 100"); ok = false
            }
        }
        var acc = 0
        for d in r.destinations { acc += d.weight; r.cumulativeWeights.append(acc) }
        r.totalWeight = acc
        return ok ? r : nil
    }

    /// One L4MatchAttributes or TLSMatchAttributes; nil (reported) when a field is bad.
    mutating func l4Match(_ n: PositionedNode, _ path: String, tls: Bool, hosts: [String]) -> L4Match? {
        let before = errors.count
        guard fields(n, path, tls ? Self.tlsMatchFields : Self.tcpMatchFields) else { return nil }
        var m = L4Match()
        m.port = int(n.child("port"), "\(path).port", range: 1...65535)
        let subnets = stringList(n.child("destinationSubnets"), "\(path).destinationSubnets")
        for (i, c) in subnets.enumerated() {
            if let parsed = TCPAuthorization.parseCIDR(c) { m.subnets.append(parsed); m.destinationSubnets.append(c) }
            else { err(n.child("destinationSubnets")?.sequence?[i], "\(path).destinationSubnets[\(i)]", "invalid IP address or CIDR \"\(c)\"") }
        }
        m.sourceLabels = labels(n.child("sourceLabels"), "\(path).sourceLabels")
        m.sourceNamespace = string(n.child("sourceNamespace"), "\(path).sourceNamespace")
        m.gateways = stringList(n.child("gateways"), "\(path).gateways")
        if let s = n.child("sourceSubnet") {
            err(s, "\(path).sourceSubnet", "not supported by moonlet (deprecated by Istio); use an AuthorizationPolicy ipBlocks rule")
        }
        if tls {
            let sni = stringList(n.child("sniHosts"), "\(path).sniHosts")
            if sni.isEmpty { err(n.child("sniHosts") ?? n, "\(path).sniHosts", "Required value: a TLS match needs at least one SNI host") }
            for (i, h) in sni.enumerated() {
                let name = h.lowercased()
                // Istio: each SNI host must be one of the VirtualService's hosts or under one.
                let within = hosts.contains { vh in
                    let v = vh.lowercased()
                    return v == "*" || v == name || (v.hasPrefix("*") && name.hasSuffix(v.dropFirst()))
                        || HostName.canonical(v, namespace: namespace) == name
                }
                if !within { err(n.child("sniHosts")?.sequence?[i], "\(path).sniHosts[\(i)]", "the SNI host \"\(h)\" is not a match or subset of any of the virtual service hosts") }
            }
            m.sniHosts = sni.map { $0.lowercased() }
        }
        return errors.count == before ? m : nil
    }

    mutating func httpRoute(_ n: PositionedNode, _ path: String) -> HTTPRouteRule? {
        guard fields(n, path, Self.httpRouteFields) else { return nil }
        for k in Self.deprecatedRouteFields { if let c = n.child(k) { notApplied(c, "\(path).\(k)", "deprecated by Istio and not applied (WebSocket upgrades pass as any request; use headers), ignored") } }
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
                r.destinations.append(RouteDestination(host: host, fqdn: HostName.canonical(host, namespace: namespace), subset: subset, port: port, weight: weight,
                                                       place: place(dest, "\(p).destination")))
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
                if enumValue(red.child("derivePort"), "\(path).redirect.derivePort", ["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"]) != nil {
                    notApplied(red.child("derivePort")!, "\(path).redirect.derivePort", "not applied by moonlet, ignored")
                }
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
                            if let data = Data(base64Encoded: s) { body = String(decoding: data, as: UTF8.self) }
                            else { err(b.child("bytes"), "\(path).directResponse.body.bytes", "illegal base64 data") }
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
        if let rt = n.child("retries") { r.retries = retries(rt, "\(path).retries") }
        if let f = n.child("fault"), fields(f, "\(path).fault", ["delay", "abort"]) {
            var fault = Fault()
            if let a = f.child("abort"), fields(a, "\(path).fault.abort", ["httpStatus", "grpcStatus", "http2Error", "percentage"]) {
                fault.abortStatus = int(a.child("httpStatus"), "\(path).fault.abort.httpStatus", range: 200...599)
                if fault.abortStatus == nil && a.child("httpStatus") == nil { err(a, "\(path).fault.abort.httpStatus", "Required value (grpcStatus and http2Error are not supported)") }
                fault.abortPercent = percentage(a.child("percentage"), "\(path).fault.abort.percentage") ?? 100
            }
            if let d = f.child("delay"), fields(d, "\(path).fault.delay", ["fixedDelay", "exponentialDelay", "percentage", "percent"]) {
                fault.delayMs = duration(d.child("fixedDelay"), "\(path).fault.delay.fixedDelay")
                if duration(d.child("exponentialDelay"), "\(path).fault.delay.exponentialDelay") != nil {
                    notApplied(d.child("exponentialDelay")!, "\(path).fault.delay.exponentialDelay", "not applied (Istio does not implement it either); use fixedDelay")
                }
                if d.child("fixedDelay") == nil { err(d, "\(path).fault.delay.fixedDelay", "Required value") }
                fault.delayPercent = percentage(d.child("percentage"), "\(path).fault.delay.percentage") ?? Double(int(d.child("percent"), "\(path).fault.delay.percent", range: 0...100) ?? 100)
            }
            r.fault = fault
        }
        var mirrorNodes: [(PositionedNode, String, Double)] = []
        let mirrorPercent = percentage(n.child("mirrorPercentage"), "\(path).mirrorPercentage") ?? Double(int(n.child("mirrorPercent"), "\(path).mirrorPercent", range: 0...100) ?? 100)
        if let m = n.child("mirror") { mirrorNodes.append((m, "\(path).mirror", mirrorPercent)) }
        for (i, m) in list(n.child("mirrors"), "\(path).mirrors").enumerated() where fields(m, "\(path).mirrors[\(i)]", ["destination", "percentage"]) {
            let pct = percentage(m.child("percentage"), "\(path).mirrors[\(i)].percentage") ?? 100
            if let d = m.child("destination") { mirrorNodes.append((d, "\(path).mirrors[\(i)].destination", pct)) } else { err(m, "\(path).mirrors[\(i)].destination", "Required value") }
        }
        for (m, p, pct) in mirrorNodes {
            if let (h, sub, port) = destination(m, p) {
                r.mirrors.append(Mirror(host: h, fqdn: HostName.canonical(h, namespace: namespace), subset: sub, port: port, percent: pct, place: place(m, p)))
            }
        }
        if let h = n.child("headers") { headerOps(h, "\(path).headers", into: &r) }
        if let c = n.child("corsPolicy") { r.cors = cors(c, "\(path).corsPolicy") }
        return r
    }

    mutating func cors(_ n: PositionedNode, _ path: String) -> CorsPolicy? {
        guard fields(n, path, ["allowOrigins", "allowOrigin", "allowMethods", "allowHeaders", "exposeHeaders", "maxAge", "allowCredentials", "unmatchedPreflights"]) else { return nil }
        var c = CorsPolicy()
        for (i, o) in list(n.child("allowOrigins"), "\(path).allowOrigins").enumerated() {
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
        if enumValue(n.child("unmatchedPreflights"), "\(path).unmatchedPreflights", ["UNSPECIFIED", "FORWARD", "IGNORE"]) == "IGNORE" {
            notApplied(n.child("unmatchedPreflights")!, "\(path).unmatchedPreflights", "IGNORE is not applied: a preflight from an origin not allowed is forwarded (FORWARD, Istio's default)")
        }
        return c
    }

    /// What `retries.retryOn` may list besides HTTP status codes, as Istio validates it:
    /// Envoy's retry_on conditions, then its gRPC ones (x-envoy-retry-grpc-on).
    static let retryOnPolicies = [
        "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited", "retriable-4xx",
        "refused-stream", "retriable-status-codes", "retriable-headers", "http3-post-connect-failure",
        "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
    ]
    /// The conditions RetrySpec applies (status codes too); the others are reported as
    /// not applied.
    static let appliedRetryOn: Set<String> = ["5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx", "retriable-status-codes",
                                              "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"]
    /// Status codes that have a name (Go's http.StatusText, which Istio asks).
    static let namedStatusCodes: Set<Int> = Set([100, 101, 102, 103, 226, 421, 422, 423, 424, 425, 426, 428, 429, 431, 451, 510, 511])
        .union(200...208).union([300, 301, 302, 303, 304, 305, 307, 308]).union(400...418).union(500...508)

    /// HTTPRetry with Istio's checks: attempts 0 disables and then takes no other
    /// setting; every retryOn entry must be a known condition or a named status code.
    mutating func retries(_ rt: PositionedNode, _ path: String) -> RetrySpec? {
        guard fields(rt, path, ["attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"]) else { return nil }
        let attempts = int(rt.child("attempts"), "\(path).attempts", range: 0...Int(Int32.max)) ?? 2
        if rt.child("attempts") != nil && attempts == 0, let k = ["perTryTimeout", "retryOn", "retryRemoteLocalities"].first(where: { rt.child($0) != nil }) {
            err(rt.child(k), "\(path).\(k)", "http retry policy configured when attempts are set to 0 (disabled)")
        }
        var retryOn = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
        if let on = rt.child("retryOn"), let v = string(on, "\(path).retryOn"), !v.isEmpty {
            retryOn = v
            for policy in v.split(separator: ",", omittingEmptySubsequences: false).map(String.init) {
                if let code = Int(policy), Self.namedStatusCodes.contains(code) { continue }
                if !Self.retryOnPolicies.contains(policy) {
                    err(on, "\(path).retryOn", "\"\(policy)\" is not a valid retryOn policy; valid: \(Self.retryOnPolicies.joined(separator: ", ")), or an HTTP status code")
                } else if !Self.appliedRetryOn.contains(policy) {
                    notApplied(on, "\(path).retryOn", "\"\(policy)\" is not applied by moonlet, ignored")
                }
            }
        }
        // Moonlet's retry prefers another host (Istio's default retryIgnorePreviousHosts:
        // true) and has no localities.
        if bool(rt.child("retryIgnorePreviousHosts"), "\(path).retryIgnorePreviousHosts") == false {
            notApplied(rt.child("retryIgnorePreviousHosts")!, "\(path).retryIgnorePreviousHosts", "false is not applied: a retry prefers another host, as with Istio's default")
        }
        if bool(rt.child("retryRemoteLocalities"), "\(path).retryRemoteLocalities") == true {
            notApplied(rt.child("retryRemoteLocalities")!, "\(path).retryRemoteLocalities", "not applied: Moonlet has no locality-aware load balancing")
        }
        if duration(rt.child("backoff"), "\(path).backoff") != nil {
            notApplied(rt.child("backoff")!, "\(path).backoff", "not applied by moonlet (a retry waits 25 ms x jitter), ignored")
        }
        return RetrySpec(attempts: attempts, perTryTimeoutMs: duration(rt.child("perTryTimeout"), "\(path).perTryTimeout") ?? 0, retryOn: retryOn)
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

    /// Where a destination's subset (or, without one, the destination) was written.
    func place(_ dest: PositionedNode, _ path: String) -> FieldPlace {
        if let s = dest.child("subset") { return FieldPlace(line: s.line, column: s.column, field: "\(path).subset") }
        return FieldPlace(line: dest.line, column: dest.column, field: path)
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
                    guard case .scalar = e.value.node else { err(e.value, "\(path).\(side).\(op).\(e.key)", "must be a string"); continue }
                    let v = e.value.value.stringValue ?? ""
                    if !HeaderValidation.isToken(e.key) || !HeaderValidation.isValidValue(v) {
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
        m.gateways = stringList(n.child("gateways"), "\(path).gateways")
        for k in ["name", "statPrefix"] { _ = string(n.child(k), "\(path).\(k)") }
        return m
    }

    // MARK: DestinationRule

    mutating func destinationRule(_ spec: PositionedNode, name: String, line: Int) -> DestinationRuleSpec? {
        guard fields(spec, "spec", ["host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"]) else { return nil }
        guard let host = string(spec.child("host"), "spec.host"), !host.isEmpty else { err(spec, "spec.host", "Required value"); return nil }
        var subsets: [Subset] = []
        var names = Set<String>()
        for (i, s) in list(spec.child("subsets"), "spec.subsets").enumerated() {
            let p = "spec.subsets[\(i)]"
            guard fields(s, p, ["name", "labels", "trafficPolicy"]) else { continue }
            guard let n = string(s.child("name"), "\(p).name"), !n.isEmpty else { err(s, "\(p).name", "Required value"); continue }
            if !names.insert(n).inserted { err(s.child("name"), "\(p).name", "Duplicate value: subset \(n)") }
            // A subset's trafficPolicy is a whole TrafficPolicy: checked as the top level is.
            if let tp = s.child("trafficPolicy") { trafficPolicy(tp, "\(p).trafficPolicy") }
            subsets.append(Subset(name: n, labels: labels(s.child("labels"), "\(p).labels"), trafficPolicy: s.child("trafficPolicy")?.value))
        }
        if let tp = spec.child("trafficPolicy") { trafficPolicy(tp, "spec.trafficPolicy") }
        selector(spec.child("workloadSelector"), "spec.workloadSelector")
        var rule = DestinationRuleSpec(name: name, namespace: namespace, host: host, fqdn: HostName.canonical(host, namespace: namespace),
                                       subsets: subsets, trafficPolicy: spec.child("trafficPolicy")?.value, file: file, line: line)
        rule.exportTo = exportTo(spec.child("exportTo"))
        return rule
    }

    /// A TrafficPolicy (top level or a subset's), or with `portLevel` one of its
    /// portLevelSettings: every field is checked; RouteTable applies them.
    mutating func trafficPolicy(_ n: PositionedNode, _ path: String, portLevel: Bool = false) {
        let known: Set<String> = portLevel ? ["port", "loadBalancer", "connectionPool", "outlierDetection", "tls"]
            : ["loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings", "tunnel", "proxyProtocol", "retryBudget"]
        guard fields(n, path, known) else { return }
        if portLevel {
            if let p = n.child("port") {
                if fields(p, "\(path).port", ["number"]) {
                    if p.child("number") == nil { err(p, "\(path).port.number", "Required value") }
                    else { _ = int(p.child("number"), "\(path).port.number", range: 1...65535) }
                }
            } else { err(n, "\(path).port.number", "Required value") }
        }
        if let t = n.child("tunnel"), fields(t, "\(path).tunnel", ["protocol", "targetHost", "targetPort"]) {
            _ = string(t.child("protocol"), "\(path).tunnel.protocol"); _ = string(t.child("targetHost"), "\(path).tunnel.targetHost")
            _ = int(t.child("targetPort"), "\(path).tunnel.targetPort", range: 1...65535)
        }
        if let pp = n.child("proxyProtocol"), fields(pp, "\(path).proxyProtocol", ["version"]) {
            _ = enumValue(pp.child("version"), "\(path).proxyProtocol.version", ["V1", "V2"])
        }
        if let rb = n.child("retryBudget"), fields(rb, "\(path).retryBudget", ["percent", "minRetryConcurrency"]) {
            _ = number(rb.child("percent"), "\(path).retryBudget.percent", range: 0...100)
            _ = int(rb.child("minRetryConcurrency"), "\(path).retryBudget.minRetryConcurrency", range: 0...Int(UInt32.max))
        }
        for k in ["tunnel", "proxyProtocol", "retryBudget"] { if let c = n.child(k) { notApplied(c, "\(path).\(k)", "not applied by moonlet, ignored") } }
        if let lb = n.child("loadBalancer") { loadBalancer(lb, "\(path).loadBalancer") }
        if let cp = n.child("connectionPool") { connectionPool(cp, "\(path).connectionPool") }
        if let od = n.child("outlierDetection"), fields(od, "\(path).outlierDetection", ["consecutiveErrors", "consecutive5xxErrors", "consecutiveGatewayErrors", "consecutiveLocalOriginFailures", "splitExternalLocalOriginErrors", "interval", "baseEjectionTime", "maxEjectionPercent", "minHealthPercent"]) {
            for k in ["consecutive5xxErrors", "consecutiveGatewayErrors", "consecutiveLocalOriginFailures", "consecutiveErrors"] { _ = int(od.child(k), "\(path).outlierDetection.\(k)", range: 0...Int(Int32.max)) }
            for k in ["maxEjectionPercent", "minHealthPercent"] { _ = int(od.child(k), "\(path).outlierDetection.\(k)", range: 0...100) }
            for k in ["interval", "baseEjectionTime"] { _ = duration(od.child(k), "\(path).outlierDetection.\(k)") }
            _ = bool(od.child("splitExternalLocalOriginErrors"), "\(path).outlierDetection.splitExternalLocalOriginErrors")
        }
        if let t = n.child("tls") { clientTLS(t, "\(path).tls") }
        for (i, pl) in list(n.child("portLevelSettings"), "\(path).portLevelSettings").enumerated() {
            trafficPolicy(pl, "\(path).portLevelSettings[\(i)]", portLevel: true)
        }
    }

    /// LoadBalancerSettings: simple or consistentHash; locality and warmup settings
    /// are checked and reported as not applied.
    mutating func loadBalancer(_ lb: PositionedNode, _ path: String) {
        guard fields(lb, path, ["simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"]) else { return }
        for k in ["localityLbSetting", "warmupDurationSecs", "warmup"] {
            if let c = lb.child(k) { notApplied(c, "\(path).\(k)", "not applied by moonlet, ignored") }
        }
        if lb.child("simple") != nil && lb.child("consistentHash") != nil {
            err(lb, path, "only one of simple or consistentHash may be set")
        }
        if let simple = lb.child("simple") {
            let v = string(simple, "\(path).simple") ?? ""
            if LBPolicy(istio: v) == nil { err(simple, "\(path).simple", "unsupported value \"\(v)\" (ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH)") }
        }
        if let ch = lb.child("consistentHash"), fields(ch, "\(path).consistentHash", ["httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName", "ringHash", "maglev", "minimumRingSize"]) {
            let p = "\(path).consistentHash"
            let keys = ["httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"].filter { ch.child($0) != nil }
            if keys.count > 1 { err(ch, p, "only one hash key may be set, got \(keys.joined(separator: ", "))") }
            _ = string(ch.child("httpHeaderName"), "\(p).httpHeaderName"); _ = string(ch.child("httpQueryParameterName"), "\(p).httpQueryParameterName")
            _ = bool(ch.child("useSourceIp"), "\(p).useSourceIp")
            if let c = ch.child("httpCookie"), fields(c, "\(p).httpCookie", ["name", "path", "ttl", "attributes"]) {
                if c.child("name") == nil { err(c, "\(p).httpCookie.name", "Required value") }
                _ = string(c.child("name"), "\(p).httpCookie.name"); _ = string(c.child("path"), "\(p).httpCookie.path")
                _ = duration(c.child("ttl"), "\(p).httpCookie.ttl")
                for (i, a) in list(c.child("attributes"), "\(p).httpCookie.attributes").enumerated() where fields(a, "\(p).httpCookie.attributes[\(i)]", ["name", "value"]) {
                    _ = string(a.child("name"), "\(p).httpCookie.attributes[\(i)].name"); _ = string(a.child("value"), "\(p).httpCookie.attributes[\(i)].value")
                }
            }
            if ch.child("ringHash") != nil && ch.child("maglev") != nil { err(ch, p, "only one of ringHash or maglev may be set") }
            if let r = ch.child("ringHash"), fields(r, "\(p).ringHash", ["minimumRingSize"]) { _ = int(r.child("minimumRingSize"), "\(p).ringHash.minimumRingSize", range: 0...Int(UInt32.max)) }
            if let m = ch.child("maglev"), fields(m, "\(p).maglev", ["tableSize"]) { _ = int(m.child("tableSize"), "\(p).maglev.tableSize", range: 0...Int(UInt32.max)) }
            _ = int(ch.child("minimumRingSize"), "\(p).minimumRingSize", range: 0...Int(UInt32.max))
        }
        if let l = lb.child("localityLbSetting"), fields(l, "\(path).localityLbSetting", ["distribute", "failover", "failoverPriority", "enabled"]) {
            let p = "\(path).localityLbSetting"
            for (i, d) in list(l.child("distribute"), "\(p).distribute").enumerated() where fields(d, "\(p).distribute[\(i)]", ["from", "to"]) {
                _ = string(d.child("from"), "\(p).distribute[\(i)].from")
                if let to = d.child("to"), to.mapping == nil { err(to, "\(p).distribute[\(i)].to", "must be a mapping of locality to weight") }
                for e in d.child("to")?.mapping ?? [] { _ = int(e.value, "\(p).distribute[\(i)].to.\(e.key)", range: 0...100) }
            }
            for (i, f) in list(l.child("failover"), "\(p).failover").enumerated() where fields(f, "\(p).failover[\(i)]", ["from", "to"]) {
                _ = string(f.child("from"), "\(p).failover[\(i)].from"); _ = string(f.child("to"), "\(p).failover[\(i)].to")
            }
            _ = stringList(l.child("failoverPriority"), "\(p).failoverPriority")
            _ = bool(l.child("enabled"), "\(p).enabled")
        }
        _ = duration(lb.child("warmupDurationSecs"), "\(path).warmupDurationSecs")
        if let w = lb.child("warmup") {
            let p = "\(path).warmup"
            if fields(w, p, ["duration", "minimumPercent", "aggression"]) {
                if w.child("duration") == nil { err(w, "\(p).duration", "Required value") } else { _ = duration(w.child("duration"), "\(p).duration") }
                if let mp = w.child("minimumPercent"), !(0...100).contains(numberValue(mp) ?? -1) {
                    err(mp, "\(p).minimumPercent", "Invalid value: must be between 0 and 100")
                }
                if let ag = w.child("aggression"), (numberValue(ag) ?? 0) < 1 { err(ag, "\(p).aggression", "Invalid value: must be at least 1") }
            }
        }
    }

    /// ConnectionPoolSettings (tcp and http): every field has its type checked.
    mutating func connectionPool(_ cp: PositionedNode, _ path: String) {
        guard fields(cp, path, ["tcp", "http"]) else { return }
        let int32 = 0...Int(Int32.max)
        if let t = cp.child("tcp"), fields(t, "\(path).tcp", ["maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration", "idleTimeout"]) {
            _ = int(t.child("maxConnections"), "\(path).tcp.maxConnections", range: int32)
            for k in ["connectTimeout", "maxConnectionDuration", "idleTimeout"] { _ = duration(t.child(k), "\(path).tcp.\(k)") }
            if let ka = t.child("tcpKeepalive"), fields(ka, "\(path).tcp.tcpKeepalive", ["probes", "time", "interval"]) {
                _ = int(ka.child("probes"), "\(path).tcp.tcpKeepalive.probes", range: 0...Int(UInt32.max))
                for k in ["time", "interval"] { _ = duration(ka.child(k), "\(path).tcp.tcpKeepalive.\(k)") }
            }
        }
        if let h = cp.child("http"), fields(h, "\(path).http", ["http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries", "idleTimeout", "h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams", "http2KeepAlive"]) {
            for k in ["http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries", "maxConcurrentStreams"] { _ = int(h.child(k), "\(path).http.\(k)", range: int32) }
            _ = duration(h.child("idleTimeout"), "\(path).http.idleTimeout")
            _ = bool(h.child("useClientProtocol"), "\(path).http.useClientProtocol")
            for k in ["maxConcurrentStreams", "http2KeepAlive"] { if let c = h.child(k) { notApplied(c, "\(path).http.\(k)", "not applied by moonlet, ignored") } }
            if let ka = h.child("http2KeepAlive"), fields(ka, "\(path).http.http2KeepAlive", ["interval", "timeout"]) {
                for k in ["interval", "timeout"] { _ = duration(ka.child(k), "\(path).http.http2KeepAlive.\(k)") }
            }
            if let u = h.child("h2UpgradePolicy") {
                let v = string(u, "\(path).http.h2UpgradePolicy") ?? ""
                if !["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"].contains(v) {
                    err(u, "\(path).http.h2UpgradePolicy", "unsupported value \"\(v)\" (DEFAULT, DO_NOT_UPGRADE, UPGRADE)")
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
        for k in ["network", "locality"] { _ = string(n.child(k), "\(path).\(k)") }
        var ports: [String: Int] = [:]
        if let pn = n.child("ports"), pn.mapping == nil { err(pn, "\(path).ports", "must be a mapping of port name to number") }
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
        for (i, a) in addresses.enumerated() {
            if let problem = Self.ipOrCIDRProblem(a) { err(spec.child("addresses")?.sequence?[i], "spec.addresses[\(i)]", problem) }
        }
        let visibleTo = exportTo(spec.child("exportTo"))
        _ = stringList(spec.child("subjectAltNames"), "spec.subjectAltNames")
        _ = enumValue(spec.child("location"), "spec.location", ["MESH_EXTERNAL", "MESH_INTERNAL"])
        if addresses.contains(where: { $0.contains("/") }) && !["NONE", "STATIC"].contains(resolution) {
            err(spec.child("addresses"), "spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types")
        }
        var ports: [ServicePort] = []
        var numbers = Set<Int>(), portNames = Set<String>()
        for (i, p) in list(spec.child("ports"), "spec.ports").enumerated() {
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
        for (i, e) in list(spec.child("endpoints"), "spec.endpoints").enumerated() {
            if let ep = endpoint(e, "spec.endpoints[\(i)]", requireAddress: true) { endpoints.append(ep) }
        }
        var selector: [String: String]? = nil
        if let ws = spec.child("workloadSelector") {
            if fields(ws, "spec.workloadSelector", ["labels"]) { selector = labels(ws.child("labels"), "spec.workloadSelector.labels") }
            if spec.child("endpoints") != nil { err(ws, "spec", "only one of WorkloadSelector or Endpoints can be set") }
        }
        if resolution == "NONE" && !endpoints.isEmpty { err(spec.child("endpoints"), "spec.endpoints", "NONE mode cannot set endpoints") }
        if resolution == "DNS_ROUND_ROBIN" && endpoints.count > 1 { err(spec.child("endpoints"), "spec.endpoints", "DNS_ROUND_ROBIN mode cannot have multiple endpoints") }
        var entry = ServiceEntrySpec(name: name, namespace: namespace, hosts: hosts, addresses: addresses, ports: ports, resolution: resolution,
                                     endpoints: endpoints, workloadSelector: selector, file: file, line: line)
        entry.exportTo = visibleTo
        return entry
    }

    /// `spec.exportTo`, checked as Istio checks it: each entry `.` (this namespace), `*`
    /// (every namespace), `~` (none, alone) or a namespace name, no duplicates.
    mutating func exportTo(_ n: PositionedNode?) -> [String] {
        let list = stringList(n, "spec.exportTo")
        var seen = Set<String>()
        for (i, e) in list.enumerated() {
            let path = "spec.exportTo[\(i)]"
            if !seen.insert(e).inserted { err(n?.sequence?[i], path, "duplicate entries in exportTo: \(e)") }
            if e == "~" && list.count > 1 { err(n?.sequence?[i], path, "cannot have both ~ and other entries in exportTo") }
            if e != "." && e != "*" && e != "~" && !Self.isDNS1123Label(e) { err(n?.sequence?[i], path, "\(e) is not a valid namespace name, ., * or ~") }
        }
        return list
    }
}

extension TrafficDecoder {
    /// Istio's check of a ServiceEntry address (ValidateIPSubnet): an IP address, or a
    /// CIDR block when it has one '/'. nil when valid, else Istio's message.
    static func ipOrCIDRProblem(_ s: String) -> String? {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false)
        if parts.count == 2 {
            let ip = String(parts[0])
            guard let bits = Int(parts[1]), bits >= 0, isIP(ip), bits <= (ip.contains(":") ? 128 : 32) else { return "\"\(s)\" is not a valid CIDR block" }
            return nil
        }
        return isIP(s) ? nil : "\(s) is not a valid IP"
    }

    static func isIP(_ s: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, s, &v4) == 1 || inet_pton(AF_INET6, s, &v6) == 1
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
        selector(spec.child("selector"), "spec.selector")
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

    /// A WorkloadSelector (`matchLabels`).
    mutating func selector(_ n: PositionedNode?, _ path: String) {
        guard let n, fields(n, path, ["matchLabels"]) else { return }
        _ = labels(n.child("matchLabels"), "\(path).matchLabels")
    }

    /// `targetRef` and `targetRefs` (PolicyTargetReference) of a policy's spec.
    mutating func targetRefs(_ spec: PositionedNode) {
        var refs: [(PositionedNode, String)] = spec.child("targetRef").map { [($0, "spec.targetRef")] } ?? []
        for (i, r) in list(spec.child("targetRefs"), "spec.targetRefs").enumerated() { refs.append((r, "spec.targetRefs[\(i)]")) }
        for (r, p) in refs where fields(r, p, ["group", "kind", "name", "namespace"]) {
            for k in ["group", "kind", "name", "namespace"] { _ = string(r.child(k), "\(p).\(k)") }
        }
    }

    /// `providers: [{name}]` of a Telemetry section.
    mutating func providers(_ n: PositionedNode?, _ path: String) {
        for (pi, p) in list(n, path).enumerated() where fields(p, "\(path)[\(pi)]", ["name"]) {
            if (p.child("name")?.scalarString ?? "").isEmpty { err(p, "\(path)[\(pi)].name", "name in body should be at least 1 chars long") }
        }
    }

    static let workloadModes = ["CLIENT_AND_SERVER", "CLIENT", "SERVER"]
    static let istioMetrics = ["ALL_METRICS", "REQUEST_COUNT", "REQUEST_DURATION", "REQUEST_SIZE", "RESPONSE_SIZE", "TCP_OPENED_CONNECTIONS",
                               "TCP_CLOSED_CONNECTIONS", "TCP_SENT_BYTES", "TCP_RECEIVED_BYTES", "GRPC_REQUEST_MESSAGES", "GRPC_RESPONSE_MESSAGES"]

    /// `match: {mode}` of a Telemetry tracing or accessLogging entry.
    mutating func modeSelector(_ n: PositionedNode?, _ path: String) {
        guard let n, fields(n, path, ["mode"]) else { return }
        _ = enumValue(n.child("mode"), "\(path).mode", Self.workloadModes)
    }

    /// Telemetry: every field of tracing, metrics and accessLogging; provider names,
    /// custom metric names and tag override operations as Istio checks them.
    mutating func telemetry(_ spec: PositionedNode) {
        guard fields(spec, "spec", ["selector", "targetRef", "targetRefs", "tracing", "metrics", "accessLogging"]) else { return }
        selector(spec.child("selector"), "spec.selector")
        targetRefs(spec)
        for (ti, t) in list(spec.child("tracing"), "spec.tracing").enumerated() {
            let path = "spec.tracing[\(ti)]"
            guard fields(t, path, ["match", "providers", "randomSamplingPercentage", "disableSpanReporting", "customTags", "useRequestIdForTraceSampling"]) else { continue }
            modeSelector(t.child("match"), "\(path).match")
            providers(t.child("providers"), "\(path).providers")
            _ = number(t.child("randomSamplingPercentage"), "\(path).randomSamplingPercentage", range: 0...100)
            for k in ["disableSpanReporting", "useRequestIdForTraceSampling"] { _ = bool(t.child(k), "\(path).\(k)") }
            if let ct = t.child("customTags") {
                guard let tags = ct.mapping else { err(ct, "\(path).customTags", "must be a mapping"); continue }
                for e in tags {
                    let tp = "\(path).customTags.\(e.key)"
                    guard fields(e.value, tp, ["literal", "environment", "header"]) else { continue }
                    let kinds = e.value.mapping!.map(\.key)
                    if kinds.count != 1 { err(e.value, tp, "exactly one of literal, environment or header must be set") }
                    if let l = e.value.child("literal"), fields(l, "\(tp).literal", ["value"]) { _ = string(l.child("value"), "\(tp).literal.value") }
                    for k in ["environment", "header"] {
                        guard let v = e.value.child(k), fields(v, "\(tp).\(k)", ["name", "defaultValue"]) else { continue }
                        if (string(v.child("name"), "\(tp).\(k).name") ?? "").isEmpty { err(v.child("name") ?? v, "\(tp).\(k).name", "Required value") }
                        _ = string(v.child("defaultValue"), "\(tp).\(k).defaultValue")
                    }
                }
            }
        }
        for (mi, m) in list(spec.child("metrics"), "spec.metrics").enumerated() {
            guard fields(m, "spec.metrics[\(mi)]", ["providers", "overrides", "reportingInterval"]) else { continue }
            providers(m.child("providers"), "spec.metrics[\(mi)].providers")
            _ = duration(m.child("reportingInterval"), "spec.metrics[\(mi)].reportingInterval")
            for (oi, o) in list(m.child("overrides"), "spec.metrics[\(mi)].overrides").enumerated() {
                let path = "spec.metrics[\(mi)].overrides[\(oi)]"
                guard fields(o, path, ["match", "disabled", "tagOverrides"]) else { continue }
                _ = bool(o.child("disabled"), "\(path).disabled")
                if let ms = o.child("match"), fields(ms, "\(path).match", ["metric", "customMetric", "mode"]) {
                    _ = enumValue(ms.child("metric"), "\(path).match.metric", Self.istioMetrics)
                    _ = enumValue(ms.child("mode"), "\(path).match.mode", Self.workloadModes)
                    if let cm = ms.child("customMetric"), (cm.scalarString ?? "").isEmpty {
                        err(cm, "\(path).match.customMetric", "customMetric in body should be at least 1 chars long")
                    }
                }
                guard let to = o.child("tagOverrides") else { continue }
                guard let tags = to.mapping else { err(to, "\(path).tagOverrides", "must be a mapping"); continue }
                for e in tags where fields(e.value, "\(path).tagOverrides.\(e.key)", ["operation", "value"]) {
                    let op = enumValue(e.value.child("operation"), "\(path).tagOverrides.\(e.key).operation", ["UPSERT", "REMOVE"]) ?? "UPSERT"
                    _ = string(e.value.child("value"), "\(path).tagOverrides.\(e.key).value")
                    let hasValue = e.value.child("value") != nil
                    if op == "UPSERT" && !hasValue { err(e.value, "\(path).tagOverrides.\(e.key)", "value must be set when operation is UPSERT") }
                    if op == "REMOVE" && hasValue { err(e.value, "\(path).tagOverrides.\(e.key)", "value must not be set when operation is REMOVE") }
                }
            }
        }
        for (ai, a) in list(spec.child("accessLogging"), "spec.accessLogging").enumerated() {
            let path = "spec.accessLogging[\(ai)]"
            guard fields(a, path, ["match", "providers", "disabled", "filter"]) else { continue }
            modeSelector(a.child("match"), "\(path).match")
            providers(a.child("providers"), "\(path).providers")
            _ = bool(a.child("disabled"), "\(path).disabled")
            if let f = a.child("filter"), fields(f, "\(path).filter", ["expression"]), let x = string(f.child("expression"), "\(path).filter.expression") {
                // Moonlet evaluates a subset of CEL: anything else is refused here, with its place.
                do { _ = try AccessLogFilter.parse(x) } catch let e as ConfigError { err(f.child("expression"), "\(path).filter.expression", e.message) } catch {}
            }
        }
    }
}
