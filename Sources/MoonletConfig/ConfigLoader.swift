import Yams
#if canImport(Foundation)
import Foundation
#endif

/// Reads a directory (or files) of YAML, multi-document, into a validated snapshot.
/// Every error of every file is collected; any error rejects the whole load.
public struct ConfigLoader {
    public static let istioKinds: Set<String> = [
        "VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry",
        "PeerAuthentication", "AuthorizationPolicy", "Telemetry", "RequestAuthentication", "Sidecar",
    ]
    public static let unsupportedIstioKinds: Set<String> = [
        "Gateway", "EnvoyFilter", "WorkloadGroup", "WasmPlugin", "ProxyConfig",
    ]
    /// Kinds decoded into typed specs at load (IstioResource keeps their text only).
    static let typedKinds: Set<String> = ["VirtualService", "DestinationRule", "ServiceEntry", "WorkloadEntry", "Sidecar"]
    static let istioGroups = ["networking.istio.io", "security.istio.io", "telemetry.istio.io"]
    static let istioVersions: Set<String> = ["v1alpha3", "v1beta1", "v1", "v1alpha1"]

    public init() {}

    /// The YAML files a path stands for: the file itself, or every *.yaml / *.yml below
    /// a directory (sorted, so load order is stable). Directories named `..*` are skipped:
    /// a mounted Kubernetes ConfigMap keeps its files there (`..2026_01_01_00_00_00.1/`,
    /// `..data`) besides the links to them, and would otherwise be read twice.
    /// Files named `*.cases.yaml` / `*.cases.yml` in a directory are test cases of a
    /// filter (`moonlet filter test`), not configuration: skipped (`testCaseFiles`).
    public static func yamlFiles(at path: String) -> [String] {
        scanDirectory(path).yaml
    }

    /// The filter test-case files (`*.cases.yaml`, `*.cases.yml`) of a directory, which
    /// `yamlFiles` leaves out (the load names each in a note).
    public static func testCaseFiles(at path: String) -> [String] {
        scanDirectory(path).cases
    }

    /// Whether a file name is a filter's test cases (`moonlet filter new` writes
    /// NAME.cases.yaml next to the filter and its LuaPlugin).
    public static func isTestCaseFile(_ name: String) -> Bool {
        name.hasSuffix(".cases.yaml") || name.hasSuffix(".cases.yml")
    }

    static func scanDirectory(_ path: String) -> (yaml: [String], cases: [String]) {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { return ([], []) }
        if !isDir.boolValue { return ([path], []) }
        guard let e = FileManager.default.enumerator(atPath: path) else { return ([], []) }
        var out: [String] = [], cases: [String] = []
        for case let rel as String in e where (rel.hasSuffix(".yaml") || rel.hasSuffix(".yml")) && !rel.split(separator: "/").contains(where: { $0.hasPrefix("..") }) {
            let full = (path as NSString).appendingPathComponent(rel)
            if isTestCaseFile(rel) { cases.append(full) } else { out.append(full) }
        }
        return (out.sorted(), cases.sorted())
    }

    /// Which workloads the "security resource not enforced" check looks at.
    public enum SecurityScope: Sendable {
        /// The sidecar's own workload (`namespace`, `labels`): `moonlet run`.
        case workload
        /// Any workload (a policy may select one elsewhere): `moonlet validate`.
        case anyWorkload
    }

    /// Kinds that protect a workload and that Moonlet does not enforce yet. Loading one that
    /// selects the workload is an error (fail closed): an Istio user who reads "valid" would
    /// otherwise believe the workload is protected.
    /// (AuthorizationPolicy and RequestAuthentication are enforced by the builtin istio-authz
    /// and istio-authn filters, CUSTOM included: an unknown provider fails closed there.)
    public static let unenforcedSecurityKinds: Set<String> = []

