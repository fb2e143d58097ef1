import MoonletCore
import MoonletRegex
#if canImport(Foundation)
import Foundation
#endif

/// A service of the mesh (from ServiceEntry + WorkloadEntry), with its endpoints and
/// the subsets its DestinationRule defines, all resolved at load.
public final class ServiceInfo: @unchecked Sendable {
    public let fqdn: String
    public let namespace: String
    public let ports: [ServicePort]
    public let endpoints: [Endpoint]
    /// The ServiceEntry's `addresses` (virtual IPs or CIDR blocks).
    public internal(set) var addresses: [String] = []
    /// Subset name → endpoints whose labels match the subset's labels.
    public internal(set) var subsets: [String: [Endpoint]] = [:]
    public internal(set) var destinationRule: DestinationRuleSpec?
    /// "subset|port" → cluster ("" subset = every endpoint), built once the
    /// DestinationRule is known.
    public internal(set) var clusters: [String: ClusterInfo] = [:]

    init(fqdn: String, namespace: String, ports: [ServicePort], endpoints: [Endpoint]) {
        self.fqdn = fqdn; self.namespace = namespace; self.ports = ports; self.endpoints = endpoints
    }

    /// The service port a destination means: the one named, or the only/first one.
    public func port(_ number: Int?) -> ServicePort? {
        if let number { return ports.first { $0.number == number } ?? ServicePort(number: number, name: "", protocolName: "", targetPort: nil) }
        return ports.first
    }

    /// The port an endpoint listens on for a service port (WorkloadEntry ports by
    /// name, then targetPort, then the service port number).
    public func endpointPort(_ e: Endpoint, for p: ServicePort) -> Int {
        if !p.name.isEmpty, let v = e.ports[p.name] { return v }
        return p.targetPort ?? p.number
    }
}

/// One service subset on one service port: what the balancer picks endpoints from.
public final class ClusterInfo: UpstreamCluster, @unchecked Sendable {
    public let id: Int
    /// Istio's cluster name: outbound|PORT|SUBSET|FQDN.
    public let name: String
    public let endpoints: [Endpoint]
    /// The DestinationRule settings this cluster applies (subset over top level).
    public let settings: ClusterPolicy
    let ring: HashRing?
    let ports: [Int]
    /// Per endpoint: "address:port", the key of its connection pool.
    let poolKeys: [String]
    /// Per endpoint: how its connections are secured (nil: plaintext).
    let endpointTLS: [UpstreamTLS?]
    public let upstreamProtocol: UpstreamProtocol
    init(id: Int, name: String, policy: ClusterPolicy, endpoints: [Endpoint], ports: [Int], namespace: String = "default", sni: String? = nil,
         servicePort: ServicePort? = nil) {
        self.id = id; self.name = name; self.settings = policy
        upstreamProtocol = Self.upstreamProtocol(policy, port: servicePort)
        poolKeys = zip(endpoints, ports).map { "\($0.address):\($1)" }
        self.ring = policy.hash == nil ? nil : HashRing(keys: poolKeys, minimumRingSize: policy.ringSize)
        self.endpoints = endpoints; self.ports = ports
        endpointTLS = Self.tlsPerEndpoint(policy.tls, endpoints: endpoints, namespace: namespace, sni: sni)
    }

    /// Istio's protocol choice toward the peer sidecar (see UpstreamProtocol): the
    /// port's declared protocol (its `protocol` field, else its name's prefix before
    /// "-"), then the DestinationRule's connectionPool.http settings.
    static func upstreamProtocol(_ p: ClusterPolicy, port: ServicePort?) -> UpstreamProtocol {
        let declared = port.map(PortProtocol.init) ?? .sniff
        if declared.isHTTP2 { return .http2 }
        if p.useClientProtocol { return .likeDownstream }
        if p.h2UpgradePolicy == "UPGRADE" { return .http2 }
        if declared == .http || declared == .grpcWeb || p.h2UpgradePolicy == "DO_NOT_UPGRADE" { return .http1 }
        return .likeDownstream
    }

