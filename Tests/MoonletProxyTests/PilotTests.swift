import XCTest
import NIOCore
import NIOPosix
import NIOConcurrencyHelpers
import Logging
@testable import MoonletProxy
@testable import MoonletPilot
import MoonletConfig
import MoonletTLS

/// `moonlet pilot` on an ephemeral (or given) port with a config directory of its own.
final class PilotFixture {
    let dir: String
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var server: PilotServer!
    var channel: Channel!
    let lines = NIOLockedValueBox([String]())
    var port: Int { channel.localAddress!.port! }
    var address: String { "127.0.0.1:\(port)" }

    init(files: [String: String], dir: String? = nil, port: Int = 0, certs: String? = nil) throws {
        self.dir = dir ?? NSTemporaryDirectory() + "moonlet-pilot-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: self.dir, withIntermediateDirectories: true)
        for (name, text) in files { try write(name, text) }
        try start(port: port, certs: certs)
    }

    func start(port: Int, certs: String? = nil) throws {
        var s = PilotServer.Settings(configDirectory: dir, certsDirectory: certs)
        s.watchIntervalMs = 50
        let box = lines
        server = PilotServer(settings: s) { l in box.withLockedValue { $0.append(l) } }
        channel = try server.bind(group: group, host: "127.0.0.1", port: port)
    }

    /// Stops serving (the directory stays, for a restart on the same port).
    func stopServing() { try? channel.close().wait() }

    func write(_ name: String, _ text: String) throws { try text.write(toFile: dir + "/" + name, atomically: true, encoding: .utf8) }
    func stop() { stopServing(); try? group.syncShutdownGracefully(); try? FileManager.default.removeItem(atPath: dir) }

    /// `/status`: over HTTP when plaintext, else (mutual TLS) straight from the server.
    func status() throws -> [String: Any] {
        let body = server.settings.certsDirectory == nil ? try XCTUnwrap(adminGet(port, "/status")).body : server.statusJSON()
        return try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any], body)
    }
    func sidecar(_ node: String) throws -> [String: Any]? {
        (try status()["sidecars"] as? [[String: Any]])?.first { $0["node"] as? String == node }
    }
}

/// A sidecar (ProxyServer, with no files of its own) subscribed to pilot.
final class SubscribedSidecar {
    let proxy: ProxyFixture
    let client: PilotClient
    let cache = NSTemporaryDirectory() + "moonlet-pilot-cache-\(UUID().uuidString)"
    let lines = NIOLockedValueBox([String]())

    init(pilot: String, node: String, certs: String? = nil, fast: Bool = true, start: Bool = true) throws {
        proxy = try ProxyFixture(appPort: 1, concurrency: 1)
        proxy.server.expectPushedConfig()
        var s = PilotClient.Settings(address: pilot, node: PilotNode(id: node), cacheDirectory: cache, certsDirectory: certs)
        if fast { s.backoffBase = 0.05; s.backoffMax = 0.4 }
        s.pollSeconds = 5
        let server = proxy.server!
        client = try PilotClient(settings: s, apply: { dir, set in
            switch server.applyPushedConfig(directory: dir, reason: "pilot version \(set.version)") {
            case .success: return nil
            case .failure(let e): return e.message
            }
        }, log: { [lines] l in lines.withLockedValue { $0.append(l) } })
        if start { client.start() }
    }
    func stop() { client.stop(); proxy.stop(); try? FileManager.default.removeItem(atPath: cache) }
}

/// Waits up to `seconds` for `condition`; returns whether it held.
@discardableResult
func eventually(_ seconds: Double = 5, _ condition: () throws -> Bool) rethrows -> Bool {
    let end = Date().addingTimeInterval(seconds)
    while Date() < end {
        if try condition() { return true }
        usleep(10_000)
    }
    return try condition()
}

func orders(_ c: RawClient) -> String? {
    c.send("GET /orders/1 HTTP/1.1\r\nHost: order-service\r\n\r\n")
    guard let r = c.read(), r.status == 200 else { return nil }
    return r.header("x-version")
}

