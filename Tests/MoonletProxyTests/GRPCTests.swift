import XCTest
import NIOCore
import NIOHTTP1
import NIOConcurrencyHelpers
@testable import MoonletProxy
import MoonletConfig
import MoonletCore

/// The gRPC server and client of Tests/Fixtures/grpc (Debian's python3-grpcio, generic
/// handlers): /usr/bin/python3 explicitly, since a python3 earlier on PATH may not see
/// Debian's dist-packages. Tests skip when python3-grpcio is missing.
enum GRPCFixtures {
    static let python = "/usr/bin/python3"
    static var dir: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/grpc").path
    }

    /// Whether `import grpc` works in /usr/bin/python3 (asked once).
    static let available: Bool = {
        guard FileManager.default.isExecutableFile(atPath: python) else { return false }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = ["-c", "import grpc"]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }()

    static func requireGRPC() throws {
        if !available { throw XCTSkip("python3-grpcio is not installed for /usr/bin/python3 (scripts/install-deps installs it)") }
    }

    /// Runs client.py once: `case` against `target` ("127.0.0.1:PORT") with `authority`;
    /// returns its JSON result.
    static func client(_ port: Int, authority: String, _ args: String...) throws -> [String: Any] {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = [dir + "/client.py", "127.0.0.1:\(port)", authority] + args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let errText = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            XCTFail("client.py \(args): no JSON: \(String(decoding: data, as: UTF8.self)) \(errText)")
            return [:]
        }
        return obj
    }
}

/// server.py as a running process: its port, stopped by closing its stdin.
final class GRPCServer {
    let process = Process()
    let stdin = Pipe()
    var port = 0

    init() throws {
        try GRPCFixtures.requireGRPC()
        process.executableURL = URL(fileURLWithPath: GRPCFixtures.python)
        process.arguments = [GRPCFixtures.dir + "/server.py"]
        let out = Pipe()
        process.standardInput = stdin
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        // "PORT n" once it serves.
        var line = Data()
        let h = out.fileHandleForReading
        while !line.contains(UInt8(ascii: "\n")) {
            let d = h.availableData
            if d.isEmpty { break }
            line.append(d)
        }
        let text = String(decoding: line, as: UTF8.self)
        guard text.hasPrefix("PORT "), let p = Int(text.dropFirst(5).trimmingCharacters(in: .whitespacesAndNewlines)) else {
            stop()
            throw XCTSkip("the gRPC test server did not start: \(text)")
        }
        port = p
    }

    func stop() {
        try? stdin.fileHandleForWriting.close()
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }
}

/// One gRPC message as a request body: the 5-byte prefix (not compressed, length).
func grpcFrame(_ message: String) -> [UInt8] {
    let m = Array(message.utf8)
    let n = UInt32(m.count)
    return [0, UInt8(n >> 24), UInt8((n >> 16) & 0xff), UInt8((n >> 8) & 0xff), UInt8(n & 0xff)] + m
}

/// gRPC semantics of the proxy (docs/grpc.md): local replies to gRPC requests are gRPC
/// errors, retryOn's gRPC conditions read grpc-status, grpc-timeout bounds the route
/// timeout; and gRPC calls end to end through two sidecars with mTLS.
final class GRPCTests: XCTestCase {

    // MARK: status mapping, grpc-timeout (no sockets)

