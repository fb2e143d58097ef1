import XCTest
import NIOConcurrencyHelpers
import MoonletTLS
#if canImport(Glibc)
import Glibc
#endif

/// The sidecar for real, in network namespaces (root only; CI runs as root): two pods,
/// A and B, joined by a veth pair, each with `moonlet iptables` rules and a `moonlet run`
/// as uid 1337. An unmodified client in A calls a service VIP; iptables sends it to A's
/// sidecar, which finds the service by the original destination and reaches B's address
/// with auto mTLS; B's iptables sends that to B's sidecar, which serves the app port the
/// connection was addressed to. The apps are served by this test process: their sockets
/// are made inside the namespaces (setns on this thread, then back).
final class NetnsInterceptionTests: XCTestCase {
    static let vip = "10.96.0.50"
    static let ipA = "10.99.0.1", ipB = "10.99.0.2"

    var binary: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent(".build/debug/moonlet").path
    }

    /// Runs a command; returns its exit status and output.
    @discardableResult
    static func sh(_ args: [String]) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        do { try p.run() } catch { return (-1, "\(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// setns(2) (Glibc's module map leaves it out: it needs _GNU_SOURCE).
    static let setnsCall: (@convention(c) (Int32, Int32) -> Int32)? = {
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else { return nil }
        return unsafeBitCast(sym, to: (@convention(c) (Int32, Int32) -> Int32).self)
    }()
    static let cloneNewNet: Int32 = 0x4000_0000

    /// A socket made in network namespace `ns` (it stays there; any thread may use it).
    static func socketIn(_ ns: String, type: Int32 = Int32(SOCK_STREAM.rawValue)) -> Int32 {
        let own = open("/proc/thread-self/ns/net", O_RDONLY)
        let target = open("/var/run/netns/\(ns)", O_RDONLY)
        defer { close(own); close(target) }
        guard own >= 0, target >= 0, let setns = setnsCall, setns(target, cloneNewNet) == 0 else { return -1 }
        let fd = socket(AF_INET, type, 0)
        _ = setnsCall?(own, cloneNewNet)
        return fd
    }

    static func sockaddr(_ ip: String, _ port: Int) -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        a.sin_addr.s_addr = inet_addr(ip)
        return a
    }

    /// A client connection from namespace `ns` to ip:port, with a 5 s receive timeout.
    static func connectFrom(_ ns: String, _ ip: String, _ port: Int) -> Int32? {
        let fd = socketIn(ns)
        guard fd >= 0 else { return nil }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var a = sockaddr(ip, port)
        let rc = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        if rc != 0 { close(fd); return nil }
        return fd
    }

    static func send(_ fd: Int32, _ s: String) {
        let b = Array(s.utf8)
        _ = b.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Reads until EOF or timeout: the text and whether the peer closed.
    static func readAll(_ fd: Int32, until stop: ((String) -> Bool)? = nil) -> (String, Bool) {
        var out = [UInt8](), buf = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n == 0 { return (String(decoding: out, as: UTF8.self), true) }
            if n < 0 { return (String(decoding: out, as: UTF8.self), false) }
            out += buf[0..<n]
            if let stop, stop(String(decoding: out, as: UTF8.self)) { return (String(decoding: out, as: UTF8.self), false) }
        }
    }

    /// An app of pod `ns` on 0.0.0.0:port: each connection is served by `serve` on its
    /// own thread. Returns the listening socket (closed by the caller) and a counter.
    static func app(_ ns: String, port: Int, _ serve: @escaping @Sendable (Int32) -> Void) -> (Int32, NIOLockedValueBox<Int>)? {
        let fd = socketIn(ns)
        guard fd >= 0 else { return nil }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var a = sockaddr("0.0.0.0", port)
        let rc = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0, listen(fd, 16) == 0 else { close(fd); return nil }
        let count = NIOLockedValueBox(0)
        let t = Thread {
            while true {
                let c = accept(fd, nil, nil)
                if c < 0 { return }
                count.withLockedValue { $0 += 1 }
                var tv = timeval(tv_sec: 10, tv_usec: 0)
                setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
                Thread { serve(c); close(c) }.start()
            }
        }
        t.start()
        return (fd, count)
    }

    func testAnUnmodifiedClientReachesAServiceVIPThroughBothSidecarsWithAutoMTLS_TCPAndServerFirstPassThrough_andRegistryOnlyBlocksTheUnknown() throws {
        guard getuid() == 0 else { throw XCTSkip("network namespaces need root (CI runs as root)") }
        guard FileManager.default.isExecutableFile(atPath: binary) else { throw XCTSkip("moonlet binary not built at \(binary)") }
        for tool in ["ip", "iptables-restore", "setpriv"] where Self.sh(["which", tool]).status != 0 {
            throw XCTSkip("\(tool) is not installed (scripts/install-deps installs iproute2 and iptables)")
        }
        let tag = String(UInt32.random(in: 0..<UInt32.max), radix: 36)
        let nsA = "mlA\(tag)", nsB = "mlB\(tag)", vethA = "mva\(tag)".prefix(15), vethB = "mvb\(tag)".prefix(15)
        let probe = Self.sh(["ip", "netns", "add", nsA])
        guard probe.status == 0 else { throw XCTSkip("network namespaces cannot be created here: \(probe.output)") }
        var processes: [Process] = []
        var listeners: [Int32] = []
        let pki = try FixturePKI()
        let dir = NSTemporaryDirectory() + "moonlet-netns-\(tag)"
        defer {
            for p in processes where p.isRunning { p.terminate(); p.waitUntilExit() }
            if (testRun?.failureCount ?? 0) > 0 {
                // The sidecars' logs say why.
                for n in ["A", "B"] { print("--- sidecar \(n):\n" + ((try? String(contentsOfFile: dir + "/sidecar-\(n).log", encoding: .utf8)) ?? "")) }
            }
            for fd in listeners { shutdown(fd, Int32(SHUT_RDWR)); close(fd) }
            Self.sh(["ip", "netns", "del", nsA])
            Self.sh(["ip", "netns", "del", nsB])
            pki.cleanup()
            try? FileManager.default.removeItem(atPath: dir)
        }
        func must(_ args: [String]) throws {
            let r = Self.sh(args)
            if r.status != 0 { throw XCTSkip("cannot set up the namespaces (\(args.joined(separator: " "))): \(r.output)") }
        }
        try must(["ip", "netns", "add", nsB])
        try must(["ip", "link", "add", String(vethA), "type", "veth", "peer", "name", String(vethB)])
        try must(["ip", "link", "set", String(vethA), "netns", nsA])
        try must(["ip", "link", "set", String(vethB), "netns", nsB])
        for (ns, dev, ip) in [(nsA, String(vethA), Self.ipA), (nsB, String(vethB), Self.ipB)] {
            try must(["ip", "-n", ns, "addr", "add", "\(ip)/24", "dev", dev])
            try must(["ip", "-n", ns, "link", "set", dev, "up"])
            try must(["ip", "-n", ns, "link", "set", "lo", "up"])
            try must(["ip", "-n", ns, "route", "add", "default", "dev", dev])
            // The init container's job, with the arguments Istio's injector gives it.
            let r = Self.sh(["ip", "netns", "exec", ns, binary, "iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                             "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"])
            guard r.status == 0 else { throw XCTSkip("iptables rules cannot be applied in a namespace: \(r.output)") }
        }

        // The apps of pod B: HTTP (answers with the XFCC it got), a TCP echo that answers a
        // half-close with "|EOF", a server-first protocol, and one no service declares.
        let http: @Sendable (Int32) -> Void = { c in
            let (req, _) = Self.readAll(c, until: { $0.contains("\r\n\r\n") })
            let xfcc = req.components(separatedBy: "\r\n").first { $0.lowercased().hasPrefix("x-forwarded-client-cert:") }
                .map { String($0.dropFirst("x-forwarded-client-cert:".count)).trimmingCharacters(in: .whitespaces) } ?? "none"
            Self.send(c, "HTTP/1.1 200 OK\r\ncontent-length: \(xfcc.utf8.count)\r\nconnection: close\r\n\r\n\(xfcc)")
        }
        let echo: @Sendable (Int32) -> Void = { c in
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = recv(c, &buf, buf.count, 0)
                if n <= 0 { break }
                _ = buf.withUnsafeBytes { Glibc.send(c, $0.baseAddress, n, Int32(MSG_NOSIGNAL)) }
            }
            Self.send(c, "|EOF")
        }
        let greet: @Sendable (Int32) -> Void = { c in
            Self.send(c, "HELLO server-first\n")
            echo(c)
        }
        var unknownCount: NIOLockedValueBox<Int>?
        for (port, serve) in [(8080, http), (9000, echo), (3306, greet), (7777, echo)] {
            guard let (fd, count) = Self.app(nsB, port: port, serve) else { return XCTFail("cannot listen on \(port) in pod B") }
            listeners.append(fd)
            if port == 7777 { unknownCount = count }
        }

        // Config (both pods see the same mesh), certificates and the sidecars as uid 1337.
        try FileManager.default.createDirectory(atPath: dir + "/config", withIntermediateDirectories: true)
        let se = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web.default.svc.cluster.local]
          addresses: [\(Self.vip)]
          resolution: STATIC
          ports:
          - {number: 80, name: http, targetPort: 8080}
          - {number: 9000, name: tcp-echo, targetPort: 9000}
          - {number: 3306, name: db, protocol: MYSQL, targetPort: 3306}
          endpoints:
          - {address: \(Self.ipB), serviceAccount: b, labels: {app: b, security.istio.io/tlsMode: istio}}
        """
        try se.write(toFile: dir + "/config/se.yaml", atomically: true, encoding: .utf8)
        try "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n".write(toFile: dir + "/mesh.yaml", atomically: true, encoding: .utf8)
        let certsA = try pki.issue("default", "a"), certsB = try pki.issue("default", "b")
        for d in [dir, certsA, certsB] { try must(["chown", "-R", "1337:1337", d]) }
        try must(["chmod", "755", pki.dir])
        for (ns, sa, certs) in [(nsA, "a", certsA), (nsB, "b", certsB)] {
            let log = dir + "/sidecar-\(sa.uppercased()).log"
            FileManager.default.createFile(atPath: log, contents: nil)
            let p = Process()
            p.standardError = FileHandle(forWritingAtPath: log)
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["ip", "netns", "exec", ns, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", binary, "run",
                           "--config", dir + "/config", "--certs", certs, "--mesh-config", dir + "/mesh.yaml", "--bind", "0.0.0.0",
                           "--namespace", "default", "--service-account", sa, "--labels", "app=\(sa)", "--concurrency", "1", "--log-level", "debug"]
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            processes.append(p)
        }
        // Ready: the health port answers in both pods (it is not captured).
        let deadline = Date().addingTimeInterval(20)
        for ns in [nsA, nsB] {
            var ready = false
            while !ready && Date() < deadline {
                if let fd = Self.connectFrom(ns, "127.0.0.1", 15021) {
                    Self.send(fd, "GET /healthz/ready HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n")
                    ready = Self.readAll(fd).0.hasPrefix("HTTP/1.1 200")
                    close(fd)
                }
                if !ready { usleep(100_000) }
            }
            XCTAssertTrue(ready, "the sidecar of \(ns) did not become ready")
            if !ready { return }
        }

        // 1. HTTP to the VIP: B's app sees A's identity in X-Forwarded-Client-Cert.
        let h = try XCTUnwrap(Self.connectFrom(nsA, Self.vip, 80), "connect to the VIP")
        Self.send(h, "GET /hello HTTP/1.1\r\nHost: \(Self.vip)\r\nConnection: close\r\n\r\n")
        let (resp, _) = Self.readAll(h)
        close(h)
        XCTAssertTrue(resp.hasPrefix("HTTP/1.1 200"), resp)
        XCTAssertTrue(resp.contains("By=spiffe://cluster.local/ns/default/sa/b"), resp)
        XCTAssertTrue(resp.contains("URI=spiffe://cluster.local/ns/default/sa/a"), resp)

        // 2. Raw TCP echo with a half-close.
        let t = try XCTUnwrap(Self.connectFrom(nsA, Self.vip, 9000))
        Self.send(t, "ping over two sidecars")
        shutdown(t, Int32(SHUT_WR))
        let (echoed, closed) = Self.readAll(t)
        close(t)
        XCTAssertEqual(echoed, "ping over two sidecars|EOF")
        XCTAssertTrue(closed)

        // 3. A server-first protocol: the greeting comes without the client sending.
        let m = try XCTUnwrap(Self.connectFrom(nsA, Self.vip, 3306))
        let (greeting, _) = Self.readAll(m, until: { $0.hasSuffix("\n") })
        close(m)
        XCTAssertEqual(greeting, "HELLO server-first\n")

        // 4. REGISTRY_ONLY: B's address on a port no service declares is blocked.
        if let u = Self.connectFrom(nsA, Self.ipB, 7777) {
            Self.send(u, "let me in")
            let (text, _) = Self.readAll(u)
            close(u)
            XCTAssertEqual(text, "")
        }
        XCTAssertEqual(unknownCount?.withLockedValue { $0 }, 0, "the unknown destination was reached")
    }
}
