import XCTest
import NIOCore
import NIOConcurrencyHelpers
@testable import MoonletProxy
import MoonletConfig
import MoonletTelemetry
import MoonletCore
#if canImport(Foundation)
import Foundation
#endif

/// istio-accesslog and istio-tracing end to end: Telemetry resources and the mesh config
/// turn them on; lines land in real files (or the process's stdout), spans in a collector
/// on a real socket.
final class AccessLogTracingTests: XCTestCase {
    /// A mesh config file outside the config directory (the loader reads every YAML there).
    func meshConfig(_ text: String) throws -> String {
        let p = NSTemporaryDirectory() + "moonlet-mesh-\(UUID().uuidString).yaml"
        try text.write(toFile: p, atomically: true, encoding: .utf8)
        return p
    }

    /// Lines of `path` once at least `count` are there (polled up to 3 s).
    func lines(_ path: String, atLeast count: Int) -> [String] {
        var out: [String] = []
        for _ in 0..<150 {
            let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
            out = text.split(separator: "\n").map(String.init)
            if out.count >= count { break }
            usleep(20_000)
        }
        return out
    }

    /// The seed's Telemetry, verbatim: policies/telemetry/access-log.yaml (Istio's
    /// mesh-wide access log as its documentation gives it).
    static var seedTelemetry: String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return (try? String(contentsOf: root.appendingPathComponent("policies/telemetry/access-log.yaml"), encoding: .utf8)) ?? ""
    }

    func test_seedTelemetry_turnsTheAccessLogOn_andARequestWritesIstiosDefaultLineToStdout() throws {
        let binary = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent(".build/debug/moonlet").path
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw XCTSkip("moonlet binary not built at \(binary)") }
        let up = try TestUpstream()
        defer { up.stop() }
        let d = NSTemporaryDirectory() + "moonlet-seedlog-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: d) }
        XCTAssertTrue(Self.seedTelemetry.contains("kind: Telemetry"), "policies/telemetry/access-log.yaml is read")
        try Self.seedTelemetry.write(toFile: d + "/telemetry.yaml", atomically: true, encoding: .utf8)
        let port = freePort(), admin = freePort()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["run", "--config", d, "--inbound-port", "\(port)", "--outbound-port", "0", "--admin-port", "\(admin)",
                       "--prometheus-port", "0", "--health-port", "0", "--app-port", "\(up.port)", "--concurrency", "1", "--log-level", "error"]
        let out = Pipe()
        p.standardOutput = out; p.standardError = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { p.terminate() } }
        let text = NIOLockedValueBox("")
        out.fileHandleForReading.readabilityHandler = { h in
            let d = h.availableData
            text.withLockedValue { $0 += String(decoding: d, as: UTF8.self) }
        }
        defer { out.fileHandleForReading.readabilityHandler = nil }
        var ready = false
        for _ in 0..<100 { if adminGet(admin, "/ready")?.status == 200 { ready = true; break }; usleep(50_000) }
        XCTAssertTrue(ready)
        let c = try RawClient(port: port)
        c.send("GET /hello?x=1 HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent: curl/8.5.0\r\nX-Forwarded-For: 10.1.2.3\r\nX-Request-Id: 4f0e7d2c-req\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        var line = ""
        for _ in 0..<150 {
            line = text.withLockedValue { $0 }
            if line.contains("\n") { break }
            usleep(20_000)
        }
        // Istio's default format, field by field (Moonlet has no upstream local address
        // or SNI to give on a plaintext inbound stream: "-" as Envoy prints an empty one).
        let pattern = #"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "GET /hello\?x=1 HTTP/1\.1" 200 - via_upstream - "-" 0 5 \d+ - "10\.1\.2\.3[^"]*" "curl/8\.5\.0" "4f0e7d2c-req" "reviews:9080" "127\.0\.0\.1:\#(up.port)" inbound\|\#(up.port)\|\| - 127\.0\.0\.1:\#(port) 127\.0\.0\.1:\d+ - default\n$"#
        XCTAssertNotNil(line.range(of: pattern, options: .regularExpression), "not Istio's default line: \(line)")
        XCTAssertEqual(line.filter { $0 == "\n" }.count, 1, "exactly one line for one request")
    }

    func test_istioDefaultFormats_ofTheConfigLayer_areTheOnesTheAccessLogCompiles() {
        XCTAssertEqual(AccessLogFormatKeys.istioText, AccessLogFormat.istioText)
        XCTAssertEqual(AccessLogFormatKeys.istioJSON.map { $0.0 + "=" + $0.1 }, AccessLogFormat.istioJSONLabels.map { $0.0 + "=" + $0.1 })
    }

    func test_jsonEncoding_writesOneObjectPerLineWithIstiosKeys() throws {
        let up = try TestUpstream()
        defer { up.stop() }
        let logPath = NSTemporaryDirectory() + "moonlet-json-\(UUID().uuidString).log"
        defer { try? FileManager.default.removeItem(atPath: logPath) }
        let mesh = try meshConfig("accessLogFile: \(logPath)\naccessLogEncoding: JSON\n")
        let fx = try ProxyFixture(appPort: up.port) { $0.meshConfigPath = mesh }
        defer { fx.stop() }
        let c = try RawClient(port: fx.inbound)
        c.send("POST /orders HTTP/1.1\r\nHost: orders\r\nUser-Agent: t\r\nContent-Length: 3\r\n\r\nabc")
        XCTAssertEqual(c.read()?.status, 200)
        let ls = lines(logPath, atLeast: 1)
        XCTAssertEqual(ls.count, 1)
        let obj = try XCTUnwrap(JSONSerialization.jsonObject(with: Data((ls.first ?? "").utf8)) as? [String: Any], ls.first ?? "")
        let istioKeys: Set<String> = ["authority", "bytes_received", "bytes_sent", "connection_termination_details", "downstream_local_address",
                                      "downstream_remote_address", "duration", "method", "path", "protocol", "request_id", "requested_server_name",
                                      "response_code", "response_code_details", "response_flags", "route_name", "start_time", "upstream_cluster",
                                      "upstream_host", "upstream_local_address", "upstream_service_time", "upstream_transport_failure_reason",
                                      "user_agent", "x_forwarded_for"]
        XCTAssertEqual(Set(obj.keys), istioKeys)
        XCTAssertEqual(obj["method"] as? String, "POST")
        XCTAssertEqual(obj["path"] as? String, "/orders")
        XCTAssertEqual(obj["response_code"] as? Int, 200)
        XCTAssertEqual(obj["bytes_received"] as? Int, 3)
        XCTAssertEqual(obj["bytes_sent"] as? Int, 5)
        XCTAssertEqual(obj["protocol"] as? String, "HTTP/1.1")
        XCTAssertEqual(obj["response_flags"] as? String, "-")
        XCTAssertEqual(obj["upstream_cluster"] as? String, "inbound|\(up.port)||")
        XCTAssertTrue(obj["requested_server_name"] is NSNull, "absent values are null, as Envoy writes them")
    }

    func test_filterExpression_logsOnlyResponsesOf400AndAbove_toTheFileProvider() throws {
        let up = try TestUpstream { r in r.uri == "/missing" ? TestUpstream.Reply(status: .notFound, body: "no") : TestUpstream.Reply() }
        defer { up.stop() }
        let logPath = NSTemporaryDirectory() + "moonlet-filter-\(UUID().uuidString).log"
        defer { try? FileManager.default.removeItem(atPath: logPath) }
        let mesh = try meshConfig("""
        extensionProviders:
        - name: errors-file
          envoyFileAccessLog:
            path: \(logPath)
            logFormat:
              text: "%RESPONSE_CODE% %REQ(:METHOD)% %REQ(:PATH)%"
        """)
        let telemetry = """
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {name: errors-only, namespace: default}
        spec:
          accessLogging:
          - providers: [{name: errors-file}]
            filter:
              expression: response.code >= 400
        """
        let fx = try ProxyFixture(appPort: up.port, files: ["t.yaml": telemetry]) { $0.meshConfigPath = mesh }
        defer { fx.stop() }
        let c = try RawClient(port: fx.inbound)
        XCTAssertEqual(get(c, "/fine")?.status, 200)
        XCTAssertEqual(get(c, "/missing")?.status, 404)
        XCTAssertEqual(get(c, "/fine-again")?.status, 200)
        let ls = lines(logPath, atLeast: 1)
        usleep(300_000)   // two flush periods: a 200 line would be there by now
        XCTAssertEqual(lines(logPath, atLeast: 1), ["404 GET /missing"], "\(ls)")
    }

    func test_aBlockedLogFile_neverStallsRequests_andTheDroppedLinesAreCounted() throws {
        let up = try TestUpstream()
        defer { up.stop() }
        // A FIFO whose reader never reads: the writer thread blocks once the pipe is full.
        let fifo = NSTemporaryDirectory() + "moonlet-fifo-\(UUID().uuidString)"
        XCTAssertEqual(mkfifo(fifo, 0o600), 0)
        let reader = open(fifo, O_RDONLY | O_NONBLOCK)
        XCTAssertGreaterThanOrEqual(reader, 0)
        // The reader stays open (one descriptor for the test process's life): closed, the
        // writer thread stuck in write(2) would get SIGPIPE.
        defer { unlink(fifo) }
        let mesh = try meshConfig("accessLogFile: \(fifo)\naccessLogFormat: \"%REQ(X-PAD)%\\n\"\n")
        let fx = try ProxyFixture(appPort: up.port, concurrency: 1) { $0.meshConfigPath = mesh; $0.accessLogMaxQueuedBytes = 64 << 10 }
        defer { fx.stop() }
        let pad = String(repeating: "p", count: 4000)
        let c = try RawClient(port: fx.inbound)
        let started = Date()
        for i in 0..<200 {
            guard get(c, "/\(i)", headers: "X-Pad: \(pad)\r\n")?.status == 200 else { return XCTFail("request \(i) failed") }
        }
        // Not a timing assertion on speed: 200 requests must simply not wait on the disk
        // (a blocked write would hold them forever).
        XCTAssertLessThan(Date().timeIntervalSince(started), 30)
        var dropped = 0.0
        for _ in 0..<50 {
            let body = adminGet(fx.admin, "/stats/prometheus")?.body ?? ""
            if let l = body.split(separator: "\n").first(where: { $0.hasPrefix("moonlet_access_log_dropped_lines_total ") }) {
                dropped = Double(l.split(separator: " ").last ?? "") ?? 0
            }
            if dropped > 0 { break }
            usleep(50_000)
        }
        XCTAssertGreaterThan(dropped, 0, "lines past the queue bound are dropped and counted")
    }

    func test_reopenLogs_afterRotation_writesToTheNewFile() throws {
        let up = try TestUpstream()
        defer { up.stop() }
        let logPath = NSTemporaryDirectory() + "moonlet-rotate-\(UUID().uuidString).log"
        defer { try? FileManager.default.removeItem(atPath: logPath); try? FileManager.default.removeItem(atPath: logPath + ".1") }
        let mesh = try meshConfig("accessLogFile: \(logPath)\naccessLogFormat: \"%REQ(:PATH)%\"\n")
        let fx = try ProxyFixture(appPort: up.port) { $0.meshConfigPath = mesh }
        defer { fx.stop() }
        let c = try RawClient(port: fx.inbound)
        XCTAssertEqual(get(c, "/before")?.status, 200)
        XCTAssertEqual(lines(logPath, atLeast: 1), ["/before"])
        // logrotate: move the file away, then signal (here the admin endpoint, what
        // SIGUSR1 runs in the moonlet process).
        try FileManager.default.moveItem(atPath: logPath, toPath: logPath + ".1")
        XCTAssertEqual(adminGet(fx.admin, "/reopen_logs", method: "POST")?.status, 200)
        XCTAssertEqual(get(c, "/after")?.status, 200)
        XCTAssertEqual(lines(logPath, atLeast: 1), ["/after"])
        XCTAssertEqual(lines(logPath + ".1", atLeast: 1), ["/before"])
    }

    func test_anUnsupportedFormatOperator_refusesTheConfig_namingIt() throws {
        let mesh = try meshConfig("accessLogFile: /dev/null\naccessLogFormat: \"%START_TIME% %DYNAMIC_METADATA(istio.mixer:status)%\"\n")
        XCTAssertThrowsError(try ProxyFixture(appPort: 1) { $0.meshConfigPath = mesh }) { e in
            XCTAssertTrue("\(e)".contains("plugin istio-accesslog"), "\(e)")
            XCTAssertTrue("\(e)".contains("%DYNAMIC_METADATA(istio.mixer:status)% is not an access log operator Moonlet supports"), "\(e)")
        }
    }

    func test_aForkOfIstioAccesslog_keepingTheBuiltinsConfigure_runsItsOwnOnLog_notTheNativeShortcut() throws {
        // The builtin's configure hands its writes to the proxy (conf.shortcuts.on_log);
        // a plugin loaded from a file gets no shortcut: its on_log decides.
        let up = try TestUpstream()
        defer { up.stop() }
        let logPath = NSTemporaryDirectory() + "moonlet-fork-\(UUID().uuidString).log"
        defer { try? FileManager.default.removeItem(atPath: logPath) }
        let mesh = try meshConfig("accessLogFile: \(logPath)\naccessLogEncoding: JSON\n")
        let fork = """
        local base = require("istio-accesslog")
        local f = {}
        f.configure = base.configure
        function f.on_log(s, conf)
          if s.request.method == "POST" then base.on_log(s, conf) end
        end
        return f
        """
        let fx = try ProxyFixture(appPort: up.port, files: ["my-accesslog.lua": fork,
                                                            "p.yaml": ProxyFixture.plugin("istio-accesslog").replacingOccurrences(of: "istio-accesslog.lua", with: "my-accesslog.lua")]) {
            $0.meshConfigPath = mesh
        }
        defer { fx.stop() }
        let c = try RawClient(port: fx.inbound)
        XCTAssertEqual(get(c, "/skipped")?.status, 200)
        c.send("POST /kept HTTP/1.1\r\nHost: orders\r\nContent-Length: 1\r\n\r\nx")
        XCTAssertEqual(c.read()?.status, 200)
        _ = lines(logPath, atLeast: 1)
        usleep(300_000)   // two flush periods: a GET line would be there by now
        let ls = lines(logPath, atLeast: 1)
        XCTAssertEqual(ls.count, 1, "\(ls)")
        let obj = try XCTUnwrap(JSONSerialization.jsonObject(with: Data((ls.first ?? "").utf8)) as? [String: Any], ls.first ?? "")
        XCTAssertEqual(obj["path"] as? String, "/kept")
    }

    func test_aLuaPluginNamedIstioTracing_replacesTheBuiltin_andGetsItsCompiledConfig() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let mesh = try meshConfig("defaultConfig:\n  tracing:\n    sampling: 100\n")
        let fork = """
        local base = require("istio-tracing")
        local f = {}
        f.configure = base.configure
        function f.on_request(s, conf)
          base.on_request(s, conf)
          s.request.headers:set("x-fork-sampling", tostring(conf.mode))
        end
        f.on_log = base.on_log
        return f
        """
        let fx = try ProxyFixture(appPort: app.port, files: ["my-tracing.lua": fork,
                                                             "p.yaml": ProxyFixture.plugin("istio-tracing").replacingOccurrences(of: "istio-tracing.lua", with: "my-tracing.lua")]) {
            $0.meshConfigPath = mesh
        }
        defer { fx.stop() }
        let c = try RawClient(port: fx.inbound)
        XCTAssertEqual(get(c)?.status, 200)
        let seen = try XCTUnwrap(app.seen.last)
        XCTAssertEqual(seen.headers.first(name: "x-fork-sampling"), "CLIENT_AND_SERVER", "the fork got the compiled pluginConfig")
        XCTAssertEqual(seen.headers["x-b3-traceid"].count, 1, "one tracing filter ran, not the builtin as well")
    }

    // MARK: tracing

    /// A collector on a real socket: keeps the JSON bodies POSTed to it.
    final class Collector {
        let server: TestUpstream
        var port: Int { server.port }
        init() throws { server = try TestUpstream { _ in TestUpstream.Reply(status: .accepted, body: "") } }
        func stop() { server.stop() }
        /// Every object of the Zipkin arrays received so far (POST /api/v2/spans).
        var zipkinSpans: [[String: Any]] {
            server.seen.filter { $0.uri == "/api/v2/spans" }.flatMap { r -> [[String: Any]] in
                (try? JSONSerialization.jsonObject(with: Data(r.body.utf8)) as? [[String: Any]]) ?? []
            }
        }
        func waitZipkin(_ n: Int) -> [[String: Any]] {
            for _ in 0..<200 { if zipkinSpans.count >= n { break }; usleep(20_000) }
            return zipkinSpans
        }
    }

    /// Two sidecars: the client's (outbound) sends to the server's inbound listener,
    /// which forwards to the app. Both trace at `sampling` percent to `collector`.
    func twoSidecars(app: TestUpstream, collector: Collector, sampling: Double) throws -> (ProxyFixture, ProxyFixture, String) {
        let mesh = try meshConfig("""
        defaultConfig:
          tracing:
            sampling: \(sampling)
            zipkin: {address: 127.0.0.1:\(collector.port)}
        """)
        let server = try ProxyFixture(appPort: app.port) { $0.meshConfigPath = mesh; $0.identity.labels = ["app": "reviews", "version": "v1"] }
        let client = try ProxyFixture(appPort: 1, files: ["svc.yaml": meshService("reviews", ports: [server.inbound])]) {
            $0.meshConfigPath = mesh; $0.identity.labels = ["app": "productpage"]
        }
        return (client, server, mesh)
    }

    func hex(_ s: Any?, _ n: Int) -> Bool {
        guard let s = s as? String else { return false }
        return s.utf8.count == n && s.allSatisfy { $0.isHexDigit && !$0.isUppercase }
    }

    /// Checks a span against Zipkin's v2 model (zipkin2-api.yaml): ids as lowercase hex,
    /// kind, microsecond timestamp and duration as integers, endpoints, string tags.
    func assertZipkinV2(_ s: [String: Any], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(hex(s["traceId"], 32) || hex(s["traceId"], 16), "traceId \(s["traceId"] ?? "nil")", file: file, line: line)
        XCTAssertTrue(hex(s["id"], 16), "id", file: file, line: line)
        if let p = s["parentId"] { XCTAssertTrue(hex(p, 16), "parentId", file: file, line: line) }
        XCTAssertTrue(["CLIENT", "SERVER"].contains(s["kind"] as? String ?? ""), file: file, line: line)
        XCTAssertNotNil(s["name"] as? String, file: file, line: line)
        XCTAssertGreaterThan((s["timestamp"] as? Int) ?? 0, 1_600_000_000_000_000, "timestamp in epoch microseconds", file: file, line: line)
        XCTAssertGreaterThan((s["duration"] as? Int) ?? 0, 0, file: file, line: line)
        XCTAssertNotNil((s["localEndpoint"] as? [String: Any])?["serviceName"] as? String, file: file, line: line)
        let tags = s["tags"] as? [String: Any] ?? [:]
        XCTAssertTrue(tags.values.allSatisfy { $0 is String }, "Zipkin tags are strings", file: file, line: line)
        let allowed: Set<String> = ["traceId", "id", "parentId", "kind", "name", "timestamp", "duration", "localEndpoint", "remoteEndpoint", "tags", "debug", "shared", "annotations"]
        XCTAssertTrue(Set(s.keys).isSubset(of: allowed), "unknown keys \(Set(s.keys).subtracting(allowed))", file: file, line: line)
    }

    func test_aNewTrace_startsAtTheFirstSidecar_andBothSpansReachZipkin_serverChildOfClient() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let collector = try Collector()
        defer { collector.stop() }
        let (client, server, _) = try twoSidecars(app: app, collector: collector, sampling: 100)
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound)
        c.send("GET /reviews/1 HTTP/1.1\r\nHost: reviews\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        let seen = try XCTUnwrap(app.seen.last)
        let traceID = try XCTUnwrap(seen.headers.first(name: "x-b3-traceid"))
        XCTAssertTrue(hex(traceID, 32))
        XCTAssertNotNil(seen.headers.first(name: "x-request-id"))
        XCTAssertEqual(seen.headers.first(name: "x-b3-sampled"), "1")
        let appSpan = try XCTUnwrap(seen.headers.first(name: "x-b3-spanid"))
        let appParent = try XCTUnwrap(seen.headers.first(name: "x-b3-parentspanid"))
        XCTAssertEqual(seen.headers.first(name: "traceparent"), "00-\(traceID)-\(appSpan)-01")

        let spans = collector.waitZipkin(2)
        XCTAssertEqual(spans.count, 2)
        for s in spans { assertZipkinV2(s) }
        let cs = try XCTUnwrap(spans.first { $0["kind"] as? String == "CLIENT" })
        let ss = try XCTUnwrap(spans.first { $0["kind"] as? String == "SERVER" })
        XCTAssertEqual(cs["traceId"] as? String, traceID)
        XCTAssertEqual(ss["traceId"] as? String, traceID)
        XCTAssertNil(cs["parentId"], "the first sidecar's span is the root")
        XCTAssertEqual(ss["parentId"] as? String, cs["id"] as? String, "the server span is a child of the client span")
        XCTAssertEqual(ss["id"] as? String, appSpan, "the app sees the server span as its parent")
        XCTAssertEqual(appParent, cs["id"] as? String)
        XCTAssertEqual((cs["localEndpoint"] as? [String: Any])?["serviceName"] as? String, "productpage.default")
        XCTAssertEqual((ss["localEndpoint"] as? [String: Any])?["serviceName"] as? String, "reviews.default")
        let tags = ss["tags"] as? [String: String] ?? [:]
        XCTAssertEqual(tags["istio.canonical_service"], "reviews")
        XCTAssertEqual(tags["istio.namespace"], "default")
        XCTAssertEqual(tags["istio.mesh_id"], "cluster.local")
        XCTAssertEqual(tags["http.method"], "GET")
        XCTAssertEqual(tags["http.status_code"], "200")
        XCTAssertEqual(tags["http.url"], "http://reviews/reviews/1")
        XCTAssertEqual(tags["component"], "proxy")
        XCTAssertEqual(tags["response_flags"], "-")
        XCTAssertEqual(tags["upstream_cluster"], "inbound|\(app.port)||")
        XCTAssertEqual(tags["peer.address"], "127.0.0.1")
        XCTAssertNotNil(tags["node_id"]?.hasPrefix("sidecar~"))
        XCTAssertNil(tags["error"])
        XCTAssertEqual((cs["tags"] as? [String: String])?["upstream_cluster"], "outbound|80||reviews.default.svc.cluster.local")
    }

    func test_w3cTraceparent_keepsItsTraceID_andB3SingleWith64BitIDs_isContinued() throws {
        // 500, not 503: Istio's default retry policy retries a 503 (each attempt a server span).
        let app = try TestUpstream { _ in TestUpstream.Reply(status: .internalServerError, body: "down") }
        defer { app.stop() }
        let collector = try Collector()
        defer { collector.stop() }
        let (client, server, _) = try twoSidecars(app: app, collector: collector, sampling: 0)
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound)
        // W3C, sampled by the caller: recorded although the rate is 0.
        let w3cTrace = "4bf92f3577b34da6a3ce929d0e0e4736", caller = "00f067aa0ba902b7"
        c.send("GET / HTTP/1.1\r\nHost: reviews\r\ntraceparent: 00-\(w3cTrace)-\(caller)-01\r\ntracestate: congo=t61rcWkgMzE\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 500)
        var seen = try XCTUnwrap(app.seen.last)
        XCTAssertEqual(seen.headers.first(name: "x-b3-traceid"), w3cTrace)
        XCTAssertTrue(seen.headers.first(name: "traceparent")?.hasPrefix("00-\(w3cTrace)-") ?? false)
        XCTAssertEqual(seen.headers.first(name: "tracestate"), "congo=t61rcWkgMzE")
        let spans = collector.waitZipkin(2)
        XCTAssertEqual(spans.count, 2)
        let cs = try XCTUnwrap(spans.first { $0["kind"] as? String == "CLIENT" })
        let ss = try XCTUnwrap(spans.first { $0["kind"] as? String == "SERVER" })
        XCTAssertEqual(cs["parentId"] as? String, caller, "the client span is a child of the caller's span")
        XCTAssertEqual(ss["parentId"] as? String, cs["id"] as? String)
        XCTAssertEqual((ss["tags"] as? [String: String])?["error"], "true", "5xx marks the span as an error")

        // B3 single header, 64-bit trace id, sampled.
        let b3Trace = "a3ce929d0e0e4736", b3Span = "e457b5a2e4d86bd1"
        c.send("GET / HTTP/1.1\r\nHost: reviews\r\nb3: \(b3Trace)-\(b3Span)-1\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 500)
        seen = try XCTUnwrap(app.seen.last)
        XCTAssertEqual(seen.headers.first(name: "x-b3-traceid"), b3Trace, "a 64-bit B3 trace id stays 64 bits")
        let b3 = try XCTUnwrap(seen.headers.first(name: "b3"))
        XCTAssertTrue(b3.hasPrefix("\(b3Trace)-\(seen.headers.first(name: "x-b3-spanid") ?? "?")-1-"), b3)
        XCTAssertEqual(seen.headers.first(name: "traceparent"), "00-0000000000000000\(b3Trace)-\(seen.headers.first(name: "x-b3-spanid") ?? "")-01")
        let all = collector.waitZipkin(4)
        let b3Client = all.first { $0["kind"] as? String == "CLIENT" && $0["traceId"] as? String == b3Trace }
        XCTAssertEqual(b3Client?["parentId"] as? String, b3Span)
    }

    func test_zeroSampling_sendsNoSpans_butStillPropagatesTheHeaders_andHonoursXB3Sampled() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let collector = try Collector()
        defer { collector.stop() }
        let (client, server, _) = try twoSidecars(app: app, collector: collector, sampling: 0)
        defer { client.stop(); server.stop() }
        let c = try RawClient(port: client.outbound)
        for _ in 0..<5 {
            c.send("GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            XCTAssertEqual(c.read()?.status, 200)
        }
        let seen = try XCTUnwrap(app.seen.last)
        let traceID = try XCTUnwrap(seen.headers.first(name: "x-b3-traceid"))
        XCTAssertEqual(seen.headers.first(name: "x-b3-sampled"), "0")
        XCTAssertTrue(seen.headers.first(name: "traceparent")?.hasSuffix("-00") ?? false)
        XCTAssertTrue(hex(traceID, 32))
        XCTAssertNotNil(seen.headers.first(name: "x-request-id"))
        usleep(1_500_000)   // past the exporter's one-second batch period
        XCTAssertEqual(collector.server.seen.count, 0, "sampling 0%: no span leaves")
        // A caller that samples (x-b3-sampled: 1) is honoured.
        c.send("GET / HTTP/1.1\r\nHost: reviews\r\nx-b3-sampled: 1\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        XCTAssertEqual(collector.waitZipkin(2).count, 2)
    }

    func test_otlpProvider_exportsOTLPJSON_followingTheOTLPMapping() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let collector = try Collector()
        defer { collector.stop() }
        let mesh = try meshConfig("""
        extensionProviders:
        - name: otel
          opentelemetry: {service: 127.0.0.1, port: \(collector.port)}
        """)
        let telemetry = """
        apiVersion: telemetry.istio.io/v1
        kind: Telemetry
        metadata: {name: mesh-default, namespace: istio-system}
        spec:
          tracing:
          - providers: [{name: otel}]
            randomSamplingPercentage: 100
            customTags:
              team: {literal: {value: checkout}}
              tenant: {header: {name: x-tenant, defaultValue: none}}
        """
        let fx = try ProxyFixture(appPort: app.port, files: ["t.yaml": telemetry]) { $0.meshConfigPath = mesh; $0.identity.labels = ["app": "cart"] }
        defer { fx.stop() }
        let c = try RawClient(port: fx.inbound)
        XCTAssertEqual(get(c, "/cart", headers: "x-tenant: acme\r\n")?.status, 200)
        var body: [String: Any]?
        for _ in 0..<200 {
            if let r = collector.server.seen.first(where: { $0.uri == "/v1/traces" }) {
                body = try JSONSerialization.jsonObject(with: Data(r.body.utf8)) as? [String: Any]; break
            }
            usleep(20_000)
        }
        let rs = try XCTUnwrap((body?["resourceSpans"] as? [[String: Any]])?.first)
        let resAttrs = (rs["resource"] as? [String: Any])?["attributes"] as? [[String: Any]] ?? []
        XCTAssertEqual(resAttrs.first { $0["key"] as? String == "service.name" }.flatMap { ($0["value"] as? [String: Any])?["stringValue"] as? String }, "cart.default")
        let span = try XCTUnwrap(((rs["scopeSpans"] as? [[String: Any]])?.first?["spans"] as? [[String: Any]])?.first)
        XCTAssertTrue(hex(span["traceId"], 32))
        XCTAssertTrue(hex(span["spanId"], 16))
        XCTAssertEqual(span["kind"] as? Int, 2, "SPAN_KIND_SERVER")
        let start = UInt64(span["startTimeUnixNano"] as? String ?? "") ?? 0, end = UInt64(span["endTimeUnixNano"] as? String ?? "") ?? 0
        XCTAssertGreaterThan(start, 1_600_000_000_000_000_000, "fixed64 nanoseconds as a decimal string")
        XCTAssertGreaterThan(end, start)
        let attrs = span["attributes"] as? [[String: Any]] ?? []
        func attr(_ k: String) -> String? { attrs.first { $0["key"] as? String == k }.flatMap { ($0["value"] as? [String: Any])?["stringValue"] as? String } }
        XCTAssertEqual(attr("http.method"), "GET")
        XCTAssertEqual(attr("http.status_code"), "200")
        XCTAssertEqual(attr("team"), "checkout")
        XCTAssertEqual(attr("tenant"), "acme")
        XCTAssertEqual((span["status"] as? [String: Any])?["code"] as? Int, 0)
    }
}
