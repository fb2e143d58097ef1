/// VirtualService `tcp` and `tls` routes (Istio's TCPRoute and TLSRoute): how an
/// intercepted TCP connection, or a TLS one the app originated (passed through untouched),
/// picks its cluster.
///
/// As Istio does for a sidecar: `sourceLabels`, `sourceNamespace` and `gateways` are
/// about the proxy itself, so they are decided once when the table is built (a match
/// naming other labels, another namespace, or gateways without `mesh` is dropped; a rule
/// left with no match is dropped); `port`, `destinationSubnets` and `sniHosts` are
/// checked per connection against its original destination and its ClientHello's SNI.
/// The first rule that matches wins; a rule without `match` matches every connection;
/// when no rule matches, the connection goes to the service's own cluster (as with no
/// VirtualService).

/// One L4MatchAttributes (`tcp[].match[]`) or TLSMatchAttributes (`tls[].match[]`).
public struct L4Match: Sendable {
    /// The destination port (nil: any).
    public var port: Int?
    /// CIDRs (or addresses) the original destination must be in (empty: any).
    public var destinationSubnets: [String] = []
    /// Parsed `destinationSubnets`: network bytes and prefix length.
    var subnets: [([UInt8], Int)] = []
    /// TLS only: the SNI names (`*.example.com` matches any name under it; `*` any).
    public var sniHosts: [String] = []
    /// The source workload's labels (this proxy's, on a sidecar).
    public var sourceLabels: [String: String] = [:]
    /// The source workload's namespace (this proxy's, on a sidecar).
    public var sourceNamespace: String?
    /// Gateways the match applies to; a sidecar is `mesh` (empty: the VirtualService's).
    public var gateways: [String] = []
    public init() {}

    /// Whether a connection to `ip`:`port` with ClientHello SNI `sni` matches (source
    /// fields were decided at build time).
    @inline(__always)
    func matches(ip: String, port: Int, sni: String?) -> Bool {
        if let p = self.port, p != port { return false }
        if !subnets.isEmpty && !subnets.contains(where: { TCPAuthorization.contains($0.0, $0.1, ip) }) { return false }
        if !sniHosts.isEmpty {
            guard let sni else { return false }
            let name = sni.lowercased()
            if !sniHosts.contains(where: { L4Match.sniMatches($0, name) }) { return false }
        }
        return true
    }

    /// Istio's SNI host match: exact (case-insensitive), `*` anything, `*.suffix` any name
    /// ending in `.suffix`.
    static func sniMatches(_ pattern: String, _ name: String) -> Bool {
        let p = pattern.lowercased()
        if p == "*" { return true }
        if p.hasPrefix("*") { return name.hasSuffix(p.dropFirst()) }
        return p == name
    }
}

/// One `tcp[]` or `tls[]` rule as decoded: its matches and weighted destinations.
public struct L4RouteRule: Sendable {
    public var matches: [L4Match] = []
    public var destinations: [RouteDestination] = []
    /// Running sums of the destinations' weights (the pick is a draw below `totalWeight`).
    public var cumulativeWeights: [Int] = []
    public var totalWeight = 0
    public init() {}
}

/// A `tcp[]` or `tls[]` rule compiled for this proxy: the matches that can apply to it
/// and the destinations resolved to clusters. A class: a connection borrows it.
public final class CompiledL4Route: @unchecked Sendable {
    /// Matches left after the source fields were decided (empty: every connection).
    public let matches: [L4Match]
    /// Each destination's target when it names its port (or its service has one port);
    /// for one without a port, the target of the service's first port.
    public let targets: [RouteTarget]
    /// For a destination without a port: its targets by service port. As Istio does, the
    /// connection's own service port is used (the port the client dialled).
    let byPort: [[Int: RouteTarget]?]
    let cumulativeWeights: [Int]
    let totalWeight: Int

    init(matches: [L4Match], targets: [RouteTarget], byPort: [[Int: RouteTarget]?], cumulativeWeights: [Int], totalWeight: Int) {
        self.matches = matches; self.targets = targets; self.byPort = byPort; self.cumulativeWeights = cumulativeWeights; self.totalWeight = totalWeight
    }

    /// Whether a connection matches one of the rule's matches.
    @inline(__always)
    public func matches(ip: String, port: Int, sni: String?) -> Bool {
        matches.isEmpty || matches.contains { $0.matches(ip: ip, port: port, sni: sni) }
    }

    /// The destination for draw `random` (any 64-bit value), weighted as the rule says,
    /// for a connection to service port `port` (used by a destination without a port).
    public func target(random: UInt64, port: Int) -> RouteTarget {
        var i = targets.count - 1
        if targets.count == 1 || totalWeight <= 0 { i = 0 } else {
            let x = Int(random % UInt64(totalWeight))
            for (k, w) in cumulativeWeights.enumerated() where x < w { i = k; break }
        }
        if let m = byPort[i], let t = m[port] { return t }
        return targets[i]
    }
}

extension L4Match {
    /// Whether the source fields let this match apply to a sidecar with these labels in
    /// this namespace (`vsGateways`: the VirtualService's `gateways`).
    func appliesToSidecar(labels: [String: String], namespace: String, vsGateways: [String]) -> Bool {
        let gws = gateways.isEmpty ? vsGateways : gateways
        if !gws.isEmpty && !gws.contains("mesh") { return false }
        if let ns = sourceNamespace, ns != namespace { return false }
        return sourceLabels.allSatisfy { labels[$0.key] == $0.value }
    }
}

