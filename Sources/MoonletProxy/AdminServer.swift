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
/// | GET | /ready, /healthz/ready | 200 LIVE once started, 503 while draining or (with pilot) before the first pushed version |
/// | GET | /stats/prometheus, /metrics | Prometheus text exposition |
/// | GET | /config_dump | JSON of the active snapshot |
/// | GET | /clusters | clusters, endpoints, circuit counters, outlier state (Envoy's text; ?format=json) |
/// | GET | /plugins | JSON per plugin: hash, load time, last error, executions, errors, time |
/// | GET | /experiments | JSON per A/B experiment: arms, rates, latencies, verdicts, shadow divergences, guardrail |
/// | GET | /ui | the admin page (AdminUI: plugins, experiments, clusters, routes; refreshes itself) |
/// | POST | /plugins/reload | reload config and plugins now; 200 or 400 with the errors |
/// | POST | /reopen_logs | open the access log files again (Envoy's endpoint; SIGUSR1 does the same) |
///
/// The Prometheus and health ports follow `--bind` (the pod network may reach them), so
/// they answer only their own paths; the rest of the API is on the admin port alone.
enum AdminServer {
    /// What a port serves: everything (admin), metrics only, or readiness only.
    enum Role: String, Sendable { case admin, prometheus, health }

    static func bind(group: EventLoopGroup, host: String, port: Int, role: Role, server: ProxyServer) throws -> Channel {
        try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { ch in
                ch.pipeline.configureHTTPServerPipeline().flatMap { ch.pipeline.addHandler(AdminHandler(server: server, role: role)) }
            }
            .bind(host: host, port: port).wait()
    }
}

