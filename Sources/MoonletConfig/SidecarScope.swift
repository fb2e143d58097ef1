import MoonletCore
#if canImport(Foundation)
import Foundation
#endif

/// Istio's `outboundTrafficPolicy.mode` of a Sidecar (or the mesh default).
public enum OutboundTrafficMode: String, Sendable {
    /// A host outside the registry goes on as Moonlet routes any unknown host today
    /// (the router answers 404 NR; without traffic resources requests pass through).
    case allowAny = "ALLOW_ANY"
    /// A host outside the registry (or outside the Sidecar's egress scope) gets 502,
    /// Istio's BlackHoleCluster (`block_all` route).
    case registryOnly = "REGISTRY_ONLY"
}

/// One `egress[].hosts` entry of a Sidecar: `namespace/dnsName`.
public struct SidecarHost: Sendable, Equatable {
    /// `*` (any namespace), `~` (none), or a namespace name (`.` is resolved to the
    /// Sidecar's own namespace when decoded).
    public var namespace: String
    /// `*`, `*.suffix`, or a host name (lowercased).
    public var dnsName: String

    /// Whether this entry imports a host `host` (as written in the resource) of a
    /// resource in namespace `ns`; `fqdn` is the canonical form Moonlet routes on.
    public func imports(namespace ns: String, host: String, fqdn: String) -> Bool {
        if namespace == "~" { return false }
        if namespace != "*" && namespace != ns { return false }
        if dnsName == "*" { return true }
        if dnsName.hasPrefix("*.") {
            let suffix = dnsName.dropFirst()
            return fqdn.hasSuffix(suffix) || host.lowercased().hasSuffix(suffix)
        }
        if dnsName == host.lowercased() || dnsName == fqdn { return true }
        // A short name stands for the service of that name in the namespace it names.
        return !dnsName.contains(".") && HostName.canonical(dnsName, namespace: ns) == fqdn
    }
}

/// A decoded `Sidecar` resource (networking.istio.io): what Moonlet applies of it.
public struct SidecarSpec: Sendable {
    public var name: String
    public var namespace: String
    /// `workloadSelector.labels` (nil: every workload of the namespace).
    public var workloadSelector: [String: String]?
    /// The union of every egress listener's hosts; nil when `egress` is absent (Istio
    /// then imports everything the namespace can see: `*/*`).
    public var egressHosts: [SidecarHost]?
    /// nil: not set (the mesh default, ALLOW_ANY, applies).
    public var outboundTrafficPolicy: OutboundTrafficMode?
    /// `ingress[]` listeners as (port, defaultEndpoint), checked against Moonlet's
    /// inbound once the workload's app port is known.
    public var ingress: [(port: Int, defaultEndpoint: String, line: Int)] = []
    public var file: String
    public var line: Int
    public var resource: String { "Sidecar \(namespace)/\(name)" }
}

/// Which services one sidecar loads: the Sidecar resource Istio picks for the workload
/// and what it imports. The default (no Sidecar) imports everything, ALLOW_ANY.
public struct SidecarScope: Sendable {
    /// "namespace/name" of the Sidecar in force, "" when none.
    public var sidecar: String = ""
    /// nil: everything is imported.
    public var hosts: [SidecarHost]? = nil
    public var outboundTrafficPolicy: OutboundTrafficMode = .allowAny
    /// The Sidecar's ingress listeners (port, defaultEndpoint), with where it was read:
    /// the proxy checks them against its inbound listener (`ingressProblems`).
    public var ingress: [(port: Int, defaultEndpoint: String, line: Int)] = []
    public var file = ""

    public init() {}

    /// Moonlet's inbound listener forwards every port it receives to 127.0.0.1:`appPort`.
    /// An ingress listener maps onto it when its defaultEndpoint is that address
    /// (`127.0.0.1:PORT`, `0.0.0.0:PORT`, `[::1]:PORT` or empty, with PORT the app port);
    /// one message per listener that does not.
    public func ingressProblems(appPort: Int) -> [String] {
        ingress.compactMap { l in
            let ep = l.defaultEndpoint
            let ok = ep.isEmpty || ["127.0.0.1:\(appPort)", "0.0.0.0:\(appPort)", "[::1]:\(appPort)", "[::]:\(appPort)"].contains(ep)
            return ok ? nil : "\(file):\(l.line): Sidecar \(sidecar): ingress listener on port \(l.port) with defaultEndpoint \"\(ep)\" is not applied: "
                + "Moonlet's inbound listener forwards every port to 127.0.0.1:\(appPort) (--app-port)"
        }
    }

    public static let everything = SidecarScope()

    /// Whether a resource of namespace `ns` naming `host` is imported.
    public func imports(namespace ns: String, host: String, fqdn: String) -> Bool {
        guard let hosts else { return true }
        return hosts.contains { $0.imports(namespace: ns, host: host, fqdn: fqdn) }
    }

