import XCTest
import NIOCore
import NIOPosix
import NIOHTTP1
import NIOSSL
import NIOConcurrencyHelpers
import Logging
@testable import MoonletProxy
import MoonletConfig

/// What the test upstream saw of one request.
struct SeenRequest {
    var method: String
    var uri: String
    var headers: HTTPHeaders
    var bodyBytes: Int
    var body: String
}

/// An HTTP/1.1 upstream on 127.0.0.1 for tests (NIOHTTP1): counts connections and
/// requests, and answers with what `respond` says.
final class TestUpstream: @unchecked Sendable {
    struct Reply {
        var status: HTTPResponseStatus = .ok
        var headers: [(String, String)] = []
        var body: String = "hello"
        var chunked = false
        var delayMs = 0
        /// Chunked only: the first half is flushed, the second half follows this much later
        /// (a streamed response).
        var gapMs = 0
    }
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var channel: Channel!
    let lock = NIOLock()
    private var _connections = 0
    private var _open = 0
    private var _peakOpen = 0
    private var _seen: [SeenRequest] = []
    var respond: @Sendable (SeenRequest) -> Reply = { _ in Reply() }
    /// Keep only the first N bytes of bodies (large-body tests).
    var keepBody = 64 * 1024

    var port: Int { channel.localAddress!.port! }
    var connections: Int { lock.withLock { _connections } }
    /// Most connections open at the same time.
    var peakOpenConnections: Int { lock.withLock { _peakOpen } }
    var seen: [SeenRequest] { lock.withLock { _seen } }

    /// `tls`: serve HTTPS with this context (for DestinationRule SIMPLE / MUTUAL tests).
    /// `host`: the address to listen on (a loopback address).
    init(host: String = "127.0.0.1", port: Int = 0, tls: NIOSSLContext? = nil, respond: (@Sendable (SeenRequest) -> Reply)? = nil) throws {
        if let respond { self.respond = respond }
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                self.lock.withLock { self._connections += 1; self._open += 1; self._peakOpen = max(self._peakOpen, self._open) }
                ch.closeFuture.whenComplete { _ in self.lock.withLock { self._open -= 1 } }
                if let tls { try? ch.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                return ch.pipeline.configureHTTPServerPipeline().flatMap { ch.pipeline.addHandler(Handler(owner: self)) }
            }
            .bind(host: host, port: port).wait()
    }

    func stop() { try? channel.close().wait(); try? group.syncShutdownGracefully() }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let owner: TestUpstream
        var req: SeenRequest?
        init(owner: TestUpstream) { self.owner = owner }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): req = SeenRequest(method: h.method.rawValue, uri: h.uri, headers: h.headers, bodyBytes: 0, body: "")
            case .body(let b):
                req?.bodyBytes += b.readableBytes
                if (req?.body.utf8.count ?? 0) < owner.keepBody { req?.body += String(buffer: b) }
            case .end:
                guard let r = req else { return }
                owner.lock.withLock { owner._seen.append(r) }
                let reply = owner.respond(r)
                let send = {
                    var headers = HTTPHeaders(reply.headers)
                    if reply.chunked { headers.add(name: "transfer-encoding", value: "chunked") }
                    else if !headers.contains(name: "content-length") { headers.add(name: "content-length", value: String(reply.body.utf8.count)) }
                    context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: reply.status, headers: headers))), promise: nil)
                    if !reply.body.isEmpty {
                        if reply.chunked {
                            let mid = reply.body.index(reply.body.startIndex, offsetBy: reply.body.count / 2)
                            context.write(self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: String(reply.body[..<mid]))))), promise: nil)
                            if reply.gapMs > 0 {
                                context.flush()
                                context.eventLoop.scheduleTask(in: .milliseconds(Int64(reply.gapMs))) {
                                    context.write(self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: String(reply.body[mid...]))))), promise: nil)
                                    context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)
                                }
                                return
                            }
                            context.write(self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: String(reply.body[mid...]))))), promise: nil)
                        } else {
                            context.write(self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: reply.body)))), promise: nil)
                        }
                    }
                    context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)
                }
                if reply.delayMs > 0 { context.eventLoop.scheduleTask(in: .milliseconds(Int64(reply.delayMs)), send) } else { send() }
            }
        }
    }
}

