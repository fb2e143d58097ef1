import Foundation
import Yams

/// What the injector puts in a pod: image, where the CA and config are, the ports.
/// Defaults match `moonlet run`'s defaults and deploy/kubernetes.
public struct InjectionSettings: Equatable, Sendable {
    /// Image of both injected containers (overridable per pod with `sidecar.istio.io/proxyImage`).
    public var image = "moonlet:latest"
    /// `CA_ADDR` of the sidecar: the in-cluster `moonlet ca serve`.
    public var caAddress = "moonlet-ca.istio-system.svc:15012"
    /// ConfigMap with the mesh's Istio YAML, mounted at `configPath` (optional: absent means an empty config).
    public var configMap = "moonlet-config"
    /// Revision written in `sidecar.istio.io/status`.
    public var revision = "default"
    /// `MOONLET_PILOT` of the sidecar (`moonlet pilot`, host:port); nil: the sidecar reads
    /// only the ConfigMap.
    public var pilotAddress: String? = nil
    /// The sidecar's outbound listener (`moonlet run --outbound-port`, iptables `--envoy-port`).
    public var outboundPort = 15001
    /// The sidecar's inbound listener (`--inbound-port`, iptables `--inbound-capture-port`).
    public var inboundPort = 15006
    /// Prometheus port (`--prometheus-port`), scraped at /stats/prometheus.
    public var prometheusPort = 15090
    /// Health port (`--health-port`) with /healthz/ready.
    public var healthPort = 15021
    /// The proxy's UID and GID (traffic from it is never captured).
    public var proxyUID = 1337

    /// Where the config ConfigMap is mounted.
    public static let configPath = "/etc/moonlet/config"
    /// Where the workload certificate is written (Istio's path for workload credentials).
    public static let certsPath = "/var/run/secrets/workload-spiffe-credentials"
    /// Where the CA bootstrap token Secret is mounted.
    public static let tokenPath = "/var/run/secrets/moonlet/ca-token"
    /// Where the downward API puts the pod's labels and annotations (Istio's path).
    public static let podInfoPath = "/etc/istio/pod"

    /// The defaults.
    public init() {}
}

/// Why a pod was left as it was.
public enum InjectionSkip: Equatable, Sendable {
    /// `sidecar.istio.io/inject: "false"` (annotation or label).
    case optedOut
    /// It already has `sidecar.istio.io/status` or an `istio-proxy` container.
    case alreadyInjected
    /// `hostNetwork: true`: capture would take over the node's traffic (Istio skips these too).
    case hostNetwork
}

/// Adds Moonlet's sidecar (`istio-proxy`) and init container (`istio-init`) to pods, as
/// `istioctl kube-inject` and Istio's injection webhook do.
public struct SidecarInjector: Sendable {
    /// The settings every injected pod gets.
    public var settings: InjectionSettings

    /// An injector with these settings.
    public init(settings: InjectionSettings = InjectionSettings()) { self.settings = settings }

    /// Kinds whose pod template is injected, with the path to that template.
    public static let workloadKinds: [String: [String]] = [
        "Pod": [],
        "Deployment": ["spec", "template"],
        "StatefulSet": ["spec", "template"],
        "DaemonSet": ["spec", "template"],
        "ReplicaSet": ["spec", "template"],
        "ReplicationController": ["spec", "template"],
        "Job": ["spec", "template"],
        "CronJob": ["spec", "jobTemplate", "spec", "template"],
    ]

    // MARK: Multi-document YAML

    /// Injects every workload in a multi-document YAML stream. Documents that are not
    /// workloads, or whose pods are skipped, come out byte for byte as they came in.
    public func injectYAML(_ text: String) throws -> String {
        var out: [String] = []
        for doc in Self.splitDocuments(text) {
            if let node = try? Yams.compose(yaml: doc), var injected = Optional(node), try injectWorkload(&injected) {
                out.append(try Self.emit(injected))
            } else {
                out.append(doc.hasSuffix("\n") ? doc : doc + "\n")
            }
        }
        return out.joined(separator: "---\n")
    }

