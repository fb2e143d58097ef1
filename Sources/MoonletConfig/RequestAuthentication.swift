import MoonletCore
#if canImport(Foundation)
import Foundation
#endif

/// One `jwtRules` entry of a RequestAuthentication (security.istio.io v1/v1beta1).
public struct JWTRuleSpec: Sendable, Equatable {
    /// Where a token is looked for: a header (with a value prefix such as "Bearer "),
    /// a query parameter or a cookie.
    public enum Location: Sendable, Equatable {
        case header(name: String, prefix: String)
        case param(String)
        case cookie(String)
    }
    public var issuer: String
    public var audiences: [String] = []
    /// Inline JWKS JSON (`jwks`); takes precedence over `jwksUri`, as in Istio.
    public var jwks: String?
    public var jwksUri: String?
    /// The rule's locations, or Istio's defaults (`Authorization: Bearer`, then the
    /// `access_token` query parameter) when it names none.
    public var locations: [Location] = []
    public var forwardOriginalToken = false
    public var outputPayloadToHeader: String?
    /// (header, claim) pairs; the claim may be a dotted path into nested objects.
    public var outputClaimToHeaders: [(header: String, claim: String)] = []
    /// JWKS fetch timeout in milliseconds (Istio's default 5 s).
    public var timeoutMs = 5000
    public var spaceDelimitedClaims: [String] = []
    /// `presence: REQUIRED`: a request with no token at all is refused ("Jwt is missing").
    public var required = false

    public init(issuer: String) { self.issuer = issuer }

    public static func == (a: JWTRuleSpec, b: JWTRuleSpec) -> Bool {
        a.issuer == b.issuer && a.audiences == b.audiences && a.jwks == b.jwks && a.jwksUri == b.jwksUri && a.locations == b.locations
            && a.forwardOriginalToken == b.forwardOriginalToken && a.outputPayloadToHeader == b.outputPayloadToHeader
            && a.outputClaimToHeaders.map { "\($0.header)=\($0.claim)" } == b.outputClaimToHeaders.map { "\($0.header)=\($0.claim)" }
            && a.timeoutMs == b.timeoutMs && a.spaceDelimitedClaims == b.spaceDelimitedClaims && a.required == b.required
    }

    /// Istio's default token locations.
    public static let defaultLocations: [Location] = [.header(name: "authorization", prefix: "Bearer "), .param("access_token")]
}

/// A RequestAuthentication as far as Moonlet applies it.
public struct RequestAuthenticationSpec: Sendable {
    public var name: String
    /// metadata.namespace ("" counts as the workload's own).
    public var namespace: String
    /// spec.selector.matchLabels (empty: every workload of the namespace).
    public var selector: [String: String]
    /// Set when the policy uses targetRef(s): it selects a gateway or waypoint, not a sidecar.
    public var hasTargetRef: Bool
    public var rules: [JWTRuleSpec]
    public var file: String
    public var line: Int

    /// Istio's scope: the root namespace applies mesh-wide, otherwise the policy's own
    /// namespace; a selector narrows it to workloads with those labels. A policy with a
    /// targetRef does not apply to a sidecar.
    public func selects(_ w: WorkloadIdentity) -> Bool {
        !hasTargetRef && w.isSelected(namespace: namespace, matchLabels: selector)
    }

    /// The RequestAuthentications of `resources` that apply to `workload`, in load order
    /// (Istio merges the jwtRules of every policy that applies).
    public static func applicable(_ resources: [IstioResource], to workload: WorkloadIdentity) -> [RequestAuthenticationSpec] {
        resources.filter { $0.kind == "RequestAuthentication" }.map { decode($0) }.filter { $0.selects(workload) }
    }