    /// DestinationRule tls when set; otherwise Istio's auto mTLS: an endpoint labelled
    /// security.istio.io/tlsMode=istio (set by sidecar injection) is reached with
    /// ISTIO_MUTUAL and, when it names a service account, its SPIFFE id is checked; any
    /// other endpoint, with or without a service account, in plaintext.
    static func tlsPerEndpoint(_ t: ClientTLSSettings?, endpoints: [Endpoint], namespace: String, sni: String?) -> [UpstreamTLS?] {
        func spiffe(_ e: Endpoint) -> [String] { e.serviceAccount.isEmpty ? [] : [MeshIdentity.spiffe(namespace: namespace, serviceAccount: e.serviceAccount)] }
        if let t {
            switch t.mode {
            case .disable: return endpoints.map { _ in nil }
            case .istioMutual:
                // Without subjectAltNames: any of the service accounts behind the cluster.
                let derived = t.subjectAltNames.isEmpty
                let sans = derived ? Array(Set(endpoints.flatMap(spiffe))).sorted() : t.subjectAltNames
                let one = UpstreamTLS(mode: .istioMutual, subjectAltNames: sans, fromServiceAccounts: derived, sni: t.sni ?? sni)
                return endpoints.map { _ in one }
            case .simple, .mutual:
                let one = UpstreamTLS(mode: t.mode, clientCertificate: t.clientCertificate, privateKey: t.privateKey, caCertificates: t.caCertificates,
                                      subjectAltNames: t.subjectAltNames, sni: t.sni, verifyHostname: !t.insecureSkipVerify)
                return endpoints.map { _ in one }
            }
        }
        var byAccount: [String: UpstreamTLS] = [:]
        return endpoints.map { e in
            let label = e.labels["security.istio.io/tlsMode"]
            guard label == "istio" else { return nil }
            if let u = byAccount[e.serviceAccount] { return u }
            let u = UpstreamTLS(mode: .istioMutual, automatic: true, subjectAltNames: spiffe(e), fromServiceAccounts: true, sni: sni)
            byAccount[e.serviceAccount] = u
            return u
        }
    }
    public func tls(_ i: Int) -> UpstreamTLS? { endpointTLS[i] }
    /// Every distinct TLS setting of the cluster (the proxy builds contexts for them).
    public var tlsSettings: [UpstreamTLS] {
        var seen = Set<ObjectIdentifier>()
        return endpointTLS.compactMap { $0 }.filter { seen.insert(ObjectIdentifier($0)).inserted }
    }
    public var policy: LBPolicy { settings.lb }
    public var maxRequestsPerConnection: Int { settings.maxRequestsPerConnection }
    public var outlierPolicy: OutlierPolicy? { settings.outlier }
    public var maxConnections: Int { settings.maxConnections }
    public var maxPendingRequests: Int { settings.maxPendingRequests }
    public var connectTimeoutMs: Int { settings.connectTimeoutMs }
    public var maxRetries: Int { settings.maxRetries }
    public var maxRequests: Int { settings.maxRequests }
    public var idleTimeoutMs: Int { settings.idleTimeoutMs }
    public var maxConnectionDurationMs: Int { settings.maxConnectionDurationMs }
    public var tcpKeepalive: (probes: Int, timeSeconds: Int, intervalSeconds: Int)? { settings.tcpKeepalive }
    /// consistentHash: what the key is made of (the ring is built over the endpoints).
    public var hashPolicy: HashPolicy? { settings.hash }
    public var stableName: String { name }
    public func hashPick(_ hash: UInt64, skip: (Int) -> Bool) -> Int? { ring?.lookup(hash, skip: skip) }
    public var endpointCount: Int { endpoints.count }
    public func endpoint(_ i: Int) -> (address: String, port: Int) { (endpoints[i].address, ports[i]) }
    public func poolKey(_ i: Int) -> String { poolKeys[i] }
}

/// What a consistent-hash key is made of (DestinationRule consistentHash).
public enum HashPolicy: Sendable, Equatable {
    case header(String)
    /// Cookie name, path, ttl seconds (0: never generated).
    case cookie(name: String, path: String, ttlSeconds: Int)
    case sourceIP
    case queryParameter(String)
}

