import MoonletCore
#if canImport(Foundation)
import Foundation
#endif

// AuthorizationPolicy (security.istio.io v1 and v1beta1): validation with Istio's
// rules and messages, and the compilation of the policies that select a workload into
// the tables the builtin `istio-authz` Lua filter evaluates (plugins/istio-authz.lua).

// MARK: - Validation (Galley's checks)

extension TrafficDecoder {
    static let authzSourceFields: Set<String> = [
        "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces", "notNamespaces",
        "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks", "serviceAccounts", "notServiceAccounts",
        "trustDomains", "notTrustDomains",
    ]
    static let authzOperationFields: Set<String> = ["hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"]

    /// AuthorizationPolicy: every field of every rule, the action enum, provider and
    /// action together, non-empty sources and operations, IPs, ports, and the `when`
    /// keys Istio knows (`ValidateAuthorizationPolicy`).
    mutating func authorizationPolicy(_ spec: PositionedNode) {
        guard fields(spec, "spec", ["selector", "targetRef", "targetRefs", "rules", "action", "provider"]) else { return }
        selector(spec.child("selector"), "spec.selector")
        targetRefs(spec)
        if spec.child("selector") != nil && (spec.child("targetRef") != nil || spec.child("targetRefs") != nil) {
            err(spec, "spec", "only one of targetRefs or workloadSelector can be set")
        }
        let action = enumValue(spec.child("action"), "spec.action", ["ALLOW", "DENY", "AUDIT", "CUSTOM"]) ?? "ALLOW"
        if let p = spec.child("provider"), fields(p, "spec.provider", ["name"]) { _ = string(p.child("name"), "spec.provider.name") }
        if action == "CUSTOM" && spec.child("provider") == nil { err(spec, "spec.provider", "must specify provider when using CUSTOM action") }
        if action != "CUSTOM" && spec.child("provider") != nil { err(spec.child("provider"), "spec.provider", "provider must not be set for \(action) action") }
        for (ri, r) in list(spec.child("rules"), "spec.rules").enumerated() {
            let rp = "spec.rules[\(ri)]"
            if r.value == .null { err(r, rp, "`rule` must not be nil, found at rule \(ri)"); continue }
            guard fields(r, rp, ["from", "to", "when"]) else { continue }
            if let f = r.child("from"), f.sequence?.isEmpty == true { err(f, "\(rp).from", "`from` must not be empty, found at rule \(ri)") }
            for (fi, f) in list(r.child("from"), "\(rp).from").enumerated() {
                let fp = "\(rp).from[\(fi)]"
                guard fields(f, fp, ["source"]) else { continue }
                guard let src = f.child("source"), src.value != .null else { err(f, "\(fp).source", "`from.source` must not be nil, found at rule \(ri)"); continue }
                guard fields(src, "\(fp).source", Self.authzSourceFields) else { continue }
                var any = false
                for e in src.mapping! {
                    let vals = stringList(e.value, "\(fp).source.\(e.key)")
                    any = any || !vals.isEmpty || e.value.sequence == nil
                    if vals.contains("") { err(e.value, "\(fp).source.\(e.key)", "empty value not allowed, found in \(e.key)") }
                    if e.key.hasSuffix("pBlocks") || e.key.hasSuffix("IpBlocks") {
                        for v in vals { if let p = Self.ipOrCIDRProblem(v) { err(e.value, "\(fp).source.\(e.key)", p) } }
                    }
                    if action == "CUSTOM" && (e.key == "requestPrincipals" || e.key == "notRequestPrincipals") {
                        err(e.value, "\(fp).source.\(e.key)", "\(e.key) not allowed in CUSTOM action")
                    }
                }
                if !any { err(src, "\(fp).source", "`from.source` must not be empty, found at rule \(ri)") }
                if src.child("serviceAccounts") != nil && (src.child("namespaces") != nil || src.child("principals") != nil) {
                    err(src, "\(fp).source", "Cannot set serviceAccounts with namespaces or principals")
                }
                if src.child("notServiceAccounts") != nil && (src.child("notNamespaces") != nil || src.child("notPrincipals") != nil) {
                    err(src, "\(fp).source", "Cannot set notServiceAccounts with notNamespaces or notPrincipals")
                }
            }
            if let t = r.child("to"), t.sequence?.isEmpty == true { err(t, "\(rp).to", "`to` must not be empty, found at rule \(ri)") }
            for (ti, t) in list(r.child("to"), "\(rp).to").enumerated() {
                let tp = "\(rp).to[\(ti)]"
                guard fields(t, tp, ["operation"]) else { continue }
                guard let op = t.child("operation"), op.value != .null else { err(t, "\(tp).operation", "`to.operation` must not be nil, found at rule \(ri)"); continue }
                guard fields(op, "\(tp).operation", Self.authzOperationFields) else { continue }
                var any = false
                for e in op.mapping! {
                    let vals = stringList(e.value, "\(tp).operation.\(e.key)")
                    any = any || !vals.isEmpty || e.value.sequence == nil
                    if vals.contains("") { err(e.value, "\(tp).operation.\(e.key)", "empty value not allowed, found in \(e.key)") }
                    if e.key == "ports" || e.key == "notPorts" {
                        for v in vals where !v.isEmpty { if Int(v).map({ !(0...65535).contains($0) }) ?? true { err(e.value, "\(tp).operation.\(e.key)", "invalid port \(v)") } }
                    }
                    if action == "CUSTOM" && e.key.lowercased().hasSuffix("paths") {
                        for v in vals where v.contains("{") { err(e.value, "\(tp).operation.\(e.key)", "path templates are not supported for CUSTOM action") }
                    }
                }
                if !any { err(op, "\(tp).operation", "`to.operation` must not be empty, found at rule \(ri)") }
            }
            for (wi, w) in list(r.child("when"), "\(rp).when").enumerated() {
                let wp = "\(rp).when[\(wi)]"
                guard fields(w, wp, ["key", "values", "notValues"]) else { continue }
                let key = string(w.child("key"), "\(wp).key") ?? ""
                if key.isEmpty { err(w.child("key") ?? w, "\(wp).key", "Required value"); continue }
                let values = stringList(w.child("values"), "\(wp).values"), notValues = stringList(w.child("notValues"), "\(wp).notValues")
                if values.isEmpty && notValues.isEmpty { err(w, wp, "at least one of values or notValues must be set for key \(key)") }
                guard AuthorizationCompiler.conditionKind(key) != nil else { err(w.child("key"), "\(wp).key", "unknown attribute: \(key)"); continue }
                for (k, vals) in [("values", values), ("notValues", notValues)] {
                    if ["source.ip", "remote.ip", "destination.ip"].contains(key) {
                        for v in vals { if let p = Self.ipOrCIDRProblem(v) { err(w.child(k), "\(wp).\(k)", p) } }
                    }
                    if key == "destination.port" {
                        for v in vals { if Int(v).map({ !(0...65535).contains($0) }) ?? true { err(w.child(k), "\(wp).\(k)", "invalid port \(v)") } }
                    }
                    if action == "CUSTOM" && key.hasPrefix("request.auth.") { err(w.child("key"), "\(wp).key", "\(key) not allowed in CUSTOM action") }
                }
            }
        }
    }
}