    /// Loads every YAML file under `paths`. `version` labels the snapshot.
    /// `rootNamespace` is the mesh config's (policies there apply mesh-wide).
    /// With a `cache` (kept by the caller between loads, one load at a time), documents
    /// whose text did not change since the last load are not parsed nor decoded again:
    /// their decoded resources are shared with the previous snapshot.
    /// With `securityScope` `.workload`, the Sidecar resource that selects the workload
    /// narrows the services, VirtualServices and DestinationRules loaded to those its
    /// egress hosts import (`snapshot.routes.scope`); `.anyWorkload` loads everything.
    public func load(paths: [String], version: Int = 1, namespace: String = "default", labels: [String: String] = [:],
                     rootNamespace: String = "istio-system", securityScope: SecurityScope = .workload,
                     cache: ConfigCache? = nil, sources: [ConfigLoader.Source] = []) -> Result<ConfigSnapshot, ConfigErrors> {
        var errors: [ConfigError] = []
        var all = TextResult()
        var files: [String] = []
        var seenFiles = Set<String>()
        let workload = WorkloadIdentity(namespace: namespace, labels: labels, rootNamespace: rootNamespace)
        cache?.beginLoad()
        var texts: [(name: String, source: ConfigLoader.Source?)] = []
        for root in paths {
            let (list, testCases) = Self.scanDirectory(root)
            if list.isEmpty && !FileManager.default.fileExists(atPath: root) {
                errors.append(ConfigError(file: root, line: 0, column: 0, message: "no such file or directory"))
            }
            for f in testCases {
                all.skipped.append("\(f): skipped: a filter's test cases (moonlet filter test), not configuration")
            }
            for file in list {
                files.append(file)
                texts.append((file, nil))
            }
        }
        for src in sources { texts.append((name: src.name, source: src)) }
        do {
            // Files are read one at a time (a large mesh's text is not held whole).
            for (name, pushed) in texts {
                let file = name
                seenFiles.insert(file)
                let src: ConfigLoader.Source
                var stamp: FileStamp?
                let r: TextResult
                if let pushed { src = pushed } else {
                    // A file unchanged since the last load is not read again.
                    if let kept = cache?.unchanged(file) {
                        r = kept
                        Self.checkSecurity(r, scope: securityScope, workload: workload, errors: &errors)
                        all.append(r)
                        continue
                    }
                    stamp = cache == nil ? nil : FileStamp(path: file)
                    guard let data = FileManager.default.contents(atPath: file), let text = String(data: data, encoding: .utf8) else {
                        errors.append(ConfigError(file: file, line: 0, column: 0, message: "cannot read file as UTF-8"))
                        continue
                    }
                    src = ConfigLoader.Source(name: file, text: text, baseDir: (file as NSString).deletingLastPathComponent)
                }
                cache?.filesReadLastLoad += 1
                r = loadText(src.text, file: file, baseDir: src.baseDir, cache: cache)
                cache?.files[file]?.stamp = stamp
                Self.checkSecurity(r, scope: securityScope, workload: workload, errors: &errors)
                all.append(r)
            }
        }
        cache?.keepOnly(seenFiles)
        errors += all.errors
        // The Sidecar of this workload, and what it imports.
        var notes: [String] = []
        var scope = SidecarScope.everything
        if securityScope == .workload {
            scope = SidecarScope(SidecarScope.select(all.sidecars, workload: workload, notes: &notes))
            all = scope.filter(all)
            // What other namespaces keep to themselves (exportTo) is not this sidecar's.
            all.virtualServices.removeAll { !ExportTo.visible($0.exportTo, from: $0.namespace, to: namespace) }
            all.destinationRules.removeAll { !ExportTo.visible($0.exportTo, from: $0.namespace, to: namespace) }
            all.serviceEntries.removeAll { !ExportTo.visible($0.exportTo, from: $0.namespace, to: namespace) }
        }
        let routes = RouteTable.build(vs: all.virtualServices, dr: all.destinationRules, se: all.serviceEntries, we: all.workloadEntries,
                                      localNamespace: namespace, localLabels: labels, errors: &errors, previous: cache?.routes)
        routes.scope = scope
        if !errors.isEmpty { return .failure(ConfigErrors(errors)) }
        cache?.routes = routes
        return .success(ConfigSnapshot(version: version, plugins: all.plugins, istio: all.istio, skipped: all.skipped + notes + routes.warnings,
                                       files: files, routes: routes))
    }

    /// Refuses the security resources of `r` Moonlet does not enforce that select the workload.
    static func checkSecurity(_ r: TextResult, scope securityScope: SecurityScope, workload: WorkloadIdentity, errors: inout [ConfigError]) {
        for sec in r.security where securityScope == .anyWorkload || sec.selects(workload) {
            errors.append(ConfigError(file: sec.file, line: sec.line, column: 1, resource: sec.resource, field: "kind",
                                      message: "\(sec.what ?? sec.kind) is not enforced by this version of Moonlet; refusing it "
                                        + (securityScope == .anyWorkload ? "(a sidecar whose workload it selects will not start)"
                                                                         : "rather than serve the workload unprotected")
                                        + ": remove it, or narrow its selector/namespace so it does not select this workload"))
        }
    }

    /// A YAML text to load: a file's content, or resources pushed to the sidecar (`name`
    /// is what errors and notes name: a path, or "pilot/...").
    public struct Source: Sendable {
        public var name: String
        public var text: String
        /// Where a LuaPlugin's relative `url` is taken from.
        public var baseDir: String
        public init(name: String, text: String, baseDir: String = "") { self.name = name; self.text = text; self.baseDir = baseDir }
    }

    public struct TextResult {
        public var virtualServices: [VirtualServiceSpec] = []
        public var destinationRules: [DestinationRuleSpec] = []
        public var serviceEntries: [ServiceEntrySpec] = []
        public var workloadEntries: [WorkloadEntrySpec] = []
        public var sidecars: [SidecarSpec] = []
        public var plugins: [LuaPluginSpec] = []
        public var istio: [IstioResource] = []
        public var skipped: [String] = []
        public var errors: [ConfigError] = []
        /// Well-formed security resources Moonlet does not enforce (see `unenforcedSecurityKinds`).
        public var security: [UnenforcedSecurityResource] = []

        /// Appends everything `r` holds.
        public mutating func append(_ r: TextResult) {
            virtualServices += r.virtualServices; destinationRules += r.destinationRules
            serviceEntries += r.serviceEntries; workloadEntries += r.workloadEntries; sidecars += r.sidecars
            plugins += r.plugins; istio += r.istio; skipped += r.skipped; errors += r.errors; security += r.security
        }
    }

    /// An AuthorizationPolicy or RequestAuthentication as far as selection goes.
    public struct UnenforcedSecurityResource: Sendable {
        public var kind: String
        public var resource: String
        /// metadata.namespace ("" when unset: taken as the workload's own, so the check fails closed).
        public var namespace: String
        /// spec.selector.matchLabels (nil: every workload of the namespace).
        public var selector: [String: String]?
        public var file: String
        public var line: Int
        /// What is not enforced, for the message (default: the kind).
        public var what: String? = nil