final class PilotTests: XCTestCase {
    var v1: TestUpstream!
    var v2: TestUpstream!
    override func setUpWithError() throws {
        v1 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v1")], body: "v1") }
        v2 = try TestUpstream { _ in TestUpstream.Reply(headers: [("x-version", "v2")], body: "v2") }
    }
    override func tearDown() { v1?.stop(); v2?.stop() }

    /// The seed's gray-release files with every request going to `to` (weight 100).
    func seed(allTo to: String) -> [String: String] {
        var files = GrayReleaseTests.seed(v1.port, v2.port)
        files["order-service.yaml"] = files["order-service.yaml"]!
            .replacingOccurrences(of: "weight: 90", with: "weight: W1").replacingOccurrences(of: "weight: 10", with: "weight: W2")
            .replacingOccurrences(of: "weight: W1", with: "weight: \(to == "v1" ? 100 : 0)")
            .replacingOccurrences(of: "weight: W2", with: "weight: \(to == "v2" ? 100 : 0)")
        return files
    }

    func test_sidecarGetsTheValidatedVersion_appliesIt_andAcks_andStatusListsIt() throws {
        var files = seed(allTo: "v1")
        // Sidecar scoping is not applied yet: pilot says so with the version.
        files["scope.yaml"] = "apiVersion: networking.istio.io/v1beta1\nkind: Sidecar\nmetadata: {name: default}\nspec:\n  egress: [{hosts: [\"./*\"]}]\n"
        let pilot = try PilotFixture(files: files)
        defer { pilot.stop() }
        let sc = try SubscribedSidecar(pilot: pilot.address, node: "orders-1.default")
        defer { sc.stop() }
        XCTAssertTrue(eventually { sc.client.status.appliedVersion == 1 }, "\(sc.client.status)")
        let c = try RawClient(port: sc.proxy.outbound)
        XCTAssertEqual(orders(c), "v1")
        XCTAssertTrue(try eventually { try pilot.sidecar("orders-1.default")?["applied_version"] as? Int == 1 })
        let st = try XCTUnwrap(try pilot.sidecar("orders-1.default"))
        XCTAssertEqual(st["workload"] as? String, "default/default")
        XCTAssertEqual(st["in_sync"] as? Bool, true)
        XCTAssertTrue(st["last_nack"] is NSNull)
        XCTAssertEqual(try pilot.status()["version"] as? Int, 1)
        XCTAssertEqual(try pilot.status()["hash"] as? String, pilot.server.current?.hash)
        XCTAssertTrue(pilot.lines.withLockedValue { $0 }.contains { $0.contains("ACK from orders-1.default for version 1") })
        // The Sidecar resource of the set is applied by the sidecars (SidecarScope), not
        // noted as skipped: pilot pushes it like any other resource.
        XCTAssertFalse(pilot.lines.withLockedValue { $0 }.contains { $0.contains("note:") && $0.contains("Sidecar") && $0.contains("skipped") }, "\(pilot.lines.withLockedValue { $0 })")
        // A held poll is answered as soon as the directory changes.
        try pilot.write("order-service.yaml", seed(allTo: "v2")["order-service.yaml"]!)
        XCTAssertTrue(eventually { sc.client.status.appliedVersion == 2 })
        XCTAssertEqual(orders(c), "v2")
    }

