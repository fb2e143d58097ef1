import NIOCore
import NIOPosix
import NIOHTTP1
import NIOSSL
import NIOConcurrencyHelpers
import Logging
import MoonletCore
import MoonletTLS
import MoonletConfig
import MoonletLua
#if canImport(Foundation)
import Foundation
#endif

/// Fetches the JWKS of RequestAuthentication `jwksUri`s (HTTP or HTTPS GET) on a loop
/// of its own, never on the proxy's event loops. Each URI is fetched when a
/// configuration first names it, then refreshed every `refreshInterval` (Istio's 20
/// minutes); while a URI has no keys yet a failed fetch is retried every
/// `retryInterval`. A failed refresh keeps the last good keys. Keys live in a
/// `JWKSHolder` shared by every provider of the URI, so a reload that keeps the URI
/// keeps its keys.
public final class JWKSFetcher: @unchecked Sendable {
    /// Time between two fetches of a URI that has keys.
    public var refreshInterval: TimeAmount = .minutes(20)
    /// Time between two fetches of a URI that has no keys yet.
    public var retryInterval: TimeAmount = .seconds(30)
    /// Largest response body read.
    public static let maxBodyBytes = JWKSet.maxBytes

    let logger: Logger
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let lock = NIOLock()
    var entries: [String: Entry] = [:]
    var tlsContext: NIOSSLContext?

    final class Entry {
        let uri: String
        /// Set when `uri` is an issuer whose jwks_uri comes from OpenID discovery.
        var discover = false
        let holder = JWKSHolder()
        var timeoutMs: Int
        var timer: Scheduled<Void>?
        var fetching = false
        var stopped = false
        var waiters: [EventLoopPromise<Void>] = []
        init(uri: String, timeoutMs: Int) { self.uri = uri; self.timeoutMs = timeoutMs }
    }

    public init(logger: Logger) { self.logger = logger }

    /// The keys of `uri`; the first call for a URI starts fetching it.
    public func holder(for uri: String, timeoutMs: Int) -> JWKSHolder {
        let (e, isNew) = lock.withLock { () -> (Entry, Bool) in
            if let e = entries[uri] { return (e, false) }
            let e = Entry(uri: uri, timeoutMs: timeoutMs)
            entries[uri] = e
            return (e, true)
        }
        // Entry state is the fetcher loop's: a later rule's timeout is set there too.
        group.next().execute { e.timeoutMs = timeoutMs; if isNew { self.fetch(e) } }
        return e.holder
    }

    /// The keys of `issuer` found by OpenID discovery: its
    /// `/.well-known/openid-configuration` names the `jwks_uri` (what istiod does for a
    /// jwtRule with neither jwks nor jwksUri). Retained under the key `discovery:ISSUER`.
    public func holder(discovering issuer: String, timeoutMs: Int) -> JWKSHolder {
        let key = Self.discoveryKey(issuer)
        let (e, isNew) = lock.withLock { () -> (Entry, Bool) in
            if let e = entries[key] { return (e, false) }
            let e = Entry(uri: key, timeoutMs: timeoutMs)
            e.discover = true
            entries[key] = e
            return (e, true)
        }
        // Entry state is the fetcher loop's: a later rule's timeout is set there too.
        group.next().execute { e.timeoutMs = timeoutMs; if isNew { self.fetch(e) } }
        return e.holder
    }

    public static func discoveryKey(_ issuer: String) -> String { "discovery:" + issuer }

    /// Stops fetching the URIs not in `uris` (a reload dropped them).
    public func retain(_ uris: Set<String>) {
        let gone = lock.withLock { () -> [Entry] in
            let g = entries.filter { !uris.contains($0.key) }.map(\.value)
            for e in g { entries[e.uri] = nil }
            return g
        }
        let loop = group.next()
        for e in gone { loop.execute { e.stopped = true; e.timer?.cancel(); e.timer = nil } }
    }

    /// Waits until every URI of `uris` has keys or had its first fetch fail, at most
    /// `timeoutMs` (a configuration load waits for its first keys, as Istio's does).
    public func waitForFirstFetch(_ uris: [String], timeoutMs: Int) {
        let loop = group.next()
        let futures: [EventLoopFuture<Void>] = uris.compactMap { uri in
            guard let e = lock.withLock({ entries[uri] }) else { return nil }
            return loop.submit { () -> EventLoopFuture<Void> in
                if !e.fetching && (e.holder.keys != nil || e.holder.lastError != nil) { return loop.makeSucceededVoidFuture() }
                let p = loop.makePromise(of: Void.self)
                e.waiters.append(p)
                return p.futureResult
            }.flatMap { $0 }
        }
        let done = loop.makePromise(of: Void.self)
        EventLoopFuture.andAllComplete(futures, on: loop).whenComplete { _ in done.succeed(()) }
        let deadline = loop.scheduleTask(in: .milliseconds(Int64(timeoutMs))) { done.succeed(()) }
        _ = try? done.futureResult.wait()
        deadline.cancel()
    }