    /// Builds the typed policy from a resource the loader validated.
    public static func decode(_ r: IstioResource) -> RequestAuthenticationSpec {
        let spec = r.spec
        var selector: [String: String] = [:]
        if case .map(let m)? = spec["selector"]?["matchLabels"] { for (k, v) in m { selector[k] = v.stringValue ?? "" } }
        var rules: [JWTRuleSpec] = []
        if case .array(let list)? = spec["jwtRules"] {
            for item in list {
                var rule = JWTRuleSpec(issuer: item["issuer"]?.stringValue ?? "")
                func strings(_ k: String) -> [String] { if case .array(let l)? = item[k] { return l.compactMap(\.stringValue) }; return [] }
                rule.audiences = strings("audiences")
                rule.jwks = item["jwks"]?.stringValue
                rule.jwksUri = item["jwksUri"]?.stringValue
                if case .array(let hs)? = item["fromHeaders"] {
                    for h in hs { rule.locations.append(.header(name: (h["name"]?.stringValue ?? "").lowercased(), prefix: h["prefix"]?.stringValue ?? "")) }
                }
                rule.locations += strings("fromParams").map { .param($0) }
                rule.locations += strings("fromCookies").map { .cookie($0) }
                if rule.locations.isEmpty { rule.locations = JWTRuleSpec.defaultLocations }
                if case .bool(let b)? = item["forwardOriginalToken"] { rule.forwardOriginalToken = b }
                rule.outputPayloadToHeader = item["outputPayloadToHeader"]?.stringValue.map { $0.lowercased() }
                if case .array(let cs)? = item["outputClaimToHeaders"] {
                    for c in cs { rule.outputClaimToHeaders.append(((c["header"]?.stringValue ?? "").lowercased(), c["claim"]?.stringValue ?? "")) }
                }
                if let t = item["timeout"]?.stringValue, let ms = TrafficDecoder.parseDuration(t) { rule.timeoutMs = ms }
                rule.spaceDelimitedClaims = strings("spaceDelimitedClaims")
                rule.required = item["presence"]?.stringValue == "REQUIRED"
                rules.append(rule)
            }
        }
        return RequestAuthenticationSpec(name: r.name, namespace: r.namespace, selector: selector,
                                         hasTargetRef: spec["targetRef"] != nil || spec["targetRefs"] != nil,
                                         rules: rules, file: r.file, line: r.line)
    }
}

// MARK: - Validation (Istio's CRD and webhook rules)

extension TrafficDecoder {
    static let jwtRuleFields: Set<String> = [
        "issuer", "audiences", "jwksUri", "jwks", "fromHeaders", "fromParams", "fromCookies", "outputPayloadToHeader",
        "forwardOriginalToken", "outputClaimToHeaders", "timeout", "spaceDelimitedClaims", "presence",
    ]
    static let targetGroupPattern = "^$|^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?(\\.[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*$"
    static let targetKindPattern = "^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
    static let claimHeaderPattern = "^[-_A-Za-z0-9]+$"

    /// A string that must not be empty (Kubernetes' minLength: 1 message).
    mutating func nonEmpty(_ n: PositionedNode?, _ path: String) -> String? {
        guard let n, let s = string(n, path) else { return nil }
        if s.isEmpty { err(n, path, "\(path) in body should be at least 1 chars long"); return nil }
        return s
    }

    /// A list of non-empty strings.
    mutating func nonEmptyList(_ n: PositionedNode?, _ path: String) {
        for (i, item) in list(n, path).enumerated() { _ = nonEmpty(item, "\(path)[\(i)]") }
    }

    /// A mapping item of a list (null or a scalar: "must be of type object").
    mutating func objectItem(_ n: PositionedNode, _ path: String, _ known: Set<String>) -> Bool {
        guard n.mapping != nil else { err(n, path, "\(path) in body must be of type object"); return false }
        return fields(n, path, known)
    }

    static func matches(_ s: String, _ pattern: String) -> Bool {
        s.range(of: pattern, options: .regularExpression) != nil
    }

    /// targetRef / targetRefs of a RequestAuthentication: one of targetRef(s) or selector,
    /// required name, group and kind patterns, no cross-namespace reference.
    mutating func policyTargetRefs(_ spec: PositionedNode) {
        let single = spec.child("targetRef"), multi = spec.child("targetRefs")
        if (single != nil && multi != nil) || (spec.child("selector") != nil && (single != nil || multi != nil)) {
            err(spec, "spec", "only one of targetRefs or selector can be set")
        }
        var refs: [(PositionedNode, String)] = single.map { [($0, "spec.targetRef")] } ?? []
        for (i, r) in list(multi, "spec.targetRefs").enumerated() { refs.append((r, "spec.targetRefs[\(i)]")) }
        for (r, p) in refs where objectItem(r, p, ["group", "kind", "name", "namespace"]) {
            let group = string(r.child("group"), "\(p).group") ?? ""
            if !Self.matches(group, Self.targetGroupPattern) { err(r.child("group"), "\(p).group", "\(p).group in body should match '\(Self.targetGroupPattern)'") }
            if let kn = r.child("kind"), let kind = string(kn, "\(p).kind") {
                if !Self.matches(kind, Self.targetKindPattern) { err(kn, "\(p).kind", "\(p).kind in body should match '\(Self.targetKindPattern)'") }
            } else { err(r, "\(p).kind", "\(p).kind: Required value") }
            if (string(r.child("name"), "\(p).name") ?? "").isEmpty { err(r.child("name") ?? r, "\(p).name", "\(p).name: Required value") }
            if let nsn = r.child("namespace"), let ns = string(nsn, "\(p).namespace"), !ns.isEmpty, ns != namespace {
                err(nsn, "\(p).namespace", "cross namespace referencing is not currently supported")
            }
        }
    }