final class AdminHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let server: ProxyServer
    let role: AdminServer.Role
    var head: HTTPRequestHead?
    init(server: ProxyServer, role: AdminServer.Role) { self.server = server; self.role = role }

    /// Whether this port answers `path` (the admin port answers every path).
    func serves(_ path: String) -> Bool {
        switch role {
        case .admin: return true
        case .prometheus: return path == "/stats/prometheus" || path == "/metrics"
        case .health: return path == "/healthz/ready" || path == "/ready"
        }
    }

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
        guard serves(path) else {
            reply(.notFound, "not found: \(path)\nthe \(role.rawValue) port serves \(role == .prometheus ? "/stats/prometheus" : "/healthz/ready") only\n")
            return
        }
        // Every admin request, reads included: a page whose DNS name rebinds to 127.0.0.1
        // reaches this port with its own name as Host, and could read /config_dump.
        if role == .admin, let why = Self.hostRefusal(h.headers) {
            reply(.forbidden, why + "\n")
            return
        }
        if h.method == .POST, let why = Self.crossOriginRefusal(h.headers) {
            reply(.forbidden, why + "\n")
            return
        }
        switch (h.method, path) {
        case (.GET, "/ready"), (.GET, "/healthz/ready"):
            server.ready ? reply(.ok, "LIVE\n") : reply(.serviceUnavailable, "NOT READY\n")
        case (.GET, "/stats/prometheus"), (.GET, "/metrics"), (.GET, "/stats"):
            server.metricsSnapshot().and(server.luaMemory()).and(server.experimentCounters()).whenComplete { r in
                switch r {
                case .success(let ((snap, mem), experiments)):
                    reply(.ok, PrometheusExposition.render(snap, extra: [("moonlet_lua_memory_bytes", "Bytes used by all Lua VMs", Double(mem))], user: self.server.lua.userMetrics) + self.server.clusterMetrics() + self.server.lua.telemetry.prometheus()
                          + ExperimentReport.prometheus(self.server.lua.experiments(), experiments), "text/plain; version=0.0.4")
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
            reply(.ok, ConfigDump.redacted(server.currentSnapshot).json + "\n", "application/json")
        case (.GET, "/plugins"):
            server.metricsSnapshot().whenComplete { r in
                let stats = (try? r.get())?.plugins ?? [:]
                reply(.ok, self.pluginsJSON(stats) + "\n", "application/json")
            }
        case (.GET, "/ui"):
            reply(.ok, AdminUI.html, "text/html; charset=utf-8")
        case (.GET, "/experiments"):
            server.experimentCounters().whenComplete { r in
                let counters = (try? r.get()) ?? [:]
                reply(.ok, ExperimentReport.json(self.server.lua.experiments(), counters) + "\n", "application/json")
            }
        case (.POST, "/reopen_logs"):
            // Envoy's admin endpoint: access log files are opened again (logrotate).
            DispatchQueue.global().async {
                self.server.reopenAccessLogs()
                reply(.ok, "OK\n")
            }
        case (.POST, "/plugins/reload"), (.POST, "/reload"):
            DispatchQueue.global().async {
                switch self.server.reload(reason: "admin") {
                case .success(let v): reply(.ok, "{\"reloaded\":true,\"version\":\(v)}\n", "application/json")
                case .failure(let e): reply(.badRequest, "{\"reloaded\":false,\"error\":\(JSON.quote(e.message))}\n", "application/json")
                }
            }
        default:
            reply(.notFound, "not found: \(h.method) \(path)\nendpoints: /ready /stats/prometheus /config_dump /clusters /plugins /experiments /ui POST /plugins/reload\n")
        }
    }

    /// Why a POST must be refused as a browser's cross-origin request, or nil. A page on
    /// another origin (or one that rebinds its DNS name to 127.0.0.1) can make a browser
    /// send a form POST here: it carries `Origin` (and `Sec-Fetch-Site`), which must name
    /// this same host, addressed by IP or as localhost. curl and other tools send neither.
    static func crossOriginRefusal(_ headers: HTTPHeaders) -> String? {
        if let site = headers.first(name: "sec-fetch-site")?.lowercased(), site != "same-origin" && site != "none" {
            return "cross-origin request refused (sec-fetch-site: \(site))"
        }
        guard let origin = headers.first(name: "origin") else { return nil }
        let host = (headers.first(name: "host") ?? "").lowercased()
        let authority = origin.lowercased().components(separatedBy: "://").last ?? ""
        guard origin.contains("://"), authority == host else { return "cross-origin request refused (origin \(origin) is not \(host))" }
        return hostNameRefusal(authority)
    }

    /// Why the admin API refuses a request for its Host, or nil: it is addressed by IP
    /// or as localhost (a request without Host, HTTP/1.0 from a tool, is no browser's).
    static func hostRefusal(_ headers: HTTPHeaders) -> String? {
        guard let host = headers.first(name: "host") else { return nil }
        return hostNameRefusal(host.lowercased())
    }

    static func hostNameRefusal(_ authority: String) -> String? {
        var name = authority
        if name.hasPrefix("[") { name = String(name.dropFirst().prefix { $0 != "]" }) }
        else if let colon = name.lastIndex(of: ":") { name = String(name[..<colon]) }
        let isIP = name.contains(":") || (!name.isEmpty && name.allSatisfy { $0.isNumber || $0 == "." })
        guard isIP || name == "localhost" else { return "request refused: the admin API is addressed by IP or localhost, not \(name)" }
        return nil
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

/// /config_dump without secrets: a pluginConfig value whose key names a secret (see
/// `isSecret`) is shown as "[redacted]", at any depth; in Istio resources, the value of
/// a header whose name does (under any `headers`: route set/add, match conditions); and
/// everywhere the password in a URL (`redis://user:[redacted]@host`).
enum ConfigDump {
    static func redacted(_ snap: ConfigSnapshot) -> ConfigSnapshot {
        let plugins = snap.plugins.map { p -> LuaPluginSpec in
            var q = p
            q.pluginConfig = redact(p.pluginConfig)
            for i in q.variants.indices { q.variants[i].pluginConfig = redact(q.variants[i].pluginConfig) }
            q.shadow?.pluginConfig = redact(p.shadow?.pluginConfig ?? .null)
            return q
        }
        let istio = snap.istio.map { r -> IstioResource in
            var q = r
            q.spec = redact(r.spec, onlyUnderHeaders: true)
            return q
        }
        return ConfigSnapshot(version: snap.version, plugins: plugins, istio: istio, skipped: snap.skipped, files: snap.files, routes: snap.routes)
    }

    /// `onlyUnderHeaders`: secret keys count only inside a `headers` map (Istio specs,
    /// whose other keys, such as jwtRules or httpCookie, are configuration, not secrets).
    static func redact(_ v: ConfigValue, onlyUnderHeaders: Bool = false) -> ConfigValue {
        switch v {
        case .map(let kv):
            return .map(kv.map { k, x in
                (k, !onlyUnderHeaders && isSecret(k) ? .string("[redacted]") : redact(x, onlyUnderHeaders: onlyUnderHeaders && k != "headers"))
            })
        case .array(let a): return .array(a.map { redact($0, onlyUnderHeaders: onlyUnderHeaders) })
        case .string(let s): return .string(redactUserinfo(s))
        default: return v
        }
    }

    /// `scheme://user:password@host...` with the password (a lone user part, often a
    /// token, whole) replaced by "[redacted]".
    static func redactUserinfo(_ s: String) -> String {
        guard let scheme = s.range(of: "://") else { return s }
        let rest = s[scheme.upperBound...]
        let authority = rest.prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        guard let at = authority.lastIndex(of: "@") else { return s }
        let userinfo = rest[rest.startIndex..<at]
        let kept = userinfo.firstIndex(of: ":").map { String(userinfo[...$0]) } ?? ""
        return String(s[..<scheme.upperBound]) + kept + "[redacted]" + String(s[at...])
    }

    /// A key names a secret when, lowercased and without "-", "_" and ".", it contains
    /// one of `secretWords`, ends in "key" (key, hmacKey, signing_key) or "auth", or is
    /// pwd or pass (a false positive only hides a value from the dump).
    static func isSecret(_ key: String) -> Bool {
        let k = key.lowercased().filter { $0 != "-" && $0 != "_" && $0 != "." }
        for word in secretWords where k.contains(word) { return true }
        return k.hasSuffix("key") || k.hasSuffix("auth") || k == "pwd" || k == "pass"
    }

    static let secretWords = ["secret", "password", "passwd", "passphrase", "token", "credential", "apikey", "privatekey",
                              "authorization", "bearer", "jwt", "cookie", "session", "hmac", "signature", "clientcert"]
}

extension ProxyServer {
    /// Every loop's experiment counters, merged (for /experiments and the scrape).
    func experimentCounters() -> EventLoopFuture<[String: ExperimentCounters]> {
        let futures = contexts.map { c in c.loop.submit { c.lua.vm.experimentCounters() } }
        return EventLoopFuture.reduce([String: ExperimentCounters](), futures, on: group.next()) { acc, loop in
            var out = acc
            for (k, v) in loop { if out[k] == nil { out[k] = v } else { out[k]!.merge(v) } }
            return out
        }
    }
}
