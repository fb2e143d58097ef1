/// A workload as Istio's metric labels name it: this sidecar's own, or a peer's learned
/// through metadata exchange (`x-envoy-peer-metadata`). Immutable; made at startup (own)
/// or once per distinct peer header value (peers), never per request.
public final class MeshWorkload: @unchecked Sendable {
    /// Istio's WORKLOAD_NAME (the Deployment and the like).
    public let workload: String
    public let namespace: String
    /// The `app` label, else the canonical service ("" when neither).
    public let app: String
    /// The `version` label, else the canonical revision ("" when neither).
    public let version: String
    /// Istio's canonical service: `service.istio.io/canonical-name`, else `app`, else the workload.
    public let canonicalService: String
    /// Istio's canonical revision: `service.istio.io/canonical-revision`, else `version`, else "latest".
    public let canonicalRevision: String
    /// Istio's CLUSTER_ID.
    public let cluster: String
    public let serviceAccount: String
    /// A number the per-loop caches key label sets by: distinct for every distinct
    /// workload a loop has seen (0 is "no peer known").
    public let serial: Int

    public init(workload: String, namespace: String, labels: [String: String], cluster: String, serviceAccount: String, serial: Int) {
        self.workload = workload
        self.namespace = namespace
        let canonName = labels["service.istio.io/canonical-name"]
        let canonRev = labels["service.istio.io/canonical-revision"]
        app = labels["app"] ?? canonName ?? ""
        version = labels["version"] ?? canonRev ?? ""
        canonicalService = canonName ?? labels["app"] ?? (workload.isEmpty ? "unknown" : workload)
        canonicalRevision = canonRev ?? labels["version"] ?? "latest"
        self.cluster = cluster
        self.serviceAccount = serviceAccount
        self.serial = serial
    }

    /// Istio's default workload name: the `app` label, else the service account.
    public static func defaultName(labels: [String: String], serviceAccount: String) -> String {
        labels["app"] ?? serviceAccount
    }
}