// MARK: - Compilation for one workload

/// The AuthorizationPolicies that select a workload, compiled into the plugin
/// configuration of the builtin `istio-authz` filter (a ConfigValue its `configure`
/// receives): policies by action, rules, and per rule the checks of from/to/when with
/// Istio's value matchers spelled out (`exact`, `prefix`, `suffix`, `present`,
/// `template`, CIDR strings, ports). Trust domain aliases are expanded here, as
/// Istio's trust domain bundle does.
public enum AuthorizationCompiler {
    /// Result of `compile`: the filter's configuration (nil when no policy selects the
    /// workload), and notes to log (targetRef policies, conditions not applied).
    public struct Compiled: Sendable {
        public var config: ConfigValue?
        public var notes: [String]
        /// "ns/name" of the compiled policies, in evaluation order.
        public var policies: [String]
        /// Policies Moonlet cannot enforce as written and fails closed for (a CUSTOM
        /// provider missing from the mesh config, or of a kind not supported): to log as
        /// errors, each naming its file:line.
        public var errors: [String] = []
    }

    /// The attribute a `when` key reads, or nil when Istio does not know the key.
    public static func conditionKind(_ key: String) -> String? {
        switch key {
        case "source.ip": return "source_ip"
        case "remote.ip": return "remote_ip"
        case "source.namespace": return "namespace"
        case "source.principal": return "principal"
        case "source.trustDomain": return "trust_domain"
        case "request.auth.principal": return "request_principal"
        case "request.auth.audiences": return "auth_audiences"
        case "request.auth.presenter": return "auth_presenter"
        case "destination.ip": return "destination_ip"
        case "destination.port": return "destination_port"
        case "connection.sni": return "sni"
        default:
            if key.hasPrefix("request.headers["), key.hasSuffix("]"), key.count > "request.headers[]".count { return "header" }
            if key.hasPrefix("request.auth.claims["), key.hasSuffix("]"), key.count > "request.auth.claims[]".count { return "auth_claims" }
            if key.hasPrefix("experimental.envoy.filters.") { return "unsupported" }
            return nil
        }
    }