/// The parts of a DestinationRule trafficPolicy the proxy applies today.
public struct ClusterPolicy: Sendable {
    public var lb: LBPolicy = .leastRequest
    public var hash: HashPolicy?
    public var ringSize = 1024
    public var maxRequestsPerConnection = 0
    /// Istio's defaults (2^32-1) unless the DestinationRule sets them.
    public var maxConnections = CircuitBreakerDefaults.unlimited
    public var maxPendingRequests = CircuitBreakerDefaults.unlimited
    public var connectTimeoutMs = 0
    public var maxRetries = CircuitBreakerDefaults.unlimited
    public var maxRequests = CircuitBreakerDefaults.unlimited
    public var idleTimeoutMs = 0
    public var maxConnectionDurationMs = 0
    public var tcpKeepalive: (probes: Int, timeSeconds: Int, intervalSeconds: Int)?
    public var outlier: OutlierPolicy?
    /// trafficPolicy.tls (nil: not set, auto mTLS applies).
    public var tls: ClientTLSSettings?
    /// connectionPool.http.h2UpgradePolicy ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"; nil: not set).
    public var h2UpgradePolicy: String?
    /// connectionPool.http.useClientProtocol: the upstream speaks what the downstream spoke.
    public var useClientProtocol = false
    /// connectionPool.tcp.idleTimeout: a proxied TCP connection with no bytes either way
    /// for this long is closed (Istio's default 1 h; 0: never).
    public var tcpIdleTimeoutMs = 3_600_000

    /// The portLevelSettings entry of a policy for `port`.
    static func portLevel(_ tp: ConfigValue?, _ port: Int?) -> ConfigValue? {
        guard let port, case .array(let list)? = tp?["portLevelSettings"] else { return nil }
        return list.first { e in if case .int(let n)? = e["port"]?["number"] { return n == port }; return false }
    }

    /// Top-level policy, its port-level settings, then the subset's policy and its
    /// port-level settings, each overriding the fields it sets (Istio's rule).
    static func from(_ top: ConfigValue?, subset: ConfigValue?, port: Int? = nil) -> ClusterPolicy {
        var p = ClusterPolicy()
        for tp in [top, portLevel(top, port), subset, portLevel(subset, port)] {
            guard let tp else { continue }
            if let t = tp["tls"], let s = ClientTLSSettings.from(t) { p.tls = s }
            if let s = tp["loadBalancer"]?["simple"]?.stringValue, let lb = LBPolicy(istio: s) { p.lb = lb; p.hash = nil }
            if let ch = tp["loadBalancer"]?["consistentHash"] {
                p.lb = .consistentHash
                if let h = ch["httpHeaderName"]?.stringValue { p.hash = .header(h.lowercased()) }
                else if let c = ch["httpCookie"] {
                    let ttl = c["ttl"]?.stringValue.flatMap(TrafficDecoder.parseDuration).map { $0 / 1000 } ?? 0
                    p.hash = .cookie(name: c["name"]?.stringValue ?? "", path: c["path"]?.stringValue ?? "/", ttlSeconds: ttl)
                }
                else if case .bool(true)? = ch["useSourceIp"] { p.hash = .sourceIP }
                else if let q = ch["httpQueryParameterName"]?.stringValue { p.hash = .queryParameter(q) }
                if case .int(let m)? = ch["ringHash"]?["minimumRingSize"] { p.ringSize = m }
                else if case .int(let m)? = ch["minimumRingSize"] { p.ringSize = m }
                if p.hash == nil { p.hash = .sourceIP }
            }
            if case .int(let m)? = tp["connectionPool"]?["http"]?["maxRequestsPerConnection"] { p.maxRequestsPerConnection = max(0, m) }
            if case .int(let m)? = tp["connectionPool"]?["tcp"]?["maxConnections"], m > 0 { p.maxConnections = m }
            if case .int(let m)? = tp["connectionPool"]?["http"]?["http1MaxPendingRequests"], m > 0 { p.maxPendingRequests = m }
            // 0 is "unset" here, as Istio reads these fields (the default stays).
            if case .int(let m)? = tp["connectionPool"]?["http"]?["maxRetries"], m > 0 { p.maxRetries = m }
            if let ct = tp["connectionPool"]?["tcp"]?["connectTimeout"]?.stringValue.flatMap(TrafficDecoder.parseDuration) { p.connectTimeoutMs = ct }
            if case .int(let m)? = tp["connectionPool"]?["http"]?["http2MaxRequests"], m > 0 { p.maxRequests = m }
            if let v = tp["connectionPool"]?["http"]?["h2UpgradePolicy"]?.stringValue { p.h2UpgradePolicy = v == "DEFAULT" ? nil : v }
            if case .bool(let b)? = tp["connectionPool"]?["http"]?["useClientProtocol"] { p.useClientProtocol = b }
            if let v = tp["connectionPool"]?["http"]?["idleTimeout"]?.stringValue.flatMap(TrafficDecoder.parseDuration) { p.idleTimeoutMs = v }
            if let v = tp["connectionPool"]?["tcp"]?["idleTimeout"]?.stringValue.flatMap(TrafficDecoder.parseDuration) { p.tcpIdleTimeoutMs = v }
            if let v = tp["connectionPool"]?["tcp"]?["maxConnectionDuration"]?.stringValue.flatMap(TrafficDecoder.parseDuration) { p.maxConnectionDurationMs = v }
            if let ka = tp["connectionPool"]?["tcp"]?["tcpKeepalive"] {
                func secs(_ k: String, _ d: Int) -> Int { ka[k]?.stringValue.flatMap(TrafficDecoder.parseDuration).map { max(1, $0 / 1000) } ?? d }
                var probes = 9
                if case .int(let n)? = ka["probes"] { probes = n }
                p.tcpKeepalive = (probes, secs("time", 7200), secs("interval", 75))
            }
            if let od = tp["outlierDetection"] {
                // Istio's defaults where a field is left out.
                var o = p.outlier ?? OutlierPolicy()
                if p.outlier == nil { o.consecutive5xxErrors = 5; o.intervalMs = 10_000; o.baseEjectionTimeMs = 30_000; o.maxEjectionPercent = 10 }
                func int(_ k: String) -> Int? { if case .int(let v)? = od[k] { return v }; return nil }
                func ms(_ k: String) -> Int? { od[k]?.stringValue.flatMap(TrafficDecoder.parseDuration) }
                if let v = int("consecutive5xxErrors") { o.consecutive5xxErrors = v }
                if let v = int("consecutiveGatewayErrors") { o.consecutiveGatewayErrors = v }
                if let v = int("consecutiveLocalOriginFailures") { o.consecutiveLocalOriginFailures = v }
                if let v = int("maxEjectionPercent") { o.maxEjectionPercent = v }
                if let v = int("minHealthPercent") { o.minHealthPercent = v }
                if let v = ms("interval") { o.intervalMs = v }
                if let v = ms("baseEjectionTime") { o.baseEjectionTimeMs = v }
                p.outlier = o
            }
        }
        return p
    }
}

