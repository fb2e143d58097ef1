import XCTest
import NIOConcurrencyHelpers
import MoonletTLS

/// The `moonlet` executable as users run it: validate exit codes, SIGTERM drain, SIGHUP reload.
final class CommandTests: XCTestCase {
    /// The debug executable `swift build --build-tests` made, found from this file's place.
    var binary: String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/moonlet").path
    }

    func tmpdir() throws -> String {
        let d = NSTemporaryDirectory() + "moonlet-cmd-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return d
    }

    func run(_ args: [String]) throws -> (Int32, String) {
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw XCTSkip("moonlet binary not built at \(binary)") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out; p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    func test_pluginsExport_writesEveryBuiltinFilter_andOverwritesADifferentFileOnlyWithForce() throws {
        let d = try tmpdir() + "/out"
        let (rc, out) = try run(["plugins", "export", d])
        XCTAssertEqual(rc, 0, out)
        let file = d + "/istio-router.lua"
        XCTAssertTrue(try String(contentsOfFile: file, encoding: .utf8).contains("function router.on_request"), out)
        try "-- mine\n".write(toFile: file, atomically: true, encoding: .utf8)
        let (rc2, out2) = try run(["plugins", "export", d])
        XCTAssertEqual(rc2, 1, out2)
        XCTAssertTrue(out2.contains("--force"), out2)
        XCTAssertEqual(try String(contentsOfFile: file, encoding: .utf8), "-- mine\n")
        let (rc3, out3) = try run(["plugins", "export", "--force", d])
        XCTAssertEqual(rc3, 0, out3)
        XCTAssertTrue(try String(contentsOfFile: file, encoding: .utf8).contains("function router.on_request"))
    }

    func test_validate_exits0ForGoodConfig_and1WithEveryErrorForBad() throws {
        let d = try tmpdir()
        try "return {}".write(toFile: d + "/f.lua", atomically: true, encoding: .utf8)
        try "apiVersion: moonlet.io/v1alpha1\nkind: LuaPlugin\nmetadata: {name: ok}\nspec:\n  url: file://f.lua\n".write(toFile: d + "/ok.yaml", atomically: true, encoding: .utf8)
        let (rc, out) = try run(["validate", d])
        XCTAssertEqual(rc, 0, out)
        try "apiVersion: moonlet.io/v1alpha1\nkind: LuaPlugin\nmetadata: {name: bad}\nspec:\n  url: file://nope.lua\n  phase: LATER\n".write(toFile: d + "/bad.yaml", atomically: true, encoding: .utf8)
        let (rc2, out2) = try run(["validate", d])
        XCTAssertEqual(rc2, 1)
        XCTAssertTrue(out2.contains("bad.yaml:5:8: LuaPlugin bad: spec.url: file not found"), out2)
        XCTAssertTrue(out2.contains("bad.yaml:6:10: LuaPlugin bad: spec.phase"), out2)
        let (rc3, json) = try run(["validate", "--output", "json", d])
        XCTAssertEqual(rc3, 1)
        XCTAssertTrue(json.hasPrefix("{\"valid\":false,\"errors\":[{\"file\":"), json)
    }

    func test_validate_checksCustomProviders_againstTheMeshConfig_andNotesThemWithoutOne() throws {
        let d = try tmpdir()
        try """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ext, namespace: foo}
        spec:
          action: CUSTOM
          provider: {name: my-authz}
          rules: [{}]
        """.write(toFile: d + "/p.yaml", atomically: true, encoding: .utf8)
        let meshDir = try tmpdir()
        let (rc, out) = try run(["validate", d])
        XCTAssertEqual(rc, 0, out)
        XCTAssertTrue(out.contains("note: \(d)/p.yaml:1: AuthorizationPolicy foo/ext: CUSTOM provider \"my-authz\" not checked (no mesh config given"), out)
        try "extensionProviders:\n- name: other\n  envoyExtAuthzHttp: {service: a.foo.svc.cluster.local, port: 80}\n".write(toFile: meshDir + "/mesh.yaml", atomically: true, encoding: .utf8)
        let (rc2, out2) = try run(["validate", "--mesh-config", meshDir + "/mesh.yaml", d])
        XCTAssertEqual(rc2, 1, out2)
        XCTAssertTrue(out2.contains("p.yaml:1: AuthorizationPolicy foo/ext: CUSTOM provider \"my-authz\" is not an extensionProvider of the mesh config"), out2)
        try "extensionProviders:\n- name: my-authz\n  envoyExtAuthzHttp: {service: a.foo.svc.cluster.local, port: 80}\n".write(toFile: meshDir + "/mesh.yaml", atomically: true, encoding: .utf8)
        let (rc3, out3) = try run(["validate", "--mesh-config", meshDir + "/mesh.yaml", d])
        XCTAssertEqual(rc3, 0, out3)
    }

    func test_demo_runsTheGrayRelease_fromTheSeedPolicies() throws {
        let (rc, out) = try run(["demo", "--once", "--outbound-port", "0", "--admin-port", "0", "--requests", "300"])
        XCTAssertEqual(rc, 0, out)
        let grayRow = try XCTUnwrap(out.split(separator: "\n").first { $0.hasPrefix("X-Gray: true") }, out)
        XCTAssertTrue(grayRow.contains("0 (0.0%)") && grayRow.contains("30 (100.0%)") && grayRow.hasSuffix("0"), String(grayRow))
        let dirLine = try XCTUnwrap(out.split(separator: "\n").first { $0.contains("policies in ") }, out)
        let dir = String(dirLine[dirLine.range(of: "policies in ")!.upperBound...])
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir), "the demo's temporary directory is removed on exit")
        XCTAssertFalse(out.contains("Try it"), "--once has no sidecar left to try: \(out)")
    }

    /// Into a pipe (not a terminal) the demo's lines arrive while it serves, not at exit;
    /// its policies are the seed's; SIGTERM removes its temporary directory.
    func test_demo_printsLinesIntoAPipeWhileItServes_andRemovesItsFilesOnSIGTERM() throws {
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw XCTSkip("moonlet binary not built at \(binary)") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["demo", "--outbound-port", "0", "--admin-port", "0", "--requests", "50"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        let text = NIOLockedValueBox("")
        out.fileHandleForReading.readabilityHandler = { h in
            let d = h.availableData
            text.withLockedValue { $0 += String(decoding: d, as: UTF8.self) }
        }
        try p.run()
        defer { if p.isRunning { p.terminate() } }
        func current() -> String { text.withLockedValue { $0 } }
        let deadline = Date().addingTimeInterval(60)
        while !current().contains("Ctrl-C stops the demo.") && Date() < deadline && p.isRunning { usleep(50_000) }
        let shown = current()
        XCTAssertTrue(shown.contains("Ctrl-C stops the demo."), "nothing flushed while serving: \(shown)")
        let dirLine = try XCTUnwrap(shown.split(separator: "\n").first { $0.contains("policies in ") }, shown)
        let dir = String(dirLine[dirLine.range(of: "policies in ")!.upperBound...])
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        XCTAssertEqual(try String(contentsOfFile: dir + "/order-service.yaml", encoding: .utf8),
                       try String(contentsOf: repo.appendingPathComponent("policies/gray-release/order-service.yaml"), encoding: .utf8))
        p.terminate()
        let exitBy = Date().addingTimeInterval(20)
        while p.isRunning && Date() < exitBy { usleep(50_000) }
        XCTAssertFalse(p.isRunning, "the demo exits within 20 s of SIGTERM")
        // Reading the status of a running process would end the whole test run.
        if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit(); out.fileHandleForReading.readabilityHandler = nil; return }
        XCTAssertEqual(p.terminationStatus, 0)
        out.fileHandleForReading.readabilityHandler = nil
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir), "the demo's temporary directory is removed on SIGTERM")
    }

    func test_runHelp_showsThePortDefaults() throws {
        let (rc, raw) = try run(["run", "--help"])
        XCTAssertEqual(rc, 0, raw)
        // Help text is wrapped to the terminal: compare with blanks folded.
        let out = raw.split(whereSeparator: { $0 == " " || $0 == "\n" }).joined(separator: " ")
        for d in ["default: 15006", "default: 15001", "default: 15000", "default: 15090", "default: 15021", "default: 8080", "--admin-bind"] {
            XCTAssertTrue(out.contains(d), "\(d) missing from:\n\(out)")
        }
    }

    func test_run_drainsOnSIGTERM_andExits0_reloadsOnSIGHUP() throws {
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw XCTSkip("moonlet binary not built") }
        let up = try TestUpstream()
        defer { up.stop() }
        let d = try tmpdir()
        try "return { on_response = function(s) s.response.headers:set('x-v', 'one') end }".write(toFile: d + "/v.lua", atomically: true, encoding: .utf8)
        try "apiVersion: moonlet.io/v1alpha1\nkind: LuaPlugin\nmetadata: {name: v}\nspec:\n  url: file://v.lua\n".write(toFile: d + "/v.yaml", atomically: true, encoding: .utf8)
        let port = MoonletProxyTests.freePort(), admin = MoonletProxyTests.freePort()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = ["run", "--config", d, "--inbound-port", "\(port)", "--outbound-port", "0", "--admin-port", "\(admin)",
                       "--prometheus-port", "0", "--health-port", "0", "--app-port", "\(up.port)", "--concurrency", "1", "--log-level", "error"]
        p.standardOutput = FileHandle.nullDevice; p.standardError = FileHandle.nullDevice
        try p.run()
        defer { if p.isRunning { p.terminate() } }
        var ready = false
        for _ in 0..<100 { if adminGet(admin, "/ready")?.status == 200 { ready = true; break }; usleep(50_000) }
        XCTAssertTrue(ready)
        let c = try RawClient(port: port)
        XCTAssertEqual(get(c)?.header("x-v"), "one")
        // SIGHUP reloads (the watcher would too; the signal makes it immediate).
        try "return { on_response = function(s) s.response.headers:set('x-v', 'two') end }".write(toFile: d + "/v.lua", atomically: true, encoding: .utf8)
        kill(p.processIdentifier, SIGHUP)
        var v = ""
        for _ in 0..<40 { v = get(c)?.header("x-v") ?? ""; if v == "two" { break }; usleep(50_000) }
        XCTAssertEqual(v, "two")
        up.respond = { _ in TestUpstream.Reply(body: "late", delayMs: 300) }
        c.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        usleep(50_000)
        kill(p.processIdentifier, SIGTERM)
        XCTAssertEqual(c.read()?.body, "late", "in-flight request finished during drain")
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
    }


    func mode(_ path: String) -> mode_t {
        var st = stat()
        return stat(path, &st) == 0 ? st.st_mode & 0o777 : 0
    }

    func test_caInitAndCaIssue_writeEveryKeyFileOwnerOnly_evenUnderAPermissiveUmask() throws {
        let d = try tmpdir()
        let old = umask(0)
        defer { umask(old) }
        let (rc, out) = try run(["ca", "init", "--out", d + "/ca", "--trust-domain", "shop.example"])
        XCTAssertEqual(rc, 0, out)
        let (rc2, out2) = try run(["ca", "issue", "--ca", d + "/ca", "--namespace", "p", "--service-account", "orders", "--out", d + "/w"])
        XCTAssertEqual(rc2, 0, out2)
        XCTAssertEqual(String(mode(d + "/ca/root-key.pem"), radix: 8), "600")
        XCTAssertEqual(String(mode(d + "/w/key.pem"), radix: 8), "600")
        XCTAssertEqual(String(mode(d + "/ca/root-cert.pem"), radix: 8), "644")
        // Only the final files: no temporary file was left behind.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: d + "/ca").sorted(), ["root-cert.pem", "root-key.pem"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: d + "/w").sorted(), ["cert-chain.pem", "key.pem", "root-cert.pem"])
    }

    func test_caServe_refusesTimeoutsBelowOneMillisecondOrAboveADay_namingTheFlag() throws {
        // Below 1ms every connection would be dropped; far above, the nanosecond TimeAmount overflows (a trap).
        for (flag, value) in [("--handshake-timeout", "0s"), ("--handshake-timeout", "0.0001s"), ("--idle-timeout", "0.0004s"),
                              ("--idle-timeout", "99999999999h"), ("--request-timeout", "2d")] {
            let (rc, out) = try run(["ca", "serve", "--ca", "/nonexistent", "--port", "0", flag, value])
            XCTAssertNotEqual(rc, 0)
            XCTAssertTrue(out.contains("\(flag): a duration from 1ms to 24h"), out)
        }
    }

    func test_runTimeoutFlags_outsideZeroToThirtyDays_areRefusedNamingTheFlag_insteadOfOverflowingADeadline() throws {
        for flag in ["--request-timeout-ms", "--request-body-idle-timeout-ms", "--stream-timeout-ms"] {
            for value in ["-1", "99999999999999"] {
                let (rc, out) = try run(["run", "--config", "/nonexistent", "\(flag)=\(value)"])
                XCTAssertNotEqual(rc, 0)
                XCTAssertTrue(out.contains("\(flag): 0 (none) to 2592000000 ms (30 days)"), out)
            }
        }
    }

    func test_caServe_withARootWhoseSubjectIsNotATrustDomain_exitsWithAnErrorNamingTheFile_insteadOfCrashing() throws {
        let d = try tmpdir()
        for o in ["my mesh", "a/b"] {
            try? FileManager.default.removeItem(atPath: d + "/ca")
            try MeshCA.create(trustDomain: "cluster.local", organization: o).write(to: d + "/ca")
            let (rc, out) = try run(["ca", "serve", "--ca", d + "/ca", "--port", "0"])
            XCTAssertEqual(rc, 1, out)
            XCTAssertTrue(out.contains(d + "/ca/root-cert.pem: the root's subject O= \"\(o)\" is not a trust domain"), out)
        }
    }
}

