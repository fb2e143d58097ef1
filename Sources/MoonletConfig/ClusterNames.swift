import MoonletCore

/// One cluster of the snapshot under one of the names a filter may give it, with the
/// parts of the name resolved (a class: a lookup hands it out without copying strings).
public final class NamedCluster: @unchecked Sendable {
    /// The cluster: endpoints of the subset, load balancer, circuit limits, TLS.
    public let cluster: ClusterInfo
    /// The service's FQDN (the HOST of the canonical name).
    public let host: String
    /// The DestinationRule subset ("" = every endpoint of the service).
    public let subset: String
    /// The service port.
    public let port: Int
    init(cluster: ClusterInfo, host: String, subset: String, port: Int) {
        self.cluster = cluster; self.host = host; self.subset = subset; self.port = port
    }
}

/// What a cluster name stands for.
public enum ClusterTarget {
    /// A cluster of the snapshot, `outbound|PORT|SUBSET|HOST`.
    case cluster(NamedCluster)
    /// Envoy's `PassthroughCluster`: no endpoint list, the stream goes to the address
    /// its endpoint override names.
    case passthrough
}

extension RouteTable {
    /// Envoy's name of the cluster that forwards to the original destination.
    public static let passthroughCluster = "PassthroughCluster"

    /// Resolves a cluster name as Istio spells it, `outbound|PORT|SUBSET|HOST` (SUBSET
    /// may be empty), or `PassthroughCluster`. HOST is the service's FQDN or any form a
    /// client of this workload may use for it: `name.namespace.svc`, `name.namespace`,
    /// and the short `name` when the service is in the workload's namespace (the forms
    /// of `HostName.aliases`). The host part is case-insensitive.
    ///
    /// One dictionary probe for a canonical name (the index holds those only); another
    /// form of the host is mapped to its FQDN through the host index (the forms a
    /// request's Host may take), lowercased first when it has upper-case letters, and
    /// probed again. nil when the snapshot has no such cluster.
    public func resolveCluster(_ name: String) -> ClusterTarget? {
        if let c = clusterNames[name] { return .cluster(c) }
        if name == Self.passthroughCluster { return .passthrough }
        guard let parts = Self.splitClusterName(name) else { return nil }
        var host = String(parts.host)
        if host.utf8.contains(where: { $0 >= 65 && $0 <= 90 }) { host = host.lowercased() }
        guard let fqdn = hosts[host]?.fqdn else { return nil }
        return clusterNames["outbound|\(parts.port)|\(parts.subset)|\(fqdn)"].map { .cluster($0) }
    }

    /// The parts of `outbound|PORT|SUBSET|HOST` (PORT 1-65535, HOST not empty), or nil
    /// when `name` does not have that form.
    public static func splitClusterName(_ name: String) -> (port: Int, subset: Substring, host: Substring)? {
        let p = name.split(separator: "|", maxSplits: 3, omittingEmptySubsequences: false)
        guard p.count == 4, p[0] == "outbound", let port = Int(p[1]), (1...65535).contains(port), !p[3].isEmpty, !p[3].contains("|") else { return nil }
        return (port, p[2], p[3])
    }

    /// Builds the name index: every cluster under its canonical name (the other forms
    /// of a host go through the host index, see resolveCluster: indexing every form cost
    /// four entries per cluster at mesh scale). Called once, when the table is built
    /// (the table is immutable afterwards).
    func indexClusterNames() {
        var index: [String: NamedCluster] = [:]
        index.reserveCapacity(clusterCount)
        for (fqdn, svc) in services {
            for (key, c) in svc.clusters {
                // key is "SUBSET|PORT" (subset names are DNS labels: no "|").
                guard let bar = key.lastIndex(of: "|"), let port = Int(key[key.index(after: bar)...]) else { continue }
                index[c.name] = NamedCluster(cluster: c, host: fqdn, subset: String(key[..<bar]), port: port)
            }
        }
        clusterNames = index
    }
}