        /// Istio's scope: the root namespace applies mesh-wide, otherwise the policy's
        /// namespace; a selector narrows it to workloads with those labels.
        public func selects(_ w: WorkloadIdentity) -> Bool { w.isSelected(namespace: namespace, matchLabels: selector ?? [:]) }
    }

    static func selectorLabels(_ spec: PositionedNode?) -> [String: String]? {
        guard let m = spec?.child("selector")?.child("matchLabels")?.mapping, !m.isEmpty else { return nil }
        var out: [String: String] = [:]
        for e in m { out[e.key] = e.value.value.stringValue ?? "" }
        return out
    }

    /// Decodes one file's text (all its documents). Each document is parsed and decoded
    /// alone (see `documentChunks`); with a `cache`, a document whose text and place in
    /// the file are those of the last load is taken from it instead (compared byte for
    /// byte with the last load's document at that line: no hashing, and no copy of an
    /// unchanged document's text). A text none of whose documents is known (a first load)
    /// is parsed with one parser for the whole file, then each document is decoded with
    /// its piece (`decodeWhole`).
    public func loadText(_ text: String, file: String, baseDir: String, cache: ConfigCache? = nil) -> TextResult {
        let original = text
        var text = text
        let previous = cache?.files[file]
        var chunks: [ConfigCache.Chunk] = []
        var decoded = 0
        text.withUTF8 { b in
            let ranges = Self.chunkRanges(b)
            chunks.reserveCapacity(ranges.count)
            // The last load's documents by the line they start at.
            var byLine: [Int: Int] = [:]
            if let previous {
                byLine.reserveCapacity(previous.chunks.count)
                for (i, c) in previous.chunks.enumerated() { byLine[c.lineOffset] = i }
            }
            var missing: [Int] = []
            for (k, r) in ranges.enumerated() {
                let piece = UnsafeBufferPointer(rebasing: b[r.bytes])
                if let i = byLine[r.lineOffset], let p = previous?.chunks[i], p.result != nil, Self.sameBytes(p.text, piece) {
                    chunks.append(p)
                    continue
                }
                chunks.append(ConfigCache.Chunk(text: String(decoding: piece, as: UTF8.self), lineOffset: r.lineOffset, result: nil))
                missing.append(k)
            }
            decoded = missing.count
            if missing.isEmpty { return }
            if missing.count == ranges.count && ranges.count > 1, let whole = decodeWhole(original, b, chunks, file: file, baseDir: baseDir) {
                for k in chunks.indices { chunks[k].result = whole[k] }
                return
            }
            for k in missing { chunks[k].result = decodeChunk(chunks[k].text, lineOffset: chunks[k].lineOffset, file: file, baseDir: baseDir) }
        }
        var out = TextResult()
        for c in chunks { if let r = c.result { out.append(r) } }
        if let cache {
            // Plugins (their Lua file may change) and errors are decoded at every load.
            for k in chunks.indices { if let r = chunks[k].result, !r.plugins.isEmpty || !r.errors.isEmpty { chunks[k].result = nil } }
            cache.files[file] = ConfigCache.FileState(chunks: chunks)
            cache.decodedLastLoad += decoded
            if decoded > 0 { cache.filesParsedLastLoad += 1 }
        }
        return out
    }

    /// Whether `text`'s UTF-8 bytes are `piece`.
    static func sameBytes(_ text: String, _ piece: UnsafeBufferPointer<UInt8>) -> Bool {
        var text = text
        return text.withUTF8 { t in
            t.count == piece.count && (t.count == 0 || memcmp(t.baseAddress!, piece.baseAddress!, t.count) == 0)
        }
    }

    /// The byte ranges of `documentChunks`, each with the number of lines before it.
    static func chunkRanges(_ b: UnsafeBufferPointer<UInt8>) -> [(bytes: Range<Int>, lineOffset: Int)] {
        if wholeText(b) != nil { return b.isEmpty ? [] : [(0..<b.count, 0)] }
        var out: [(bytes: Range<Int>, lineOffset: Int)] = []
        var start = 0, startLine = 0
        func cut(_ at: Int, _ atLine: Int) {
            if at > start { out.append((start..<at, startLine)) }
            start = at; startLine = atLine
        }
        scanMarkers(b, cut)
        cut(b.count, Int.max)
        return out
    }

    /// Every document of a file from one parser (a first load: one libyaml parser per
    /// document cost more than the parsing), each decoded with its piece: the result of
    /// `decodeChunk` for every piece, in order. Nil (the caller parses piece by piece)
    /// when the whole text does not parse, or its documents do not map one to one onto
    /// the pieces, or it has anchors (Yams keeps them across documents, a document
    /// parsed alone would not see them).
    func decodeWhole(_ text: String, _ b: UnsafeBufferPointer<UInt8>, _ chunks: [ConfigCache.Chunk], file: String, baseDir: String) -> [TextResult]? {
        if b.contains(UInt8(ascii: "&")) || YAMLReader.containsStandIn(text) { return nil }
        var out = [TextResult](repeating: TextResult(), count: chunks.count)
        var taken = [Bool](repeating: false, count: chunks.count)
        do {
            let parser = try YAMLReader.parser(text)
            var k = 0
            while let d = try parser.nextRoot() {
                // An empty document decodes to nothing; its mark may lie on the next piece.
                if case .scalar = d, PositionedNode(node: d, file: file).value == .null { continue }
                // The piece holding the document's first line (lines are 1-based, a piece's
                // first line is lineOffset + 1).
                let line = d.mark?.line ?? 0
                while k + 1 < chunks.count && chunks[k + 1].lineOffset < line { k += 1 }
                guard chunks[k].lineOffset < line, !taken[k] else { return nil }
                taken[k] = true
                decodeDocument(d, index: 0, piece: chunks[k].text, lineOffset: 0, file: file, baseDir: baseDir, into: &out[k])
            }
        } catch {
            return nil
        }
        return out
    }