    func test_invalidChangeIsNotServed_lastGoodVersionStays_andTheErrorShowsOnStatusAndInTheLog() throws {
        let pilot = try PilotFixture(files: seed(allTo: "v1"))
        defer { pilot.stop() }
        try pilot.write("broken.yaml", "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: [a]\n  http: [{route: [{destination: {host: a}, weight: lots}]}]\n")
        XCTAssertTrue(eventually { pilot.server.lastError != nil })
        let st = try pilot.status()
        XCTAssertEqual(st["version"] as? Int, 1)
        let err = try XCTUnwrap((st["last_error"] as? [String: Any])?["message"] as? String)
        XCTAssertTrue(err.contains("broken.yaml:"), err)
        XCTAssertTrue(pilot.lines.withLockedValue { $0 }.contains { $0.contains("configuration rejected") && $0.contains("keeping version 1") })
        // A sidecar arriving now gets version 1.
        let sc = try SubscribedSidecar(pilot: pilot.address, node: "late")
        defer { sc.stop() }
        XCTAssertTrue(eventually { sc.client.status.appliedVersion == 1 })
        XCTAssertFalse(pilot.server.current!.files.contains { $0.path == "broken.yaml" })
        try FileManager.default.removeItem(atPath: pilot.dir + "/broken.yaml")
        XCTAssertTrue(eventually { pilot.server.lastError == nil })
        XCTAssertEqual(pilot.server.current?.version, 1, "the same content is not a new version")
    }

    func test_badPushIsNacked_andTheSidecarKeepsRoutingWithTheLastGoodConfig() throws {
        let pilot = try PilotFixture(files: seed(allTo: "v1"))
        defer { pilot.stop() }
        let sc = try SubscribedSidecar(pilot: pilot.address, node: "orders-1.default")
        defer { sc.stop() }
        XCTAssertTrue(eventually { sc.client.status.appliedVersion == 1 })
        // Valid for pilot (YAML), refused by the sidecar (the Lua does not compile).
        try pilot.write("broken.lua", "return {")
        try pilot.write("plugin.yaml", "apiVersion: moonlet.io/v1alpha1\nkind: LuaPlugin\nmetadata: {name: broken}\nspec:\n  url: broken.lua\n  phase: AUTHN\n")
        XCTAssertTrue(eventually { sc.client.status.lastNack != nil }, "\(sc.client.status)")
        XCTAssertEqual(sc.client.status.appliedVersion, 1)
        XCTAssertTrue(try eventually { (try pilot.sidecar("orders-1.default")?["last_nack"] as? [String: Any])?["version"] as? Int ?? 0 >= 2 })
        let nack = try XCTUnwrap(try pilot.sidecar("orders-1.default")?["last_nack"] as? [String: Any])
        let message = try XCTUnwrap(nack["error"] as? String)
        XCTAssertTrue(message.contains("broken"), message)
        XCTAssertEqual(try pilot.sidecar("orders-1.default")?["applied_version"] as? Int, 1)
        XCTAssertEqual(try pilot.sidecar("orders-1.default")?["in_sync"] as? Bool, false)
        let c = try RawClient(port: sc.proxy.outbound)
        for _ in 0..<20 { XCTAssertEqual(orders(c), "v1") }
        // No retry storm: a refused version is not pushed again while it stays the same.
        usleep(300_000)
        let nacks = pilot.lines.withLockedValue { $0 }.filter { $0.contains("NACK from orders-1.default") }
        XCTAssertFalse(nacks.isEmpty)
        XCTAssertEqual(Set(nacks).count, nacks.count, "a version NACKed twice: \(nacks)")
        // The fix is the next version, applied.
        try pilot.write("broken.lua", "return { on_request = function(s) end }")
        XCTAssertTrue(eventually { sc.client.status.appliedHash == pilot.server.current?.hash && (sc.client.status.appliedVersion ?? 0) > 2 }, "\(sc.client.status)")
        XCTAssertEqual(orders(c), "v1")
    }