    /// Compiles the AuthorizationPolicies of `resources` that select `workload` (root
    /// namespace, the workload's namespace, selector). `trustDomain` and `aliases` form
    /// Istio's trust domain bundle. CUSTOM policies go to the `envoyExtAuthzHttp`
    /// provider of `providers` (the mesh config's extensionProviders) they name: its
    /// settings are compiled into `providers` of the configuration. A provider that is
    /// missing, of another kind, or a second provider for the workload (Istio allows
    /// one) fails closed: `custom_deny_all` holds the reason and every request is denied.
    public static func compile(_ resources: [IstioResource], workload: WorkloadIdentity, trustDomain: String = "cluster.local",
                               aliases: [String] = [], providers: [MeshExtensionProvider] = []) -> Compiled {
        var notes: [String] = []
        var errors: [String] = []
        var byAction: [String: [ConfigValue]] = ["ALLOW": [], "DENY": [], "AUDIT": [], "CUSTOM": []]
        var customProvider: String?
        var providerConf: ConfigValue?
        var denyAll: String?
        var names: [String] = []
        let bundle = [trustDomain] + aliases.filter { $0 != trustDomain }
        for r in resources where r.kind == "AuthorizationPolicy" {
            let ns = r.namespace.isEmpty ? workload.namespace : r.namespace
            let spec = r.spec
            let place = "\(r.file):\(r.line): AuthorizationPolicy \(ns)/\(r.name)"
            if spec["targetRef"] != nil || spec["targetRefs"] != nil {
                notes.append("\(place): targetRef/targetRefs select Gateway API resources (waypoints, gateways); not applied to a sidecar, policy ignored")
                continue
            }
            var labels: [String: String] = [:]
            if case .map(let m)? = spec["selector"]?["matchLabels"] { for (k, v) in m { labels[k] = v.stringValue ?? "" } }
            guard workload.isSelected(namespace: ns, matchLabels: labels) else { continue }
            let action = spec["action"]?.stringValue ?? "ALLOW"
            guard byAction[action] != nil else { continue }
            var dryRun = r.annotations["istio.io/dry-run"]?.lowercased() == "true"
            if action == "CUSTOM" {
                let pname = spec["provider"]?["name"]?.stringValue ?? ""
                if dryRun {
                    notes.append("\(place): istio.io/dry-run is not supported for CUSTOM; the policy is enforced")
                    dryRun = false
                }
                if let other = customProvider, other != pname {
                    errors.append("\(place): a second CUSTOM provider \"\(pname)\" for this workload (\"\(other)\" is already used; Istio allows one): every request is denied (fail closed)")
                    denyAll = denyAll ?? "two CUSTOM providers"
                    names.append("\(ns)/\(r.name)")
                    continue
                }
                guard let prov = providers.first(where: { $0.name == pname }) else {
                    errors.append("\(place): CUSTOM provider \"\(pname)\" is not an extensionProvider of the mesh config: every request is denied (fail closed)")
                    denyAll = denyAll ?? "provider \(pname) not found"
                    names.append("\(ns)/\(r.name)")
                    continue
                }
                guard case .envoyExtAuthzHttp(let a) = prov.kind else {
                    errors.append("\(place): CUSTOM provider \"\(pname)\" is \(prov.kindName), which Moonlet does not support (only envoyExtAuthzHttp): every request is denied (fail closed)")
                    denyAll = denyAll ?? "provider \(pname) not supported"
                    names.append("\(ns)/\(r.name)")
                    continue
                }
                customProvider = pname
                providerConf = extAuthzConfig(name: pname, a, notes: &notes)
            }
            let id = "ns[\(ns)]-policy[\(r.name)]"
            var rules: [ConfigValue] = []
            if case .array(let rs)? = spec["rules"] {
                for (i, rule) in rs.enumerated() {
                    if let c = compileRule(rule, action: action, policyNamespace: ns, bundle: bundle, place: place, index: i, notes: &notes) {
                        rules.append(.map([("id", .string("\(id)-rule[\(i)]")), ("checks", .array(c))]))
                    }
                }
            }
            byAction[action]!.append(.map([("id", .string(id)), ("dry_run", .bool(dryRun)), ("rules", .array(rules))]))
            names.append("\(ns)/\(r.name)\(dryRun ? " (dry-run)" : "")")
        }
        if names.isEmpty { return Compiled(config: nil, notes: notes, policies: []) }
        var entries: [(String, ConfigValue)] = [
            ("deny", .array(byAction["DENY"]!)), ("allow", .array(byAction["ALLOW"]!)), ("audit", .array(byAction["AUDIT"]!)),
        ]
        if !byAction["CUSTOM"]!.isEmpty || denyAll != nil {
            entries.append(("custom", .array(denyAll == nil ? byAction["CUSTOM"]! : [])))
            if denyAll == nil, let p = providerConf { entries.append(("provider", p)) }
            if let d = denyAll { entries.append(("custom_deny_all", .string(d))) }
        }
        return Compiled(config: .map(entries), notes: notes, policies: names, errors: errors)
    }