    /// The documents of a YAML stream as text, split at `---` lines (leading blank chunks dropped).
    static func splitDocuments(_ text: String) -> [String] {
        var docs: [String] = []
        var cur = ""
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            let l = line.hasSuffix("\r") ? line.dropLast() : line
            if l == "---" || l.hasPrefix("--- ") || l.hasPrefix("---\t") || l == "..." {
                docs.append(cur); cur = ""
                let rest = l.dropFirst(3).trimmingCharacters(in: .whitespaces)
                if l != "...", !rest.isEmpty, !rest.hasPrefix("#") { cur = rest + "\n" }
                continue
            }
            cur += line + "\n"
        }
        if text.hasSuffix("\n"), cur.hasSuffix("\n\n") || cur == "\n" { cur.removeLast() }
        docs.append(cur)
        return docs.filter { !$0.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty }
    }

    static func emit(_ node: Node) throws -> String {
        try Yams.serialize(node: node, indent: 2, width: -1, allowUnicode: true)
    }

    /// Injects the pod template of one object (any of `workloadKinds`, or each item of a
    /// `List`). Returns whether it changed.
    public func injectWorkload(_ object: inout Node) throws -> Bool {
        if object[key: "kind"]?.string == "List", let items = object[key: "items"]?.sequence {
            // `kubectl get -o yaml` output: each item in turn.
            var changed = false
            var out: [Node] = []
            for var item in items {
                if try injectWorkload(&item) { changed = true }
                out.append(item)
            }
            if changed { object[key: "items"] = seq(out) }
            return changed
        }
        guard let kind = object[key: "kind"]?.string, let path = Self.workloadKinds[kind] else { return false }
        guard var pod = object[path: path], pod.mapping != nil else { return false }
        var name = object[path: ["metadata", "name"]]?.string ?? ""
        if kind == "Pod" { name = Self.workloadName(ofPod: pod) }
        if kind == "CronJob" || kind == "Job" { name = object[path: ["metadata", "name"]]?.string ?? name }
        guard case .injected = try injectPod(&pod, workloadName: name) else { return false }
        object[path: path] = pod
        return true
    }

    /// The result of injecting one pod.
    public enum Outcome: Equatable {
        /// The pod was changed.
        case injected
        /// The pod was left alone, and why.
        case skipped(InjectionSkip)
    }

    /// A pod's workload name as Istio derives it: the `app` label's owner is not known, so
    /// the name, else `generateName` without its trailing dash and ReplicaSet hash.
    public static func workloadName(ofPod pod: Node) -> String {
        if let n = pod[path: ["metadata", "name"]]?.string, !n.isEmpty { return n }
        var g = pod[path: ["metadata", "generateName"]]?.string ?? ""
        while g.hasSuffix("-") { g.removeLast() }
        if let hash = pod[path: ["metadata", "labels", "pod-template-hash"]]?.string, g.hasSuffix("-" + hash) {
            g.removeLast(hash.count + 1)
        }
        return g
    }

    // MARK: One pod

    /// Injects one pod (a Pod object or a pod template: `metadata` + `spec`).
    public func injectPod(_ pod: inout Node, workloadName: String) throws -> Outcome {
        let annotations = pod[path: ["metadata", "annotations"]]
        let labels = pod[path: ["metadata", "labels"]]
        func flag(_ n: Node?, _ key: String) -> String? { n?[key: key].map { $0.string ?? $0.scalar?.string ?? "" } }
        for v in [flag(annotations, "sidecar.istio.io/inject"), flag(labels, "sidecar.istio.io/inject")] {
            if let v, ["false", "n", "no", "off"].contains(v.lowercased()) { return .skipped(.optedOut) }
        }
        if flag(annotations, "sidecar.istio.io/status") != nil { return .skipped(.alreadyInjected) }
        let containers = pod[path: ["spec", "containers"]]?.sequence.map(Array.init) ?? []
        if containers.contains(where: { $0[key: "name"]?.string == "istio-proxy" }) { return .skipped(.alreadyInjected) }
        if pod[path: ["spec", "hostNetwork"]]?.bool == true { return .skipped(.hostNetwork) }

        let s = settings
        let annotation = { (k: String) in flag(annotations, k) }
        let image = annotation("sidecar.istio.io/proxyImage") ?? s.image

        // Labels Istio adds.
        var labelMap = labels?.mapping ?? Node.Mapping([])
        let canonicalName = labelMap["service.istio.io/canonical-name"]?.string ?? labelMap["app.kubernetes.io/name"]?.string
            ?? labelMap["app"]?.string ?? workloadName
        let canonicalRevision = labelMap["service.istio.io/canonical-revision"]?.string ?? labelMap["app.kubernetes.io/version"]?.string
            ?? labelMap["version"]?.string ?? "latest"
        let appLabels = labelMap.map { ($0.key.string ?? "", $0.value.string ?? $0.value.scalar?.string ?? "") }
        if labelMap["security.istio.io/tlsMode"] == nil { labelMap["security.istio.io/tlsMode"] = str("istio") }
        if labelMap["service.istio.io/canonical-name"] == nil { labelMap["service.istio.io/canonical-name"] = str(canonicalName) }
        if labelMap["service.istio.io/canonical-revision"] == nil { labelMap["service.istio.io/canonical-revision"] = str(canonicalRevision) }
        pod[path: ["metadata", "labels"]] = .mapping(labelMap)

        // The init container's capture flags, from the traffic.sidecar.istio.io annotations.
        let statusPorts = "\(s.prometheusPort),\(s.healthPort)"
        let excludeInbound = [statusPorts, annotation("traffic.sidecar.istio.io/excludeInboundPorts") ?? ""].filter { !$0.isEmpty }.joined(separator: ",")
        var initArgs = ["iptables",
                        "--envoy-port", "\(s.outboundPort)",
                        "--inbound-capture-port", "\(s.inboundPort)",
                        "--proxy-uid", "\(s.proxyUID)",
                        "--istio-inbound-interception-mode", annotation("sidecar.istio.io/interceptionMode") ?? "REDIRECT",
                        "--istio-service-cidr", annotation("traffic.sidecar.istio.io/includeOutboundIPRanges") ?? "*",
                        "--istio-service-exclude-cidr", annotation("traffic.sidecar.istio.io/excludeOutboundIPRanges") ?? "",
                        "--istio-inbound-ports", annotation("traffic.sidecar.istio.io/includeInboundPorts") ?? "*",
                        "--istio-local-exclude-ports", excludeInbound]
        if let v = annotation("traffic.sidecar.istio.io/excludeOutboundPorts"), !v.isEmpty { initArgs += ["--istio-local-outbound-ports-exclude", v] }
        if let v = annotation("traffic.sidecar.istio.io/includeOutboundPorts"), !v.isEmpty { initArgs += ["--istio-outbound-ports", v] }
        if let v = annotation("traffic.sidecar.istio.io/kubevirtInterfaces"), !v.isEmpty { initArgs += ["--kube-virt-interfaces", v] }
        if let v = annotation("traffic.sidecar.istio.io/excludeInterfaces"), !v.isEmpty { initArgs += ["--istio-exclude-interfaces", v] }

        let resources = map([
            ("limits", map([("cpu", str(annotation("sidecar.istio.io/proxyCPULimit") ?? "2000m")),
                            ("memory", str(annotation("sidecar.istio.io/proxyMemoryLimit") ?? "1024Mi"))])),
            ("requests", map([("cpu", str(annotation("sidecar.istio.io/proxyCPU") ?? "100m")),
                              ("memory", str(annotation("sidecar.istio.io/proxyMemory") ?? "128Mi"))])),
        ])
        let initContainer = map([
            ("name", str("istio-init")),
            ("image", str(image)),
            ("imagePullPolicy", str("IfNotPresent")),
            ("command", seq([str("moonlet")])),
            ("args", seq(initArgs.map(str))),
            ("resources", resources),
            ("securityContext", map([
                ("allowPrivilegeEscalation", bool(false)),
                ("capabilities", map([("add", seq([str("NET_ADMIN"), str("NET_RAW")])), ("drop", seq([str("ALL")]))])),
                ("privileged", bool(false)),
                ("readOnlyRootFilesystem", bool(false)),
                ("runAsGroup", int(0)),
                ("runAsNonRoot", bool(false)),
                ("runAsUser", int(0)),
            ])),
        ])

        let firstApp = containers.first
        let appPort = firstApp?[key: "ports"]?.sequence?.first?[key: "containerPort"]?.int
        func fieldRef(_ name: String, _ path: String) -> Node {
            map([("name", str(name)), ("valueFrom", map([("fieldRef", map([("apiVersion", str("v1")), ("fieldPath", str(path))]))]))])
        }
        func env(_ name: String, _ value: String) -> Node { map([("name", str(name)), ("value", str(value))]) }
        var envs = [
            fieldRef("POD_NAME", "metadata.name"),
            fieldRef("POD_NAMESPACE", "metadata.namespace"),
            fieldRef("INSTANCE_IP", "status.podIP"),
            fieldRef("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            fieldRef("HOST_IP", "status.hostIP"),
            env("ISTIO_META_WORKLOAD_NAME", workloadName),
            env("MOONLET_LABELS", appLabels.filter { !$0.0.isEmpty }.map { "\($0.0)=\($0.1)" }.joined(separator: ",")),
            env("MOONLET_BIND", "0.0.0.0"),
            // How the init container's rules deliver inbound connections (the sidecar reads
            // the original destination accordingly).
            env("INBOUND_INTERCEPTION_MODE", annotation("sidecar.istio.io/interceptionMode") ?? "REDIRECT"),
            env("MOONLET_INBOUND_PORT", "\(s.inboundPort)"),
            env("MOONLET_OUTBOUND_PORT", "\(s.outboundPort)"),
            env("MOONLET_PROMETHEUS_PORT", "\(s.prometheusPort)"),
            env("MOONLET_HEALTH_PORT", "\(s.healthPort)"),
            env("MOONLET_CONFIG", InjectionSettings.configPath),
            env("MOONLET_CERTS", InjectionSettings.certsPath),
            env("CA_ADDR", s.caAddress),
            env("MOONLET_CA_TOKEN_FILE", InjectionSettings.tokenPath + "/token"),
        ]
        if let appPort { envs.append(env("MOONLET_APP_PORT", "\(appPort)")) }
        if let pilot = s.pilotAddress { envs.append(env("MOONLET_PILOT", pilot)) }
        func mount(_ name: String, _ path: String, readOnly: Bool = false, subPath: String? = nil) -> Node {
            var pairs: [(String, Node)] = [("name", str(name)), ("mountPath", str(path))]
            if readOnly { pairs.append(("readOnly", bool(true))) }
            if let subPath { pairs.append(("subPath", str(subPath))) }
            return map(pairs)
        }
        let tproxy = annotation("sidecar.istio.io/interceptionMode") == "TPROXY"
        let proxy = map([
            ("name", str("istio-proxy")),
            ("image", str(image)),
            ("imagePullPolicy", str("IfNotPresent")),
            ("command", seq([str("moonlet")])),
            ("args", seq([str("run")])),
            ("env", seq(envs)),
            ("ports", seq([
                map([("containerPort", int(s.prometheusPort)), ("name", str("http-envoy-prom")), ("protocol", str("TCP"))]),
                map([("containerPort", int(s.healthPort)), ("name", str("http-health")), ("protocol", str("TCP"))]),
            ])),
            ("readinessProbe", map([
                ("httpGet", map([("path", str("/healthz/ready")), ("port", int(s.healthPort))])),
                ("initialDelaySeconds", int(1)), ("periodSeconds", int(2)), ("timeoutSeconds", int(3)), ("failureThreshold", int(30)),
            ])),
            ("resources", resources),
            // TPROXY: the inbound listener is IP_TRANSPARENT, which needs NET_ADMIN; as
            // Istio's template does, the proxy then runs as root with group 1337 (its
            // traffic is exempt from capture by the gid rule) and only NET_ADMIN added.
            ("securityContext", tproxy ? map([
                ("allowPrivilegeEscalation", bool(false)),
                ("capabilities", map([("add", seq([str("NET_ADMIN")])), ("drop", seq([str("ALL")]))])),
                ("privileged", bool(false)),
                ("readOnlyRootFilesystem", bool(true)),
                ("runAsGroup", int(s.proxyUID)),
                ("runAsNonRoot", bool(false)),
                ("runAsUser", int(0)),
            ]) : map([
                ("allowPrivilegeEscalation", bool(false)),
                ("capabilities", map([("drop", seq([str("ALL")]))])),
                ("privileged", bool(false)),
                ("readOnlyRootFilesystem", bool(true)),
                ("runAsGroup", int(s.proxyUID)),
                ("runAsNonRoot", bool(true)),
                ("runAsUser", int(s.proxyUID)),
            ])),
            ("volumeMounts", seq([
                mount("workload-certs", InjectionSettings.certsPath),
                mount("istio-ca-root-cert", InjectionSettings.certsPath + "/root-cert.pem", readOnly: true, subPath: "root-cert.pem"),
                mount("moonlet-config", InjectionSettings.configPath, readOnly: true),
                mount("moonlet-ca-token", InjectionSettings.tokenPath, readOnly: true),
                mount("istio-podinfo", InjectionSettings.podInfoPath),
            ])),
        ])

        let serviceAccount = pod[path: ["spec", "serviceAccountName"]]?.string ?? pod[path: ["spec", "serviceAccount"]]?.string ?? "default"
        let volumes = [
            map([("name", str("workload-certs")), ("emptyDir", map([("medium", str("Memory"))]))]),
            map([("name", str("istio-ca-root-cert")), ("configMap", map([("name", str("istio-ca-root-cert"))]))]),
            map([("name", str("moonlet-config")), ("configMap", map([("name", str(s.configMap)), ("optional", bool(true))]))]),
            map([("name", str("moonlet-ca-token")), ("secret", map([("secretName", str("moonlet-ca-token-\(serviceAccount)")), ("optional", bool(true))]))]),
            map([("name", str("istio-podinfo")), ("downwardAPI", map([("items", seq([
                map([("path", str("labels")), ("fieldRef", map([("fieldPath", str("metadata.labels"))]))]),
                map([("path", str("annotations")), ("fieldRef", map([("fieldPath", str("metadata.annotations"))]))]),
            ]))]))]),
        ]

        var spec = pod[key: "spec"] ?? map([])
        spec[key: "initContainers"] = seq([initContainer] + (spec[key: "initContainers"]?.sequence.map(Array.init) ?? []))
        spec[key: "containers"] = seq(containers + [proxy])
        spec[key: "volumes"] = seq((spec[key: "volumes"]?.sequence.map(Array.init) ?? []) + volumes)
        pod[key: "spec"] = spec

        // Annotations Istio adds.
        var ann = annotations?.mapping ?? Node.Mapping([])
        if ann["prometheus.io/scrape"] == nil { ann["prometheus.io/scrape"] = str("true") }
        if ann["prometheus.io/port"] == nil { ann["prometheus.io/port"] = str("\(s.prometheusPort)") }
        if ann["prometheus.io/path"] == nil { ann["prometheus.io/path"] = str("/stats/prometheus") }
        if ann["kubectl.kubernetes.io/default-container"] == nil, let n = firstApp?[key: "name"]?.string {
            ann["kubectl.kubernetes.io/default-container"] = str(n)
        }
        let volumeNames = volumes.compactMap { $0[key: "name"]?.string }.map { "\"\($0)\"" }.joined(separator: ",")
        ann["sidecar.istio.io/status"] = str("{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\(volumeNames)],\"imagePullSecrets\":null,\"revision\":\"\(s.revision)\"}")
        pod[path: ["metadata", "annotations"]] = .mapping(ann)
        return .injected
    }
}