/// What a request's host resolves to: the VirtualService routes for it (if any) and
/// the service behind it (if known).
public final class VirtualHost: @unchecked Sendable {
    public let fqdn: String
    public internal(set) var routes: [HTTPRouteRule]?
    public internal(set) var virtualService: String = ""
    public internal(set) var service: ServiceInfo?
    /// `routes` with their destinations resolved to clusters, made once the table is
    /// built: routing a request copies no rule and builds no cluster key.
    public internal(set) var compiled: [CompiledRoute] = []
    /// The default route (no VirtualService): every endpoint of `service`.
    public internal(set) var defaultTarget: RouteTarget?
    /// The VirtualService's `tcp` and `tls` rules and `gateways`, as decoded, and the
    /// rules compiled for this proxy (L4Routes.swift).
    var tcpRules: [L4RouteRule] = [], tlsRules: [L4RouteRule] = [], l4Gateways: [String] = []
    public internal(set) var tcpCompiled: [CompiledL4Route] = []
    public internal(set) var tlsCompiled: [CompiledL4Route] = []
    init(fqdn: String) { self.fqdn = fqdn }
}

/// A route rule and its destinations' targets (a class: the router borrows it
/// instead of copying the rule's many fields per request).
public final class CompiledRoute {
    public let rule: HTTPRouteRule
    public let targets: [RouteTarget]
    /// The rule's mirrors with their targets, resolved as `targets` are.
    public let mirrorTargets: [(percent: Double, target: RouteTarget)]
    init(rule: HTTPRouteRule, targets: [RouteTarget], mirrorTargets: [(percent: Double, target: RouteTarget)]) {
        self.rule = rule; self.targets = targets; self.mirrorTargets = mirrorTargets
    }

    // The rule's fields the router primitives read, each read alone (no copy of the rule).
    public var cumulativeWeights: [Int] { rule.cumulativeWeights }
    public var totalWeight: Int { rule.totalWeight }
    public var timeoutMs: Int? { rule.timeoutMs }
    public var retries: RetrySpec? { rule.retries }
}

/// Where a route destination goes: its cluster, or the cluster name a 503 UH reports.
public struct RouteTarget {
    public let fqdn: String
    public let subset: String
    /// nil: the host has no ServiceEntry or no such port (503 UH).
    public let cluster: ClusterInfo?
    public let servicePort: Int
    /// The cluster name a 503 UH reports when `cluster` is nil or empty.
    public let missing: String

