/// Per-sidecar scoping of a pushed resource set (`moonlet pilot`), as Istio's control
/// plane narrows what each proxy receives with the `Sidecar` resource.
///
/// The set's YAML is decoded once per validated version, one document piece at a time
/// (the pieces the loader cuts files into). For one workload, the Sidecar that selects
/// it (`SidecarScope.select`, Istio's choice) decides: without one (or without `egress`)
/// the workload gets everything; with one, it gets
/// - the ServiceEntries with a host the egress imports, and those that select the
///   workload itself (its inbound side: the ports it serves),
/// - the VirtualServices with an imported host, the DestinationRules of imported hosts
///   and of the hosts those VirtualServices route to,
/// - the WorkloadEntries a kept ServiceEntry selects,
/// - its own Sidecar, and the other resources (security policies, Telemetry, plugins)
///   of its namespace and of the root namespace: the ones that can apply to it,
/// - every file that is not YAML (Lua), whole.
/// A piece that is not one of these resources is kept. What the sidecar then loads is
/// narrowed again by the same rules (`SidecarScope.filter`), host by host.
public final class PushScopeIndex: @unchecked Sendable {
    struct Piece {
        let text: String
        let r: ConfigLoader.TextResult
    }
    struct File {
        let path: String
        let content: String
        /// nil: not YAML (kept whole).
        let pieces: [Piece]?
    }
    let files: [File]
    let sidecars: [SidecarSpec]
    /// Kinds kept or left by the hosts they name (or, Sidecar, by the selection).
    static let hostScopedKinds: Set<String> = ["ServiceEntry", "VirtualService", "DestinationRule", "WorkloadEntry", "Sidecar"]

    /// Decodes `files` (path, content) of a validated set.
    public init(files: [(path: String, content: String)]) {
        let loader = ConfigLoader()
        var out: [File] = []
        var sidecars: [SidecarSpec] = []
        for f in files {
            let lower = f.path.lowercased()
            guard lower.hasSuffix(".yaml") || lower.hasSuffix(".yml") else { out.append(File(path: f.path, content: f.content, pieces: nil)); continue }
            var pieces: [Piece] = []
            ConfigLoader.forEachDocumentChunk(f.content) { chunk, offset in
                let r = loader.decodeChunk(chunk, lineOffset: offset, file: f.path, baseDir: "")
                sidecars += r.sidecars
                pieces.append(Piece(text: chunk, r: r))
            }
            out.append(File(path: f.path, content: f.content, pieces: pieces))
        }
        self.files = out
        self.sidecars = sidecars
    }

    /// The files `workload` receives (each YAML file with only its pieces in scope; a
    /// file left empty is left out), or nil when no Sidecar narrows its scope (it gets
    /// the whole set).
    public func files(for workload: WorkloadIdentity) -> [(path: String, content: String)]? {
        var notes: [String] = []
        let chosen = SidecarScope.select(sidecars, workload: workload, notes: &notes)
        let scope = SidecarScope(chosen)
        guard scope.hosts != nil else { return nil }
        let index = SidecarScope.Index(scope)
        let ns = workload.namespace, root = workload.rootNamespace
        func mine(_ namespace: String) -> Bool { namespace == ns || namespace == root || namespace.isEmpty }
        func imported(_ namespace: String, _ hosts: [String]) -> Bool {
            hosts.contains { index.imports(namespace: namespace, host: $0, fqdn: HostName.canonical($0, namespace: namespace)) }
        }
        func servesWorkload(_ s: ServiceEntrySpec) -> Bool {
            guard s.namespace == ns else { return false }
            if let sel = s.workloadSelector { return sel.allSatisfy { workload.labels[$0.key] == $0.value } }
            return s.endpoints.contains { e in !e.labels.isEmpty && e.labels.allSatisfy { workload.labels[$0.key] == $0.value } }
        }
        // First pass: the ServiceEntries and VirtualServices kept, and the hosts they name.
        var keptSE: [ServiceEntrySpec] = []
        var drHosts = Set<String>()
        for f in files { for p in f.pieces ?? [] {
            for s in p.r.serviceEntries where imported(s.namespace, s.hosts) || servesWorkload(s) {
                keptSE.append(s)
                for h in s.hosts { drHosts.insert(HostName.canonical(h, namespace: s.namespace)) }
            }
            for v in p.r.virtualServices where imported(v.namespace, v.hosts) {
                for r in v.http { for d in r.destinations { drHosts.insert(d.fqdn) }; for m in r.mirrors { drHosts.insert(m.fqdn) } }
                for r in v.tcp + v.tls { for d in r.destinations { drHosts.insert(d.fqdn) } }
            }
        } }
        func keep(_ r: ConfigLoader.TextResult) -> Bool {
            // The other resources: those of kinds not scoped by hosts (the traffic kinds
            // are listed in `istio` too).
            let others = r.istio.filter { !Self.hostScopedKinds.contains($0.kind) }
            let kinds = r.serviceEntries.count + r.virtualServices.count + r.destinationRules.count + r.workloadEntries.count
                + r.sidecars.count + r.plugins.count + others.count + r.security.count
            if kinds == 0 { return true }
            if r.serviceEntries.contains(where: { imported($0.namespace, $0.hosts) || servesWorkload($0) }) { return true }
            if r.virtualServices.contains(where: { imported($0.namespace, $0.hosts) }) { return true }
            if r.destinationRules.contains(where: { drHosts.contains($0.fqdn) || index.imports(namespace: $0.namespace, host: $0.host, fqdn: $0.fqdn) }) { return true }
            if r.workloadEntries.contains(where: { w in
                keptSE.contains { s in s.namespace == w.namespace && (s.workloadSelector.map { sel in sel.allSatisfy { w.endpoint.labels[$0.key] == $0.value } } ?? false) }
            }) { return true }
            if let c = chosen, r.sidecars.contains(where: { $0.namespace == c.namespace && $0.name == c.name }) { return true }
            if r.plugins.contains(where: { mine($0.namespace) }) { return true }
            if others.contains(where: { mine($0.namespace) }) || r.security.contains(where: { mine($0.namespace) }) { return true }
            return false
        }
        var out: [(path: String, content: String)] = []
        for f in files {
            guard let pieces = f.pieces else { out.append((f.path, f.content)); continue }
            let kept = pieces.filter { keep($0.r) }
            if kept.count == pieces.count { out.append((f.path, f.content)); continue }
            if kept.isEmpty { continue }
            // Each piece starts with its `---` line (but the first): joined as they were.
            var text = ""
            for p in kept {
                if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
                if !text.isEmpty && !p.text.hasPrefix("---") { text += "---\n" }
                text += p.text
            }
            out.append((f.path, text))
        }
        return out
    }
}