    /// Fetches every URI now (tests; `POST`-style refresh).
    public func refreshAll() {
        let all = lock.withLock { Array(entries.values) }
        let loop = group.next()
        for e in all { loop.execute { e.timer?.cancel(); self.fetch(e) } }
    }

    public func shutdown() {
        retain([])
        try? group.syncShutdownGracefully()
    }

    // MARK: fetching (on the fetcher's loop)

    func fetch(_ e: Entry) {
        guard !e.stopped, !e.fetching else { return }
        e.fetching = true
        let loop = group.next()
        let timeout = TimeAmount.milliseconds(Int64(max(1, e.timeoutMs)))
        let response: EventLoopFuture<(Int, [UInt8])>
        if e.discover {
            let issuer = String(e.uri.dropFirst("discovery:".count))
            let config = (issuer.hasSuffix("/") ? String(issuer.dropLast()) : issuer) + "/.well-known/openid-configuration"
            response = get(config, timeout: timeout, on: loop).flatMapThrowing { status, body -> String in
                guard status == 200 else { throw FetchError(description: "\(config): HTTP status \(status)") }
                guard let uri = JSONValue.parse(body)?["jwks_uri"]?.stringValue else { throw FetchError(description: "\(config): no jwks_uri") }
                return uri
            }.flatMap { self.get($0, timeout: timeout, on: loop) }
        } else {
            response = get(e.uri, timeout: timeout, on: loop)
        }
        response.whenComplete { result in
            e.fetching = false
            switch result {
            case .success(let (status, body)):
                if status == 200 {
                    do {
                        let set = try JWKSet.parse(body)
                        e.holder.update(set)
                        self.logger.info("jwks fetched", metadata: ["uri": "\(e.uri)", "keys": "\(set.keys.count)"])
                        for s in set.skipped { self.logger.notice("jwks \(e.uri): key skipped: \(s)") }
                    } catch {
                        self.failed(e, "\(error)")
                    }
                } else {
                    self.failed(e, "HTTP status \(status)")
                }
            case .failure(let err):
                self.failed(e, "\(err)")
            }
            for w in e.waiters { w.succeed(()) }
            e.waiters = []
            guard !e.stopped else { return }
            let next = e.holder.keys == nil ? self.retryInterval : self.refreshInterval
            e.timer = loop.scheduleTask(in: next) { self.fetch(e) }
        }
    }

    func failed(_ e: Entry, _ why: String) {
        e.holder.failed(why)
        let kept = e.holder.keys != nil
        logger.warning("jwks fetch failed\(kept ? " (the last good keys stay in use)" : " (tokens of this issuer are refused until a fetch succeeds)")",
                       metadata: ["uri": "\(e.uri)", "error": "\(LogText.escape(why))"])
    }

    struct FetchError: Error, CustomStringConvertible { var description: String }