    func test_httpStatusesMapToGRPCCodes_asEnvoysTable() {
        let table: [(Int, GRPC.Code)] = [(400, .internalError), (401, .unauthenticated), (403, .permissionDenied), (404, .unimplemented),
                                         (429, .unavailable), (502, .unavailable), (503, .unavailable), (504, .unavailable),
                                         (500, .unknown), (409, .unknown), (200, .unknown)]
        for (http, code) in table { XCTAssertEqual(GRPC.status(httpStatus: http), code, "\(http)") }
        let r = GRPC.localReply(LocalReply(status: 403, body: "RBAC: access denied\n", headers: [(name: "content-type", value: "text/plain"), (name: "x-a", value: "1")]))
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.body, "")
        XCTAssertEqual(r.headers.map { "\($0.name): \($0.value)" },
                       ["content-type: application/grpc", "x-a: 1", "grpc-status: 7", "grpc-message: RBAC: access denied"])
        XCTAssertEqual(GRPC.percentEncode("50% off\télan"), "50%25 off%09%C3%A9lan")
        let own = GRPC.localReply(LocalReply(status: 200, body: "", headers: [(name: "grpc-status", value: "5"), (name: "grpc-message", value: "gone")]))
        XCTAssertEqual(own.headers.filter { $0.name.hasPrefix("grpc-") }.map(\.value), ["5", "gone"], "a filter's own grpc-status is kept")
    }

    func test_grpcTimeoutParsesEveryUnit_andBoundsTheRouteTimeout() {
        XCTAssertEqual(GRPC.timeoutMs("100m"), 100)
        XCTAssertEqual(GRPC.timeoutMs("2S"), 2000)
        XCTAssertEqual(GRPC.timeoutMs("3M"), 180_000)
        XCTAssertEqual(GRPC.timeoutMs("1H"), 3_600_000)
        XCTAssertEqual(GRPC.timeoutMs("1500u"), 2, "rounded up to a whole millisecond")
        XCTAssertEqual(GRPC.timeoutMs("999999n"), 1)
        XCTAssertEqual(GRPC.timeoutMs("99999999S"), 99_999_999_000)
        for bad in ["", "m", "100", "100x", "123456789S", "-1S", "1.5S", " 1S"] { XCTAssertNil(GRPC.timeoutMs(bad), bad) }
        XCTAssertEqual(GRPC.effectiveTimeoutMs(routeMs: 0, grpcTimeoutMs: 250), 250, "no route timeout: the header's")
        XCTAssertEqual(GRPC.effectiveTimeoutMs(routeMs: 1000, grpcTimeoutMs: 250), 250)
        XCTAssertEqual(GRPC.effectiveTimeoutMs(routeMs: 1000, grpcTimeoutMs: 5000), 1000, "capped at the route's")
        XCTAssertEqual(GRPC.effectiveTimeoutMs(routeMs: 1000, grpcTimeoutMs: 0), 1000, "0: none")
        XCTAssertEqual(GRPC.effectiveTimeoutMs(routeMs: 1000, grpcTimeoutMs: nil), 1000)
        XCTAssertTrue(GRPC.isGRPCContentType("application/grpc"))
        XCTAssertTrue(GRPC.isGRPCContentType("application/grpc+proto"))
        XCTAssertFalse(GRPC.isGRPCContentType("application/grpc-web"))
        // Envoy compares the prefix as is.
        XCTAssertFalse(GRPC.isGRPCContentType("Application/gRPC"))
        XCTAssertFalse(GRPC.isGRPCContentType("application/json"))
    }

    func test_retryOnGRPCConditions_parseAndReadBackInCanonicalForm() {
        let all = RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: "unavailable,internal,resource-exhausted,deadline-exceeded,cancelled")
        XCTAssertEqual(all.retryOn, "cancelled,deadline-exceeded,resource-exhausted,internal,unavailable")
        for code in 0...16 { XCTAssertEqual(all.retries(grpcStatus: code), [1, 4, 8, 13, 14].contains(code), "\(code)") }
        XCTAssertEqual(RetrySpec.istioDefault.retryOn, "connect-failure,refused-stream,cancelled,unavailable,503")
        XCTAssertEqual(RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"),
                       RetrySpec.istioDefault, "Istio's default text is the default policy")
        XCTAssertFalse(RetrySpec(attempts: 2, perTryTimeoutMs: 0, retryOn: "5xx").retries(grpcStatus: 14))
    }

    // MARK: one sidecar, HTTP/1.1 app (gRPC semantics of the proxy)

    /// The outbound sidecar of a frontend with service `svc` (its endpoints `ports`) and
    /// a VirtualService whose rules are `http`.
    func outbound(_ ports: [Int], http: String = "  - route: [{destination: {host: svc}}]\n", files: [String: String] = [:]) throws -> ProxyFixture {
        var all = files
        all["svc.yaml"] = meshService("svc", ports: ports,
                                      extra: "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: svc}\nspec:\n  hosts: [svc]\n  http:\n\(http)")
        return try ProxyFixture(appPort: 1, files: all, concurrency: 1)
    }

    /// One gRPC call with curl over h2c: the response head as text. `message` nil: a POST
    /// without a body (END_STREAM on its HEADERS), for replies that come before the body
    /// is read: the proxy then ends the stream with RST_STREAM NO_ERROR after its complete
    /// reply (RFC 9113 §8.1), which this curl reports as a stream error.
    func curlGRPC(_ port: Int, host: String, path: String = "/moonlet.test.Echo/Echo", message: String? = "hi", headers: [String] = []) throws -> String {
        let body = NSTemporaryDirectory() + "moonlet-grpc-\(UUID().uuidString).bin"
        if let message { FileManager.default.createFile(atPath: body, contents: Data(grpcFrame(message))) }
        defer { try? FileManager.default.removeItem(atPath: body) }
        var args = ["-sS", "--max-time", "10", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
                    "-H", "host: \(host)", "-H", "content-type: application/grpc", "-H", "te: trailers"]
        args += message == nil ? ["-X", "POST"] : ["--data-binary", "@" + body]
        for h in headers { args += ["-H", h] }
        return try runTool("curl", args + ["http://127.0.0.1:\(port)\(path)"])
    }

    func test_localRepliesToGRPCRequests_areTrailersOnlyGRPCErrors_withEnvoysStatusMapping() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let px = try outbound([app.port], http: """
          - match: [{uri: {prefix: /moonlet.test.Echo/Abort}}]
            fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
            route: [{destination: {host: svc}}]
          - route: [{destination: {host: svc}}]

        """)
        defer { px.stop() }
        // No such host: 404 NR -> UNIMPLEMENTED, no body, no content-length on HTTP/2.
        let nr = try curlGRPC(px.outbound, host: "nowhere.example", message: nil)
        XCTAssertTrue(nr.hasPrefix("HTTP/2 200"), nr)
        XCTAssertTrue(nr.contains("content-type: application/grpc\r\n"), nr)
        XCTAssertTrue(nr.contains("grpc-status: 12\r\n"), nr)
        XCTAssertFalse(nr.contains("content-length"), nr)
        // A fault abort 503 -> UNAVAILABLE with the body as grpc-message.
        let abort = try curlGRPC(px.outbound, host: "svc", path: "/moonlet.test.Echo/Abort", message: nil)
        XCTAssertTrue(abort.contains("grpc-status: 14\r\n") && abort.contains("grpc-message: fault filter abort\r\n"), abort)
        XCTAssertEqual(app.seen.count, 0)
        // Not gRPC: the HTTP reply as before.
        let plain = try runTool("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "-H", "host: nowhere.example",
                                         "http://127.0.0.1:\(px.outbound)/x"])
        XCTAssertTrue(plain.hasPrefix("HTTP/2 404"), plain)
        // HTTP/1.1 gRPC clients get the same, with content-length 0.
        let c = try RawClient(port: px.outbound)
        c.send("POST /moonlet.test.Echo/Echo HTTP/1.1\r\nHost: nowhere.example\r\ncontent-type: application/grpc+proto\r\ncontent-length: 0\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.header("grpc-status"), "12")
        XCTAssertEqual(r.header("content-length"), "0")
        // Istio's metrics: response code 200, the gRPC status as grpc_response_status.
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        let lines = stats.split(separator: "\n").filter { $0.hasPrefix("istio_requests_total{") }
        XCTAssertTrue(lines.contains { $0.contains("request_protocol=\"grpc\"") && $0.contains("response_code=\"200\"") && $0.contains("grpc_response_status=\"14\"") && $0.contains("response_flags=\"FI\"") }, lines.joined(separator: "\n"))
        // The HTTP/2 and the HTTP/1.1 request alike: Istio's request_protocol is the
        // content-type's, on any HTTP version.
        XCTAssertTrue(lines.contains { $0.contains("request_protocol=\"grpc\"") && $0.contains("grpc_response_status=\"12\"") && $0.contains("response_flags=\"NR\"") && $0.hasSuffix("} 2") }, lines.joined(separator: "\n"))
    }

    func test_aGRPCWebRequestOverHTTP2_isCountedAsHTTP_notGRPC_andGetsAPlainReply() throws {
        let app = try TestUpstream()
        defer { app.stop() }
        let px = try outbound([app.port], http: """
          - route: [{destination: {host: svc}}]

        """)
        defer { px.stop() }
        let r = try runTool("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "-H", "host: nowhere.example",
                                     "-H", "content-type: application/grpc-web+proto", "-X", "POST", "http://127.0.0.1:\(px.outbound)/moonlet.test.Echo/Echo"])
        XCTAssertTrue(r.hasPrefix("HTTP/2 404"), r)
        XCTAssertFalse(r.contains("grpc-status"), r)
        let lines = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body.split(separator: "\n").filter { $0.hasPrefix("istio_requests_total{") }
        XCTAssertTrue(lines.contains { $0.contains("request_protocol=\"http\"") && $0.contains("response_code=\"404\"") && $0.contains("grpc_response_status=\"\"") }, lines.joined(separator: "\n"))
        XCTAssertFalse(lines.contains { $0.contains("request_protocol=\"grpc\"") }, lines.joined(separator: "\n"))
    }

    func test_aGRPCClientSeesTheMappedStatus_forAnRBACDenialAndANoRouteReply() throws {
        try GRPCFixtures.requireGRPC()
        let app = try TestUpstream()
        defer { app.stop() }
        let deny = """
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: no-echo, namespace: default}
        spec:
          action: DENY
          rules: [{to: [{operation: {paths: [/moonlet.test.Echo/Echo]}}]}]
        """
        let px = try ProxyFixture(appPort: app.port, files: ["deny.yaml": deny], concurrency: 1) { s in
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "echo", labels: ["app": "echo"])
        }
        defer { px.stop() }
        let denied = try GRPCFixtures.client(px.inbound, authority: "echo", "call", "hello")
        XCTAssertEqual(denied["code"] as? String, "PERMISSION_DENIED", "\(denied)")
        XCTAssertEqual(denied["details"] as? String, "RBAC: access denied", "\(denied)")
        let nr = try GRPCFixtures.client(px.outbound, authority: "nowhere.example", "call", "hello")
        XCTAssertEqual(nr["code"] as? String, "UNIMPLEMENTED", "\(nr)")
        XCTAssertEqual(app.seen.count, 0)
    }

    func test_a4MBMessageAndA2MBStream_goThroughOneSidecarToAnH2CApp() throws {
        let app = try GRPCServer()
        defer { app.stop() }
        let se = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: echo, namespace: default}
        spec:
          hosts: [echo.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{number: 80, name: grpc, protocol: GRPC, targetPort: \(app.port)}]
          workloadSelector: {labels: {app: echo}}
        """
        let px = try ProxyFixture(appPort: app.port, files: ["se.yaml": se], concurrency: 1) { s in
            s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "echo", labels: ["app": "echo"])
        }
        defer { px.stop() }
        let big = try GRPCFixtures.client(px.inbound, authority: "echo", "big", String(4 * 1024 * 1024))
        XCTAssertEqual(big["ok"] as? Bool, true, "\(big)")
        let up = try GRPCFixtures.client(px.inbound, authority: "echo", "client_stream", "2000")
        XCTAssertEqual(up["ok"] as? Bool, true, "\(up)")
    }

    func test_grpcTimeoutBoundsTheRouteTimeout_andItsExpiryIsAGRPCError() throws {
        let app = try TestUpstream { _ in TestUpstream.Reply(headers: [("content-type", "application/grpc"), ("grpc-status", "0")], body: "", delayMs: 1500) }
        defer { app.stop() }
        let px = try outbound([app.port], http: """
          - match: [{uri: {prefix: /capped}}]
            timeout: 300ms
            route: [{destination: {host: svc}}]
          - route: [{destination: {host: svc}}]

        """)
        defer { px.stop() }
        // No route timeout (Istio's default): grpc-timeout alone.
        var start = Date()
        let t = try curlGRPC(px.outbound, host: "svc", headers: ["grpc-timeout: 200m"])
        XCTAssertTrue(t.contains("grpc-status: 14\r\n") && t.contains("grpc-message: upstream request timeout\r\n"), t)
        XCTAssertLessThan(Date().timeIntervalSince(start), 1.4, "cut by grpc-timeout, before the app's answer")
        // The route's timeout caps a longer grpc-timeout.
        start = Date()
        let capped = try curlGRPC(px.outbound, host: "svc", path: "/capped/x", headers: ["grpc-timeout: 10S"])
        XCTAssertTrue(capped.contains("grpc-status: 14\r\n"), capped)
        XCTAssertLessThan(Date().timeIntervalSince(start), 1.4)
        // A grpc-timeout longer than the app takes: the answer.
        let ok = try curlGRPC(px.outbound, host: "svc", headers: ["grpc-timeout: 5S"])
        XCTAssertTrue(ok.contains("grpc-status: 0\r\n"), ok)
        // Not a gRPC request: grpc-timeout means nothing.
        let c = try RawClient(port: px.outbound)
        c.send("GET / HTTP/1.1\r\nHost: svc\r\ngrpc-timeout: 100m\r\n\r\n")
        XCTAssertEqual(c.read()?.header("grpc-status"), "0", "answered after 1.5 s, not cut")
    }

    func test_trailersOnlyUnavailable_isRetriedByIstiosDefaultPolicy_andOnUpstreamFailureSeesTheGRPCStatus() throws {
        let calls = NIOLockedValueBox(0)
        let app = try TestUpstream { r in
            let n = calls.withLockedValue { $0 += 1; return $0 }
            let code = r.uri.hasPrefix("/always") || n == 1 ? "14" : "0"
            return TestUpstream.Reply(headers: [("content-type", "application/grpc"), ("grpc-status", code), ("content-length", "0")], body: "")
        }
        defer { app.stop() }
        let spy = """
        return {
          on_upstream_failure = function(s, conf, f)
            s.vars.failures = (s.vars.failures or "") .. f.kind .. "/" .. f.status .. "/" .. tostring(f.grpc_status) .. " "
          end,
          on_response = function(s) if s.vars.failures then s.response.headers:set("x-failures", s.vars.failures) end end,
        }
        """
        let px = try outbound([app.port], http: """
          - match: [{uri: {prefix: /only5xx}}]
            retries: {attempts: 2, retryOn: 5xx}
            route: [{destination: {host: svc}}]
          - route: [{destination: {host: svc}}]

        """, files: ["spy.lua": spy, "spy.yaml": ProxyFixture.plugin("spy")])
        defer { px.stop() }
        let retried = try curlGRPC(px.outbound, host: "svc")
        XCTAssertTrue(retried.contains("grpc-status: 0\r\n"), retried)
        XCTAssertTrue(retried.contains("x-failures: grpc-status/200/14 \r\n"), retried)
        XCTAssertEqual(calls.withLockedValue { $0 }, 2)
        // Attempts run out: the last UNAVAILABLE goes to the client, flagged URX.
        let always = try curlGRPC(px.outbound, host: "svc", path: "/always")
        XCTAssertTrue(always.contains("grpc-status: 14\r\n"), always)
        XCTAssertEqual(calls.withLockedValue { $0 }, 5, "Istio's default: 2 retries")
        // A policy without gRPC conditions does not retry it.
        calls.withLockedValue { $0 = 0 }
        let only5xx = try curlGRPC(px.outbound, host: "svc", path: "/only5xx")
        XCTAssertTrue(only5xx.contains("grpc-status: 14\r\n"), only5xx)
        XCTAssertEqual(calls.withLockedValue { $0 }, 1)
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.split(separator: "\n").contains { $0.hasPrefix("istio_requests_total{") && $0.contains("grpc_response_status=\"14\"") && $0.contains("response_flags=\"URX\"") }, stats)
    }
}

/// gRPC end to end with python3-grpcio: client -> frontend's outbound sidecar -> mTLS (h2)
/// -> orders' inbound sidecar -> h2c -> the gRPC app (Tests/Fixtures/grpc/server.py). One
/// app and pair of sidecars serve every test of the class.
final class GRPCThroughSidecarsTests: XCTestCase {
    static let authority = "orders.production.svc.cluster.local"

    final class Mesh {
        let pki: FixturePKI
        let app: GRPCServer
        let client: ProxyFixture
        let server: ProxyFixture

        init() throws {
            app = try GRPCServer()
            pki = try FixturePKI()
            let serverFiles = [
                "pa.yaml": peerAuthentication("strict", namespace: "production", mode: "STRICT"),
                // The app's port is gRPC: the inbound side speaks h2c to it.
                "se.yaml": """
                apiVersion: networking.istio.io/v1beta1
                kind: ServiceEntry
                metadata: {name: orders, namespace: production}
                spec:
                  hosts: [\(GRPCThroughSidecarsTests.authority)]
                  location: MESH_INTERNAL
                  resolution: STATIC
                  ports: [{number: 80, name: grpc, protocol: GRPC, targetPort: \(app.port)}]
                  workloadSelector: {labels: {app: orders}}
                """,
                "deny.yaml": """
                apiVersion: security.istio.io/v1beta1
                kind: AuthorizationPolicy
                metadata: {name: no-denied, namespace: production}
                spec:
                  action: DENY
                  rules: [{to: [{operation: {paths: [/moonlet.test.Echo/Denied]}}]}]
                """,
            ]
            let serverCerts = try pki.issue("production", "orders")
            server = try ProxyFixture(appPort: app.port, files: serverFiles, concurrency: 1) { s in
                s.certsDirectory = serverCerts
                s.identity = WorkloadIdentity(namespace: "production", serviceAccount: "orders", labels: ["app": "orders"])
            }
            let clientCerts = try pki.issue("default", "frontend")
            let serverPort = server.inbound
            // The streaming methods get a 1 s route timeout: it bounds the wait for the
            // response head, never a stream whose data flows.
            let routes = """
            apiVersion: networking.istio.io/v1beta1
            kind: VirtualService
            metadata: {name: orders, namespace: default}
            spec:
              hosts: [\(GRPCThroughSidecarsTests.authority)]
              http:
              - match: [{uri: {prefix: /moonlet.test.Echo/Count}}, {uri: {prefix: /moonlet.test.Echo/Chat}}]
                timeout: 1s
                route: [{destination: {host: \(GRPCThroughSidecarsTests.authority)}}]
              - route: [{destination: {host: \(GRPCThroughSidecarsTests.authority)}}]
            """
            client = try ProxyFixture(appPort: 1, files: ["se.yaml": MTLSTests.ordersEntry(port: serverPort, serviceAccount: "orders", portName: "grpc"), "vs.yaml": routes], concurrency: 1) { s in
                s.certsDirectory = clientCerts
                s.identity = WorkloadIdentity(namespace: "default", serviceAccount: "frontend", labels: ["app": "frontend"])
            }
        }

        func stop() { client.stop(); server.stop(); app.stop(); pki.cleanup() }
    }

    nonisolated(unsafe) static var mesh: Mesh?
    nonisolated(unsafe) static var setupError: Error?

    override class func setUp() {
        super.setUp()
        guard GRPCFixtures.available else { return }
        do { mesh = try Mesh() } catch { setupError = error }
    }

    override class func tearDown() {
        mesh?.stop(); mesh = nil
        super.tearDown()
    }

    func theMesh() throws -> Mesh {
        try GRPCFixtures.requireGRPC()
        if let e = Self.setupError { throw e }
        return try XCTUnwrap(Self.mesh)
    }

    func call(_ args: String...) throws -> [String: Any] {
        let m = try theMesh()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: GRPCFixtures.python)
        p.arguments = [GRPCFixtures.dir + "/client.py", "127.0.0.1:\(m.client.outbound)", Self.authority] + args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard let line = text.split(separator: "\n").last, let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            XCTFail("client.py \(args): \(text)")
            return [:]
        }
        return obj
    }

    func istioRequests(_ px: ProxyFixture) throws -> [Substring] {
        let stats = try XCTUnwrap(adminGet(px.admin, "/stats/prometheus")).body
        return stats.split(separator: "\n").filter { $0.hasPrefix("istio_requests_total{") }
    }

    func test_manyUnaryCallsOnOneChannel_succeed_andIstioMetricsLabelThemGRPCWithTheirStatus() throws {
        let r = try call("unary", "200")
        XCTAssertEqual(r["ok"] as? Bool, true, "\(r)")
        let m = try theMesh()
        for (px, reporter) in [(m.client, "source"), (m.server, "destination")] {
            let lines = try istioRequests(px)
            XCTAssertTrue(lines.contains { $0.contains("reporter=\"\(reporter)\"") && $0.contains("request_protocol=\"grpc\"") && $0.contains("response_code=\"200\"")
                    && $0.contains("grpc_response_status=\"0\"") && $0.contains("connection_security_policy=\"\(reporter == "destination" ? "mutual_tls" : "unknown")\"") },
                          "\(reporter):\n" + lines.joined(separator: "\n"))
        }
    }

    func test_a4MBMessage_goesThroughBothWays() throws {
        let r = try call("big", String(4 * 1024 * 1024))
        XCTAssertEqual(r["ok"] as? Bool, true, "\(r)")
        XCTAssertEqual(r["bytes"] as? Int, 4 * 1024 * 1024)
    }

    func test_serverStreamingOf100Messages_arrivesWholeAndInOrder() throws {
        let r = try call("server_stream", "100")
        XCTAssertEqual(r["ok"] as? Bool, true, "\(r)")
        XCTAssertEqual(r["messages"] as? Int, 100)
    }

    func test_clientStreamingAndBidiStreaming_work() throws {
        let up = try call("client_stream", "200")
        XCTAssertEqual(up["ok"] as? Bool, true, "\(up)")
        let bidi = try call("bidi", "50")
        XCTAssertEqual(bidi["ok"] as? Bool, true, "each answer arrives before the next message is sent: \(bidi)")
    }

    func test_streamsLongerThanTheRouteTimeout_areNotCutWhileDataFlows_bothServerAndBidi() throws {
        let server = try call("slow_stream", "12:250")
        XCTAssertEqual(server["ok"] as? Bool, true, "\(server)")
        XCTAssertGreaterThan(server["elapsed_ms"] as? Int ?? 0, 2500, "the stream outlived its 1 s route timeout: \(server)")
        let bidi = try call("bidi", "10:250")
        XCTAssertEqual(bidi["ok"] as? Bool, true, "\(bidi)")
        XCTAssertGreaterThan(bidi["elapsed_ms"] as? Int ?? 0, 2000, "\(bidi)")
    }

    func test_anErrorStatus_keepsItsDetailsAndTrailingMetadata() throws {
        let r = try call("call", "fail:NOT_FOUND:no such order 42")
        XCTAssertEqual(r["code"] as? String, "NOT_FOUND", "\(r)")
        XCTAssertEqual(r["details"] as? String, "no such order 42")
        let trailing = r["trailing"] as? [String: String] ?? [:]
        XCTAssertEqual(trailing["x-detail"], "d1", "\(r)")
        XCTAssertEqual(trailing["x-raw-bin"], "0001fe", "binary metadata intact: \(r)")
        let lines = try istioRequests(try theMesh().client)
        XCTAssertTrue(lines.contains { $0.contains("grpc_response_status=\"5\"") }, lines.joined(separator: "\n"))
    }

    func test_aDeadlineExceeded_endsTheCallInTime() throws {
        let r = try call("deadline", "300")
        XCTAssertEqual(r["code"] as? String, "DEADLINE_EXCEEDED", "\(r)")
        XCTAssertLessThan(r["elapsed_ms"] as? Int ?? 99999, 3000, "\(r)")
    }

    func test_localReplies_reachTheClientAsTheirMappedGRPCStatus() throws {
        let denied = try call("call_at", "/moonlet.test.Echo/Denied")
        XCTAssertEqual(denied["code"] as? String, "PERMISSION_DENIED", "the server sidecar's RBAC denial: \(denied)")
        XCTAssertEqual(denied["details"] as? String, "RBAC: access denied")
        let unknown = try call("call_at", "/moonlet.test.Echo/NoSuchMethod")
        XCTAssertEqual(unknown["code"] as? String, "UNIMPLEMENTED", "the app's own answer: \(unknown)")
    }

    func test_unavailableFromTheApp_isRetriedByTheClientSidecar() throws {
        let key = "k\(UInt32.random(in: 0...UInt32.max))"
        let r = try call("call", "flaky:\(key):1")
        XCTAssertEqual(r["code"] as? String, "OK", "\(r)")
        XCTAssertEqual(r["answer"] as? String, "attempt 2", "one UNAVAILABLE, then the retry: \(r)")
        let twice = try call("call", "flaky:\(key)x:5")
        XCTAssertEqual(twice["code"] as? String, "UNAVAILABLE", "Istio's default gives up after 2 retries: \(twice)")
        XCTAssertEqual(twice["details"] as? String, "flaky \(key)x try 3")
    }
}
