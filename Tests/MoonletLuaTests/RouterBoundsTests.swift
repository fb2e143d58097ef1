import XCTest
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// Bounds of moonlet.router: the per-snapshot host cache and delay().
final class RouterBoundsTests: RouterHarness {
    /// A snapshot with more virtual hosts than RouterCache.maxHostsPerSnapshot: past the
    /// cap every lookup used to build an uncached table whose handles were appended to
    /// the entry's objects for the life of the snapshot (~110 bytes per request).
    func test_aSnapshotWithMoreHostsThanTheCache_keepsTheRouterObjectsBounded_whateverTheNumberOfRequests() throws {
        let count = RouterCache.maxHostsPerSnapshot + 904
        let hosts = (0..<count).map { "h\($0).example.com" }
        let yaml = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: many, namespace: default}
        spec:
          hosts: [\(hosts.joined(separator: ", "))]
          resolution: STATIC
          ports: [{number: 8080, name: http}]
          endpoints: [{address: 10.0.0.9}]
        """
        try configure(yaml)
        let first = route(host: hosts[0])
        XCTAssertNil(first.localReply, "\(String(describing: first.localReply?.body))")
        XCTAssertTrue(first.route.cluster.contains("h0.example.com"), first.route.cluster)
        let perHost = try XCTUnwrap(runtime.vm.routerCache.objectCount(snap))
        XCTAssertGreaterThan(perHost, 0)
        let bound = 2 * RouterCache.maxHostsPerSnapshot * perHost + perHost
        var most = 0
        // Every host once (the cache fills), then many requests to hosts past the cap.
        let past = count - RouterCache.maxHostsPerSnapshot
        for i in 0..<(count + 20_000) {
            let h = i < count ? hosts[i] : hosts[RouterCache.maxHostsPerSnapshot + (i - count) % past]
            let s = route(host: h)
            if i % 997 == 0 { XCTAssertTrue(s.route.cluster.contains(h), "\(h): \(s.route.cluster)") }
            most = max(most, runtime.vm.routerCache.objectCount(snap) ?? 0)
        }
        XCTAssertLessThanOrEqual(most, bound, "router objects grew with the number of requests")
        // Every host still routes (tables dropped from the cache are rebuilt).
        for h in [hosts[count - 1], hosts[1], hosts[count / 2]] {
            XCTAssertTrue(route(host: h).route.cluster.contains(h))
        }
    }

    /// moonlet.router.delay(s, ms) takes 0...86,400,000 like s.route.timeout_ms; beyond
    /// (or negative) it raises a Lua error and leaves the route's delay unset.
    func test_routerDelay_beyondADay_raisesALuaError_andADayIsAccepted() throws {
        let dir = NSTemporaryDirectory() + "moonlet-router-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try """
        local R = moonlet.router
        local f = {}
        function f.on_request(s)
          local ms = math.tointeger(tonumber(s.request.headers:get("x-ms")))
          local ok, err = pcall(R.delay, s, ms)
          return s:respond(200, ok and "ok" or tostring(err))
        end
        return f
        """.write(toFile: dir + "/delay.lua", atomically: true, encoding: .utf8)
        let spec = LuaPluginSpec(name: "delay", namespace: "", path: dir + "/delay.lua", phase: "UNSPECIFIED_PHASE", priority: 10, pluginConfig: .map([]),
                                 failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "t", line: 1)
        try configure(Self.endpoints, specs: [spec])
        let day = route(headers: [("x-ms", "86400000")])
        XCTAssertEqual(day.localReply?.body, "ok")
        XCTAssertEqual(day.route.delayMs, 86_400_000)
        for bad in ["86400001", "9223372036854775807", "-1"] {
            let s = route(headers: [("x-ms", bad)])
            XCTAssertTrue(s.localReply?.body.contains("ms must be an integer 0-86400000") ?? false, "\(bad): \(String(describing: s.localReply?.body))")
            XCTAssertEqual(s.route.delayMs, 0, bad)
        }
    }

    /// A VirtualService fixedDelay longer than a day is routed with a day's delay (what
    /// router.delay takes), not a Lua error.
    func test_aFaultDelayLongerThanADay_isRoutedWithADaysDelay() throws {
        try configure(vs: Self.vs("  - fault: {delay: {fixedDelay: 48h, percentage: {value: 100}}}\n    route: [{destination: {host: svc, subset: v1}}]\n"))
        let s = route()
        XCTAssertNil(s.localReply, "\(String(describing: s.localReply?.body))")
        XCTAssertEqual(s.route.delayMs, 86_400_000)
        XCTAssertEqual(s.route.subset, "v1")
    }
}