    /// `documentChunks` without the list: `body` gets each piece as it is cut.
    static func forEachDocumentChunk(_ text: String, _ body: (String, Int) -> Void) {
        var text = text
        text.withUTF8 { b in
            if let whole = wholeText(b) { body(whole, 0); return }
            var start = 0, startLine = 0
            func cut(_ at: Int, _ atLine: Int) {
                if at > start { body(String(decoding: UnsafeBufferPointer(rebasing: b[start..<at]), as: UTF8.self), startLine) }
                start = at; startLine = atLine
            }
            scanMarkers(b, cut)
            cut(b.count, Int.max)
        }
    }

    /// The whole text when it cannot be cut (directives, line breaks other than LF/CRLF).
    static func wholeText(_ b: UnsafeBufferPointer<UInt8>) -> String? {
        let n = b.count
        var i = 0, lineStart = true
        while i < n {
            let x = b[i]
            if lineStart && x == UInt8(ascii: "%") { return String(decoding: b, as: UTF8.self) }
            lineStart = x == 0x0A
            if x == 0x0D && !(i + 1 < n && b[i + 1] == 0x0A) { return String(decoding: b, as: UTF8.self) }
            if x == 0xC2 && i + 1 < n && b[i + 1] == 0x85 { return String(decoding: b, as: UTF8.self) }
            if x == 0xE2 && i + 2 < n && b[i + 1] == 0x80 && (b[i + 2] == 0xA8 || b[i + 2] == 0xA9) { return String(decoding: b, as: UTF8.self) }
            i += 1
        }
        return nil
    }

    /// Calls `cut(byteOffset, line)` at every place a document piece starts: a `---`
    /// line (the piece starts with it) and the line after a `...` line.
    static func scanMarkers(_ b: UnsafeBufferPointer<UInt8>, _ cut: (Int, Int) -> Void) {
        let n = b.count
        var line = 0, i = 0
        func isEnd(_ j: Int) -> Bool { j >= n || b[j] == 0x20 || b[j] == 0x09 || b[j] == 0x0A || b[j] == 0x0D }
        while i < n {
            let c = b[i]
            let marker = (c == UInt8(ascii: "-") || c == UInt8(ascii: ".")) && i + 2 < n && b[i + 1] == c && b[i + 2] == c && isEnd(i + 3)
            if marker && c == UInt8(ascii: "-") { cut(i, line) }
            var j = i
            while j < n && b[j] != 0x0A { j += 1 }
            i = j + 1; line += 1
            if marker && c == UInt8(ascii: ".") { cut(min(i, n), line) }
        }
    }

    /// The text of a file cut at its document markers (`---` at the start of a line, and
    /// after `...`), each piece with the number of lines before it. YAML forbids a
    /// marker inside any content, so the pieces parse to the file's documents. A file
    /// with directives (`%`) or line breaks other than LF and CRLF is one piece.
    static func documentChunks(_ text: String) -> [(text: String, lineOffset: Int)] {
        var out: [(text: String, lineOffset: Int)] = []
        forEachDocumentChunk(text) { out.append(($0, $1)) }
        return out
    }

    /// Decodes one piece of a file (see `documentChunks`); its first line is line
    /// `lineOffset + 1` of the file.
    func decodeChunk(_ text: String, lineOffset: Int, file: String, baseDir: String) -> TextResult {
        var out = TextResult()
        let docs: [Node]
        do {
            docs = try YAMLReader.documents(text)
        } catch let e as YamlError {
            var ce = Self.yamlError(e, file: file)
            if ce.line > 0 { ce.line += lineOffset }
            out.errors.append(ce)
            return out
        } catch {
            out.errors.append(ConfigError(file: file, line: 0, column: 0, message: "\(error)"))
            return out
        }
        for (docIndex, d) in docs.enumerated() {
            decodeDocument(d, index: docIndex, piece: text, lineOffset: lineOffset, file: file, baseDir: baseDir, into: &out)
        }
        return out
    }

    /// Top-level fields of a resource.
    static let topLevelFields: Set<String> = ["apiVersion", "kind", "metadata", "spec", "status"]