    func test_pilotDown_sidecarKeepsServing_thenReconnectsWithBackoff_andGetsTheNewConfig() throws {
        let pilot = try PilotFixture(files: seed(allTo: "v1"))
        defer { pilot.stop() }
        let port = pilot.port
        let sc = try SubscribedSidecar(pilot: pilot.address, node: "orders-1.default")
        defer { sc.stop() }
        XCTAssertTrue(eventually { sc.client.status.appliedVersion == 1 })
        pilot.stopServing()
        XCTAssertTrue(eventually { sc.client.status.failures >= 2 }, "\(sc.client.status) \(sc.lines.withLockedValue { $0 })")
        let c = try RawClient(port: sc.proxy.outbound)
        for _ in 0..<10 { XCTAssertEqual(orders(c), "v1") }
        // The change made while pilot is down arrives once it is back (a new pilot: version 1 again, other content).
        try pilot.write("order-service.yaml", seed(allTo: "v2")["order-service.yaml"]!)
        try pilot.start(port: port)
        XCTAssertTrue(eventually { sc.client.status.appliedHash == pilot.server.current?.hash }, "\(sc.client.status)")
        XCTAssertEqual(sc.client.status.appliedVersion, 1)
        XCTAssertTrue(sc.client.status.connected)
        XCTAssertEqual(orders(c), "v2")
    }

    func test_mutualTLS_pilotAndSidecarVerifyEachOthersSpiffeIdentity() throws {
        let pki = try FixturePKI()
        defer { pki.cleanup() }
        let pilotCerts = try pki.issue("istio-system", "moonlet-pilot")
        let pilot = try PilotFixture(files: seed(allTo: "v1"), certs: pilotCerts)
        defer { pilot.stop() }
        let caches = pki.dir + "/caches"
        func client(_ node: PilotNode, certs: String?, expected: [String] = []) throws -> (PilotClient, NIOLockedValueBox<Int>) {
            var s = PilotClient.Settings(address: pilot.address, node: node, cacheDirectory: caches + "/\(node.id)", certsDirectory: certs)
            s.backoffBase = 0.05; s.backoffMax = 0.2; s.expectedIdentities = expected; s.pollSeconds = 2
            let applied = NIOLockedValueBox(0)
            let c = try PilotClient(settings: s, apply: { _, set in applied.withLockedValue { $0 = set.version }; return nil })
            c.start()
            return (c, applied)
        }
        // A mesh sidecar: pilot checks its identity, it checks pilot's.
        let (good, applied) = try client(PilotNode(id: "orders-1", namespace: "shop", serviceAccount: "orders"), certs: try pki.issue("shop", "orders"))
        defer { good.stop() }
        XCTAssertTrue(eventually { applied.withLockedValue { $0 } == 1 }, "\(good.status)")
        XCTAssertTrue(try eventually { try pilot.sidecar("orders-1")?["identity"] as? String == "spiffe://cluster.local/ns/shop/sa/orders" })
        XCTAssertTrue(try eventually { try pilot.sidecar("orders-1")?["applied_version"] as? Int == 1 }, "the ACK over mutual TLS")

        // Claiming another workload than its certificate's: 403.
        let (liar, _) = try client(PilotNode(id: "liar", namespace: "payments", serviceAccount: "pay"), certs: try pki.issue("shop", "cart"))
        defer { liar.stop() }
        XCTAssertTrue(eventually { liar.status.lastError?.contains("403") == true }, "\(liar.status)")
        // A certificate from another root: refused in the handshake.
        let (foreign, _) = try client(PilotNode(id: "foreign", namespace: "shop", serviceAccount: "orders"),
                                      certs: try pki.issue("shop", "orders", name: "foreign", by: pki.foreign))
        defer { foreign.stop() }
        // No certificate at all (plaintext to a TLS port).
        let (plain, _) = try client(PilotNode(id: "plain"), certs: nil)
        defer { plain.stop() }
        // A pilot with another identity than the one expected: the sidecar refuses it.
        let (picky, pickyApplied) = try client(PilotNode(id: "picky", namespace: "shop", serviceAccount: "orders"), certs: try pki.issue("shop", "orders", name: "picky"),
                                               expected: ["spiffe://cluster.local/ns/istio-system/sa/istiod"])
        defer { picky.stop() }
        XCTAssertTrue(eventually { foreign.status.failures >= 2 && plain.status.failures >= 2 && picky.status.failures >= 2 })
        XCTAssertTrue(picky.status.lastError?.contains("identity not verified") == true, "\(picky.status)")
        XCTAssertEqual(pickyApplied.withLockedValue { $0 }, 0)
        for n in ["liar", "foreign", "plain", "picky"] { XCTAssertNil(try pilot.sidecar(n)?["applied_version"] as? Int, n) }
    }