    /// Every CUSTOM AuthorizationPolicy of `resources` whose provider is not an
    /// `envoyExtAuthzHttp` provider of `providers` (what `moonlet validate --mesh-config`
    /// reports; a sidecar denies every request of the workloads such a policy selects).
    /// `providers` nil (no mesh config): each CUSTOM policy is reported as unchecked.
    public static func customProviderProblems(_ resources: [IstioResource], providers: [MeshExtensionProvider]?) -> [(file: String, line: Int, message: String)] {
        var out: [(String, Int, String)] = []
        for r in resources where r.kind == "AuthorizationPolicy" && r.spec["action"]?.stringValue == "CUSTOM" {
            let pname = r.spec["provider"]?["name"]?.stringValue ?? ""
            let what = "AuthorizationPolicy \(r.namespace.isEmpty ? "" : r.namespace + "/")\(r.name): CUSTOM provider \"\(pname)\""
            guard let providers else {
                out.append((r.file, r.line, "\(what) not checked (no mesh config given: a sidecar whose mesh config lacks it denies every request of the workloads the policy selects)"))
                continue
            }
            guard let p = providers.first(where: { $0.name == pname }) else {
                out.append((r.file, r.line, "\(what) is not an extensionProvider of the mesh config (a sidecar denies every request of the workloads the policy selects)"))
                continue
            }
            if case .envoyExtAuthzHttp = p.kind { continue }
            out.append((r.file, r.line, "\(what) is \(p.kindName), which Moonlet does not support (a sidecar denies every request of the workloads the policy selects)"))
        }
        return out
    }

    /// Largest check timeout (moonlet.http.call's bound; Istio's default is 600 s).
    public static let maxExtAuthzTimeoutMs = 60_000

    /// The settings of an envoyExtAuthzHttp provider as the istio-authz filter reads
    /// them: the target (`http://SERVICE:PORT`, a service of the registry gets its
    /// cluster and mTLS), timeout, path prefix, fail open, status on error, and the
    /// header lists as Istio value matchers (lowercased; `*` prefix/suffix forms).
    static func extAuthzConfig(name: String, _ a: MeshExtensionProvider.ExtAuthzHTTP, notes: inout [String]) -> ConfigValue {
        // Istio's service is "[namespace/]host".
        let host = a.service.split(separator: "/", maxSplits: 1).last.map(String.init) ?? a.service
        var timeout = a.timeoutMs ?? 600_000
        if timeout > maxExtAuthzTimeoutMs {
            if a.timeoutMs != nil { notes.append("extensionProvider \"\(name)\": timeout above \(maxExtAuthzTimeoutMs / 1000)s is cut to \(maxExtAuthzTimeoutMs / 1000)s") }
            timeout = maxExtAuthzTimeoutMs
        }
        timeout = max(1, timeout)
        func list(_ v: [String]) -> ConfigValue { .array(v.map { matcher($0.lowercased()) }) }
        return .map([
            ("name", .string(name)),
            ("target", .string("http://\(host):\(a.port)")),
            ("timeout_ms", .int(timeout)),
            ("path_prefix", .string(a.pathPrefix ?? "")),
            ("fail_open", .bool(a.failOpen)),
            ("status_on_error", .int(a.statusOnError)),
            ("include", list(a.includeRequestHeadersInCheck)),
            ("additional", .map(a.includeAdditionalHeadersInCheck.sorted { $0.key < $1.key }.map { ($0.key.lowercased(), .string($0.value)) })),
            ("to_upstream", list(a.headersToUpstreamOnAllow)),
            ("to_downstream_deny", list(a.headersToDownstreamOnDeny)),
            ("to_downstream_allow", list(a.headersToDownstreamOnAllow)),
        ])
    }