/// A blocking HTTP/1.1 client over one TCP connection (keep-alive), for exact bytes.
/// A port on 127.0.0.1 that refuses connections for as long as this object lives: a
/// socket bound to it but not listening. (A stopped server's port could be taken by
/// another test's server meanwhile, which then answers instead of refusing.)
final class RefusingPort {
    let fd: Int32
    let port: Int

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        port = Int(UInt16(bigEndian: addr.sin_port))
        if !ok { throw NSError(domain: "bind", code: Int(errno)) }
    }
    deinit { close(fd) }
}

final class RawClient {
    let fd: Int32
    var pending = [UInt8]()

    init(port: Int, timeoutSeconds: Int = 10) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        if rc != 0 { close(fd); throw NSError(domain: "connect", code: Int(errno)) }
    }
    deinit { close(fd) }

    func send(_ s: String) { send(Array(s.utf8)) }
    func send(_ bytes: [UInt8]) { _ = sendCounting(bytes) }

    /// Sends `bytes`, and says how many went out (fewer when the connection failed).
    func sendCounting(_ bytes: [UInt8]) -> Int {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return off }
            off += n
        }
        return off
    }

    func fill() -> Bool {
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = recv(fd, &buf, buf.count, 0)
        if n <= 0 { return false }
        pending += buf[0..<n]
        return true
    }

    struct Response {
        var status: Int
        var headers: [(String, String)]
        var body: String
        /// A chunked body's trailer fields (names lowercased).
        var trailers: [(String, String)] = []
        func header(_ n: String) -> String? { headers.first { $0.0 == n.lowercased() }?.1 }
        func trailer(_ n: String) -> String? { trailers.first { $0.0 == n.lowercased() }?.1 }
        func all(_ n: String) -> [String] { headers.filter { $0.0 == n.lowercased() }.map(\.1) }
    }

    /// Reads one response (Content-Length, chunked, or until close). nil on EOF/timeout.
    func read(head isHead: Bool = false) -> Response? {
        var headEnd: Int?
        while true {
            if let r = pending.firstRange(of: Array("\r\n\r\n".utf8)) { headEnd = r.upperBound; break }
            if !fill() { return nil }
        }
        let headText = String(decoding: pending[0..<headEnd!], as: UTF8.self)
        pending.removeFirst(headEnd!)
        let lines = headText.components(separatedBy: "\r\n").filter { !$0.isEmpty }
        let status = Int(lines[0].split(separator: " ")[1]) ?? 0
        var headers: [(String, String)] = []
        for l in lines.dropFirst() {
            let kv = l.split(separator: ":", maxSplits: 1)
            headers.append((kv[0].lowercased(), kv.count > 1 ? kv[1].trimmingCharacters(in: .whitespaces) : ""))
        }
        var r = Response(status: status, headers: headers, body: "")
        if status == 100 { return read(head: isHead) }
        if isHead || status == 204 || status == 304 { return r }
        if let cl = r.header("content-length").flatMap(Int.init) {
            while pending.count < cl { if !fill() { return nil } }
            r.body = String(decoding: pending[0..<cl], as: UTF8.self)
            pending.removeFirst(cl)
        } else if r.header("transfer-encoding") == "chunked" {
            var body = [UInt8]()
            while true {
                while pending.firstRange(of: [13, 10]) == nil { if !fill() { return nil } }
                let le = pending.firstRange(of: [13, 10])!
                let size = Int(String(decoding: pending[0..<le.lowerBound], as: UTF8.self), radix: 16) ?? 0
                pending.removeFirst(le.upperBound)
                if size == 0 {
                    // The trailer section: lines up to an empty one.
                    while true {
                        while pending.firstRange(of: [13, 10]) == nil { if !fill() { return nil } }
                        let end = pending.firstRange(of: [13, 10])!
                        let line = String(decoding: pending[0..<end.lowerBound], as: UTF8.self)
                        pending.removeFirst(end.upperBound)
                        if line.isEmpty { break }
                        let kv = line.split(separator: ":", maxSplits: 1)
                        r.trailers.append((kv[0].lowercased(), kv.count > 1 ? kv[1].trimmingCharacters(in: .whitespaces) : ""))
                    }
                    break
                }
                while pending.count < size + 2 { if !fill() { return nil } }
                body += pending[0..<size]
                pending.removeFirst(size + 2)
                if size == 0 { break }
            }
            r.body = String(decoding: body, as: UTF8.self)
        } else {
            while fill() {}
            r.body = String(decoding: pending, as: UTF8.self)
            pending = []
        }
        return r
    }

    /// True when the peer closed the connection (after any pending bytes).
    func isClosed() -> Bool {
        var buf = [UInt8](repeating: 0, count: 1024)
        let n = recv(fd, &buf, buf.count, 0)
        return n == 0
    }
}