// MARK: Node building and access

/// A string scalar that reads back as a string (quoted when plain text would read as a number, bool or null).
func str(_ s: String) -> Node {
    let plain = Node(s)
    if Tag.Name(rawValue: plain.tag.rawValue) == .str, !s.isEmpty { return plain }
    return Node(s, Tag(.str), .doubleQuoted)
}
func int(_ i: Int) -> Node { Node(String(i)) }
func bool(_ b: Bool) -> Node { Node(b ? "true" : "false") }
func seq(_ items: [Node]) -> Node { .sequence(Node.Sequence(items)) }
func map(_ pairs: [(String, Node)]) -> Node { .mapping(Node.Mapping(pairs.map { (str($0.0), $0.1) })) }

extension Node {
    /// The value of a mapping key (nil for a missing key or a non-mapping); setting it adds or replaces the key.
    public subscript(key k: String) -> Node? {
        get { mapping?[k] }
        set {
            guard case .mapping(var m) = self else { return }
            m[k] = newValue
            self = .mapping(m)
        }
    }

    /// The value at a path of mapping keys; setting it creates the missing mappings on the way.
    public subscript(path p: [String]) -> Node? {
        get {
            var n: Node? = self
            for k in p { n = n?[key: k] }
            return n
        }
        set {
            guard let first = p.first else { if let newValue { self = newValue }; return }
            var child = self[key: first] ?? Node.mapping(Node.Mapping([]))
            if child.mapping == nil && p.count > 1 { child = .mapping(Node.Mapping([])) }
            child[path: Array(p.dropFirst())] = newValue
            self[key: first] = p.count == 1 ? newValue : child
        }
    }
}
