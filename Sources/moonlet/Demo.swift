import ArgumentParser
import Logging
import MoonletConfig
import MoonletProxy
import NIOCore
import NIOPosix
import NIOHTTP1
#if canImport(Foundation)
import Foundation
#endif

/// The seed's gray release, embedded: policies/gray-release/order-service.yaml
/// (a test keeps the two identical).
public enum GrayReleasePolicy {
    public static let yaml = #"""
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: order-service
spec:
  hosts:
  - order-service
  http:
  - match:
    - headers:
        X-Gray:
          exact: "true"
    route:
    - destination:
        host: order-service
        subset: v2
  - route:
    - destination:
        host: order-service
        subset: v1
      weight: 90
    - destination:
        host: order-service
        subset: v2
      weight: 10
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: order-service
spec:
  host: order-service
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    connectionPool:
      tcp:
        maxConnections: 100
      http:
        http1MaxPendingRequests: 50
        maxRequestsPerConnection: 10
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 30s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2

"""#

    /// ServiceEntry + WorkloadEntries for order-service v1 and v2 on 127.0.0.1.
    public static func endpoints(v1Port: Int, v2Port: Int) -> String {
        """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata:
          name: order-service
        spec:
          hosts:
          - order-service
          location: MESH_INTERNAL
          resolution: STATIC
          ports:
          - number: 8080
            name: http
            protocol: HTTP
          workloadSelector:
            labels:
              app: order-service
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: WorkloadEntry
        metadata:
          name: order-service-v1
        spec:
          address: 127.0.0.1
          ports:
            http: \(v1Port)
          labels:
            app: order-service
            version: v1
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: WorkloadEntry
        metadata:
          name: order-service-v2
        spec:
          address: 127.0.0.1
          ports:
            http: \(v2Port)
          labels:
            app: order-service
            version: v2
        """
    }
}

/// `moonlet demo`: the seed's gray release of order-service with nothing to prepare.
/// In-process v1 and v2 backends, a sidecar whose outbound listener routes by the
/// seed's VirtualService and DestinationRule, sample traffic with and without
/// X-Gray, then it keeps serving with curl commands to try.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the embedded demo: the order-service v1/v2 gray release.")
    @Option(help: "Outbound port of the demo sidecar") var outboundPort: Int = 15001
    @Option(help: "Admin port of the demo sidecar") var adminPort: Int = 15000
    @Option(help: "Requests sent without X-Gray") var requests: Int = 1000
    @Flag(help: "Exit after the sample traffic instead of serving") var once = false

    func run() throws {
        // Line by line even into a pipe or a file (stdout is fully buffered there, and the
        // demo serves until it is stopped).
        setvbuf(stdout, nil, _IOLBF, 0)
        LoggingSystem.bootstrap { label in var h = StreamLogHandler.standardError(label: label); h.logLevel = .warning; return h }
        let logger = Logger(label: "moonlet-demo")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moonlet-demo-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        // The policy files go when the demo does (end of --once, an error, Ctrl-C or SIGTERM).
        let removeDir = { _ = try? FileManager.default.removeItem(atPath: dir) }
        do { try serve(dir: dir, logger: logger, removeDir: removeDir) } catch {
            removeDir()
            throw error
        }
    }

    func serve(dir: String, logger: Logger, removeDir: @escaping () -> Void) throws {
        let v1 = try DemoApp.start(name: "order-service", version: "v1")
        let v2 = try DemoApp.start(name: "order-service", version: "v2")
        try GrayReleasePolicy.yaml.write(toFile: dir + "/order-service.yaml", atomically: true, encoding: .utf8)
        try GrayReleasePolicy.endpoints(v1Port: v1.port, v2Port: v2.port).write(toFile: dir + "/order-service-endpoints.yaml", atomically: true, encoding: .utf8)

        var settings = ProxySettings()
        settings.inboundPort = 0
        settings.outboundPort = outboundPort
        settings.adminPort = adminPort
        settings.prometheusPort = 0
        settings.healthPort = 0
        settings.concurrency = 2
        settings.configPaths = [dir]
        let server = ProxyServer(settings: settings, logger: logger)
        try server.start()
        let port = server.boundPorts["outbound"]!
        let admin = server.boundPorts["admin"]!
        print("moonlet demo: order-service v1 on 127.0.0.1:\(v1.port), v2 on 127.0.0.1:\(v2.port)")
        print("sidecar outbound listener 127.0.0.1:\(port), admin 127.0.0.1:\(admin), policies in \(dir)")
        print("")
        let plain = DemoClient.tally(port: port, count: requests, headers: [:])
        let gray = DemoClient.tally(port: port, count: max(1, requests / 10), headers: ["X-Gray": "true"])
        func pad(_ s: String, _ n: Int) -> String { s.padding(toLength: n, withPad: " ", startingAt: 0) }
        func pct(_ a: Int, _ t: Int) -> String { t == 0 ? "-" : String(format: "%.1f%%", Double(a) * 100 / Double(t)) }
        print(pad("traffic", 22) + pad("requests", 10) + pad("v1", 16) + pad("v2", 16) + "failed")
        for (name, t) in [("without X-Gray", plain), ("X-Gray: true", gray)] {
            let total = t.values.reduce(0, +)
            let v1n = t["v1"] ?? 0, v2n = t["v2"] ?? 0
            print(pad(name, 22) + pad(String(total), 10) + pad("\(v1n) (\(pct(v1n, total)))", 16) + pad("\(v2n) (\(pct(v2n, total)))", 16) + String(total - v1n - v2n))
        }
        print("")
        if once {
            server.stop(); v1.stop(); v2.stop()
            removeDir()
            return
        }
        print("Try it:")
        print("  curl -H 'Host: order-service' http://127.0.0.1:\(port)/orders/1")
        print("  curl -H 'Host: order-service' -H 'X-Gray: true' http://127.0.0.1:\(port)/orders/1")
        print("  edit the weights in \(dir)/order-service.yaml: traffic shifts within a second, no request fails")
        print("  curl http://127.0.0.1:\(admin)/stats/prometheus | grep istio_requests_total")
        print("  curl http://127.0.0.1:\(admin)/config_dump")
        print("Ctrl-C stops the demo.")
        let signals = installSignals(server, beforeExit: removeDir)
        _ = signals
        dispatchMain()
    }
}

/// A tiny HTTP/1.1 app for the demo: answers with its name and version.
final class DemoApp {
    let group: MultiThreadedEventLoopGroup
    let channel: Channel
    var port: Int { channel.localAddress!.port! }
    init(group: MultiThreadedEventLoopGroup, channel: Channel) { self.group = group; self.channel = channel }

    static func start(name: String, version: String) throws -> DemoApp {
        let g = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ch = try ServerBootstrap(group: g)
            .childChannelInitializer { ch in
                ch.pipeline.configureHTTPServerPipeline().flatMap { ch.pipeline.addHandler(DemoAppHandler(name: name, version: version)) }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        return DemoApp(group: g, channel: ch)
    }
    func stop() { try? channel.close().wait(); try? group.syncShutdownGracefully() }
}

final class DemoAppHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let name: String
    let version: String
    var head: HTTPRequestHead?
    init(name: String, version: String) { self.name = name; self.version = version }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            let body = "{\"service\":\"\(name)\",\"version\":\"\(version)\",\"path\":\"\(h.uri)\"}\n"
            var headers = HTTPHeaders()
            headers.add(name: "content-type", value: "application/json")
            headers.add(name: "content-length", value: String(body.utf8.count))
            headers.add(name: "x-version", value: version)
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}

/// A blocking HTTP/1.1 client over one keep-alive connection (demo only).
enum DemoClient {
    /// Sends `count` GETs for order-service and counts answers by x-version.
    static func tally(port: Int, count: Int, headers: [String: String]) -> [String: Int] {
        var out: [String: Int] = [:]
        var fd: Int32 = -1
        var pending = [UInt8]()
        func connectNew() {
            if fd >= 0 { close(fd) }
            pending = []
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = in_port_t(UInt16(port).bigEndian)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        }
        connectNew()
        defer { close(fd) }
        var req = "GET /orders/1 HTTP/1.1\r\nhost: order-service\r\n"
        for (k, v) in headers { req += "\(k): \(v)\r\n" }
        req += "\r\n"
        for _ in 0..<count {
            _ = req.withCString { send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
            guard let (version, close) = readResponse(fd, &pending) else { out["failed", default: 0] += 1; connectNew(); continue }
            out[version, default: 0] += 1
            if close { connectNew() }
        }
        return out
    }

    static func readResponse(_ fd: Int32, _ pending: inout [UInt8]) -> (String, Bool)? {
        var buf = [UInt8](repeating: 0, count: 16384)
        func fill() -> Bool { let n = recv(fd, &buf, buf.count, 0); if n <= 0 { return false }; pending += buf[0..<n]; return true }
        while pending.firstRange(of: Array("\r\n\r\n".utf8)) == nil { if !fill() { return nil } }
        let end = pending.firstRange(of: Array("\r\n\r\n".utf8))!.upperBound
        let head = String(decoding: pending[0..<end], as: UTF8.self).lowercased()
        pending.removeFirst(end)
        var length = 0, version = "other"
        for line in head.components(separatedBy: "\r\n") {
            if line.hasPrefix("content-length:") { length = Int(line.dropFirst(15).trimmingCharacters(in: .whitespaces)) ?? 0 }
            if line.hasPrefix("x-version:") { version = line.dropFirst(10).trimmingCharacters(in: .whitespaces) }
        }
        while pending.count < length { if !fill() { return nil } }
        pending.removeFirst(length)
        if !head.hasPrefix("http/1.1 200") { version = "failed" }
        return (version, head.contains("connection: close"))
    }
}