    func test_threeSidecarsUnderLoad_weightChangeAppliesEverywhere_withZeroFailedRequests() throws {
        let pilot = try PilotFixture(files: seed(allTo: "v1"))
        defer { pilot.stop() }
        let sidecars = try (1...3).map { try SubscribedSidecar(pilot: pilot.address, node: "orders-\($0).default") }
        defer { sidecars.forEach { $0.stop() } }
        XCTAssertTrue(eventually { sidecars.allSatisfy { $0.client.status.appliedVersion == 1 } })

        let failures = NIOLockedValueBox(0)
        let total = NIOLockedValueBox(0)
        // Per sidecar: the time the first v2 answer came, and v1 answers after the sidecar applied version 2.
        let firstV2 = NIOLockedValueBox([Int: Date]())
        let lateV1 = NIOLockedValueBox(0)
        let stop = NIOLockedValueBox(false)
        let group = DispatchGroup()
        for (i, sc) in sidecars.enumerated() {
            DispatchQueue.global().async(group: group) {
                guard let c = try? RawClient(port: sc.proxy.outbound) else { failures.withLockedValue { $0 += 1 }; return }
                // Bounded: at most 20000 requests per sidecar.
                for _ in 0..<20_000 where !stop.withLockedValue({ $0 }) {
                    let appliedBefore = sc.client.status.appliedVersion == 2
                    let v = orders(c)
                    total.withLockedValue { $0 += 1 }
                    switch v {
                    case "v2": firstV2.withLockedValue { if $0[i] == nil { $0[i] = Date() } }
                    case "v1": if appliedBefore { lateV1.withLockedValue { $0 += 1 } }
                    default: failures.withLockedValue { $0 += 1 }
                    }
                }
            }
        }
        usleep(300_000)
        let changed = Date()
        try pilot.write("order-service.yaml", seed(allTo: "v2")["order-service.yaml"]!)
        let everywhere = eventually(5) { firstV2.withLockedValue { $0.count } == 3 && sidecars.allSatisfy { $0.client.status.appliedVersion == 2 } }
        let applied = Date().timeIntervalSince(changed)
        usleep(300_000)
        stop.withLockedValue { $0 = true }
        group.wait()
        let slowest = firstV2.withLockedValue { $0.values.map { $0.timeIntervalSince(changed) }.max() ?? -1 }
        print("pilot push under load: applied on all 3 sidecars within \(String(format: "%.3f", applied)) s; last first-v2 answer at \(String(format: "%.3f", slowest)) s; \(total.withLockedValue { $0 }) requests, \(failures.withLockedValue { $0 }) failed")
        XCTAssertTrue(everywhere, "applied within 5 s on every sidecar; pilot serves version \(pilot.server.current?.version ?? 0); pilot log: \(pilot.lines.withLockedValue { $0 }); sidecars: \(sidecars.map { $0.client.status })")
        XCTAssertEqual(failures.withLockedValue { $0 }, 0)
        XCTAssertEqual(lateV1.withLockedValue { $0 }, 0, "no v1 answer once a sidecar applied the change")
        XCTAssertGreaterThan(total.withLockedValue { $0 }, 30)
        for sc in sidecars { XCTAssertEqual(try pilot.sidecar(sc.client.settings.node.id)?["applied_version"] as? Int, 2) }
    }