    /// Decodes document `d`, document `index` of `piece` (the text kept for typed kinds),
    /// into `out`; its marks are lines of the file less `lineOffset`.
    func decodeDocument(_ d: Node, index docIndex: Int, piece text: String, lineOffset: Int, file: String, baseDir: String, into out: inout TextResult) {
        let doc = PositionedNode(node: d, file: file, lineOffset: lineOffset)
        if case .scalar = d, doc.value == .null { return }
        guard let top = doc.mapping else {
            out.errors.append(ConfigError(file: file, line: doc.line, column: doc.column, message: "document is not a mapping"))
            return
        }
        // One pass (`continue` ends the document's decoding).
        repeat {
            let kind = doc.child("kind")?.scalarString ?? ""
            let apiVersion = doc.child("apiVersion")?.scalarString ?? ""
            let meta = doc.child("metadata")
            let name = meta?.child("name")?.scalarString ?? ""
            let namespace = meta?.child("namespace")?.scalarString ?? ""
            let resource = "\(kind) \(namespace.isEmpty ? "" : namespace + "/")\(name)"
            func err(_ n: PositionedNode?, _ field: String, _ msg: String) {
                out.errors.append(ConfigError(file: file, line: n?.line ?? doc.line, column: n?.column ?? doc.column,
                                              resource: resource, field: field, message: msg))
            }
            if kind.isEmpty { err(doc, "kind", "missing"); continue }
            if apiVersion.isEmpty { err(doc, "apiVersion", "missing"); continue }
            if name.isEmpty { err(meta ?? doc, "metadata.name", "missing"); continue }
            for entry in top where !Self.topLevelFields.contains(entry.key) {
                out.errors.append(ConfigError(file: file, line: entry.keyLine, column: entry.keyColumn, resource: resource, field: entry.key, message: "unknown field"))
            }
            if kind == "LuaPlugin" || Self.istioKinds.contains(kind) { out.errors += Self.checkMetadata(meta, file: file, resource: resource) }
            let spec = doc.child("spec")
            if kind == "LuaPlugin" {
                guard apiVersion == "moonlet.io/v1alpha1" else { err(doc.child("apiVersion"), "apiVersion", "LuaPlugin needs moonlet.io/v1alpha1, got \(apiVersion)"); continue }
                var notes: [String] = []
                if let p = decodeLuaPlugin(spec, name: name, namespace: namespace, file: file, line: doc.line, baseDir: baseDir, resource: resource,
                                           errors: &out.errors, notes: &notes) {
                    out.plugins.append(p)
                }
                out.skipped += notes
                continue
            }
            if apiVersion == "v1" && kind == "Service" {
                // A Kubernetes Service: a registry entry as Istio's reads it (KubernetesService.swift).
                out.errors += Self.checkMetadata(meta, file: file, resource: resource)
                var d = TrafficDecoder(file: file, resource: resource, namespace: namespace.isEmpty ? "default" : namespace)
                if let v = d.kubernetesService(spec, name: name, nameNode: meta?.child("name"), line: doc.line) { out.serviceEntries.append(v) }
                out.errors += d.errors
                out.skipped += d.notApplied
                continue
            }
            let group = apiVersion.split(separator: "/").first.map(String.init) ?? ""
            let ver = apiVersion.split(separator: "/").dropFirst().first.map(String.init) ?? ""
            if Self.istioGroups.contains(group) {
                guard Self.istioVersions.contains(ver) else { err(doc.child("apiVersion"), "apiVersion", "unsupported version \(ver)"); continue }
                if Self.istioKinds.contains(kind) {
                    guard let spec, spec.mapping != nil else { err(spec ?? doc, "spec", "Required value"); continue }
                    let ns = namespace.isEmpty ? "default" : namespace
                    var d = TrafficDecoder(file: file, resource: resource, namespace: ns)
                    switch kind {
                    case "VirtualService":
                        // Its tcp and tls routes are applied too (L4Routes.swift).
                        if let v = d.virtualService(spec, name: name, line: doc.line) { out.virtualServices.append(v) }
                    case "DestinationRule": if let v = d.destinationRule(spec, name: name, line: doc.line) { out.destinationRules.append(v) }
                    case "ServiceEntry": if let v = d.serviceEntry(spec, name: name, line: doc.line) { out.serviceEntries.append(v) }
                    case "WorkloadEntry": if let v = d.workloadEntry(spec, name: name) { out.workloadEntries.append(v) }
                    case "Sidecar": if let v = d.sidecar(spec, name: name, line: doc.line) { out.sidecars.append(v) }
                    case "PeerAuthentication": d.peerAuthentication(spec)
                    case "AuthorizationPolicy": d.authorizationPolicy(spec)
                    case "RequestAuthentication": d.requestAuthentication(spec)
                    case "Telemetry": d.telemetry(spec)
                    default: break
                    }
                    // AuthorizationPolicy is enforced by the builtin istio-authz filter; CUSTOM
                    // goes to the mesh config's envoyExtAuthzHttp provider it names (or fails
                    // closed, AuthorizationCompiler.compile).
                    out.errors += d.errors
                    out.skipped += d.notApplied
                    var annotations: [String: String] = [:]
                    for e in meta?.child("annotations")?.mapping ?? [] { annotations[e.key] = e.value.scalarString ?? "" }
                    // Kinds decoded into typed specs keep their text, not a tree of values.
                    let typed = Self.typedKinds.contains(kind)
                    out.istio.append(IstioResource(apiVersion: apiVersion, kind: kind, name: name, namespace: namespace,
                                                   spec: typed ? nil : spec.value, source: typed ? text : nil, sourceIndex: docIndex,
                                                   file: file, line: doc.line, annotations: annotations))
                } else {
                    if Self.unenforcedSecurityKinds.contains(kind) {
                        out.security.append(UnenforcedSecurityResource(kind: kind, resource: resource, namespace: namespace,
                                                                       selector: Self.selectorLabels(doc.child("spec")), file: file, line: doc.line))
                    } else {
                        out.skipped.append("\(file):\(doc.line): \(resource): kind not supported, skipped")
                    }
                }
                continue
            }
            out.skipped.append("\(file):\(doc.line): \(resource): \(apiVersion) not handled by moonlet, skipped")
        } while false
    }

