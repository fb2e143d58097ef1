#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The protocol a service port declares, Istio's way: the port's `protocol` field, else
/// the prefix of its name (`<protocol>[-<suffix>]`). A declared port skips protocol
/// detection (what matters for server-first protocols such as MySQL); anything else is
/// sniffed.
public enum PortProtocol: String, Sendable {
    case http = "HTTP", http2 = "HTTP2", grpc = "GRPC", grpcWeb = "GRPC-WEB", tcp = "TCP", tls = "TLS"
    /// Not declared (or a protocol Moonlet does not know): detected from the first bytes.
    case sniff = "AUTO"

    /// HTTP, HTTP2, GRPC, GRPC-WEB: the HTTP listener; HTTPS and TLS: TLS passthrough;
    /// TCP, MYSQL, MONGO, REDIS: opaque TCP (Istio without the protocol filters).
    public init(declared: String) {
        switch declared.uppercased() {
        case "HTTP", "HTTP_PROXY": self = .http
        case "HTTP2": self = .http2
        case "GRPC": self = .grpc
        case "GRPC-WEB": self = .grpcWeb
        case "HTTPS", "TLS": self = .tls
        case "TCP", "MYSQL", "MONGO", "REDIS": self = .tcp
        default: self = .sniff
        }
    }

    /// A service port's protocol, the one reading of it that every part of Moonlet uses:
    /// `protocol` when it names a protocol, else the port name as Istio parses it
    /// (kube ConvertProtocol): a `grpc-web` prefix is gRPC-Web (HTTP/1.1, not HTTP/2),
    /// otherwise the prefix before the first '-' (`grpc-orders` → GRPC).
    public init(_ p: ServicePort) {
        if !p.protocolName.isEmpty {
            let d = PortProtocol(declared: p.protocolName)
            if d != .sniff { self = d; return }
        }
        let name = p.name.lowercased()
        if name.hasPrefix("grpc-web") { self = .grpcWeb; return }
        let prefix = name.split(separator: "-", maxSplits: 1).first.map(String.init) ?? ""
        self = PortProtocol(declared: prefix)
    }

    /// The connection is served as HTTP.
    public var isHTTP: Bool { self == .http || self == .http2 || self == .grpc || self == .grpcWeb }

    /// The port speaks HTTP/2 (HTTP2 or GRPC; gRPC-Web is HTTP/1.1): h2c to such an app
    /// port, h2 toward it between sidecars.
    public var isHTTP2: Bool { self == .http2 || self == .grpc }
}

/// Where an intercepted connection's original destination ("ip:port") leads: a service
/// port reached by one of the service's `addresses` (endpoint -1: the balancer picks),
/// or one endpoint of a service reached by its own address (pinned).
public struct AddressTarget: Sendable {
    public let service: ServiceInfo
    public let port: ServicePort
    /// The cluster of the service port (every endpoint).
    public let cluster: ClusterInfo?
    /// The endpoint addressed directly (index in `cluster`), -1 for a VIP.
    public let endpointIndex: Int
    public var protocolKind: PortProtocol { PortProtocol(port) }
    public init(service: ServiceInfo, port: ServicePort, cluster: ClusterInfo?, endpointIndex: Int) {
        self.service = service; self.port = port; self.cluster = cluster; self.endpointIndex = endpointIndex
    }
}

/// Original destinations of a configuration snapshot, indexed once at load: service
/// VIPs and endpoint addresses by "ip:port", and the protocols declared for this
/// workload's own ports (the inbound side). Read-only afterwards, shared by every loop.
public final class AddressIndex: @unchecked Sendable {
    var byAddress: [String: AddressTarget] = [:]
    /// Ports of services this workload is an endpoint of, by the port the workload
    /// listens on, with their declared protocol.
    public private(set) var localPorts: [Int: PortProtocol] = [:]

    public static let empty = AddressIndex()

    /// The target of `ip`:`port`, nil when no service has that address and port.
    public func lookup(ip: String, port: Int) -> AddressTarget? {
        byAddress[Self.key(ip, port)]
    }

    /// Whether `ip` is a VIP or an endpoint address of some service (any port).
    public func knows(ip: String) -> Bool { knownIPs.contains(Self.canonicalIP(ip)) }
    var knownIPs: Set<String> = []

    static func key(_ ip: String, _ port: Int) -> String { "\(canonicalIP(ip)):\(port)" }

    /// One spelling per address (IPv6 in its compressed form, IPv4-mapped IPv6 as IPv4).
    public static func canonicalIP(_ ip: String) -> String {
        var a4 = in_addr()
        if inet_pton(AF_INET, ip, &a4) == 1 { return ip }
        var a6 = in6_addr()
        guard inet_pton(AF_INET6, ip, &a6) == 1 else { return ip.lowercased() }
        var buf = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let text: String = withUnsafePointer(to: &a6) { p in
            inet_ntop(AF_INET6, p, &buf, socklen_t(buf.count)).map { String(cString: $0) } ?? ip.lowercased()
        }
        if text.hasPrefix("::ffff:"), text.contains(".") { return String(text.dropFirst(7)) }
        return text
    }

    /// Indexes `services` (a table's, in name order: the first service of an address wins);
    /// `localLabels` find the services this workload serves.
    static func build(_ services: [(key: String, value: ServiceInfo)], localLabels: [String: String], localNamespace: String) -> AddressIndex {
        let x = AddressIndex()
        for (fqdn, svc) in services where !fqdn.hasByte("*") {
            for sp in svc.ports {
                let cluster = svc.clusters["|\(sp.number)"]
                for a in svc.addresses where !a.contains("/") {
                    let k = key(a, sp.number)
                    x.knownIPs.insert(canonicalIP(a))
                    if x.byAddress[k] == nil { x.byAddress[k] = AddressTarget(service: svc, port: sp, cluster: cluster, endpointIndex: -1) }
                }
                for (i, e) in svc.endpoints.enumerated() {
                    let ep = svc.endpointPort(e, for: sp)
                    x.knownIPs.insert(canonicalIP(e.address))
                    let k = key(e.address, ep)
                    if x.byAddress[k] == nil { x.byAddress[k] = AddressTarget(service: svc, port: sp, cluster: cluster, endpointIndex: i) }
                    // An endpoint carrying this workload's labels (in its namespace) is this
                    // workload: its port's declared protocol applies to the inbound side.
                    if !e.labels.isEmpty, svc.namespace == localNamespace, e.labels.allSatisfy({ localLabels[$0.key] == $0.value }) {
                        let proto = PortProtocol(sp)
                        if proto != .sniff, x.localPorts[ep] == nil { x.localPorts[ep] = proto }
                    }
                }
            }
        }
        return x
    }
}
