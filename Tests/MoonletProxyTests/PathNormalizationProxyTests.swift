import XCTest
import MoonletCore
import MoonletConfig
@testable import MoonletProxy

/// Istio's path normalization runs natively before any filter: the app, routing,
/// authorization and Lua filters all see the normalized path; Lua still reads what the
/// client sent as `s.request.original_path`.
final class PathNormalizationProxyTests: XCTestCase {
    var app: TestUpstream!
    override func setUpWithError() throws { app = try TestUpstream() }
    override func tearDown() { app.stop() }

    /// A filter that shows the app what Lua saw.
    let showPaths = """
    return { on_request = function(s)
      s.request.headers:set("x-lua-path", s.request.path)
      s.request.headers:set("x-lua-original", s.request.original_path)
    end }
    """

    func sidecar(mesh: String? = nil, files: [String: String] = [:]) throws -> ProxyFixture {
        var meshPath: String? = nil
        if let mesh {
            meshPath = NSTemporaryDirectory() + "moonlet-mesh-\(UUID().uuidString).yaml"
            try mesh.write(toFile: meshPath!, atomically: true, encoding: .utf8)
        }
        var all = files
        all["paths.lua"] = showPaths
        all["paths.yaml"] = ProxyFixture.plugin("paths")
        return try ProxyFixture(appPort: app.port, files: all, concurrency: 1) { s in s.meshConfigPath = meshPath }
    }

    func test_byDefault_BASE_normalizesDotSegmentsAndUnreservedEscapes_beforeFiltersAndTheApp() throws {
        let p = try sidecar()
        defer { p.stop() }
        let c = try RawClient(port: p.inbound)
        for (sent, want) in [("/api/order/./1", "/api/order/1"), ("/api/x/../order/1?q=%2e", "/api/order/1?q=%2e"), ("/%61pi/order/%31", "/api/order/1"),
                             ("/api//order", "/api//order")] {
            let r = get(c, sent)
            XCTAssertEqual(r?.status, 200, sent)
            let seen = try XCTUnwrap(app.seen.last)
            XCTAssertEqual(seen.uri, want, "the app sees the normalized path for \(sent)")
            XCTAssertEqual(seen.headers.first(name: "x-lua-path"), want, "Lua sees it too")
            XCTAssertEqual(seen.headers.first(name: "x-lua-original"), sent, "and can read what the client sent")
        }
    }

    func test_aPathWithAnEscapedNUL_isRefusedWith400_andNeverReachesTheApp() throws {
        let p = try sidecar()
        defer { p.stop() }
        let before = app.seen.count
        let r = get(try RawClient(port: p.inbound), "/api/%00/x")
        XCTAssertEqual(r?.status, 400)
        XCTAssertEqual(app.seen.count, before)
    }

    func test_MERGE_SLASHESfromTheMeshConfig_mergesSlashes_andDECODE_AND_MERGE_SLASHESdecodesEscapedSlashes() throws {
        let merge = try sidecar(mesh: "pathNormalization:\n  normalization: MERGE_SLASHES\n")
        defer { merge.stop() }
        XCTAssertEqual(get(try RawClient(port: merge.inbound), "//api///order/1")?.status, 200)
        XCTAssertEqual(app.seen.last?.uri, "/api/order/1")
        let decode = try sidecar(mesh: "pathNormalization:\n  normalization: DECODE_AND_MERGE_SLASHES\n")
        defer { decode.stop() }
        XCTAssertEqual(get(try RawClient(port: decode.inbound), "/api%2Forder%2f1")?.status, 200)
        XCTAssertEqual(app.seen.last?.uri, "/api/order/1")
    }

    func test_authorizationSeesTheNormalizedPath_soDotSegmentsCannotReachADeniedPath() throws {
        let deny = """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-admin, namespace: default}
        spec:
          action: DENY
          rules:
          - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
        """
        let p = try sidecar(files: ["authz.yaml": deny])
        defer { p.stop() }
        let c = try RawClient(port: p.inbound)
        let before = app.seen.count
        for trick in ["/api/../admin", "/./admin", "/api/%2e%2e/admin/x", "/%61dmin"] {
            XCTAssertEqual(get(c, trick)?.status, 403, trick)
        }
        XCTAssertEqual(app.seen.count, before, "the app never saw a denied request")
        XCTAssertEqual(get(c, "/api/order/1")?.status, 200)
    }
}

/// The outbound stream's destination port is the one the app addressed (a VirtualService
/// `match.port` compares with it).
final class AuthorityPortTests: XCTestCase {
    func test_theAuthoritysPort_orEightyWithoutOne() {
        XCTAssertEqual(DownstreamHandler.authorityPort("svc:8080"), 8080)
        XCTAssertEqual(DownstreamHandler.authorityPort("svc"), 80)
        XCTAssertEqual(DownstreamHandler.authorityPort("[fd00::1]:9090"), 9090)
        XCTAssertEqual(DownstreamHandler.authorityPort("[fd00::1]"), 80)
        XCTAssertEqual(DownstreamHandler.authorityPort("svc:99999"), 80)
        XCTAssertEqual(DownstreamHandler.authorityPort("svc:x"), 80)
    }
}