    func test_aPushedChangeGoesThroughTheIncrementalReload_onlyItsDocumentIsParsedAgain() throws {
        let pilot = try PilotFixture(files: seed(allTo: "v1"))
        defer { pilot.stop() }
        let sc = try SubscribedSidecar(pilot: pilot.address, node: "orders-1.default")
        defer { sc.stop() }
        XCTAssertTrue(eventually { sc.client.status.appliedVersion == 1 })
        let server = sc.proxy.server!
        XCTAssertEqual(server.pushedSources.map(\.name).sorted(), ["pilot/endpoints.yaml", "pilot/order-service.yaml"],
                       "pushed texts are named by their path, not by the version's directory")
        let c = try RawClient(port: sc.proxy.outbound)
        XCTAssertEqual(orders(c), "v1")
        try pilot.write("order-service.yaml", seed(allTo: "v2")["order-service.yaml"]!)
        XCTAssertTrue(eventually { sc.client.status.appliedVersion == 2 })
        XCTAssertEqual(server.configCache.decodedLastLoad, 1, "only the VirtualService whose weights changed is parsed and decoded again")
        XCTAssertEqual(orders(c), "v2")
    }

    func test_mountedConfigMap_eachFileIsPushedOnce_andLuaPluginsMustBeNamedRelativeToTheirYAML() throws {
        // A ConfigMap volume: the files in a timestamped directory, ..data linking to it,
        // and a link per key.
        let dir = NSTemporaryDirectory() + "moonlet-pilot-cm-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let stamp = dir + "/..2026_12_06_07_00_00.123"
        try FileManager.default.createDirectory(atPath: stamp, withIntermediateDirectories: true)
        try meshService("orders", ports: [v1.port]).write(toFile: stamp + "/orders.yaml", atomically: true, encoding: .utf8)
        try FileManager.default.createSymbolicLink(atPath: dir + "/..data", withDestinationPath: "..2026_12_06_07_00_00.123")
        try FileManager.default.createSymbolicLink(atPath: dir + "/orders.yaml", withDestinationPath: "..data/orders.yaml")
        let set = try PilotConfigSet.load(dir: dir, version: 1).get()
        XCTAssertEqual(set.files.map(\.path), ["orders.yaml"])
        XCTAssertEqual(set.hash, PilotConfigSet.hash(of: set.files))

        // A LuaPlugin naming its file by pilot's absolute path cannot be pushed.
        let plain = NSTemporaryDirectory() + "moonlet-pilot-abs-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: plain) }
        try FileManager.default.createDirectory(atPath: plain, withIntermediateDirectories: true)
        try "return {}".write(toFile: plain + "/f.lua", atomically: true, encoding: .utf8)
        try "apiVersion: moonlet.io/v1alpha1\nkind: LuaPlugin\nmetadata: {name: f}\nspec:\n  url: file://\(plain)/f.lua\n"
            .write(toFile: plain + "/p.yaml", atomically: true, encoding: .utf8)
        guard case .failure(let e) = PilotConfigSet.load(dir: plain, version: 1) else { return XCTFail("an absolute plugin path was accepted") }
        XCTAssertTrue(e.description.contains("relative to its YAML (url: f.lua)"), e.description)
        try "apiVersion: moonlet.io/v1alpha1\nkind: LuaPlugin\nmetadata: {name: f}\nspec:\n  url: f.lua\n".write(toFile: plain + "/p.yaml", atomically: true, encoding: .utf8)
        XCTAssertEqual(try PilotConfigSet.load(dir: plain, version: 1).get().files.map(\.path), ["f.lua", "p.yaml"])
        // A pushed path that would leave the cache directory is refused by the sidecar.
        XCTAssertThrowsError(try PilotConfigSet(version: 1, files: [PilotFile(path: "../escape.yaml", content: "")]).write(to: plain + "/cache"))
    }

    func test_sidecarWithPilot_isNotReadyUntilItsFirstPushedVersionIsApplied() throws {
        let pilot = try PilotFixture(files: seed(allTo: "v1"))
        defer { pilot.stop() }
        let sc = try SubscribedSidecar(pilot: pilot.address, node: "orders-1.default", start: false)
        defer { sc.stop() }
        XCTAssertEqual(adminGet(sc.proxy.admin, "/healthz/ready")?.status, 503)
        sc.client.start()
        XCTAssertTrue(eventually { adminGet(sc.proxy.admin, "/healthz/ready")?.status == 200 })
        XCTAssertEqual(sc.client.status.appliedVersion, 1)
    }
}