    static func yamlError(_ e: YamlError, file: String) -> ConfigError {
        switch e {
        case .scanner(let context, let problem, let mark, _), .parser(let context, let problem, let mark, _):
            let ctx = context.map { "\($0.text) " } ?? ""
            return ConfigError(file: file, line: mark.line, column: mark.column, message: "YAML: \(ctx)\(problem)")
        default:
            return ConfigError(file: file, line: 0, column: 0, message: "YAML: \(e)")
        }
    }

    /// Kubernetes ObjectMeta's fields.
    static let metadataFields: Set<String> = [
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
        "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences", "finalizers", "managedFields",
    ]

    /// `metadata` of a resource Moonlet reads: ObjectMeta's fields only; name and
    /// namespace are strings, labels and annotations maps of strings.
    static func checkMetadata(_ meta: PositionedNode?, file: String, resource: String) -> [ConfigError] {
        guard let meta, let m = meta.mapping else { return [] }
        var errors: [ConfigError] = []
        func err(_ line: Int, _ col: Int, _ field: String, _ msg: String) {
            errors.append(ConfigError(file: file, line: line, column: col, resource: resource, field: field, message: msg))
        }
        for e in m {
            let field = "metadata.\(e.key)"
            if !metadataFields.contains(e.key) { err(e.keyLine, e.keyColumn, field, "unknown field"); continue }
            switch e.key {
            case "name", "namespace":
                if case .scalar = e.value.node {} else { err(e.value.line, e.value.column, field, "must be a string") }
            case "labels", "annotations":
                guard let kv = e.value.mapping else {
                    if e.value.value != .null { err(e.value.line, e.value.column, field, "must be a mapping of strings") }
                    continue
                }
                for x in kv {
                    switch x.value.value {
                    case .string, .null: continue
                    default: err(x.value.line, x.value.column, "\(field).\(x.key)", "must be a string (quote it)")
                    }
                }
            default: break
            }
        }
        return errors
    }

    static let luaPluginFields: Set<String> = ["selector", "url", "phase", "priority", "pluginConfig", "failStrategy", "limits", "match", "variants", "pluginName", "stickyBy", "shadow", "guardrail"]