/// An unused TCP port on 127.0.0.1 (for child processes that need a port number).
func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: addr.sin_port))
}

/// nginx as a real upstream, where installed: keep-alive reuse seen from nginx's side.
final class NginxUpstreamTests: XCTestCase {
    func test_nginxUpstream_seesOneKeptAliveConnection() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/nginx") else { throw XCTSkip("nginx not installed") }
        let d = NSTemporaryDirectory() + "moonlet-nginx-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: d + "/www", withIntermediateDirectories: true)
        try "hi from nginx\n".write(toFile: d + "/www/index.html", atomically: true, encoding: .utf8)
        let port = freePort()
        try """
        daemon off; worker_processes 1; pid \(d)/nginx.pid; error_log \(d)/error.log;
        events { worker_connections 64; }
        http { access_log off; keepalive_requests 1000;
          server { listen 127.0.0.1:\(port); location / { root \(d)/www; add_header x-conn $connection; } } }
        """.write(toFile: d + "/nginx.conf", atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/nginx")
        p.arguments = ["-c", d + "/nginx.conf", "-p", d]
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer { p.terminate(); p.waitUntilExit() }
        var up = false
        for _ in 0..<50 { if (try? RawClient(port: port)) != nil { up = true; break }; usleep(50_000) }
        XCTAssertTrue(up)
        let px = try ProxyFixture(appPort: port, concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        var conns = Set<String>()
        for _ in 0..<10 {
            let r = try XCTUnwrap(get(c))
            XCTAssertEqual(r.body, "hi from nginx\n")
            conns.insert(r.header("x-conn") ?? "?")
        }
        XCTAssertEqual(conns.count, 1, "nginx saw connections \(conns)")
    }
}
