#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// AuthorizationPolicy for proxied TCP connections (inbound), evaluated natively: Envoy's
/// network RBAC filter as Istio configures it. Built at config load from the same
/// compiled rules the HTTP filter (`istio-authz`) gets (AuthorizationCompiler), so both
/// read one source.
///
/// Istio's TCP rule (pilot's authz model, `forTCP`): a rule that needs an HTTP-only
/// attribute (hosts, methods, paths, request principals, request headers, JWT claims)
/// does not match in an ALLOW policy (the allow scope gets smaller); in a DENY or AUDIT
/// policy the HTTP-only condition is ignored (the deny scope gets wider). TCP attributes:
/// source.principal, source.namespace, trust domain, source.ip / remote.ip,
/// destination.ip, destination.port.
public final class TCPAuthorization: @unchecked Sendable {
    /// What a connection offers the rules.
    public struct Connection {
        /// The mTLS peer's principal ("td/ns/N/sa/S"); empty without mTLS.
        public var principal: String
        public var namespace: String
        public var sourceIP: String
        public var destinationIP: String
        public var destinationPort: Int
        public init(principal: String, namespace: String, sourceIP: String, destinationIP: String, destinationPort: Int) {
            self.principal = principal; self.namespace = namespace; self.sourceIP = sourceIP
            self.destinationIP = destinationIP; self.destinationPort = destinationPort
        }
    }

    /// The outcome: allowed, or denied with the id of the matching DENY rule ("none":
    /// no ALLOW rule matched).
    public enum Decision: Equatable { case allowed, denied(String) }

    enum Matcher {
        case exact(String), prefix(String), suffix(String), nonempty, present
        case cidr([UInt8], Int)
        case port(Int)
        func test(_ v: String?) -> Bool {
            guard let v else { return false }
            switch self {
            case .exact(let s): return v == s
            case .prefix(let s): return v.hasPrefix(s)
            case .suffix(let s): return v.hasSuffix(s)
            case .nonempty: return !v.isEmpty
            case .present: return true
            case .cidr(let net, let bits): return TCPAuthorization.contains(net, bits, v)
            case .port: return false
            }
        }
    }

    indirect enum Check {
        /// Holds when every check of one alternative holds.
        case anyOf([[Check]])
        case attribute(String, neg: Bool, [Matcher])
        /// An HTTP-only attribute in a DENY/AUDIT rule: ignored (holds).
        case ignored
    }

    struct Rule { let id: String; let checks: [Check] }
    let deny: [Rule]
    let allow: [Rule]
    /// Rules of ALLOW policies exist (even if none can match TCP): then a connection
    /// none allows is denied.
    let hasAllow: Bool
    let hasDeny: Bool

    static let tcpKinds: Set<String> = ["principal", "namespace", "trust_domain", "source_ip", "remote_ip", "destination_ip", "destination_port"]

    /// From the `istio-authz` configuration AuthorizationCompiler made (nil: no policy).
    public init?(_ config: ConfigValue?) {
        guard let config else { return nil }
        func policies(_ key: String, allowAction: Bool) -> ([Rule], Bool) {
            guard case .array(let ps)? = config[key] else { return ([], false) }
            var rules: [Rule] = []
            var any = false
            for p in ps {
                if case .bool(true)? = p["dry_run"] { continue }
                any = true
                guard case .array(let rs)? = p["rules"] else { continue }
                for r in rs {
                    guard case .array(let cs)? = r["checks"] else { continue }
                    var out: [Check] = []
                    var usable = true
                    for c in cs {
                        guard let k = Self.compile(c, allowAction: allowAction) else { usable = false; break }
                        out.append(k)
                    }
                    if usable { rules.append(Rule(id: r["id"]?.stringValue ?? "", checks: out)) }
                }
            }
            return (rules, any)
        }
        (deny, hasDeny) = policies("deny", allowAction: false)
        (allow, hasAllow) = policies("allow", allowAction: true)
    }