    /// Istio's choice of the Sidecar of a workload: one in the workload's namespace
    /// whose workloadSelector matches its labels; else the one of that namespace without
    /// a selector; else the one of the root namespace without a selector (the mesh
    /// default). Among several equal candidates Istio takes the oldest; Moonlet the
    /// first read (file order), and says so in `notes`.
    public static func select(_ sidecars: [SidecarSpec], workload: WorkloadIdentity, notes: inout [String]) -> SidecarSpec? {
        func pick(_ list: [SidecarSpec], _ what: String) -> SidecarSpec? {
            guard let first = list.first else { return nil }
            if list.count > 1 {
                notes.append("\(first.file):\(first.line): \(first.resource): \(list.count) Sidecars \(what) select this workload; "
                             + "the first read applies (\(list.dropFirst().map(\.resource).joined(separator: ", ")) ignored)")
            }
            return first
        }
        let own = sidecars.filter { $0.namespace == workload.namespace }
        let bySelector = own.filter { s in s.workloadSelector.map { sel in !sel.isEmpty && sel.allSatisfy { workload.labels[$0.key] == $0.value } } ?? false }
        if let s = pick(bySelector, "with a workloadSelector") { return s }
        if let s = pick(own.filter { $0.workloadSelector?.isEmpty ?? true }, "without a workloadSelector in namespace \(workload.namespace)") { return s }
        if workload.namespace != workload.rootNamespace {
            if let s = pick(sidecars.filter { $0.namespace == workload.rootNamespace && ($0.workloadSelector?.isEmpty ?? true) },
                            "of the root namespace \(workload.rootNamespace)") { return s }
        }
        return nil
    }

    /// The scope of a chosen Sidecar (nil: the default scope).
    public init(_ s: SidecarSpec?) {
        guard let s else { return }
        sidecar = "\(s.namespace)/\(s.name)"
        hosts = s.egressHosts
        outboundTrafficPolicy = s.outboundTrafficPolicy ?? .allowAny
        ingress = s.ingress
        file = s.file
    }
}

extension TrafficDecoder {
    static let sidecarFields: Set<String> = ["workloadSelector", "ingress", "egress", "outboundTrafficPolicy", "inboundConnectionPool"]

    /// A Sidecar (networking.istio.io): every field as Istio validates it; what Moonlet
    /// does not apply is a note (`notApplied`), never silently accepted.
    mutating func sidecar(_ spec: PositionedNode, name: String, line: Int) -> SidecarSpec? {
        guard fields(spec, "spec", Self.sidecarFields) else { return nil }
        var out = SidecarSpec(name: name, namespace: namespace, file: file, line: line)
        if let ws = spec.child("workloadSelector"), fields(ws, "spec.workloadSelector", ["labels"]) {
            let l = labels(ws.child("labels"), "spec.workloadSelector.labels")
            if l.isEmpty { err(ws, "spec.workloadSelector.labels", "workloadSelector must have at least one label") }
            out.workloadSelector = l
        }
        if let egress = spec.child("egress") {
            var hosts: [SidecarHost] = []
            let listeners = list(egress, "spec.egress")
            for (i, e) in listeners.enumerated() {
                let path = "spec.egress[\(i)]"
                guard fields(e, path, ["port", "bind", "captureMode", "hosts"]) else { continue }
                let hs = stringList(e.child("hosts"), "\(path).hosts")
                if hs.isEmpty { err(e.child("hosts") ?? e, "\(path).hosts", "egress listener must contain at least one host") }
                for (j, h) in hs.enumerated() {
                    let parts = h.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
                    let hp = "\(path).hosts[\(j)]"
                    guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                        err(e.child("hosts")?.sequence?[j], hp, "host must be of form namespace/dnsName, got \"\(h)\""); continue
                    }
                    let ns = parts[0] == "." ? namespace : parts[0]
                    let dns = parts[1].lowercased()
                    if dns != "*" && dns.dropFirst(dns.hasPrefix("*.") ? 2 : 0).contains("*") {
                        err(e.child("hosts")?.sequence?[j], hp, "invalid dnsName \"\(parts[1])\": a wildcard may only be the first label")
                        continue
                    }
                    hosts.append(SidecarHost(namespace: ns, dnsName: dns))
                }
                if let p = e.child("port") {
                    sidecarPort(p, "\(path).port")
                    notApplied(p, "\(path).port", "egress listeners are not per port in Moonlet: the hosts apply on every port of the outbound listener")
                }
                if let b = e.child("bind") { _ = string(b, "\(path).bind"); notApplied(b, "\(path).bind", "not applied: the outbound listener binds --bind") }
                if let c = e.child("captureMode") {
                    if enumValue(c, "\(path).captureMode", ["DEFAULT", "IPTABLES", "NONE"]) != "DEFAULT" {
                        notApplied(c, "\(path).captureMode", "not applied: capture is set up by `moonlet iptables`")
                    }
                }
            }
            if listeners.filter({ $0.child("port") == nil }).count > 1 {
                err(egress, "spec.egress", "at most one egress listener may omit the port (the catch-all)")
            }
            out.egressHosts = hosts
        }
        if let otp = spec.child("outboundTrafficPolicy"), fields(otp, "spec.outboundTrafficPolicy", ["mode", "egressProxy"]) {
            if let m = enumValue(otp.child("mode"), "spec.outboundTrafficPolicy.mode", ["REGISTRY_ONLY", "ALLOW_ANY"]) {
                out.outboundTrafficPolicy = OutboundTrafficMode(rawValue: m)
            }
            if let ep = otp.child("egressProxy") {
                notApplied(ep, "spec.outboundTrafficPolicy.egressProxy", "not applied: unknown hosts are not forwarded to an egress proxy")
            }
        }
        for (i, l) in list(spec.child("ingress"), "spec.ingress").enumerated() {
            let path = "spec.ingress[\(i)]"
            guard fields(l, path, ["port", "bind", "captureMode", "defaultEndpoint", "tls", "connectionPool"]) else { continue }
            var port: Int? = nil
            if let p = l.child("port") { port = sidecarPort(p, "\(path).port") } else { err(l, "\(path).port", "Required value") }
            let ep = string(l.child("defaultEndpoint"), "\(path).defaultEndpoint") ?? ""
            if let port { out.ingress.append((port, ep, l.line)) }
            for k in ["bind", "captureMode", "tls", "connectionPool"] {
                if let n = l.child(k) { notApplied(n, "\(path).\(k)", "not applied by Moonlet's inbound listener") }
            }
        }
        if let icp = spec.child("inboundConnectionPool") {
            notApplied(icp, "spec.inboundConnectionPool", "not applied: the inbound listener has no connection pool settings")
        }
        return out
    }

    /// A Sidecar's `port` (SidecarPort: number, protocol, name, targetPort); the number.
    @discardableResult
    mutating func sidecarPort(_ p: PositionedNode, _ path: String) -> Int? {
        guard fields(p, path, ["number", "protocol", "name", "targetPort"]) else { return nil }
        let n = int(p.child("number"), "\(path).number", range: 1...65535)
        if p.child("number") == nil { err(p, "\(path).number", "Required value") }
        _ = string(p.child("protocol"), "\(path).protocol")
        _ = string(p.child("name"), "\(path).name")
        _ = int(p.child("targetPort"), "\(path).targetPort", range: 1...65535)
        return n
    }
}