    /// RequestAuthentication: every field of every jwtRule as Istio validates it.
    mutating func requestAuthentication(_ spec: PositionedNode) {
        guard fields(spec, "spec", ["selector", "targetRef", "targetRefs", "jwtRules"]) else { return }
        selector(spec.child("selector"), "spec.selector")
        policyTargetRefs(spec)
        if spec.child("targetRef") != nil || spec.child("targetRefs") != nil {
            notApplied(spec, spec.child("targetRef") != nil ? "spec.targetRef" : "spec.targetRefs", "selects a gateway or waypoint: a sidecar does not apply this policy")
        }
        for (ri, r) in list(spec.child("jwtRules"), "spec.jwtRules").enumerated() {
            let p = "spec.jwtRules[\(ri)]"
            guard objectItem(r, p, Self.jwtRuleFields) else { continue }
            if (string(r.child("issuer"), "\(p).issuer") ?? "").isEmpty { err(r.child("issuer") ?? r, "\(p).issuer", "issuer must be set") }
            nonEmptyList(r.child("audiences"), "\(p).audiences")
            if let u = r.child("jwksUri"), let s = string(u, "\(p).jwksUri") {
                let lower = s.lowercased()
                if !(lower.hasPrefix("http://") || lower.hasPrefix("https://")) {
                    err(u, "\(p).jwksUri", "url must have scheme http:// or https://")
                } else if URL(string: s)?.host == nil {
                    err(u, "\(p).jwksUri", "url must have a host")
                }
            }
            if let j = r.child("jwks"), let s = string(j, "\(p).jwks") {
                if let doc = JSONValue.parse(Array(s.utf8), limits: .init(maxBytes: 1 << 20, maxDepth: 16)) {
                    if case .array? = doc["keys"] {} else { err(j, "\(p).jwks", "Jwks does not have a [keys] array") }
                } else { err(j, "\(p).jwks", "Jwks is an invalid JSON") }
            }
            for (hi, h) in list(r.child("fromHeaders"), "\(p).fromHeaders").enumerated() {
                let hp = "\(p).fromHeaders[\(hi)]"
                guard objectItem(h, hp, ["name", "prefix"]) else { continue }
                if let n = h.child("name") {
                    if let s = nonEmpty(n, "\(hp).name"), !HeaderValidation.isToken(s) { err(n, "\(hp).name", "\(hp).name: not a valid header name") }
                } else { err(h, "\(hp).name", "\(hp).name: Required value") }
                _ = string(h.child("prefix"), "\(hp).prefix")
            }
            nonEmptyList(r.child("fromParams"), "\(p).fromParams")
            nonEmptyList(r.child("fromCookies"), "\(p).fromCookies")
            if let o = r.child("outputPayloadToHeader"), let s = string(o, "\(p).outputPayloadToHeader"), !s.isEmpty, !HeaderValidation.isToken(s) {
                err(o, "\(p).outputPayloadToHeader", "not a valid header name")
            }
            _ = bool(r.child("forwardOriginalToken"), "\(p).forwardOriginalToken")
            for (ci, c) in list(r.child("outputClaimToHeaders"), "\(p).outputClaimToHeaders").enumerated() {
                let cp = "\(p).outputClaimToHeaders[\(ci)]"
                guard objectItem(c, cp, ["header", "claim"]) else { continue }
                if c.child("claim") == nil { err(c, "\(cp).claim", "\(cp).claim: Required value") } else { _ = nonEmpty(c.child("claim"), "\(cp).claim") }
                if c.child("header") == nil { err(c, "\(cp).header", "\(cp).header: Required value") }
                else if let h = nonEmpty(c.child("header"), "\(cp).header"), !Self.matches(h, Self.claimHeaderPattern) {
                    err(c.child("header"), "\(cp).header", "\(cp).header in body should match '\(Self.claimHeaderPattern)'")
                }
            }
            if let t = r.child("timeout"), let s = string(t, "\(p).timeout") {
                if let ms = Self.parseDuration(s), ms >= 1, s != "1ms" {} else { err(t, "\(p).timeout", "must be a valid duration greater than 1ms") }
            }
            nonEmptyList(r.child("spaceDelimitedClaims"), "\(p).spaceDelimitedClaims")
            _ = enumValue(r.child("presence"), "\(p).presence", ["PRESENCE_UNSPECIFIED", "OPTIONAL", "REQUIRED"])
        }
    }
}
