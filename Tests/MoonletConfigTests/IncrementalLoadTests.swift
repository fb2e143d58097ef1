import XCTest
import MoonletCore
@testable import MoonletConfig

/// Loads with a ConfigCache: only the documents that changed are parsed and decoded
/// again, and the result is the one a fresh load gives.
final class IncrementalLoadTests: XCTestCase {
    var dir = ""
    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "moonlet-incr-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    static func service(_ i: Int, weight: Int = 90) -> String {
        let s = "svc-\(i)"
        return """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: \(s), namespace: default}
        spec:
          hosts: [\(s)]
          resolution: STATIC
          ports: [{number: 8080, name: http}]
          workloadSelector: {labels: {app: \(s)}}
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: WorkloadEntry
        metadata: {name: \(s)-v1, namespace: default}
        spec: {address: 127.0.0.1, ports: {http: 9001}, labels: {app: \(s), version: v1}}
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: \(s), namespace: default}
        spec:
          host: \(s)
          subsets: [{name: v1, labels: {version: v1}}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: \(s), namespace: default}
        spec:
          hosts: [\(s)]
          http:
          - route:
            - {destination: {host: \(s), subset: v1}, weight: \(weight)}
            - {destination: {host: \(s)}, weight: \(100 - weight)}
        """
    }

    func write(_ services: [String]) throws {
        try services.joined(separator: "\n---\n").write(toFile: dir + "/mesh.yaml", atomically: true, encoding: .utf8)
    }

    func load(_ cache: ConfigCache) throws -> ConfigSnapshot {
        switch ConfigLoader().load(paths: [dir], cache: cache) {
        case .success(let s): return s
        case .failure(let e): throw e
        }
    }

    func weights(_ s: ConfigSnapshot, _ host: String) -> [Int] { s.routes.lookup(host)?.compiled.first?.rule.destinations.map(\.weight) ?? [] }

    func testChangingOneVirtualServiceDecodesOnlyThatDocumentAndChangesOnlyItsRoutes() throws {
        let cache = ConfigCache()
        try write((0..<20).map { Self.service($0) })
        let first = try load(cache)
        XCTAssertEqual(cache.decodedLastLoad, 80)
        try write((0..<20).map { Self.service($0, weight: $0 == 7 ? 80 : 90) })
        let second = try load(cache)
        XCTAssertEqual(cache.decodedLastLoad, 1, "only the changed VirtualService is decoded again")
        XCTAssertEqual(weights(first, "svc-7"), [90, 10])
        XCTAssertEqual(weights(second, "svc-7"), [80, 20])
        for i in (0..<20) where i != 7 { XCTAssertEqual(weights(second, "svc-\(i)"), [90, 10]) }
        XCTAssertEqual(second.routes.services.count, 20)
        XCTAssertEqual(second.routes.lookup("svc-3")?.service?.subsets["v1"]?.count, 1)
        // The same result as a load without cache.
        let fresh = try load(ConfigCache())
        XCTAssertEqual(fresh.routes.hosts.count, second.routes.hosts.count)
        XCTAssertEqual(weights(fresh, "svc-7"), [80, 20])
    }

    func testUnchangedServicesAndHostsAreSharedWithThePreviousTableAndDependentsAreRebuilt() throws {
        let cache = ConfigCache()
        let front = """
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: front, namespace: default}
        spec:
          hosts: [front.example.com]
          http: [{route: [{destination: {host: svc-7, subset: v1}}]}]
        """
        try write((0..<10).map { Self.service($0) } + [front])
        let first = try load(cache)
        // One weight changed: only that host is compiled again.
        try write((0..<10).map { Self.service($0, weight: $0 == 3 ? 80 : 90) } + [front])
        let second = try load(cache)
        XCTAssertEqual(second.routes.reusedServices, 10)
        XCTAssertEqual(second.routes.reusedHosts, 10, "every host but svc-3's")
        XCTAssertTrue(first.routes.lookup("svc-5") === second.routes.lookup("svc-5"))
        XCTAssertFalse(first.routes.lookup("svc-3") === second.routes.lookup("svc-3"))
        XCTAssertTrue(first.routes.services["svc-3.default.svc.cluster.local"] === second.routes.services["svc-3.default.svc.cluster.local"])
        XCTAssertEqual(weights(second, "svc-3"), [80, 20])
        // svc-7's DestinationRule changes: svc-7 is rebuilt, and so is front.example.com,
        // whose route leads there; the rest is shared.
        var docs = (0..<10).map { Self.service($0, weight: $0 == 3 ? 80 : 90) } + [front]
        // (On the same line: a document whose lines move is decoded again.)
        docs[7] = docs[7].replacingOccurrences(of: "labels: {version: v1}}]", with: "labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}]")
        try write(docs)
        let third = try load(cache)
        XCTAssertEqual(third.routes.reusedServices, 9)
        XCTAssertEqual(third.routes.reusedHosts, 9)
        XCTAssertFalse(second.routes.lookup("front.example.com") === third.routes.lookup("front.example.com"))
        let target = try XCTUnwrap(third.routes.lookup("front.example.com")?.compiled.first?.targets.first?.cluster)
        XCTAssertEqual(target.policy, .roundRobin)
        XCTAssertTrue(target === third.routes.services["svc-7.default.svc.cluster.local"]?.clusters["v1|8080"])
        // Cluster ids stay unique.
        let ids = third.routes.services.values.flatMap { $0.clusters.values.map(\.id) }
        XCTAssertEqual(Set(ids).count, ids.count)
        XCTAssertTrue(ids.allSatisfy { $0 < third.routes.clusterCount })
    }

    func testDeletingAResourceRemovesIt() throws {
        let cache = ConfigCache()
        try write((0..<3).map { Self.service($0) })
        XCTAssertNotNil(try load(cache).routes.lookup("svc-2")?.routes)
        // svc-2's VirtualService goes; the rest of its documents stay.
        var docs = (0..<3).map { Self.service($0) }
        docs[2] = docs[2].components(separatedBy: "\n---\n").dropLast().joined(separator: "\n---\n")
        try write(docs)
        let s = try load(cache)
        // The DestinationRule, now last in the file, lost its trailing line break: its text
        // changed, so it alone is decoded again.
        XCTAssertEqual(cache.decodedLastLoad, 1)
        XCTAssertNil(s.routes.lookup("svc-2")?.routes, "the VirtualService is gone")
        XCTAssertNotNil(s.routes.lookup("svc-2")?.defaultTarget, "the service stays")
        XCTAssertEqual(s.istio.filter { $0.kind == "VirtualService" }.count, 2)
        // A whole file removed.
        try FileManager.default.removeItem(atPath: dir + "/mesh.yaml")
        try "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n".write(toFile: dir + "/other.yaml", atomically: true, encoding: .utf8)
        XCTAssertTrue(try load(cache).routes.services.isEmpty)
        XCTAssertEqual(cache.documentCount, 1)
    }

    func testAnInvalidChangeIsRefusedAndTheNextLoadStillDecodesIt() throws {
        let cache = ConfigCache()
        try write((0..<3).map { Self.service($0) })
        _ = try load(cache)
        try write((0..<3).map { Self.service($0, weight: $0 == 1 ? 101 : 90) })
        XCTAssertThrowsError(try load(cache))
        XCTAssertThrowsError(try load(cache), "an error is not cached as valid")
        try write((0..<3).map { Self.service($0) })
        XCTAssertEqual(weights(try load(cache), "svc-1"), [90, 10])
    }

    func testErrorsInADocumentParsedAloneNameTheLineOfTheFile() throws {
        // Document 6 (svc-1's DestinationRule, 4 + 4 + 2 + 4 + 4 + 8 ... lines in) has an unknown field.
        var docs = (0..<2).map { Self.service($0) }
        docs[1] = docs[1].replacingOccurrences(of: "  host: svc-1\n", with: "  host: svc-1\n  hostt: x\n")
        try write(docs)
        let lines = docs.joined(separator: "\n---\n").components(separatedBy: "\n")
        let expected = try XCTUnwrap(lines.firstIndex(of: "  hostt: x")) + 1
        XCTAssertThrowsError(try load(ConfigCache())) { e in
            let errs = (e as? ConfigErrors)?.errors ?? []
            XCTAssertEqual(errs.map(\.line), [expected], "\(errs)")
            XCTAssertEqual(errs.first?.column, 3)
        }
        // A YAML syntax error too.
        try (docs[0] + "\n---\nkind: [\n").write(toFile: dir + "/mesh.yaml", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try load(ConfigCache())) { e in
            let errs = (e as? ConfigErrors)?.errors ?? []
            XCTAssertEqual(errs.count, 1)
            XCTAssertGreaterThan(errs.first?.line ?? 0, docs[0].components(separatedBy: "\n").count, "\(errs)")
        }
    }

    func testDocumentsAreCutAtMarkersOnly() {
        let text = "a: 1\n---\nb: |\n  --- not a marker\n  x\n--- {c: 3}\n...\nd: 4\n"
        let chunks = ConfigLoader.documentChunks(text)
        XCTAssertEqual(chunks.map(\.lineOffset), [0, 1, 5, 7])
        XCTAssertEqual(chunks.map(\.text).joined(), text)
        XCTAssertEqual(ConfigLoader.documentChunks("%YAML 1.2\n---\na: 1\n").count, 1, "directives: one piece")
        XCTAssertEqual(ConfigLoader.documentChunks("a: 1\r---\r").count, 1, "CR line breaks: one piece")
        XCTAssertEqual(ConfigLoader.documentChunks("a: 1\r\n---\r\nb: 2\r\n").map(\.lineOffset), [0, 1])
    }

    func testTheSpecOfATypedResourceIsReadBackFromItsText() throws {
        try write([Self.service(0)])
        let s = try load(ConfigCache())
        let vs = try XCTUnwrap(s.istio.first { $0.kind == "VirtualService" })
        XCTAssertEqual(vs.spec["hosts"], .array([.string("svc-0")]))
        let we = try XCTUnwrap(s.istio.first { $0.kind == "WorkloadEntry" })
        XCTAssertEqual(we.spec["address"], .string("127.0.0.1"))
    }

    func testAnUnchangedFileIsNotReadAgainAndOnlyTheChangedFileIsParsed() throws {
        let cache = ConfigCache()
        func write(_ name: String, _ range: Range<Int>, changed: Int = -1) throws {
            try range.map { Self.service($0, weight: $0 == changed ? 80 : 90) }.joined(separator: "\n---\n")
                .write(toFile: dir + "/" + name, atomically: true, encoding: .utf8)
        }
        try write("a.yaml", 0..<5)
        try write("b.yaml", 5..<10)
        // A file modified within a second of being read is read again (coarse file times).
        Thread.sleep(forTimeInterval: 1.1)
        _ = try load(cache)
        XCTAssertEqual(cache.filesReadLastLoad, 2)
        XCTAssertEqual(cache.filesParsedLastLoad, 2)
        _ = try load(cache)
        XCTAssertEqual(cache.filesReadLastLoad, 0, "neither file changed: neither is read")
        XCTAssertEqual(cache.decodedLastLoad, 0)
        try write("b.yaml", 5..<10, changed: 7)
        let s = try load(cache)
        XCTAssertEqual(cache.filesReadLastLoad, 1, "a.yaml is not read again")
        XCTAssertEqual(cache.filesParsedLastLoad, 1)
        XCTAssertEqual(cache.decodedLastLoad, 1, "only the changed VirtualService is parsed and decoded")
        XCTAssertEqual(weights(s, "svc-7"), [80, 20])
        XCTAssertEqual(weights(s, "svc-2"), [90, 10])
        XCTAssertEqual(s.routes.services.count, 10)
        XCTAssertEqual(s.istio.count, 40)
        // Changed again at once (within the second): read and parsed again, not missed.
        try write("b.yaml", 5..<10, changed: 8)
        let t = try load(cache)
        XCTAssertEqual(weights(t, "svc-7"), [90, 10])
        XCTAssertEqual(weights(t, "svc-8"), [80, 20])
    }

    func testAFileParsedWithOneParserDecodesAsItsPiecesParsedAlone() throws {
        let text = """
        # a comment before the first document
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: a, namespace: default}
        spec: {hosts: [a], resolution: STATIC, ports: [{number: 80, name: http}], endpoints: [{address: 127.0.0.1}]}
        ---
        ---
        # only a comment
        --- {apiVersion: networking.istio.io/v1beta1, kind: VirtualService, metadata: {name: a}, spec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}}
        ...
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: a}
        spec:
          host: a
          subsets: [{name: v1, labels: {version: v1}}]
          unknownField: 1
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: c}
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: WorkloadEntry
        metadata: {name: w}
        spec: {address: 127.0.0.2, labels: {app: a}}

        """
        let loader = ConfigLoader()
        let whole = loader.loadText(text, file: "m.yaml", baseDir: "/")
        var alone = ConfigLoader.TextResult()
        for c in ConfigLoader.documentChunks(text) { alone.append(loader.decodeChunk(c.text, lineOffset: c.lineOffset, file: "m.yaml", baseDir: "/")) }
        func describe(_ r: ConfigLoader.TextResult) -> [String] {
            r.istio.map { "\($0.kind) \($0.name) \($0.file):\($0.line) \($0.spec.json)" } + r.errors.map(\.description) + r.skipped
                + r.serviceEntries.map { "\($0.name):\($0.line)" } + r.workloadEntries.map(\.endpoint.address)
        }
        XCTAssertEqual(describe(whole), describe(alone))
        XCTAssertEqual(whole.istio.map(\.kind), ["ServiceEntry", "VirtualService", "DestinationRule", "WorkloadEntry"])
        XCTAssertEqual(whole.errors.map(\.line), [17], "\(whole.errors)")
        // Anchors, and text that only parses piece by piece (a colon go-yaml reads), go piece by piece.
        let anchors = "a: &x 1\n---\nb: *x\n"
        XCTAssertEqual(describe(loader.loadText(anchors, file: "y.yaml", baseDir: "/")).count, 2, "each document is refused alone: no kind, and the alias is unknown there")
        let colon = "apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {name: v6}\nspec: {hosts: [v6], addresses: [2001:db8::], resolution: STATIC, ports: [{number: 80, name: http}]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"
        let r = loader.loadText(colon, file: "c.yaml", baseDir: "/")
        XCTAssertEqual(r.errors.map(\.description), [])
        XCTAssertEqual(r.serviceEntries.first?.addresses, ["2001:db8::"])
    }
}
