import XCTest
import NIOCore
import Logging
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// `moonlet.jwt` and `s.auth` with a stand-in verifier (the real one is MoonletTLS's).
final class AuthnAPITests: XCTestCase {
    /// Accepts the token "good" as alice, refuses anything else as expired.
    final class FakeVerifier: JWTVerifying, @unchecked Sendable {
        let issuer = "https://issuer.example"
        func verify(_ token: String, now: Double) -> Result<RequestAuthResult, JWTFailure> {
            guard token == "good" else { return .failure(.expired) }
            return .success(RequestAuthResult(principal: "\(issuer)/alice", issuer: issuer, subject: "alice", audiences: ["orders"], presenter: "web",
                                              claims: .object([("sub", .string("alice")), ("roles", .array([.string("admin"), .string("dev")])),
                                                               ("org", .object([("id", .int(7))]))])))
        }
    }

    var host: LuaHost!
    var runtime: LuaLoopRuntime!
    var dir: String!

    override func setUp() {
        dir = NSTemporaryDirectory() + "moonlet-authn-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        host = LuaHost(logger: Logger(label: "test"))
        runtime = LuaLoopRuntime(host: host, metrics: nil)
        JWTProviders.replace(["ns/p#0": FakeVerifier()], for: host)
    }

    override func tearDown() { JWTProviders.replace([:], for: host); try? FileManager.default.removeItem(atPath: dir) }

    func chain(_ code: String) throws -> FilterChain {
        let path = "\(dir!)/f.lua"
        try code.write(toFile: path, atomically: true, encoding: .utf8)
        let spec = LuaPluginSpec(name: "f", namespace: "", path: path, phase: "UNSPECIFIED_PHASE", priority: 0, pluginConfig: .map([]),
                                 failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "t", line: 1)
        return FilterChain(runtime.filters(for: try host.prepare([spec]).get()))
    }

    func stream(_ token: String) -> ProxyStream {
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: "GET / HTTP/1.1\r\nHost: svc\r\nX-Token: \(token)\r\n\r\n")) else { fatalError() }
        return ProxyStream(id: UInt64.random(in: 1...1 << 40), request: h, source: PeerInfo(address: "127.0.0.1:1"), filterCount: 0, startNanos: 0)
    }

    let filter = """
    local f, p = {}, nil
    function f.configure(c) p = moonlet.jwt.provider("ns/p#0"); return c end
    function f.on_request(s)
      local claims, err, status = moonlet.jwt.authenticate(s, s.request.headers:get("x-token"), p)
      if not claims then return s:respond(status, err) end
      local a = s.auth
      local ok1 = pcall(function() a.principal = "x" end)
      local ok2 = pcall(function() a.claims.roles[1] = "x" end)
      local ok3 = pcall(function() s.auth = {} end)
      local ok4 = pcall(moonlet.jwt.verify, "good", {})
      local ok5 = pcall(moonlet.jwt.verify, "good", moonlet.shared("d"))
      s.request.headers:set("x-out", table.concat({ a.principal, a.subject, a.presenter, a.audiences[1], #a.audiences,
        a.claims.roles[2], #a.claims.roles, a.claims.org.id, claims.sub, tostring(ok1), tostring(ok2), tostring(ok3),
        tostring(ok4), tostring(ok5) }, ","))
    end
    return f
    """

    func test_authenticate_setsAReadOnlySAuth_andProviderHandlesAreChecked() throws {
        let c = try chain(filter)
        let s = stream("good")
        XCTAssertEqual(c.runRequest(s), .continue)
        XCTAssertEqual(s.request.first("x-out"), "https://issuer.example/alice,alice,web,orders,1,dev,2,7,alice,false,false,false,false,false")
        XCTAssertEqual(s.auth?.principal, "https://issuer.example/alice")
    }

    func test_failedVerification_givesEnvoysMessageAndStatus_andNoSAuth() throws {
        let c = try chain(filter)
        let s = stream("bad")
        XCTAssertEqual(c.runRequest(s), .respond)
        XCTAssertEqual(s.localReply?.status, 401)
        XCTAssertEqual(s.localReply?.body, "Jwt is expired")
        XCTAssertNil(s.auth)
    }

    func test_providersBelongToTheirHost_soTwoProxiesInOneProcessDoNotMix() {
        let other = LuaHost(logger: Logger(label: "other"))
        XCTAssertNotNil(JWTProviders.lookup("ns/p#0", host: host))
        XCTAssertNil(JWTProviders.lookup("ns/p#0", host: other))
        JWTProviders.replace([:], for: other)
        XCTAssertNotNil(JWTProviders.lookup("ns/p#0", host: host))
    }

    func test_idWithoutVersion_namesThePreparingReloadsProviderOnItsThread_andTheAcceptedOneElsewhere() throws {
        JWTProviders.replace(["ns/p#0@1": FakeVerifier()], for: host, current: ["ns/p#0@1"])
        XCTAssertEqual(JWTProviders.resolve("ns/p#0", host: host), "ns/p#0@1")
        JWTProviders.merge(["ns/p#0@2": FakeVerifier()], for: host)
        XCTAssertEqual(JWTProviders.resolve("ns/p#0", host: host), "ns/p#0@2", "the reload being prepared (this thread) gets its own")
        final class Box: @unchecked Sendable { var id: String? }
        let elsewhere = Box(), h: LuaHost = host
        let t = Thread { elsewhere.id = JWTProviders.resolve("ns/p#0", host: h) }
        t.start()
        while !t.isFinished { usleep(1000) }
        XCTAssertEqual(elsewhere.id, "ns/p#0@1", "the serving filters keep the accepted provider")
        JWTProviders.remove(["ns/p#0@2"], for: host)
        XCTAssertEqual(JWTProviders.resolve("ns/p#0", host: host), "ns/p#0@1", "a rejected reload's provider is gone")
        XCTAssertNil(JWTProviders.lookup("ns/p#0@2", host: host))
        JWTProviders.merge(["ns/p#0@3": FakeVerifier()], for: host)
        JWTProviders.replace(["ns/p#0@1": FakeVerifier(), "ns/p#0@3": FakeVerifier()], for: host, current: ["ns/p#0@3"])
        XCTAssertEqual(JWTProviders.resolve("ns/p#0", host: host), "ns/p#0@3", "an accepted reload's provider is the current one")
        XCTAssertNotNil(JWTProviders.lookup("ns/p#0@1", host: host), "the replaced generation's provider stays for its streams")
    }

    func test_unknownProviderId_failsTheLoad() {
        let path = "\(dir!)/g.lua"
        try! "return { configure = function() moonlet.jwt.provider('nope') end }".write(toFile: path, atomically: true, encoding: .utf8)
        let spec = LuaPluginSpec(name: "g", namespace: "", path: path, phase: "UNSPECIFIED_PHASE", priority: 0, pluginConfig: .map([]),
                                 failStrategy: .failClose, matchLabels: [:], maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "t", line: 1)
        guard case .failure(let e) = host.prepare([spec]) else { return XCTFail("an unknown provider id loaded") }
        XCTAssertTrue(e.description.contains("no JWT provider \"nope\""), e.description)
    }
}
