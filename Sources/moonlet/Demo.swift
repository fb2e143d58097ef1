import ArgumentParser
import Logging
import MoonletConfig
import MoonletProxy
import NIOCore
import NIOPosix
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet demo`: an in-process app and a sidecar in front of it with a Lua filter,
/// sample traffic, then it keeps serving with curl commands to try. Until the
/// traffic-management work lands this is the inbound example of the proxy-core issue.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the embedded demo: an app, a sidecar with a Lua filter, sample traffic.")
    @Option(help: "Inbound port of the demo sidecar") var inboundPort: Int = 15006
    @Option(help: "Admin port of the demo sidecar") var adminPort: Int = 15000
    @Flag(help: "Exit after the sample traffic instead of serving") var once = false

    func run() throws {
        LoggingSystem.bootstrap { label in var h = StreamLogHandler.standardError(label: label); h.logLevel = .warning; return h }
        let logger = Logger(label: "moonlet-demo")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moonlet-demo-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let filter = """
        -- Demo filter: tags requests and responses, blocks x-block, counts per path.
        local f = {}
        function f.on_request(s, conf)
          if s.request.headers:get("x-block") then
            return s:respond(403, "blocked by " .. conf.name .. "\\n", { ["content-type"] = "text/plain" })
          end
          s.request.headers:set("x-seen-by", "moonlet")
          s.vars.t0 = moonlet.now()
        end
        function f.on_response(s, conf)
          s.response.headers:set("x-filter", conf.name)
          local hits = moonlet.shared("demo"):incr(s.request.path, 1, 0)
          s.response.headers:set("x-hits", tostring(hits))
        end
        return f
        """
        try filter.write(toFile: dir + "/demo-filter.lua", atomically: true, encoding: .utf8)
        let yaml = """
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata:
          name: demo-filter
          namespace: default
        spec:
          url: file://\(dir)/demo-filter.lua
          pluginConfig:
            name: demo
        """
        try yaml.write(toFile: dir + "/plugin.yaml", atomically: true, encoding: .utf8)

        let app = try DemoApp.start(name: "order-service-v1")
        var settings = ProxySettings()
        settings.inboundPort = inboundPort
        settings.outboundPort = 0
        settings.adminPort = adminPort
        settings.prometheusPort = 0
        settings.healthPort = 0
        settings.appPort = app.port
        settings.concurrency = 2
        settings.configPaths = [dir]
        let server = ProxyServer(settings: settings, logger: logger)
        try server.start()
        let port = server.boundPorts["inbound"]!
        print("moonlet demo: app on 127.0.0.1:\(app.port), sidecar inbound on 127.0.0.1:\(port), admin on 127.0.0.1:\(server.boundPorts["admin"]!)")
        print("")
        var codes: [Int: Int] = [:]
        var tagged = 0
        for i in 0..<20 {
            let block = i % 5 == 4
            let r = DemoClient.get(port: port, path: "/orders/\(i % 3)", headers: block ? ["x-block": "1"] : [:])
            codes[r.status, default: 0] += 1
            if r.headers["x-filter"] == "demo" { tagged += 1 }
        }
        func row(_ k: String, _ v: Int) { print(k.padding(toLength: 28, withPad: " ", startingAt: 0) + String(v)) }
        row("requests sent", 20)
        for (c, n) in codes.sorted(by: { $0.key < $1.key }) { row("status \(c)", n) }
        row("responses tagged by Lua", tagged)
        print("")
        print("Try it:")
        print("  curl -i http://127.0.0.1:\(port)/orders/1")
        print("  curl -i -H 'x-block: 1' http://127.0.0.1:\(port)/orders/1")
        print("  curl http://127.0.0.1:\(server.boundPorts["admin"]!)/plugins")
        print("  curl http://127.0.0.1:\(server.boundPorts["admin"]!)/stats/prometheus")
        print("  edit \(dir)/demo-filter.lua: it reloads within a second")
        if once { server.stop(); app.stop(); return }
        print("Ctrl-C stops the demo.")
        let signals = installSignals(server)
        _ = signals
        dispatchMain()
    }
}

/// A tiny HTTP/1.1 app server for the demo.
final class DemoApp {
    let group: MultiThreadedEventLoopGroup
    let channel: Channel
    var port: Int { channel.localAddress!.port! }
    init(group: MultiThreadedEventLoopGroup, channel: Channel) { self.group = group; self.channel = channel }

    static func start(name: String) throws -> DemoApp {
        let g = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ch = try ServerBootstrap(group: g)
            .childChannelInitializer { ch in
                ch.pipeline.configureHTTPServerPipeline().flatMap { ch.pipeline.addHandler(DemoAppHandler(name: name)) }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        return DemoApp(group: g, channel: ch)
    }
    func stop() { try? channel.close().wait(); try? group.syncShutdownGracefully() }
}

import NIOHTTP1
final class DemoAppHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let name: String
    var head: HTTPRequestHead?
    init(name: String) { self.name = name }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            let body = "{\"service\":\"\(name)\",\"path\":\"\(h.uri)\",\"seen_by\":\"\(h.headers["x-seen-by"].first ?? "")\"}\n"
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: "application/json")
            headers.add(name: "content-length", value: String(body.utf8.count))
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}

/// A blocking one-shot HTTP/1.1 client over a plain socket (demo only).
enum DemoClient {
    struct Response { var status: Int; var headers: [String: String]; var body: String }
    static func get(port: Int, path: String, headers: [String: String]) -> Response {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard ok == 0 else { return Response(status: 0, headers: [:], body: "") }
        var req = "GET \(path) HTTP/1.1\r\nhost: order-service\r\nconnection: close\r\n"
        for (k, v) in headers { req += "\(k): \(v)\r\n" }
        req += "\r\n"
        _ = req.withCString { send(fd, $0, strlen($0), 0) }
        var data = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true { let n = recv(fd, &buf, 4096, 0); if n <= 0 { break }; data += buf[0..<n] }
        let text = String(decoding: data, as: UTF8.self)
        let parts = text.components(separatedBy: "\r\n\r\n")
        let lines = parts[0].components(separatedBy: "\r\n")
        let status = lines.first.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
        var h: [String: String] = [:]
        for l in lines.dropFirst() { let kv = l.split(separator: ":", maxSplits: 1); if kv.count == 2 { h[kv[0].lowercased()] = kv[1].trimmingCharacters(in: .whitespaces) } }
        return Response(status: status, headers: h, body: parts.dropFirst().joined(separator: "\r\n\r\n"))
    }
}