    func decodeLuaPlugin(_ spec: PositionedNode?, name: String, namespace: String, file: String, line: Int, baseDir: String, resource: String,
                         errors: inout [ConfigError], notes: inout [String]) -> LuaPluginSpec? {
        var ok = true
        func err(_ n: PositionedNode?, _ field: String, _ msg: String, line l: Int? = nil, col c: Int? = nil) {
            ok = false
            errors.append(ConfigError(file: file, line: l ?? n?.line ?? line, column: c ?? n?.column ?? 1, resource: resource, field: field, message: msg))
        }
        guard let spec, let m = spec.mapping else { err(spec, "spec", "missing or not a mapping"); return nil }
        for e in m where !Self.luaPluginFields.contains(e.key) { err(nil, "spec." + e.key, "unknown field", line: e.keyLine, col: e.keyColumn) }
        // A `file://` URL (or a bare path, relative to the YAML file's directory) of a .lua file.
        func luaPath(_ u: PositionedNode, _ field: String) -> String {
            let s = u.scalarString ?? ""
            var path = ""
            if s.hasPrefix("file://") {
                path = String(s.dropFirst(7))
                if !path.hasPrefix("/") { path = (baseDir as NSString).appendingPathComponent(path) }
            } else if !s.isEmpty && !s.contains("://") {
                path = s.hasPrefix("/") ? s : (baseDir as NSString).appendingPathComponent(s)
            } else {
                err(u, field, "expected file:///path/to/filter.lua, got \"\(s)\"")
            }
            if !path.isEmpty && !path.hasSuffix(".lua") { err(u, field, "not a .lua file: \(path)") }
            else if !path.isEmpty && !FileManager.default.fileExists(atPath: path) { err(u, field, "file not found: \(path)") }
            return path
        }
        var path = ""
        if let u = spec.child("url") {
            path = luaPath(u, "spec.url")
            if spec.child("variants") != nil { err(u, "spec.url", "give either spec.url or spec.variants (each variant has its url)") }
        } else if spec.child("variants") == nil { err(spec, "spec.url", "missing") }
        var phase = "UNSPECIFIED_PHASE"
        if let p = spec.child("phase") {
            let s = p.scalarString ?? ""
            if ["AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE"].contains(s) { phase = s } else { err(p, "spec.phase", "must be AUTHN, AUTHZ, STATS or UNSPECIFIED_PHASE, got \"\(s)\"") }
        }
        var priority = 0
        if let p = spec.child("priority") {
            if case .int(let i) = p.value { priority = i } else { err(p, "spec.priority", "must be an integer") }
        }
        var fail = FailStrategy.failClose
        if let f = spec.child("failStrategy") {
            if let s = f.scalarString, let v = FailStrategy(rawValue: s) { fail = v } else { err(f, "spec.failStrategy", "must be FAIL_CLOSE, FAIL_OPEN or FAIL_RELOAD") }
        }
        var labels: [String: String] = [:]
        if let sel = spec.child("selector") {
            if sel.mapping == nil { err(sel, "spec.selector", "must be a mapping") }
            for e in sel.mapping ?? [] where e.key != "matchLabels" { err(nil, "spec.selector." + e.key, "unknown field", line: e.keyLine, col: e.keyColumn) }
            if let ml = sel.child("matchLabels") {
                guard let mm = ml.mapping else { err(ml, "spec.selector.matchLabels", "must be a mapping"); return nil }
                for e in mm {
                    switch e.value.value {
                    case .string(let v): labels[e.key] = v
                    case .null: labels[e.key] = ""
                    default: err(e.value, "spec.selector.matchLabels.\(e.key)", "must be a string (quote it)")
                    }
                }
            }
        }
        if let l = spec.child("limits"), l.mapping == nil { err(l, "spec.limits", "must be a mapping") }
        // pluginName and match (WasmPlugin's traffic selectors): checked with the Istio
        // decoder's helpers, then refused: Moonlet does not apply them yet, and a plugin
        // that ran on more traffic (match) than its resource says would be silently wrong.
        var d = TrafficDecoder(file: file, resource: resource, namespace: namespace)
        if let n = spec.child("pluginName"), d.string(n, "spec.pluginName") != nil {
            d.err(n, "spec.pluginName", "not supported: a Lua module is one filter (remove the field)")
        }
        for (i, sel) in d.list(spec.child("match"), "spec.match").enumerated() where d.fields(sel, "spec.match[\(i)]", ["mode", "ports"]) {
            _ = d.enumValue(sel.child("mode"), "spec.match[\(i)].mode", ["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"])
            for (k, port) in d.list(sel.child("ports"), "spec.match[\(i)].ports").enumerated() where d.fields(port, "spec.match[\(i)].ports[\(k)]", ["number"]) {
                _ = d.int(port.child("number"), "spec.match[\(i)].ports[\(k)].number", range: 1...65535)
            }
        }
        if let m = spec.child("match"), d.errors.isEmpty { d.err(m, "spec.match", "not supported yet: the plugin would run on all traffic of the workload (remove the field, or select the workload with spec.selector)") }
        // Experiments (docs/configuration.md "A/B experiments"): variants, stickyBy, shadow, guardrail.
        var variants: [LuaPluginVariant] = []
        var names = Set<String>()
        let basePluginConfig = spec.child("pluginConfig")?.value ?? .map([])
        for (i, v) in d.list(spec.child("variants"), "spec.variants").enumerated() where d.fields(v, "spec.variants[\(i)]", ["name", "url", "weight", "pluginConfig"]) {
            let vname = d.string(v.child("name"), "spec.variants[\(i)].name") ?? ""
            if v.child("name") == nil { d.err(v, "spec.variants[\(i)].name", "missing") }
            else if !vname.isEmpty && !names.insert(vname).inserted { d.err(v.child("name"), "spec.variants[\(i)].name", "duplicate variant name \"\(vname)\"") }
            var vpath = ""
            if let u = v.child("url") { vpath = luaPath(u, "spec.variants[\(i)].url") } else { d.err(v, "spec.variants[\(i)].url", "missing") }
            let w = d.int(v.child("weight"), "spec.variants[\(i)].weight", range: 0...100) ?? 0
            if v.child("weight") == nil { d.err(v, "spec.variants[\(i)].weight", "missing") }
            variants.append(LuaPluginVariant(name: vname, path: vpath, weight: w, pluginConfig: v.child("pluginConfig")?.value ?? basePluginConfig))
        }
        if let vn = spec.child("variants"), d.errors.isEmpty {
            let total = variants.reduce(0) { $0 + $1.weight }
            if variants.isEmpty { d.err(vn, "spec.variants", "must list at least one variant") }
            else if total != 100 { d.err(vn, "spec.variants", "weights must sum to 100, got \(total)") }
        }
        var sticky = StickyKey.random
        if let sb = spec.child("stickyBy") {
            if let s = d.string(sb, "spec.stickyBy") {
                if let k = StickyKey(s) { sticky = k } else { d.err(sb, "spec.stickyBy", "must be header:NAME, cookie:NAME, principal, source-ip or random, got \"\(s)\"") }
            }
            if spec.child("variants") == nil { d.err(sb, "spec.stickyBy", "only applies with spec.variants") }
        }
        var shadow: LuaPluginShadow?
        if let sh = spec.child("shadow"), d.fields(sh, "spec.shadow", ["url", "pluginConfig"]) {
            if let u = sh.child("url") {
                shadow = LuaPluginShadow(path: luaPath(u, "spec.shadow.url"), pluginConfig: sh.child("pluginConfig")?.value ?? basePluginConfig)
            } else { d.err(sh, "spec.shadow.url", "missing") }
        }
        var guardrail: LuaPluginGuardrail?
        if let g = spec.child("guardrail"), d.fields(g, "spec.guardrail", ["metric", "maxIncrease", "minRequests", "action"]) {
            var gr = LuaPluginGuardrail()
            if let m = d.enumValue(g.child("metric"), "spec.guardrail.metric", ["error_rate"]) { gr.metric = m }
            if let x = d.number(g.child("maxIncrease"), "spec.guardrail.maxIncrease", range: 0...1) { gr.maxIncrease = x }
            if let n = d.int(g.child("minRequests"), "spec.guardrail.minRequests", range: 1...Int(Int32.max)) { gr.minRequests = n }
            if let a = d.enumValue(g.child("action"), "spec.guardrail.action", ["rollback"]) { gr.action = a }
            if variants.count < 2 { d.err(g, "spec.guardrail", "needs spec.variants with a control and at least one candidate") }
            guardrail = gr
        }
        if !d.errors.isEmpty { ok = false; errors += d.errors }
        notes += d.notApplied
        var maxInstr: Int?, maxMem: Int?, timeout: Int?
        if let l = spec.child("limits") {
            for e in l.mapping ?? [] {
                guard ["maxInstructions", "maxMemoryBytes", "timeoutMs"].contains(e.key) else {
                    err(nil, "spec.limits." + e.key, "unknown field", line: e.keyLine, col: e.keyColumn); continue
                }
                guard case .int(let v) = e.value.value, v > 0 else { err(e.value, "spec.limits." + e.key, "must be a positive integer"); continue }
                switch e.key {
                case "maxInstructions": maxInstr = v
                case "maxMemoryBytes": maxMem = v
                default: timeout = v
                }
            }
        }
        guard ok else { return nil }
        var out = LuaPluginSpec(name: name, namespace: namespace, path: variants.first?.path ?? path, phase: phase, priority: priority,
                                pluginConfig: variants.first?.pluginConfig ?? basePluginConfig, failStrategy: fail,
                                matchLabels: labels, maxInstructions: maxInstr, maxMemoryBytes: maxMem, timeoutMs: timeout,
                                file: file, line: line)
        out.variants = variants
        out.stickyBy = sticky
        out.shadow = shadow
        out.guardrail = guardrail
        return out
    }
}