extension RouteTable {
    /// The HTTP routes a VirtualService gives its hosts on a sidecar: nil (the default
    /// route) when it has only `tcp`/`tls` rules, as Istio builds HTTP routes from `http`
    /// alone. As Istio builds a sidecar's routes, a match whose `gateways` (its own, else
    /// none: the VirtualService's, which `appliesToSidecar` checked) do not include `mesh`
    /// is dropped, and a rule all of whose matches were dropped goes with them (it does
    /// not become a catch-all).
    static func httpRoutes(_ v: VirtualServiceSpec) -> [HTTPRouteRule]? {
        if v.http.isEmpty && (!v.tcp.isEmpty || !v.tls.isEmpty) { return nil }
        if !v.http.contains(where: { r in r.matches.contains { !$0.gateways.isEmpty && !$0.gateways.contains("mesh") } }) { return v.http }
        return v.http.compactMap { r in
            var r = r
            let kept = r.matches.filter { $0.gateways.isEmpty || $0.gateways.contains("mesh") }
            if !r.matches.isEmpty && kept.isEmpty { return nil }
            r.matches = kept
            return r
        }
    }

    /// Whether a VirtualService applies to sidecars: no `gateways` (Istio's default,
    /// `mesh`), or a list that includes `mesh`. One bound only to gateways (Istio's
    /// ingress examples: `gateways: [bookinfo-gateway]`, often with `hosts: ["*"]`) does
    /// not route a sidecar's traffic.
    static func appliesToSidecars(_ v: VirtualServiceSpec) -> Bool {
        v.gateways.isEmpty || v.gateways.contains("mesh")
    }

    /// The `tcp` and `tls` rules of virtual host `vh` compiled for this proxy (called by
    /// `compile`): source fields decided, destinations resolved to clusters. A
    /// VirtualService bound only to gateways (no `mesh`) gives a sidecar no rule.
    func compileL4(_ vh: VirtualHost) {
        func build(_ rules: [L4RouteRule]) -> [CompiledL4Route] {
            if !vh.l4Gateways.isEmpty && !vh.l4Gateways.contains("mesh") { return [] }
            var out: [CompiledL4Route] = []
            for r in rules where !r.destinations.isEmpty {
                let ms = r.matches.filter { $0.appliesToSidecar(labels: localLabels, namespace: localNamespace, vsGateways: vh.l4Gateways) }
                if !r.matches.isEmpty && ms.isEmpty { continue }
                let targets = r.destinations.map { RouteTarget(services[$0.fqdn], fqdn: $0.fqdn, subset: $0.subset, port: $0.port) }
                let byPort: [[Int: RouteTarget]?] = r.destinations.map { d in
                    guard d.port == nil, let svc = services[d.fqdn], svc.ports.count > 1 else { return nil }
                    var m: [Int: RouteTarget] = [:]
                    for p in svc.ports { m[p.number] = RouteTarget(svc, fqdn: d.fqdn, subset: d.subset, port: p.number) }
                    return m
                }
                out.append(CompiledL4Route(matches: ms, targets: targets, byPort: byPort, cumulativeWeights: r.cumulativeWeights, totalWeight: r.totalWeight))
            }
            return out
        }
        vh.tcpCompiled = build(vh.tcpRules)
        vh.tlsCompiled = build(vh.tlsRules)
    }

    /// Cross-resource checks of a VirtualService's tcp and tls destinations (as for http):
    /// a subset must be defined by the host's DestinationRule; a host without a
    /// ServiceEntry is a warning (connections routed there are refused).
    static func checkL4Destinations(_ v: VirtualServiceSpec, rules: [String: DestinationRuleSpec], services: [String: ServiceInfo],
                                    errors: inout [ConfigError], warnings: inout [String]) {
        var noted = Set<String>()
        for d in (v.tcp + v.tls).flatMap(\.destinations) {
            let place = d.place
            if !d.subset.isEmpty {
                guard let rule = rules[d.fqdn] else {
                    errors.append(ConfigError(file: v.file, line: place.line, column: place.column, resource: "VirtualService \(v.namespace)/\(v.name)",
                                              field: place.field, message: "subset \"\(d.subset)\" is not defined: no DestinationRule for host \(d.fqdn)"))
                    continue
                }
                if !rule.subsets.contains(where: { $0.name == d.subset }) {
                    errors.append(ConfigError(file: v.file, line: place.line, column: place.column, resource: "VirtualService \(v.namespace)/\(v.name)",
                                              field: place.field, message: "subset \"\(d.subset)\" is not defined by DestinationRule \(rule.namespace)/\(rule.name) for host \(d.fqdn)"))
                    continue
                }
            }
            if services[d.fqdn] == nil && !d.fqdn.contains("*") && noted.insert(d.fqdn).inserted {
                warnings.append("\(v.file):\(place.line): VirtualService \(v.namespace)/\(v.name): \(place.field): no ServiceEntry for host \(d.fqdn): moonlet has no endpoints for it, connections routed there are closed")
            }
        }
    }
}

extension VirtualHost {
    /// The L4 route an outbound connection to `ip`:`port` takes (`sni`: its ClientHello's
    /// server name when it is TLS): the first `tls` rule whose match fits (TLS only), else
    /// the first `tcp` rule; nil when none fits (the service's own cluster then).
    @inline(__always)
    public func l4Route(ip: String, port: Int, sni: String?) -> CompiledL4Route? {
        if sni != nil { for r in tlsCompiled where r.matches(ip: ip, port: port, sni: sni) { return r } }
        for r in tcpCompiled where r.matches(ip: ip, port: port, sni: nil) { return r }
        return nil
    }

    /// Whether any `tcp` or `tls` rule applies to this proxy.
    public var hasL4Routes: Bool { !tcpCompiled.isEmpty || !tlsCompiled.isEmpty }
}