    init(_ service: ServiceInfo?, fqdn: String, subset: String, port: Int?) {
        self.fqdn = fqdn
        self.subset = subset
        guard let sp = service?.port(port), let svc = service else {
            cluster = nil; servicePort = 0; missing = "outbound|\(port ?? 0)|\(subset)|\(fqdn)"
            return
        }
        servicePort = sp.number
        cluster = svc.clusters["\(subset)|\(sp.number)"]
        missing = "outbound|\(sp.number)|\(subset)|\(fqdn)"
    }
}

/// Routes indexed by host at load: lookup is one dictionary probe on the normalized
/// authority; regexes are compiled and weights pre-summed, so routing cost does not
/// grow with the number of VirtualServices.
public final class RouteTable: @unchecked Sendable {
    public private(set) var hosts: [String: VirtualHost] = [:]
    public private(set) var wildcards: [(suffix: String, host: VirtualHost)] = []
    public private(set) var services: [String: ServiceInfo] = [:]
    public private(set) var warnings: [String] = []
    /// Service VIPs and endpoint addresses, for intercepted connections (AddressIndex.swift).
    public private(set) var addressIndex = AddressIndex.empty
    /// Every cluster under each name a filter may give it (see ClusterNames.swift).
    var clusterNames: [String: NamedCluster] = [:]
    public let localNamespace: String
    /// Labels of this workload: on the outbound listener it is the source, so
    /// `sourceLabels` and `sourceNamespace` match against it.
    public let localLabels: [String: String]
    /// The Sidecar resource in force and what it imports; its outboundTrafficPolicy
    /// decides what a host outside the table gets (REGISTRY_ONLY: 502, BlackHoleCluster).
    public internal(set) var scope = SidecarScope.everything
    /// This workload's ports that speak HTTP/2 (h2c for the inbound side to the app): the
    /// workload ports (targetPort, else number) declared HTTP2 or GRPC (PortProtocol) by a
    /// ServiceEntry or Kubernetes Service of this namespace whose workloadSelector
    /// (selector) matches this workload's labels, as Istio takes the app port's protocol
    /// from the services that select the workload.
    public private(set) var inboundHTTP2Ports: Set<Int> = []

    public static let empty = RouteTable(localNamespace: "default", localLabels: [:])

    init(localNamespace: String, localLabels: [String: String]) { self.localNamespace = localNamespace; self.localLabels = localLabels }

    public var isEmpty: Bool { hosts.isEmpty && wildcards.isEmpty }

    /// What a service was built from (ServiceEntry, DestinationRule, WorkloadEntries, as
    /// decoded): a later build from the same decodings reuses the service and its clusters.
    struct ServiceSource {
        let serviceEntry: DocumentToken
        let destinationRule: DocumentToken?
        let workloadEntries: [DocumentToken]
        func same(_ o: ServiceSource) -> Bool {
            serviceEntry === o.serviceEntry && destinationRule === o.destinationRule
                && workloadEntries.count == o.workloadEntries.count && zip(workloadEntries, o.workloadEntries).allSatisfy { $0 === $1 }
        }
    }
    /// What a virtual host was compiled from: its VirtualService (as decoded) and the
    /// services its routes and default route lead to.
    struct HostSource {
        let virtualService: DocumentToken?
        let services: [ServiceInfo?]
        func same(_ o: HostSource) -> Bool {
            virtualService === o.virtualService && services.count == o.services.count && zip(services, o.services).allSatisfy { $0 === $1 }
        }
    }
    var serviceSources: [String: ServiceSource] = [:]
    var hostSources: [String: HostSource] = [:]
    /// Services and virtual hosts taken from the previous table by the last build.
    public private(set) var reusedServices = 0
    public private(set) var reusedHosts = 0
    /// Clusters in the table (ids may have holes when services were reused).
    var liveClusters = 0

