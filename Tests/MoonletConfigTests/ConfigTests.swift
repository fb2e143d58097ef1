import XCTest
@testable import MoonletConfig

final class ConfigTests: XCTestCase {
    func load(_ yaml: String, lua: Bool = true) -> (ConfigLoader.TextResult, String) {
        let dir = NSTemporaryDirectory() + "moonlet-cfg-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        if lua { try! "return {}".write(toFile: dir + "/f.lua", atomically: true, encoding: .utf8) }
        return (ConfigLoader().loadText(yaml, file: "policy.yaml", baseDir: dir), dir)
    }

    func test_luaPlugin_decodesEveryField() {
        let (r, dir) = load("""
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata: {name: p, namespace: default}
        spec:
          selector:
            matchLabels: {app: orders}
          url: file://f.lua
          phase: AUTHZ
          priority: 10
          failStrategy: FAIL_OPEN
          pluginConfig: {a: 1, b: [x, y]}
        """)
        XCTAssertEqual(r.errors, [])
        let p = r.plugins[0]
        XCTAssertEqual(p.path, dir + "/f.lua")
        XCTAssertEqual(p.phase, "AUTHZ"); XCTAssertEqual(p.priority, 10); XCTAssertEqual(p.failStrategy, .failOpen)
        XCTAssertEqual(p.pluginConfig["a"], .int(1))
        XCTAssertTrue(p.applies(to: WorkloadIdentity(namespace: "default", labels: ["app": "orders"])))
        XCTAssertFalse(p.applies(to: WorkloadIdentity(namespace: "default", labels: ["app": "other"])))
        XCTAssertFalse(p.applies(to: WorkloadIdentity(namespace: "prod", labels: ["app": "orders"])))
    }

    func test_badFields_areAllReported_withFileLineAndColumn() {
        let (r, _) = load("""
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata: {name: p}
        spec:
          url: file://missing.lua
          phase: SOMETIMES
          bogus: 1
          failStrategy: MAYBE
        """)
        let text = r.errors.map(\.description)
        XCTAssertEqual(r.errors.count, 4, "\(text)")
        XCTAssertTrue(text.contains { $0.hasPrefix("policy.yaml:5:8: LuaPlugin p: spec.url: file not found") }, "\(text)")
        XCTAssertTrue(text.contains { $0.hasPrefix("policy.yaml:6:10: LuaPlugin p: spec.phase:") }, "\(text)")
        XCTAssertTrue(text.contains { $0.hasPrefix("policy.yaml:7:3: LuaPlugin p: spec.bogus: unknown field") }, "\(text)")
    }

    func test_yamlSyntaxError_namesThePlace() {
        let (r, _) = load("kind: [unclosed\n")
        XCTAssertEqual(r.errors.count, 1)
        XCTAssertTrue(r.errors[0].description.hasPrefix("policy.yaml:"), r.errors[0].description)
    }

    func test_unsupportedIstioKinds_areSkippedNotFatal() {
        let (r, _) = load("""
        apiVersion: networking.istio.io/v1beta1
        kind: Gateway
        metadata: {name: gw}
        spec: {}
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: vs}
        spec: {hosts: [a]}
        """)
        XCTAssertEqual(r.errors, [])
        XCTAssertEqual(r.istio.count, 1)
        XCTAssertEqual(r.skipped.count, 1)
        XCTAssertTrue(r.skipped[0].contains("Gateway gw"))
    }

    func test_labelsFlag_parses() throws {
        XCTAssertEqual(try WorkloadIdentity.parseLabels("app=a, version=v1"), ["app": "a", "version": "v1"])
        XCTAssertThrowsError(try WorkloadIdentity.parseLabels("novalue"))
    }
}