    /// One check: attribute `k`, matchers `m` (any matches), `neg` (none may match).
    static func check(_ k: String, _ m: [ConfigValue], neg: Bool, extra: [(String, ConfigValue)] = []) -> ConfigValue {
        let base: [(String, ConfigValue)] = [("k", .string(k)), ("neg", .bool(neg)), ("m", .array(m))]
        return .map(base + extra)
    }

    /// Istio's string matcher: `*` any non-empty value, `abc*` prefix, `*abc` suffix, else exact.
    static func matcher(_ v: String, presentForStar: Bool = false, template: Bool = false) -> ConfigValue {
        func m(_ t: String, _ s: String) -> ConfigValue { .map([("t", .string(t)), ("s", .string(s))]) }
        if v == "*" { return m(presentForStar ? "present" : "nonempty", "") }
        if template && v.contains("{") { return m("template", v) }
        if v.hasSuffix("*") { return m("prefix", String(v.dropLast())) }
        if v.hasPrefix("*") { return m("suffix", String(v.dropFirst())) }
        return m("exact", v)
    }

    static func strings(_ v: ConfigValue?) -> [String] {
        guard case .array(let a)? = v else { return [] }
        return a.compactMap(\.stringValue)
    }

    /// Istio's `ReplaceTrustDomainAliases`: a principal "TD/ns/N/sa/S" whose TD is in the
    /// bundle (or is cluster.local) stands for the same identity in every trust domain of
    /// the bundle.
    static func expandTrustDomains(_ principals: [String], bundle: [String]) -> [String] {
        var out: [String] = []
        for p in principals {
            let parts = p.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count == 5, parts[0] != "*" else { out.append(p); continue }
            let td = String(parts[0])
            guard bundle.contains(where: { istioMatch($0, td) }) || td == "cluster.local" else { out.append(p); continue }
            for b in bundle {
                let np = istioMatch(b, td) && td.hasPrefix("*") ? p : ([b] + parts.dropFirst().map(String.init)).joined(separator: "/")
                if !out.contains(np) { out.append(np) }
            }
        }
        return out
    }

    /// Istio's `stringMatch` of a value against a pattern with a leading or trailing `*`.
    static func istioMatch(_ value: String, _ pattern: String) -> Bool {
        if pattern == "*" { return true }
        if pattern.hasPrefix("*") { return value.hasSuffix(pattern.dropFirst()) }
        if pattern.hasSuffix("*") { return value.hasPrefix(pattern.dropLast()) }
        return value == pattern
    }