    /// One GET of `uri`; the body is read up to `maxBodyBytes`.
    func get(_ uri: String, timeout: TimeAmount, on loop: EventLoop) -> EventLoopFuture<(Int, [UInt8])> {
        guard let url = URL(string: uri), let scheme = url.scheme?.lowercased(), scheme == "http" || scheme == "https", let host = url.host, !host.isEmpty else {
            return loop.makeFailedFuture(FetchError(description: "not an http(s) URL"))
        }
        let port = url.port ?? (scheme == "https" ? 443 : 80)
        var path = url.path.isEmpty ? "/" : url.path
        if let q = url.query { path += "?" + q }
        let promise = loop.makePromise(of: (Int, [UInt8]).self)
        var ssl: NIOSSLContext?
        if scheme == "https" {
            do { ssl = try lock.withLock { () throws -> NIOSSLContext in
                if let c = tlsContext { return c }
                let c = try NIOSSLContext(configuration: .makeClientConfiguration())
                tlsContext = c
                return c
            } } catch { return loop.makeFailedFuture(error) }
        }
        let isIP = host.allSatisfy { $0.isHexDigit || $0 == "." || $0 == ":" } && (host.contains(".") || host.contains(":"))
        let hostHeader = url.port.map { "\(host):\($0)" } ?? host
        let timer = loop.scheduleTask(in: timeout) { promise.fail(FetchError(description: "no answer within \(timeout.nanoseconds / 1_000_000) ms")) }
        ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    if let ssl {
                        try ch.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: ssl, serverHostname: isIP ? nil : host))
                    }
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(Collector(promise: promise))
                }
            }
            .connect(host: host.trimmingCharacters(in: CharacterSet(charactersIn: "[]")), port: port)
            .whenComplete { result in
                switch result {
                case .failure(let err): promise.fail(err)
                case .success(let ch):
                    let headers = HTTPHeaders([("host", hostHeader), ("accept", "application/json"), ("user-agent", "moonlet"), ("connection", "close")])
                    ch.write(HTTPClientRequestPart.head(HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: headers)), promise: nil)
                    ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
                    promise.futureResult.whenComplete { _ in ch.close(promise: nil) }
                }
            }
        promise.futureResult.whenComplete { _ in timer.cancel() }
        return promise.futureResult
    }

    final class Collector: ChannelInboundHandler {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<(Int, [UInt8])>
        var status = 0
        var body: [UInt8] = []
        var tooLarge = false
        init(promise: EventLoopPromise<(Int, [UInt8])>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): status = Int(h.status.code)
            case .body(let b):
                if body.count + b.readableBytes > JWKSFetcher.maxBodyBytes {
                    tooLarge = true
                    promise.fail(FetchError(description: "response larger than \(JWKSFetcher.maxBodyBytes) bytes"))
                    context.close(promise: nil)
                } else { body.append(contentsOf: b.readableBytesView) }
            case .end: if !tooLarge { promise.succeed((status, body)) }
            }
        }
        func errorCaught(context: ChannelHandlerContext, error: Error) {
            promise.fail(error)
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) {
            promise.fail(FetchError(description: "connection closed before a complete response"))
        }
    }
}

/// Builds the `istio-authn` builtin filter from the RequestAuthentications that select
/// the workload: one native JWT provider per jwtRule (registered for
/// `moonlet.jwt.provider`) and the filter's pluginConfig (token locations, outputs).
enum RequestAuthnSetup {
    struct Prepared {
        var spec: LuaPluginSpec
        var providers: [String: JWTVerifying]
        /// The jwksUris (and discovery keys) the configuration fetches; the caller
        /// retains them in the fetcher once the reload is accepted.
        var uris: Set<String>
    }

    /// `fetcher` makes (or gives) the JWKS fetcher. `generation` (the reload's version)
    /// is part of every provider id, so the providers of a configuration being prepared
    /// never replace those the serving one finds (a rejected reload changes no keys).
    /// Nothing is retained or dropped in the fetcher here: that is the caller's, once
    /// the reload is accepted (or, for a rejected one, back to the accepted URIs).
    static func prepare(_ snap: ConfigSnapshot, workload: WorkloadIdentity, generation: Int, fetcher: () -> JWKSFetcher) -> Result<Prepared?, ReloadError> {
        let policies = RequestAuthenticationSpec.applicable(snap.istio, to: workload)
        var providers: [String: JWTVerifying] = [:]
        var rules: [ConfigValue] = []
        var uris: [String] = []
        var errors: [String] = []
        var waitMs = 0
        for p in policies {
            for (i, r) in p.rules.enumerated() {
                let id = "\(p.namespace.isEmpty ? workload.namespace : p.namespace)/\(p.name)#\(i)@\(generation)"
                let holder: JWKSHolder
                if let inline = r.jwks {
                    do { holder = JWKSHolder(keys: try JWKSet.parse(Array(inline.utf8))) } catch {
                        errors.append("\(p.file):\(p.line): RequestAuthentication \(p.namespace)/\(p.name): spec.jwtRules[\(i)].jwks: \(error)")
                        continue
                    }
                } else if let uri = r.jwksUri {
                    holder = fetcher().holder(for: uri, timeoutMs: r.timeoutMs)
                    uris.append(uri)
                    waitMs = max(waitMs, min(r.timeoutMs, 5000))
                } else {
                    // Neither jwks nor jwksUri: OpenID discovery from the issuer, as istiod does.
                    holder = fetcher().holder(discovering: r.issuer, timeoutMs: r.timeoutMs)
                    uris.append(JWKSFetcher.discoveryKey(r.issuer))
                    waitMs = max(waitMs, min(r.timeoutMs, 5000))
                }
                providers[id] = JWTProvider(issuer: r.issuer, audiences: r.audiences, keys: holder, spaceDelimitedClaims: r.spaceDelimitedClaims)
                var locations: [ConfigValue] = []
                for l in r.locations {
                    switch l {
                    case .header(let n, let prefix): locations.append(.map([("header", .string(n)), ("prefix", .string(prefix))]))
                    case .param(let n): locations.append(.map([("param", .string(n))]))
                    case .cookie(let n): locations.append(.map([("cookie", .string(n))]))
                    }
                }
                var rule: [(String, ConfigValue)] = [
                    ("provider", .string(id)), ("issuer", .string(r.issuer)), ("locations", .array(locations)),
                    ("forward", .bool(r.forwardOriginalToken)), ("required", .bool(r.required)),
                    ("claim_headers", .array(r.outputClaimToHeaders.map { .map([("header", .string($0.header)), ("claim", .string($0.claim))]) })),
                ]
                if let h = r.outputPayloadToHeader, !h.isEmpty { rule.append(("payload_header", .string(h))) }
                rules.append(.map(rule))
            }
        }
        if !errors.isEmpty { return .failure(ReloadError(message: errors.joined(separator: "\n"))) }
        guard !policies.isEmpty else { return .success(nil) }
        // The first load of a jwksUri waits for its keys (Istio inlines fetched keys too).
        if !uris.isEmpty { fetcher().waitForFirstFetch(uris, timeoutMs: waitMs) }
        let spec = LuaPluginSpec(name: "istio-authn", namespace: "", path: "builtin://istio-authn", phase: "AUTHN", priority: Int(Int32.min),
                                 pluginConfig: .map([("rules", .array(rules))]), failStrategy: .failClose, matchLabels: [:],
                                 maxInstructions: nil, maxMemoryBytes: nil, timeoutMs: nil, file: "builtin", line: 0)
        return .success(Prepared(spec: spec, providers: providers, uris: Set(uris)))
    }
}