extension SidecarScope {
    /// `all` narrowed to what this scope imports: ServiceEntries and VirtualServices keep
    /// the hosts it imports (and go when none is left); a DestinationRule stays when its
    /// host is an imported service or is itself imported. WorkloadEntries stay (they are
    /// only read through an imported ServiceEntry's selector). A control plane pushing to a
    /// sidecar can send it only this (`ConfigLoader.loadText` decodes, `select` picks).
    public func filter(_ all: ConfigLoader.TextResult) -> ConfigLoader.TextResult {
        guard hosts != nil else { return all }
        let index = Index(self)
        var out = all
        out.serviceEntries = all.serviceEntries.compactMap { s in
            var x = s
            x.hosts = s.hosts.filter { index.imports(namespace: s.namespace, host: $0, fqdn: HostName.canonical($0, namespace: s.namespace)) }
            return x.hosts.isEmpty ? nil : x
        }
        var fqdns = Set<String>()
        for s in out.serviceEntries { for h in s.hosts { fqdns.insert(HostName.canonical(h, namespace: s.namespace)) } }
        out.virtualServices = all.virtualServices.compactMap { v in
            var x = v
            x.hosts = v.hosts.filter { index.imports(namespace: v.namespace, host: $0, fqdn: HostName.canonical($0, namespace: v.namespace)) }
            return x.hosts.isEmpty ? nil : x
        }
        out.destinationRules = all.destinationRules.filter { d in fqdns.contains(d.fqdn) || index.imports(namespace: d.namespace, host: d.host, fqdn: d.fqdn) }
        return out
    }

    /// The egress hosts indexed: names without wildcard by "namespace/name" (one probe
    /// per form), the others scanned.
    struct Index {
        var exact = Set<String>()
        var others: [SidecarHost] = []
        init(_ scope: SidecarScope) {
            for h in scope.hosts ?? [] {
                if h.namespace == "~" { continue }
                if h.dnsName.contains("*") { others.append(h); continue }
                exact.insert("\(h.namespace)/\(h.dnsName)")
            }
        }
        func imports(namespace ns: String, host: String, fqdn: String) -> Bool {
            let h = host.lowercased()
            for n in [ns, "*"] {
                if exact.contains("\(n)/\(h)") || exact.contains("\(n)/\(fqdn)") { return true }
                // A short name stands for the service of that name in the namespace it names.
                if fqdn.hasSuffix(".\(ns).\(HostName.clusterDomain)"), let dot = fqdn.firstIndex(of: "."), exact.contains("\(n)/\(fqdn[..<dot])") { return true }
            }
            return others.contains { $0.imports(namespace: ns, host: host, fqdn: fqdn) }
        }
    }
}
