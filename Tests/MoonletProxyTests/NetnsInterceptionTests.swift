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
    /// One address family's pod network: the service VIP, pod A's and pod B's addresses.
    struct PodNet {
        let v6: Bool
        let vip: String, ipA: String, ipB: String
        /// The `ip addr add` prefix length.
        let prefix: Int
        var family: Int32 { v6 ? AF_INET6 : AF_INET }
        var any: String { v6 ? "::" : "0.0.0.0" }
        var loopback: String { v6 ? "::1" : "127.0.0.1" }
        /// `ip` as a Host header value.
        func host(_ ip: String) -> String { v6 ? "[\(ip)]" : ip }
        static let v4 = PodNet(v6: false, vip: "10.96.0.50", ipA: "10.99.0.1", ipB: "10.99.0.2", prefix: 24)
        static let v6net = PodNet(v6: true, vip: "fd00:96::50", ipA: "fd00:99::1", ipB: "fd00:99::2", prefix: 64)
    }

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

    /// A socket of `family` made in network namespace `ns` (it stays there; any thread may use it).
    static func socketIn(_ ns: String, family: Int32 = AF_INET, type: Int32 = Int32(SOCK_STREAM.rawValue)) -> Int32 {
        let own = open("/proc/thread-self/ns/net", O_RDONLY)
        let target = open("/var/run/netns/\(ns)", O_RDONLY)
        defer { close(own); close(target) }
        guard own >= 0, target >= 0, let setns = setnsCall, setns(target, cloneNewNet) == 0 else { return -1 }
        let fd = socket(family, type, 0)
        _ = setnsCall?(own, cloneNewNet)
        return fd
    }

    /// Calls `body` with `ip`:`port` as a sockaddr (IPv4 or IPv6, by the address's form).
    static func withSockaddr<T>(_ ip: String, _ port: Int, _ body: (UnsafePointer<Glibc.sockaddr>, socklen_t) -> T) -> T {
        if ip.contains(":") {
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            a.sin6_port = in_port_t(UInt16(port).bigEndian)
            _ = inet_pton(AF_INET6, ip, &a.sin6_addr)
            return withUnsafePointer(to: &a) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
        }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        a.sin_addr.s_addr = inet_addr(ip)
        return withUnsafePointer(to: &a) { $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    }

    /// A client connection from namespace `ns` to ip:port, with a 5 s receive timeout.
    static func connectFrom(_ ns: String, _ ip: String, _ port: Int) -> Int32? {
        let fd = socketIn(ns, family: ip.contains(":") ? AF_INET6 : AF_INET)
        guard fd >= 0 else { return nil }
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let rc = withSockaddr(ip, port) { connect(fd, $0, $1) }
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

    /// An app of pod `ns` on 0.0.0.0:port (or [::]:port): each connection is served by `serve` on its
    /// own thread. Returns the listening socket (closed by the caller) and a counter.
    /// On IPv6 the app listens on [::] (dual-stack: the sidecar reaches it on 127.0.0.1 too).
    static func app(_ ns: String, port: Int, v6: Bool = false, _ serve: @escaping @Sendable (Int32) -> Void) -> (Int32, NIOLockedValueBox<Int>)? {
        let fd = socketIn(ns, family: v6 ? AF_INET6 : AF_INET)
        guard fd >= 0 else { return nil }
        var one: Int32 = 1, zero: Int32 = 0
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        if v6 { setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &zero, socklen_t(MemoryLayout<Int32>.size)) }
        let rc = withSockaddr(v6 ? "::" : "0.0.0.0", port) { bind(fd, $0, $1) }
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
        try runTwoPods(.v4, tproxy: false)
    }

    /// The same over IPv6 only (ip6tables rules from `moonlet iptables`, IP6T_SO_ORIGINAL_DST).
    func testOverIPv6AnUnmodifiedClientReachesAServiceVIPThroughBothSidecarsWithAutoMTLS_TCPAndServerFirstPassThrough_andRegistryOnlyBlocksTheUnknown() throws {
        try runTwoPods(.v6net, tproxy: false)
    }

    /// The same with inbound TPROXY (mangle rules, the fwmark rule and local route, a
    /// transparent inbound listener; the sidecars keep CAP_NET_ADMIN as Istio's do in this mode).
    func testWithInboundTPROXYAnUnmodifiedClientReachesAServiceVIPThroughBothSidecarsWithAutoMTLS_TCPAndServerFirstPassThrough_andRegistryOnlyBlocksTheUnknown() throws {
        try runTwoPods(.v4, tproxy: true)
    }

    /// IPv6 with inbound TPROXY (ip6tables mangle rules, `ip -6 rule`, IPV6_TRANSPARENT).
    func testOverIPv6WithInboundTPROXYAnUnmodifiedClientReachesAServiceVIPThroughBothSidecarsWithAutoMTLS_TCPAndServerFirstPassThrough_andRegistryOnlyBlocksTheUnknown() throws {
        try runTwoPods(.v6net, tproxy: true)
    }

    /// Both pods' network, rules, apps and sidecars, then the four checks.
    func runTwoPods(_ net: PodNet, tproxy: Bool) throws {
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
        for (ns, dev, ip) in [(nsA, String(vethA), net.ipA), (nsB, String(vethB), net.ipB)] {
            // IPv6: no duplicate address detection (the address is usable at once).
            try must(["ip", "-n", ns, "addr", "add", "\(ip)/\(net.prefix)", "dev", dev] + (net.v6 ? ["nodad"] : []))
            try must(["ip", "-n", ns, "link", "set", dev, "up"])
            try must(["ip", "-n", ns, "link", "set", "lo", "up"])
            try must(["ip", "-n", ns] + (net.v6 ? ["-6"] : []) + ["route", "add", "default", "dev", dev])
            // The init container's job, with the arguments Istio's injector gives it.
            let r = Self.sh(["ip", "netns", "exec", ns, binary, "iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", tproxy ? "TPROXY" : "REDIRECT",
                             "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"])
            guard r.status == 0 else { throw XCTSkip("iptables rules cannot be applied in a namespace: \(r.output)") }
            if tproxy {
                // TPROXY: the mangle rules, and marked packets delivered locally (table 133).
                let mangle = Self.sh(["ip", "netns", "exec", ns, "iptables-save", "-t", "mangle"]).output
                XCTAssertTrue(mangle.contains("-j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff")
                              || mangle.contains("--on-port 15006"), mangle)
                let family = net.v6 ? ["-6"] : []
                XCTAssertTrue(Self.sh(["ip", "-n", ns] + family + ["rule"]).output.contains("fwmark 0x539 lookup 133"))
                XCTAssertTrue(Self.sh(["ip", "-n", ns] + family + ["route", "show", "table", "133"]).output.contains("local default dev lo"))
            }
            if net.v6 {
                // The pod's first address is IPv6: the rules went to ip6tables too.
                let saved = Self.sh(["ip", "netns", "exec", ns, "ip6tables-save", "-t", "nat"]).output
                XCTAssertTrue(saved.contains("ISTIO_INBOUND") && saved.contains("--to-ports 15006"), saved)
            }
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
            guard let (fd, count) = Self.app(nsB, port: port, v6: net.v6, serve) else { return XCTFail("cannot listen on \(port) in pod B") }
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
          addresses: ["\(net.vip)"]
          resolution: STATIC
          ports:
          - {number: 80, name: http, targetPort: 8080}
          - {number: 9000, name: tcp-echo, targetPort: 9000}
          - {number: 3306, name: db, protocol: MYSQL, targetPort: 3306}
          endpoints:
          - {address: "\(net.ipB)", serviceAccount: b, labels: {app: b, security.istio.io/tlsMode: istio}}
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
            // TPROXY: the sidecar keeps CAP_NET_ADMIN (its inbound listener is transparent).
            let caps = tproxy ? ["--inh-caps=+net_admin", "--ambient-caps=+net_admin"] : []
            p.arguments = ["ip", "netns", "exec", ns, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups"] + caps + [binary, "run",
                           "--config", dir + "/config", "--certs", certs, "--mesh-config", dir + "/mesh.yaml", "--bind", net.any,
                           "--namespace", "default", "--service-account", sa, "--labels", "app=\(sa)", "--concurrency", "1", "--log-level", "debug"]
                + (tproxy ? ["--inbound-interception-mode", "TPROXY"] : [])
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            processes.append(p)
        }
        // Ready: the health port answers in both pods (it is not captured).
        let deadline = Date().addingTimeInterval(20)
        for ns in [nsA, nsB] {
            var ready = false
            while !ready && Date() < deadline {
                if let fd = Self.connectFrom(ns, net.loopback, 15021) {
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
        let h = try XCTUnwrap(Self.connectFrom(nsA, net.vip, 80), "connect to the VIP")
        Self.send(h, "GET /hello HTTP/1.1\r\nHost: \(net.host(net.vip))\r\nConnection: close\r\n\r\n")
        let (resp, _) = Self.readAll(h)
        close(h)
        XCTAssertTrue(resp.hasPrefix("HTTP/1.1 200"), resp)
        XCTAssertTrue(resp.contains("By=spiffe://cluster.local/ns/default/sa/b"), resp)
        XCTAssertTrue(resp.contains("URI=spiffe://cluster.local/ns/default/sa/a"), resp)

        // 2. Raw TCP echo with a half-close.
        let t = try XCTUnwrap(Self.connectFrom(nsA, net.vip, 9000))
        Self.send(t, "ping over two sidecars")
        shutdown(t, Int32(SHUT_WR))
        let (echoed, closed) = Self.readAll(t)
        close(t)
        XCTAssertEqual(echoed, "ping over two sidecars|EOF")
        XCTAssertTrue(closed)

        // 3. A server-first protocol: the greeting comes without the client sending.
        let m = try XCTUnwrap(Self.connectFrom(nsA, net.vip, 3306))
        let (greeting, _) = Self.readAll(m, until: { $0.hasSuffix("\n") })
        close(m)
        XCTAssertEqual(greeting, "HELLO server-first\n")

        // 4. REGISTRY_ONLY: B's address on a port no service declares is blocked.
        if let u = Self.connectFrom(nsA, net.ipB, 7777) {
            Self.send(u, "let me in")
            let (text, _) = Self.readAll(u)
            close(u)
            XCTAssertEqual(text, "")
        }
        XCTAssertEqual(unknownCount?.withLockedValue { $0 }, 0, "the unknown destination was reached")
    }
}