extension ProxyServer {
    /// The JWKS fetcher of RequestAuthentication jwksUris (made on first use).
    public var jwks: JWKSFetcher {
        lock.withLock {
            if let f = jwksFetcher { return f }
            let f = JWKSFetcher(logger: logger)
            jwksFetcher = f
            return f
        }
    }

    /// Adds the builtin `istio-authn` to `specs` when RequestAuthentications select the
    /// workload (unless a LuaPlugin named "istio-authn" replaces it) and makes its
    /// providers reachable under ids of this reload only (so `lua.prepare` can resolve
    /// them while the serving filters keep theirs). The reload then calls
    /// `commitRequestAuthn` if accepted, or `abandonRequestAuthn` if not.
    func prepareRequestAuthn(_ snap: ConfigSnapshot, version: Int, into specs: inout [LuaPluginSpec], reason: String) -> Result<RequestAuthnSetup.Prepared?, ReloadError> {
        switch RequestAuthnSetup.prepare(snap, workload: meshIdentity, generation: version, fetcher: { self.jwks }) {
        case .failure(let e):
            abandonRequestAuthn(nil)
            lock.withLock { lastReloadError = e.description }
            logger.error("config rejected (\(reason)); keeping the last good snapshot:\n\(e.description)")
            return .failure(e)
        case .success(.none):
            return .success(nil)
        case .success(let p?):
            JWTProviders.merge(p.providers, for: lua)
            if !specs.contains(where: { $0.name == "istio-authn" }) { specs.append(p.spec) }
            return .success(p)
        }
    }

    /// The reload was accepted: its providers and those of the generation it replaces
    /// (whose streams may still run) are the reachable set; older ones are dropped. The
    /// fetcher keeps refreshing only the accepted configuration's URIs.
    func commitRequestAuthn(_ p: RequestAuthnSetup.Prepared?) {
        let providers = p?.providers ?? [:]
        let previous = lock.withLock { () -> [String: JWTVerifying] in
            let prev = acceptedAuthnProviders
            acceptedAuthnProviders = providers
            acceptedAuthnURIs = p?.uris ?? []
            return prev
        }
        JWTProviders.replace(previous.merging(providers) { _, new in new }, for: lua, current: Array(providers.keys))
        let uris = p?.uris ?? []
        if !uris.isEmpty { jwks.retain(uris) } else { lock.withLock { jwksFetcher }?.retain([]) }
    }

    /// The reload was rejected: its providers are removed and the fetcher goes back to
    /// the URIs of the accepted configuration (the live keys keep being refreshed).
    func abandonRequestAuthn(_ p: RequestAuthnSetup.Prepared?) {
        if let p { JWTProviders.remove(p.providers.keys, for: lua) }
        let accepted = lock.withLock { acceptedAuthnURIs }
        lock.withLock { jwksFetcher }?.retain(accepted)
    }
}
