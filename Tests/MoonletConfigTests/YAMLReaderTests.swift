import XCTest
@testable import MoonletConfig

/// YAML that go-yaml (kubectl, Istio) reads loads here too, with the same places in
/// errors.
final class YAMLReaderTests: XCTestCase {
    static let serviceEntry = """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: v6}
    spec:
      hosts: [example.com]
      addresses: [1.2.3.4, 2001:db8::, "::1"]
      resolution: STATIC
    """

    func test_ipv6PlainScalarInAFlowSequence_loadsAsGoYamlReadsIt() throws {
        let r = ConfigLoader().loadText(Self.serviceEntry, file: "se.yaml", baseDir: "/")
        XCTAssertEqual(r.errors.map(\.description), [])
        let spec = try XCTUnwrap(r.istio.first?.spec)
        XCTAssertEqual(spec["addresses"], .array([.string("1.2.3.4"), .string("2001:db8::"), .string("::1")]))
    }

    func test_colonBeforeEveryFlowIndicator_staysInTheScalar_inSequencesAndMappings() throws {
        let docs = try YAMLReader.documents("a: [x:, y:]\nb: {k: fe80::}\nc: [[1::]]\n")
        let v = PositionedNode(node: docs[0], file: "f").value
        XCTAssertEqual(v["a"], .array([.string("x:"), .string("y:")]))
        XCTAssertEqual(v["b"], .map([("k", .string("fe80::"))]))
        XCTAssertEqual(v["c"], .array([.array([.string("1::")])]))
    }

    /// The colon is replaced by one character, so what follows on the line keeps its
    /// column: the error names the same place libyaml would without the address.
    func test_errorsAfterAnIPv6FlowScalar_keepTheirLineAndColumn() {
        let bad = Self.serviceEntry.replacingOccurrences(of: "\"::1\"]", with: "{x: 1}]")
        let r = ConfigLoader().loadText(bad, file: "se.yaml", baseDir: "/")
        XCTAssertEqual(r.errors.map(\.description), ["se.yaml:6:36: ServiceEntry v6: spec.addresses[2]: must be a string"])
        let syntax = ConfigLoader().loadText("addresses: [2001:db8::, ]]\n", file: "s.yaml", baseDir: "/")
        XCTAssertEqual(syntax.errors.count, 1)
        let message = syntax.errors.first?.description ?? ""
        XCTAssertTrue(message.hasPrefix("s.yaml:1:26: YAML:"), message)
    }
}