    static func compileRule(_ rule: ConfigValue, action: String, policyNamespace: String, bundle: [String], place: String, index: Int,
                            notes: inout [String]) -> [ConfigValue]? {
        var checks: [ConfigValue] = []
        // from: any of the sources (an "or" check holding one list of checks per source).
        if case .array(let froms)? = rule["from"] {
            var alternatives: [ConfigValue] = []
            for f in froms {
                let src = f["source"] ?? .map([])
                var cs: [ConfigValue] = []
                for (field, neg) in [("principals", false), ("notPrincipals", true)] {
                    let v = expandTrustDomains(strings(src[field]), bundle: bundle)
                    if !v.isEmpty { cs.append(check("principal", v.map { matcher($0) }, neg: neg)) }
                }
                for (field, neg) in [("serviceAccounts", false), ("notServiceAccounts", true)] {
                    let v = strings(src[field]).map { sa -> String in
                        let p = sa.split(separator: "/", maxSplits: 1).map(String.init)
                        return p.count == 2 ? "*/ns/\(p[0])/sa/\(p[1])" : "*/ns/\(policyNamespace)/sa/\(sa)"
                    }
                    if !v.isEmpty { cs.append(check("principal", v.map { ConfigValue.map([("t", .string("suffix")), ("s", .string(String($0.dropFirst())))]) }, neg: neg)) }
                }
                let simple: [(String, String, Bool)] = [
                    ("requestPrincipals", "request_principal", false), ("notRequestPrincipals", "request_principal", true),
                    ("namespaces", "namespace", false), ("notNamespaces", "namespace", true),
                    ("trustDomains", "trust_domain", false), ("notTrustDomains", "trust_domain", true),
                ]
                for (field, k, neg) in simple {
                    let v = strings(src[field])
                    if !v.isEmpty { cs.append(check(k, v.map { matcher($0) }, neg: neg)) }
                }
                for (field, k, neg) in [("ipBlocks", "source_ip", false), ("notIpBlocks", "source_ip", true),
                                        ("remoteIpBlocks", "remote_ip", false), ("notRemoteIpBlocks", "remote_ip", true)] {
                    let v = strings(src[field])
                    if !v.isEmpty { cs.append(check(k, v.map { ConfigValue.string($0) }, neg: neg)) }
                }
                alternatives.append(.array(cs))
            }
            if !alternatives.isEmpty { checks.append(.map([("k", .string("any_of")), ("alts", .array(alternatives))])) }
        }
        // to: any of the operations.
        if case .array(let tos)? = rule["to"] {
            var alternatives: [ConfigValue] = []
            for t in tos {
                let op = t["operation"] ?? .map([])
                var cs: [ConfigValue] = []
                for (field, neg) in [("hosts", false), ("notHosts", true)] {
                    let v = strings(op[field])
                    if !v.isEmpty { cs.append(check("host", v.map { matcher($0.lowercased()) }, neg: neg)) }
                }
                for (field, neg) in [("methods", false), ("notMethods", true)] {
                    let v = strings(op[field])
                    if !v.isEmpty { cs.append(check("method", v.map { matcher($0) }, neg: neg)) }
                }
                for (field, neg) in [("paths", false), ("notPaths", true)] {
                    let v = strings(op[field])
                    if !v.isEmpty { cs.append(check("path", v.map { matcher($0, template: true) }, neg: neg)) }
                }
                for (field, neg) in [("ports", false), ("notPorts", true)] {
                    let v = strings(op[field]).compactMap { Int($0) }
                    if !v.isEmpty { cs.append(check("destination_port", v.map { ConfigValue.int($0) }, neg: neg)) }
                }
                alternatives.append(.array(cs))
            }
            if !alternatives.isEmpty { checks.append(.map([("k", .string("any_of")), ("alts", .array(alternatives))])) }
        }
        // when: every condition.
        if case .array(let whens)? = rule["when"] {
            for w in whens {
                let key = w["key"]?.stringValue ?? ""
                guard let kind = conditionKind(key) else { continue }
                if kind == "unsupported" || kind == "sni" {
                    // Istio's rule for what a filter cannot evaluate: an ALLOW rule that needs it
                    // never matches; a DENY (or AUDIT) rule ignores the condition (denies more).
                    if action == "ALLOW" {
                        notes.append("\(place): rules[\(index)].when \(key): not available to Moonlet; this ALLOW rule never matches")
                        return nil
                    }
                    notes.append("\(place): rules[\(index)].when \(key): not available to Moonlet; the condition is ignored (the \(action) rule applies more widely)")
                    continue
                }
                var extra: [(String, ConfigValue)] = []
                var values = strings(w["values"]), notValues = strings(w["notValues"])
                if kind == "header" {
                    extra.append(("h", .string(String(key.dropFirst("request.headers[".count).dropLast()).lowercased())))
                } else if kind == "auth_claims" {
                    let inner = key.dropFirst("request.auth.claims[".count).dropLast()
                    let path = inner.components(separatedBy: "][")
                    extra.append(("c", .array(path.map { ConfigValue.string($0) })))
                } else if kind == "principal" {
                    values = expandTrustDomains(values, bundle: bundle); notValues = expandTrustDomains(notValues, bundle: bundle)
                }
                func compiled(_ vs: [String]) -> [ConfigValue] {
                    switch kind {
                    case "source_ip", "remote_ip", "destination_ip": return vs.map { ConfigValue.string($0) }
                    case "destination_port": return vs.compactMap { Int($0) }.map { ConfigValue.int($0) }
                    case "header": return vs.map { matcher($0, presentForStar: true) }
                    default: return vs.map { matcher($0) }
                    }
                }
                if !values.isEmpty { checks.append(check(kind, compiled(values), neg: false, extra: extra)) }
                if !notValues.isEmpty { checks.append(check(kind, compiled(notValues), neg: true, extra: extra)) }
            }
        }
        return checks
    }
}
