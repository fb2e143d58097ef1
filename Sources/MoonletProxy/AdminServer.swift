import MoonletCore
import NIOCore
import NIOPosix
import NIOHTTP1
import MoonletConfig
import MoonletLua
import MoonletTelemetry
#if canImport(Foundation)
import Foundation
#endif

/// The admin API (15000), the Prometheus port (15090) and the health port (15021).
/// Not on the hot path, so it uses NIOHTTP1.
///
/// | method | path | answer |
/// |---|---|---|
/// | GET | /ready, /healthz/ready | 200 LIVE once started, 503 while draining |
/// | GET | /stats/prometheus, /metrics | Prometheus text exposition |
/// | GET | /config_dump | JSON of the active snapshot |
/// | GET | /clusters | clusters, endpoints, circuit counters, outlier state (Envoy's text; ?format=json) |
/// | GET | /plugins | JSON per plugin: hash, load time, last error, executions, errors, time |
/// | POST | /plugins/reload | reload config and plugins now; 200 or 400 with the errors |
enum AdminServer {
    static func bind(group: EventLoopGroup, host: String, port: Int, server: ProxyServer) throws -> Channel {
        try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                ch.pipeline.configureHTTPServerPipeline().flatMap { ch.pipeline.addHandler(AdminHandler(server: server)) }
            }
            .bind(host: host, port: port).wait()
    }
}

final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let server: ProxyServer
    var head: HTTPRequestHead?
    init(server: ProxyServer) { self.server = server }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            route(context: context, h)
        }
    }

    func route(context: ChannelHandlerContext, _ h: HTTPRequestHead) {
        let path = h.uri.split(separator: "?").first.map(String.init) ?? h.uri
        let loop = context.eventLoop
        func reply(_ status: HTTPResponseStatus, _ body: String, _ type: String = "text/plain; charset=utf-8") {
            loop.execute { self.send(context: context, status, body, type, keepAlive: h.isKeepAlive) }
        }
        switch (h.method, path) {
        case (.GET, "/ready"), (.GET, "/healthz/ready"):
            server.ready ? reply(.ok, "LIVE\n") : reply(.serviceUnavailable, "NOT READY\n")
        case (.GET, "/stats/prometheus"), (.GET, "/metrics"), (.GET, "/stats"):
            server.metricsSnapshot().and(server.luaMemory()).whenComplete { r in
                switch r {
                case .success(let (snap, mem)):
                    reply(.ok, PrometheusExposition.render(snap, extra: [("moonlet_lua_memory_bytes", "Bytes used by all Lua VMs", Double(mem))]) + self.server.clusterMetrics(), "text/plain; version=0.0.4")
                case .failure(let e): reply(.internalServerError, "\(e)\n")
                }
            }
        case (.GET, "/clusters"):
            server.clustersReport(json: h.uri.contains("format=json")).whenComplete { r in
                switch r {
                case .success(let body): reply(.ok, body, h.uri.contains("format=json") ? "application/json" : "text/plain; charset=utf-8")
                case .failure(let e): reply(.internalServerError, "\(e)\n")
                }
            }
        case (.GET, "/config_dump"):
            reply(.ok, server.currentSnapshot.json + "\n", "application/json")
        case (.GET, "/plugins"):
            server.metricsSnapshot().whenComplete { r in
                let stats = (try? r.get())?.plugins ?? [:]
                reply(.ok, self.pluginsJSON(stats) + "\n", "application/json")
            }
        case (.POST, "/plugins/reload"), (.POST, "/reload"):
            DispatchQueue.global().async {
                switch self.server.reload(reason: "admin") {
                case .success(let v): reply(.ok, "{\"reloaded\":true,\"version\":\(v)}\n", "application/json")
                case .failure(let e): reply(.badRequest, "{\"reloaded\":false,\"error\":\(JSON.quote(e.message))}\n", "application/json")
                }
            }
        default:
            reply(.notFound, "not found: \(h.method) \(path)\nendpoints: /ready /stats/prometheus /config_dump /clusters /plugins POST /plugins/reload\n")
        }
    }

    func pluginsJSON(_ stats: [String: PluginStats]) -> String {
        let fmt = ISO8601DateFormatter()
        let items = server.lua.statuses().map { p -> String in
            let s = stats[p.name] ?? PluginStats()
            return "{\"name\":\(JSON.quote(p.name)),\"path\":\(JSON.quote(p.path)),\"version\":\(JSON.quote(p.hash)),\"loaded_at\":\(JSON.quote(fmt.string(from: p.loadedAt))),\"last_error\":\(p.lastError.map(JSON.quote) ?? "null"),\"executions\":\(s.calls),\"errors\":\(s.errors),\"aborted\":\(s.aborted),\"seconds\":\(Double(s.nanos) / 1e9)}"
        }
        return "{\"plugins\":[" + items.joined(separator: ",") + "],\"last_reload_error\":\(server.lastError.map(JSON.quote) ?? "null")}"
    }

    func send(context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ body: String, _ type: String, keepAlive: Bool) {
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: type)
        headers.add(name: "content-length", value: String(body.utf8.count))
        if !keepAlive { headers.add(name: "connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if !keepAlive { context.close(promise: nil) } }
    }
}