    /// Builds the table; cross-resource problems that Istio would reject are returned as errors.
    /// With `previous` (the table of the last load), every service whose ServiceEntry,
    /// DestinationRule and WorkloadEntries are the same decodings is taken from it with
    /// its clusters (and cluster ids), and every virtual host whose VirtualService and
    /// services are the same: a reload rebuilds what changed and what depends on it, and
    /// the two snapshots share the rest.
    static func build(vs: [VirtualServiceSpec], dr: [DestinationRuleSpec], se: [ServiceEntrySpec], we: [WorkloadEntrySpec],
                      localNamespace: String, localLabels: [String: String], errors: inout [ConfigError],
                      previous candidate: RouteTable? = nil) -> RouteTable {
        let t = RouteTable(localNamespace: localNamespace, localLabels: localLabels)
        // Reused clusters keep their ids and new ones are numbered after them; when the
        // holes this leaves outnumber the clusters, everything is renumbered.
        var previous = candidate
        if let p = previous, p.localNamespace != localNamespace || p.localLabels != localLabels || p.clusterCount > 2 * p.liveClusters + 1024 { previous = nil }
        // The DestinationRule of each host (the first one read), with or without a ServiceEntry.
        var rules: [String: DestinationRuleSpec] = [:]
        rules.reserveCapacity(dr.count)
        for d in dr where rules[d.fqdn] == nil { rules[d.fqdn] = d }
        // Sized as the last table (or the resources): a large mesh's tables are not grown
        // by successive doublings at every load.
        t.services.reserveCapacity(max(se.count, previous?.services.count ?? 0))
        t.serviceSources.reserveCapacity(max(se.count, previous?.serviceSources.count ?? 0))
        t.hosts.reserveCapacity(max(se.count + vs.count, previous?.hosts.count ?? 0))
        t.hostSources.reserveCapacity(max(se.count + vs.count, previous?.hostSources.count ?? 0))
        var reused = Set<String>()
        // WorkloadEntries indexed by namespace and by each namespace/label pair, so a
        // ServiceEntry's workloadSelector looks at the entries carrying one of its labels
        // instead of every entry of the mesh (which made a mesh of N services cost N²).
        var byNamespace: [String: [Int]] = [:]
        var byLabel: [String: [Int]] = [:]
        for (i, w) in we.enumerated() {
            byNamespace[w.namespace, default: []].append(i)
            for (k, v) in w.endpoint.labels { byLabel["\(w.namespace)\u{0}\(k)\u{0}\(v)", default: []].append(i) }
        }
        for s in se where s.namespace == localNamespace {
            guard let sel = s.workloadSelector, !sel.isEmpty, sel.allSatisfy({ localLabels[$0.key] == $0.value }) else { continue }
            for p in s.ports where PortProtocol(p).isHTTP2 { t.inboundHTTP2Ports.insert(p.targetPort ?? p.number) }
        }
        for s in se {
            var endpoints = s.endpoints
            var weTokens: [DocumentToken] = []
            if endpoints.isEmpty && s.workloadSelector == nil && (s.resolution == "DNS" || s.resolution == "DNS_ROUND_ROBIN") {
                // DNS resolution without endpoints: the hosts themselves are resolved.
                endpoints = s.hosts.filter { !$0.hasByte("*") }.map { Endpoint(address: $0) }
            }
            if let sel = s.workloadSelector {
                // The candidates: the smallest list among the selector's labels (all of the
                // namespace for an empty selector), then every label checked.
                var candidates = byNamespace[s.namespace] ?? []
                for (k, v) in sel {
                    let list = byLabel["\(s.namespace)\u{0}\(k)\u{0}\(v)"] ?? []
                    if list.count < candidates.count { candidates = list }
                    if candidates.isEmpty { break }
                }
                candidates = candidates.filter { i in sel.allSatisfy { k, v in we[i].endpoint.labels[k] == v } }
                endpoints = candidates.map { we[$0].endpoint }
                weTokens = candidates.map { we[$0].token }
            }
            for h in s.hosts {
                let fqdn = HostName.canonical(h, namespace: s.namespace)
                if t.services[fqdn] != nil { t.warnings.append("\(s.file):\(s.line): ServiceEntry \(s.namespace)/\(s.name): host \(fqdn) already defined, ignored"); continue }
                let source = ServiceSource(serviceEntry: s.token, destinationRule: rules[fqdn]?.token, workloadEntries: weTokens)
                t.serviceSources[fqdn] = source
                if let p = previous, let old = p.services[fqdn], let was = p.serviceSources[fqdn], was.same(source) {
                    t.services[fqdn] = old
                    reused.insert(fqdn)
                    continue
                }
                let info = ServiceInfo(fqdn: fqdn, namespace: s.namespace, ports: s.ports, endpoints: endpoints)
                info.addresses = s.addresses
                t.services[fqdn] = info
            }
        }
        t.reusedServices = reused.count
        var assigned = Set<String>()
        for d in dr {
            guard let svc = t.services[d.fqdn] else {
                t.warnings.append("\(d.file):\(d.line): DestinationRule \(d.namespace)/\(d.name): no ServiceEntry for host \(d.fqdn)")
                continue
            }
            if !assigned.insert(d.fqdn).inserted { t.warnings.append("\(d.file):\(d.line): DestinationRule \(d.namespace)/\(d.name): host \(d.fqdn) already has a DestinationRule, ignored"); continue }
            if reused.contains(d.fqdn) { continue }
            svc.destinationRule = d
            for sub in d.subsets { svc.subsets[sub.name] = svc.endpoints.filter { e in sub.labels.allSatisfy { e.labels[$0.key] == $0.value } } }
        }
        func vhost(_ fqdn: String) -> VirtualHost {
            if let v = t.hosts[fqdn] { return v }
            let v = VirtualHost(fqdn: fqdn)
            for alias in HostName.aliases(fqdn, localNamespace: localNamespace) where t.hosts[alias] == nil { t.hosts[alias] = v }
            t.hosts[fqdn] = v
            return v
        }
        // In name order (the first name taking an alias wins, clusters are numbered in it).
        let sortedServices = t.services.sorted(by: { $0.key < $1.key })
        for (fqdn, svc) in sortedServices where !fqdn.hasByte("*") {
            let vh = vhost(fqdn)
            vh.service = svc
            // Istio's virtual host domains include the service's VIPs: a Host that is one
            // of them (a client calling the address) routes as the service's name does.
            for a in svc.addresses where !a.contains("/") && t.hosts[a.lowercased()] == nil {
                t.hosts[a.lowercased()] = vh
                // An IPv6 VIP in a Host header is bracketed.
                if a.contains(":") { t.hosts["[\(a.lowercased())]"] = vh }
            }
        }
        var vsTokens: [String: DocumentToken] = [:]
        for v in vs {
            for h in v.hosts where Self.appliesToSidecars(v) {
                let fqdn = HostName.canonical(h, namespace: v.namespace)
                if fqdn.hasPrefix("*") {
                    let vh = VirtualHost(fqdn: fqdn)
                    vh.routes = Self.httpRoutes(v); vh.virtualService = "\(v.namespace)/\(v.name)"
                    vh.tcpRules = v.tcp; vh.tlsRules = v.tls; vh.l4Gateways = v.gateways
                    t.wildcards.append((String(fqdn.dropFirst()), vh))
                    continue
                }
                let vh = vhost(fqdn)
                if vh.routes != nil || !vh.tcpRules.isEmpty || !vh.tlsRules.isEmpty { t.warnings.append("\(v.file):\(v.line): VirtualService \(v.namespace)/\(v.name): host \(fqdn) already routed by \(vh.virtualService), ignored"); continue }
                vh.routes = Self.httpRoutes(v)
                vh.tcpRules = v.tcp; vh.tlsRules = v.tls; vh.l4Gateways = v.gateways
                vh.virtualService = "\(v.namespace)/\(v.name)"
                vsTokens[fqdn] = v.token
            }
            // Every subset a route or mirror names must be defined by the host's
            // DestinationRule, whether or not a ServiceEntry gives the host endpoints.
            // A destination host without a ServiceEntry is only a note: in a mesh it may
            // be a Kubernetes Service, which Moonlet does not read (it answers 503 UH).
            var noted = Set<String>()
            for r in v.http {
                for (fqdn, subset, place) in r.destinations.map({ ($0.fqdn, $0.subset, $0.place) }) + r.mirrors.map({ ($0.fqdn, $0.subset, $0.place) }) {
                    func fail(_ message: String) {
                        errors.append(ConfigError(file: v.file, line: place.line, column: place.column, resource: "VirtualService \(v.namespace)/\(v.name)",
                                                  field: place.field, message: message))
                    }
                    if !subset.isEmpty {
                        guard let rule = rules[fqdn] else {
                            fail("subset \"\(subset)\" is not defined: no DestinationRule for host \(fqdn)")
                            continue
                        }
                        if !rule.subsets.contains(where: { $0.name == subset }) {
                            fail("subset \"\(subset)\" is not defined by DestinationRule \(rule.namespace)/\(rule.name) for host \(fqdn)")
                            continue
                        }
                    }
                    if t.services[fqdn] == nil && !fqdn.hasByte("*") && noted.insert(fqdn).inserted {
                        t.warnings.append("\(v.file):\(place.line): VirtualService \(v.namespace)/\(v.name): \(place.field): no ServiceEntry for host \(fqdn): moonlet has no endpoints for it, requests routed there get 503 UH")
                    }
                }
            }
        }
        for v in vs where !v.tcp.isEmpty || !v.tls.isEmpty {
            checkL4Destinations(v, rules: rules, services: t.services, errors: &errors, warnings: &t.warnings)
        }
        t.wildcards.sort { $0.suffix.count > $1.suffix.count }
        // Clusters: every service port × (all endpoints, each subset), numbered densely
        // (after the previous table's ids when services were reused).
        var nextID = previous?.clusterCount ?? 0
        var live = 0
        for (fqdn, svc) in sortedServices {
            if reused.contains(fqdn) { live += svc.clusters.count; continue }
            let dr = svc.destinationRule
            var sets: [(String, [Endpoint], ConfigValue?)] = [("", svc.endpoints, nil)]
            for sub in dr?.subsets ?? [] { sets.append((sub.name, svc.subsets[sub.name] ?? [], sub.trafficPolicy)) }
            for sp in svc.ports {
                for (name, eps, subPolicy) in sets {
                    let policy = ClusterPolicy.from(dr?.trafficPolicy, subset: subPolicy, port: sp.number)
                    svc.clusters["\(name)|\(sp.number)"] = ClusterInfo(id: nextID, name: "outbound|\(sp.number)|\(name)|\(fqdn)", policy: policy,
                                                                       endpoints: eps, ports: eps.map { svc.endpointPort($0, for: sp) },
                                                                       namespace: svc.namespace, sni: "outbound_.\(sp.number)_.\(name)_.\(fqdn)",
                                                                       servicePort: sp)
                    nextID += 1
                    live += 1
                }
            }
        }
        t.clusterCount = nextID
        t.liveClusters = live
        t.indexClusterNames()
        var seen = Set<ObjectIdentifier>()
        var replaced: [ObjectIdentifier: VirtualHost] = [:]
        for vh in Array(t.hosts.values) where seen.insert(ObjectIdentifier(vh)).inserted {
            var targets: [ServiceInfo?] = [vh.service]
            for r in vh.routes ?? [] {
                for d in r.destinations { targets.append(t.services[d.fqdn]) }
                for m in r.mirrors { targets.append(t.services[m.fqdn]) }
            }
            for r in vh.tcpRules + vh.tlsRules { for d in r.destinations { targets.append(t.services[d.fqdn]) } }
            let routed = vh.routes != nil || !vh.tcpRules.isEmpty || !vh.tlsRules.isEmpty
            let source = HostSource(virtualService: routed ? vsTokens[vh.fqdn] : nil, services: targets)
            t.hostSources[vh.fqdn] = source
            if let p = previous, let old = p.hosts[vh.fqdn], old.fqdn == vh.fqdn, let was = p.hostSources[vh.fqdn], was.same(source) {
                replaced[ObjectIdentifier(vh)] = old
                continue
            }
            t.compile(vh)
        }
        if !replaced.isEmpty {
            for (k, v) in t.hosts { if let old = replaced[ObjectIdentifier(v)] { t.hosts[k] = old } }
        }
        t.reusedHosts = replaced.count
        for vh in t.wildcards.map(\.host) { t.compile(vh) }
        t.addressIndex = AddressIndex.build(sortedServices, localLabels: localLabels, localNamespace: localNamespace)
        return t
    }