    /// One compiled check; nil when an ALLOW rule cannot match TCP (HTTP-only attribute).
    static func compile(_ c: ConfigValue, allowAction: Bool) -> Check? {
        let k = c["k"]?.stringValue ?? ""
        if k == "any_of" {
            guard case .array(let alts)? = c["alts"] else { return .anyOf([]) }
            var out: [[Check]] = []
            for alt in alts {
                guard case .array(let cs) = alt else { continue }
                var checks: [Check] = []
                var usable = true
                for x in cs {
                    guard let y = compile(x, allowAction: allowAction) else { usable = false; break }
                    checks.append(y)
                }
                // An ALLOW alternative needing HTTP never holds; the others still may.
                if usable { out.append(checks) }
            }
            if out.isEmpty && allowAction { return nil }
            return .anyOf(out)
        }
        guard tcpKinds.contains(k) else { return allowAction ? nil : .ignored }
        var neg = false
        if case .bool(let b)? = c["neg"] { neg = b }
        var ms: [Matcher] = []
        if case .array(let list)? = c["m"] {
            for m in list {
                switch m {
                case .int(let p): ms.append(.port(p))
                case .string(let s): if let (net, bits) = parseCIDR(s) { ms.append(.cidr(net, bits)) }
                default:
                    let s = m["s"]?.stringValue ?? ""
                    switch m["t"]?.stringValue ?? "" {
                    case "exact": ms.append(.exact(s))
                    case "prefix": ms.append(.prefix(s))
                    case "suffix": ms.append(.suffix(s))
                    case "nonempty": ms.append(.nonempty)
                    case "present": ms.append(.present)
                    default: ms.append(.exact(s))
                    }
                }
            }
        }
        return .attribute(k, neg: neg, ms)
    }

    /// Envoy's order: a DENY rule that matches denies; then, when ALLOW policies apply,
    /// a connection none of their rules matches is denied.
    public func evaluate(_ c: Connection) -> Decision {
        for r in deny where r.checks.allSatisfy({ holds($0, c) }) { return .denied(r.id) }
        if hasAllow && !allow.contains(where: { r in r.checks.allSatisfy { holds($0, c) } }) { return .denied("none") }
        return .allowed
    }

    func holds(_ check: Check, _ c: Connection) -> Bool {
        switch check {
        case .ignored: return true
        case .anyOf(let alts): return alts.contains { alt in alt.allSatisfy { holds($0, c) } }
        case .attribute(let k, let neg, let ms):
            let hit: Bool
            if k == "destination_port" {
                hit = ms.contains { if case .port(let p) = $0 { return p == c.destinationPort }; return false }
            } else {
                let v: String?
                switch k {
                case "principal": v = c.principal.isEmpty ? nil : c.principal
                case "namespace": v = c.namespace.isEmpty ? nil : c.namespace
                case "trust_domain": v = c.principal.split(separator: "/", maxSplits: 1).first.map(String.init)
                case "source_ip", "remote_ip": v = c.sourceIP
                case "destination_ip": v = c.destinationIP
                default: v = nil
                }
                hit = ms.contains { $0.test(v) }
            }
            return neg ? !hit : hit
        }
    }

    /// An IPv4/IPv6 address or CIDR block: its bytes and prefix length.
    static func parseCIDR(_ text: String) -> ([UInt8], Int)? {
        let parts = text.split(separator: "/", maxSplits: 1).map(String.init)
        guard let bytes = addressBytes(parts[0]) else { return nil }
        let bits = parts.count == 2 ? Int(parts[1]) ?? -1 : bytes.count * 8
        guard bits >= 0 && bits <= bytes.count * 8 else { return nil }
        return (bytes, bits)
    }

    static func addressBytes(_ s: String) -> [UInt8]? {
        var a4 = in_addr()
        if inet_pton(AF_INET, s, &a4) == 1 { return withUnsafeBytes(of: &a4) { Array($0) } }
        var a6 = in6_addr()
        if inet_pton(AF_INET6, s, &a6) == 1 {
            let b = withUnsafeBytes(of: &a6) { Array($0) }
            // IPv4-mapped: compared as IPv4.
            if b[0..<10].allSatisfy({ $0 == 0 }) && b[10] == 0xFF && b[11] == 0xFF { return Array(b[12..<16]) }
            return b
        }
        return nil
    }

    static func contains(_ net: [UInt8], _ bits: Int, _ value: String) -> Bool {
        // "ip:port" or "[v6]:port" as well as a bare address.
        var v = value
        if v.hasPrefix("["), let e = v.firstIndex(of: "]") { v = String(v[v.index(after: v.startIndex)..<e]) }
        else if v.filter({ $0 == ":" }).count == 1, let c = v.firstIndex(of: ":") { v = String(v[..<c]) }
        guard let a = addressBytes(v), a.count == net.count else { return false }
        var left = bits, i = 0
        while left > 0 {
            let mask: UInt8 = left >= 8 ? 0xFF : UInt8(0xFF << (8 - left) & 0xFF)
            if a[i] & mask != net[i] & mask { return false }
            left -= 8; i += 1
        }
        return true
    }
}
