#if canImport(Foundation)
import Foundation
#endif

// MARK: - Kubernetes Service (core/v1), read as Istio's service registry reads it

extension TrafficDecoder {
    /// The `spec` fields of a Kubernetes Service that only concern the cluster's own
    /// networking (node ports, cloud load balancers, kube-proxy policies): valid, not
    /// applied by a sidecar, each noted at load.
    static let kubeNetworkingFields: Set<String> = [
        "type", "sessionAffinity", "sessionAffinityConfig", "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy",
        "externalTrafficPolicy", "publishNotReadyAddresses", "loadBalancerIP", "loadBalancerSourceRanges",
        "loadBalancerClass", "externalIPs", "healthCheckNodePort", "allocateLoadBalancerNodePorts", "trafficDistribution",
    ]

    /// A Kubernetes `Service` as the registry entry Istio makes of it: host
    /// `NAME.NAMESPACE.svc.cluster.local`, its cluster IPs as addresses, its `selector` as a
    /// workload selector (Moonlet's workloads are WorkloadEntries: a Service selects them as
    /// Istio lets it), `type: ExternalName` as DNS resolution of the external name. A port's
    /// protocol is Istio's reading (kube ConvertProtocol): `appProtocol` first
    /// (`kubernetes.io/h2c` is HTTP2, `kubernetes.io/ws` HTTP, `kubernetes.io/wss` HTTPS),
    /// else the port name (`grpc-web…`, else its prefix before '-'), see PortProtocol.
    /// UDP and SCTP ports are left out (noted): the sidecar proxies TCP only.
    mutating func kubernetesService(_ spec: PositionedNode?, name: String, nameNode: PositionedNode?, line: Int) -> ServiceEntrySpec? {
        if !Self.isDNS1035Label(name) {
            err(nameNode, "metadata.name", "a Service name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, at most 63)", line: nameNode == nil ? line : nil)
        }
        guard let spec else { err(nil, "spec", "Required value", line: line, col: 1); return nil }
        let known: Set<String> = ["selector", "ports", "clusterIP", "clusterIPs", "externalName"]
        guard fields(spec, "spec", known.union(Self.kubeNetworkingFields)) else { return nil }
        let type = string(spec.child("type"), "spec.type") ?? "ClusterIP"
        if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(type) {
            err(spec.child("type"), "spec.type", "Unsupported value: \"\(type)\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"")
        }
        for e in spec.mapping ?? [] where Self.kubeNetworkingFields.contains(e.key) {
            if e.key == "type" && (type == "ClusterIP" || type == "ExternalName") { continue }
            notApplied(e.value, "spec.\(e.key)", "cluster networking outside the mesh; the sidecar routes by the service's host, cluster IPs and ports")
        }
        let host = "\(name).\(namespace).\(HostName.clusterDomain)"
        var addresses: [String] = []
        let ips = [string(spec.child("clusterIP"), "spec.clusterIP")].compactMap { $0 } + stringList(spec.child("clusterIPs"), "spec.clusterIPs")
        for (i, ip) in ips.enumerated() where ip != "None" && ip != "" {
            if !Self.isIP(ip) { err(spec.child(i == 0 && spec.child("clusterIP") != nil ? "clusterIP" : "clusterIPs"), "spec.clusterIP", "\(ip) is not a valid IP"); continue }
            if !addresses.contains(ip) { addresses.append(ip) }
        }
        var ports: [ServicePort] = []
        var numbers = Set<String>()
        for (i, p) in list(spec.child("ports"), "spec.ports").enumerated() {
            let path = "spec.ports[\(i)]"
            guard fields(p, path, ["name", "port", "targetPort", "protocol", "appProtocol", "nodePort"]) else { continue }
            guard let num = int(p.child("port"), "\(path).port", range: 1...65535) else {
                if p.child("port") == nil { err(p, "\(path).port", "Required value") }
                continue
            }
            let portName = string(p.child("name"), "\(path).name") ?? ""
            let transport = enumValue(p.child("protocol"), "\(path).protocol", ["TCP", "UDP", "SCTP"]) ?? "TCP"
            // Kubernetes keys ports by (port, protocol): 53/UDP and 53/TCP may both be there.
            if !numbers.insert("\(num)/\(transport)").inserted { err(p.child("port"), "\(path).port", "Duplicate value: \(num)/\(transport)") }
            if transport != "TCP" { notApplied(p, path, "\(transport) port \(num): the sidecar proxies TCP only"); continue }
            if let np = p.child("nodePort") { notApplied(np, "\(path).nodePort", "node ports are outside the mesh") }
            var target: Int? = nil
            if let t = p.child("targetPort") {
                switch t.value {
                case .int(let v):
                    if (1...65535).contains(v) { target = v } else { err(t, "\(path).targetPort", "port must be between 1-65535") }
                case .string(let s):
                    // A named container port: Moonlet has no pod specs to resolve it; a
                    // WorkloadEntry's `ports` (by this service port's name) or the service
                    // port itself gives the endpoint's port.
                    notApplied(t, "\(path).targetPort", "named target port \"\(s)\" is not resolved (no pod specs): the WorkloadEntry's port for \"\(portName)\", else \(num), is used")
                default:
                    err(t, "\(path).targetPort", "must be a port number or name")
                }
            }
            var proto = ""
            if let ap = string(p.child("appProtocol"), "\(path).appProtocol") {
                switch ap {
                case "kubernetes.io/h2c": proto = "HTTP2"
                case "kubernetes.io/ws": proto = "HTTP"
                case "kubernetes.io/wss": proto = "HTTPS"
                default:
                    // Istio parses appProtocol as it parses a port name.
                    let parsed = PortProtocol(ServicePort(number: num, name: ap, protocolName: "", targetPort: nil))
                    proto = parsed == .sniff ? "" : parsed.rawValue
                }
            }
            ports.append(ServicePort(number: num, name: portName, protocolName: proto, targetPort: target))
        }
        if type == "ExternalName" {
            guard let ext = string(spec.child("externalName"), "spec.externalName"), !ext.isEmpty else {
                err(spec, "spec.externalName", "Required value for type ExternalName")
                return nil
            }
            return ServiceEntrySpec(name: name, namespace: namespace, hosts: [host], ports: ports, resolution: "DNS",
                                    endpoints: [Endpoint(address: ext)], workloadSelector: nil, file: file, line: line)
        }
        if let x = spec.child("externalName") { notApplied(x, "spec.externalName", "used only by type ExternalName") }
        let selector = spec.child("selector").map { labels($0, "spec.selector") }
        if selector == nil || selector?.isEmpty == true {
            notApplied(spec, "spec.selector", "a Service without a selector takes its endpoints from Endpoints/EndpointSlice objects, which Moonlet does not read: it has no endpoints (use a ServiceEntry with endpoints)")
        }
        return ServiceEntrySpec(name: name, namespace: namespace, hosts: [host], addresses: addresses, ports: ports, resolution: "STATIC",
                                endpoints: [], workloadSelector: selector?.isEmpty == false ? selector : nil, file: file, line: line)
    }

    /// Kubernetes' DNS-1035 label: what a Service name must be (a DNS-1123 label that
    /// starts with a letter).
    static func isDNS1035Label(_ s: String) -> Bool {
        guard let f = s.utf8.first, f >= UInt8(ascii: "a"), f <= UInt8(ascii: "z") else { return false }
        return isDNS1123Label(s)
    }
}