    /// Resolves a virtual host's destinations to clusters (see VirtualHost.compiled).
    func compile(_ vh: VirtualHost) {
        if let svc = vh.service { vh.defaultTarget = RouteTarget(svc, fqdn: vh.fqdn, subset: "", port: nil) }
        func target(_ fqdn: String, _ subset: String, _ port: Int?) -> RouteTarget { RouteTarget(services[fqdn], fqdn: fqdn, subset: subset, port: port) }
        vh.compiled = (vh.routes ?? []).map { rule in
            CompiledRoute(rule: rule, targets: rule.destinations.map { target($0.fqdn, $0.subset, $0.port) },
                          mirrorTargets: rule.mirrors.map { ($0.percent, target($0.fqdn, $0.subset, $0.port)) })
        }
        compileL4(vh)
    }

    /// How many clusters the table numbered (balancer counters are sized by it).
    public private(set) var clusterCount = 0

    /// The virtual host of a request's Host (port ignored, case-insensitive; exact
    /// names and aliases first, then the longest `*.suffix` wildcard), or nil.
    public func lookup(_ authority: String) -> VirtualHost? {
        let h = HostName.normalize(authority)
        if let v = hosts[h] { return v }
        for w in wildcards where h.hasSuffix(w.suffix) { return w.host }
        return nil
    }
}
