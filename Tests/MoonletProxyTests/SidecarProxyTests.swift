import XCTest
import NIOConcurrencyHelpers
@testable import MoonletProxy
@testable import MoonletConfig

/// The Sidecar resource through the outbound listener, and reloads that apply a new
/// set of resources (files or pushed).
final class SidecarProxyTests: XCTestCase {
    var up: TestUpstream!
    var px: ProxyFixture!
    override func setUpWithError() throws { up = try TestUpstream { _ in TestUpstream.Reply(body: "ok") } }
    override func tearDown() { px?.stop(); up?.stop() }

    func sidecar(mode: String) -> String {
        """
        apiVersion: networking.istio.io/v1beta1
        kind: Sidecar
        metadata: {name: default, namespace: default}
        spec:
          egress: [{hosts: ["./a"]}]
          outboundTrafficPolicy: {mode: \(mode)}
        """
    }

    func status(_ host: String) throws -> Int? {
        let c = try RawClient(port: px.outbound)
        c.send("GET / HTTP/1.1\r\nHost: \(host)\r\n\r\n")
        return c.read()?.status
    }

    func testAHostOutsideTheEgressScopeGets502UnderRegistryOnly() throws {
        px = try ProxyFixture(appPort: 1, files: ["a.yaml": meshService("a", ports: [up.port]), "b.yaml": meshService("b", ports: [up.port]),
                                                  "sidecar.yaml": sidecar(mode: "REGISTRY_ONLY")])
        XCTAssertEqual(try status("a"), 200)
        XCTAssertEqual(try status("b"), 502, "b is in the registry but not imported")
        XCTAssertEqual(try status("nowhere.example.com"), 502)
        XCTAssertEqual(px.server.currentSnapshot.routes.services.count, 1)
    }

    func testAHostOutsideTheEgressScopeGets404NRUnderAllowAny() throws {
        px = try ProxyFixture(appPort: 1, files: ["a.yaml": meshService("a", ports: [up.port]), "b.yaml": meshService("b", ports: [up.port]),
                                                  "sidecar.yaml": sidecar(mode: "ALLOW_ANY")])
        XCTAssertEqual(try status("a"), 200)
        XCTAssertEqual(try status("b"), 404, "as any host Moonlet does not know: 404 NR")
    }

    func testRegistryOnlyWithoutServicesRefusesEveryHost() throws {
        px = try ProxyFixture(appPort: 1, files: ["sidecar.yaml": sidecar(mode: "REGISTRY_ONLY")])
        XCTAssertEqual(try status("a"), 502)
    }

    func testAnInvalidChangeKeepsTheLastGoodSnapshot() throws {
        px = try ProxyFixture(appPort: 1, files: ["a.yaml": meshService("a", ports: [up.port])])
        let before = px.server.currentSnapshot
        try px.write("bad.yaml", "apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata: {name: s}\nspec: {egress: [{hosts: [nope]}]}\n")
        guard case .failure(let e) = px.server.reload(reason: "test") else { return XCTFail("the bad Sidecar was accepted") }
        XCTAssertTrue(e.message.contains("bad.yaml:4"), e.message)
        XCTAssertTrue(px.server.currentSnapshot === before)
        XCTAssertEqual(try status("a"), 200)
    }

    func testPushedResourcesAreAppliedWithTheFilesAndAFailedPushChangesNothing() throws {
        px = try ProxyFixture(appPort: 1, files: ["a.yaml": meshService("a", ports: [up.port])])
        XCTAssertEqual(try status("b"), 404)
        guard case .success = px.server.apply(sources: [ConfigLoader.Source(name: "pilot/b", text: meshService("b", ports: [up.port]))]) else {
            return XCTFail("push refused")
        }
        XCTAssertEqual(try status("b"), 200)
        XCTAssertEqual(try status("a"), 200)
        guard case .failure(let e) = px.server.apply(sources: [ConfigLoader.Source(name: "pilot/c", text: "kind: [\n")]) else {
            return XCTFail("a bad push was accepted")
        }
        XCTAssertTrue(e.message.contains("pilot/c"), e.message)
        XCTAssertEqual(try status("b"), 200, "the last good push stays")
        // The next file reload keeps the last good push.
        guard case .success = px.server.reload(reason: "test") else { return XCTFail("reload failed") }
        XCTAssertEqual(try status("b"), 200)
    }
}