/// A proxy on ephemeral ports with a config directory of its own.
final class ProxyFixture {
    let dir: String
    var server: ProxyServer!
    var inbound: Int { server.boundPorts["inbound"]! }
    var outbound: Int { server.boundPorts["outbound"]! }
    var admin: Int { server.boundPorts["admin"]! }

    /// `logger`: where the proxy logs (default: critical lines only, dropped).
    init(appPort: Int, files: [String: String] = [:], concurrency: Int = 2, logger custom: Logger? = nil, tweak: (inout ProxySettings) -> Void = { _ in }) throws {
        dir = NSTemporaryDirectory() + "moonlet-it-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for (name, text) in files { try text.replacingOccurrences(of: "$DIR", with: dir).write(toFile: dir + "/" + name, atomically: true, encoding: .utf8) }
        var s = ProxySettings()
        s.inboundPort = 0; s.outboundPort = 0; s.adminPort = 0; s.prometheusPort = 0; s.healthPort = 0
        s.appPort = appPort
        s.concurrency = concurrency
        s.configPaths = [dir]
        s.watchIntervalMs = 200
        tweak(&s)
        var logger = Logger(label: "moonlet-test")
        logger.logLevel = .critical
        server = ProxyServer(settings: s, logger: custom ?? logger)
        try server.start()
    }

    /// Downstream handlers still alive on the first loop, polled for up to a second
    /// until they reach 0 (a closed connection's handler goes once NIO lets it go).
    func liveHandlersOnceSettled() throws -> Int {
        let ctx = server.contexts[0]
        var live = -1
        for _ in 0..<50 {
            live = try ctx.loop.submit { ctx.liveHandlers }.wait()
            if live == 0 { break }
            usleep(20_000)
        }
        return live
    }

    func write(_ name: String, _ text: String) throws {
        try text.replacingOccurrences(of: "$DIR", with: dir).write(toFile: dir + "/" + name, atomically: true, encoding: .utf8)
    }

    func stop() { server.stop(); try? FileManager.default.removeItem(atPath: dir) }

    static func plugin(_ name: String, _ extra: String = "") -> String {
        """
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata:
          name: \(name)
        spec:
          url: file://$DIR/\(name).lua
        \(extra)
        """
    }
}

func get(_ c: RawClient, _ path: String = "/", headers: String = "") -> RawClient.Response? {
    c.send("GET \(path) HTTP/1.1\r\nHost: app\r\n\(headers)\r\n")
    return c.read()
}

func adminGet(_ port: Int, _ path: String, method: String = "GET") -> RawClient.Response? {
    guard let c = try? RawClient(port: port) else { return nil }
    c.send("\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nContent-Length: 0\r\n\r\n")
    return c.read()
}

/// A ServiceEntry `name` with endpoints on 127.0.0.1 at `ports` (port name http,
/// service port 80), a DestinationRule with `trafficPolicy` (flow YAML) when given,
/// and `extra` documents.
/// `address`: the endpoints' address (a name needs `resolution: "DNS"`).
func meshService(_ name: String, ports: [Int], trafficPolicy: String? = nil, extra: String = "",
                 address: String = "127.0.0.1", resolution: String = "STATIC") -> String {
    var y = """
    apiVersion: networking.istio.io/v1beta1
    kind: ServiceEntry
    metadata: {name: \(name)}
    spec:
      hosts: [\(name)]
      resolution: \(resolution)
      ports: [{number: 80, name: http}]
      endpoints:

    """
    for p in ports { y += "  - {address: \(address), ports: {http: \(p)}}\n" }
    if let trafficPolicy {
        y += "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: \(name)}\nspec:\n  host: \(name)\n  trafficPolicy: \(trafficPolicy)\n"
    }
    if !extra.isEmpty { y += "---\n" + extra }
    return y
}

/// Runs a system tool (curl, h2load) and returns its output; skips the test when the
/// tool is not installed (scripts/install-deps installs it).
func runTool(_ tool: String, _ args: [String]) throws -> String {
    guard let path = ["/usr/bin/\(tool)", "/usr/local/bin/\(tool)"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
        throw XCTSkip("\(tool) not installed (scripts/install-deps installs it)")
    }
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return String(decoding: data, as: UTF8.self)
}
