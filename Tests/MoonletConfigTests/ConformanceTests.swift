import XCTest
@testable import MoonletConfig

/// Istio's own material from ../shared/conformance (read at istio/istio 86c9f01f).
final class ConformanceTests: XCTestCase {
    static var root: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("shared/conformance").path
    }

    func requireRoot() throws -> String {
        let r = Self.root
        guard FileManager.default.fileExists(atPath: r) else { throw XCTSkip("conformance data not found at \(r)") }
        return r
    }

    /// Documents of a validation file: (expected error or nil, text without the _err line).
    func documents(_ path: String) throws -> [(String?, String)] {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        var out: [(String?, String)] = []
        for doc in text.components(separatedBy: "\n---") {
            var expected: String?
            var lines: [String] = []
            for l in doc.components(separatedBy: "\n") {
                if l.hasPrefix("_err:") {
                    var v = l.dropFirst(5).trimmingCharacters(in: .whitespaces)
                    if (v.hasPrefix("\"") && v.hasSuffix("\"")) || (v.hasPrefix("'") && v.hasSuffix("'")) { v = String(v.dropFirst().dropLast()) }
                    expected = v
                } else { lines.append(l) }
            }
            let body = lines.joined(separator: "\n")
            if body.split(separator: "\n").allSatisfy({ $0.trimmingCharacters(in: .whitespaces).isEmpty || $0.hasPrefix("#") }) { continue }
            out.append((expected, body))
        }
        return out
    }

    /// Kinds whose validation Moonlet implements; the unsupported EnvoyFilter,
    /// ProxyConfig, WasmPlugin and WorkloadGroup are skipped with a notice instead
    /// (Moonlet does not read them).
    static let implemented = ["serviceentry", "workloadentry", "destinationrule", "peerauth", "authz", "telemetry", "reqauth"]

    func test_validDocuments_ofImplementedKinds_load() throws {
        let root = try requireRoot()
        for kind in Self.implemented {
            for (_, doc) in try documents("\(root)/validation/\(kind)-valid.yaml") {
                let r = ConfigLoader().loadText(doc, file: "\(kind)-valid.yaml", baseDir: root)
                XCTAssertEqual(r.errors.map(\.description), [], doc)
            }
        }
    }

    func test_invalidDocuments_ofImplementedKinds_areRefusedWithIstiosMessage() throws {
        let root = try requireRoot()
        var checked = 0
        for kind in Self.implemented {
            for (expected, doc) in try documents("\(root)/validation/\(kind)-invalid.yaml") {
                guard let expected else { continue }
                let r = ConfigLoader().loadText(doc, file: "\(kind)-invalid.yaml", baseDir: root)
                let text = r.errors.map(\.description).joined(separator: "\n")
                XCTAssertTrue(text.contains(expected), "expected \"\(expected)\" for:\n\(doc)\ngot:\n\(text)")
                checked += 1
            }
        }
        XCTAssertGreaterThanOrEqual(checked, 20)
    }

    func test_bookinfoNetworkingSamples_eachLoad_gatewaysSkipped() throws {
        let root = try requireRoot()
        let dir = "\(root)/samples/bookinfo/networking"
        for f in try FileManager.default.contentsOfDirectory(atPath: dir).sorted() where f.hasSuffix(".yaml") {
            let text = try String(contentsOfFile: "\(dir)/\(f)", encoding: .utf8)
            let r = ConfigLoader().loadText(text, file: f, baseDir: dir)
            XCTAssertEqual(r.errors.map(\.description), [], f)
            if text.contains("kind: Gateway") { XCTAssertTrue(r.skipped.contains { $0.contains("Gateway") }, f) }
        }
    }

    func test_istioTestdataConfig_loadsOrReportsUnsupported() throws {
        let root = try requireRoot()
        let dir = "\(root)/config"
        var failures: [String] = []
        for f in try FileManager.default.contentsOfDirectory(atPath: dir).sorted() where f.hasSuffix(".yaml") || f.hasSuffix(".yml") {
            let text = try String(contentsOfFile: "\(dir)/\(f)", encoding: .utf8)
            let r = ConfigLoader().loadText(text, file: f, baseDir: dir)
            if !r.errors.isEmpty { failures.append(r.errors.map(\.description).joined(separator: "\n")) }
        }
        XCTAssertEqual(failures, [])
    }
}