/// What one load decoded, per file and document, kept for the next load (hot reload,
/// pilot push): a document whose text and place did not change is neither parsed nor
/// decoded again, and its decoded resources (routes, subsets, endpoints) are shared by
/// the old and the new snapshot; a file whose stamp (device, inode, size, modification
/// and change times) did not change is not even read. Documents that declare LuaPlugins
/// or have errors are not kept. One load at a time uses a cache (the proxy's reload lock).
public final class ConfigCache: @unchecked Sendable {
    /// One document piece of a file (see `ConfigLoader.documentChunks`).
    struct Chunk {
        var text: String
        var lineOffset: Int
        /// What it decoded to (nil: decoded again at every load).
        var result: ConfigLoader.TextResult?
    }
    /// What a file held at the last load, its pieces in order.
    struct FileState {
        var chunks: [Chunk]
        /// The file's stamp when it was read, and when (nil for pushed texts).
        var stamp: FileStamp? = nil
        /// Whether every piece is kept: the file can be taken whole while its stamp holds.
        var complete: Bool { chunks.allSatisfy { $0.result != nil } }
    }
    var files: [String: FileState] = [:]
    /// Documents the last load had to parse and decode (the others came from the cache).
    public internal(set) var decodedLastLoad = 0
    /// Files (and pushed texts) the last load read.
    public internal(set) var filesReadLastLoad = 0
    /// Files (and pushed texts) in which the last load parsed at least one document.
    public internal(set) var filesParsedLastLoad = 0
    /// The route table of the last load that succeeded: the next one shares its
    /// unchanged services and virtual hosts (RouteTable.build).
    public internal(set) var routes: RouteTable?

    public init() {}

    /// Documents held.
    public var documentCount: Int { files.values.reduce(0) { $0 + $1.chunks.count } }

    /// Forgets every file not in `paths` (removed since).
    func keepOnly(_ paths: Set<String>) {
        for f in files.keys where !paths.contains(f) { files[f] = nil }
    }

    /// Starts a load: the counters count it.
    func beginLoad() { decodedLastLoad = 0; filesReadLastLoad = 0; filesParsedLastLoad = 0 }

    /// The decoded documents of `file` without reading it, when its stamp is the one it had
    /// when last read and every piece was kept; nil otherwise.
    func unchanged(_ file: String) -> ConfigLoader.TextResult? {
        guard let state = files[file], let was = state.stamp, state.complete, let now = FileStamp(path: file), now.same(as: was) else { return nil }
        var out = ConfigLoader.TextResult()
        for c in state.chunks { if let r = c.result { out.append(r) } }
        return out
    }
}

/// What identifies a file's content without reading it. A file modified within a second
/// of being read is read again (its times may not have moved: they tick coarsely), as
/// git does with "racily clean" files.
struct FileStamp: Equatable {
    var device: UInt64, inode: UInt64, size: Int64
    var modified: Int64, changed: Int64
    /// When it was taken (nanoseconds since the epoch).
    var takenAt: Int64

    init?(path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        device = UInt64(st.st_dev); inode = UInt64(st.st_ino); size = Int64(st.st_size)
        modified = Int64(st.st_mtim.tv_sec) * 1_000_000_000 + Int64(st.st_mtim.tv_nsec)
        changed = Int64(st.st_ctim.tv_sec) * 1_000_000_000 + Int64(st.st_ctim.tv_nsec)
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        takenAt = Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)
    }

    /// The same file, unchanged since `was` was taken (and not changed in the second before).
    func same(as was: FileStamp) -> Bool {
        device == was.device && inode == was.inode && size == was.size && modified == was.modified && changed == was.changed
            && max(modified, changed) < was.takenAt - 1_000_000_000
    }
}
