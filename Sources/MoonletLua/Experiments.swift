import CLua
import MoonletCore
import MoonletConfig
import MoonletTelemetry
import NIOCore
import NIOConcurrencyHelpers
#if canImport(Foundation)
import Foundation
#endif

// A/B policy experiments over Lua filters (docs/configuration.md "A/B experiments",
// docs/operations.md "/experiments"): a LuaPlugin with `spec.variants` runs one arm per
// stream, chosen from the sticky key; `spec.shadow` runs a candidate on a copy of each
// stream and counts where it would have decided otherwise. A plugin with neither is a
// plain LuaPluginInstance: nothing here runs for it.

/// The loaded sources of an experiment: its arms (in `spec.variants` order, the first is
/// the control) and its shadow, with the process-wide state they share.
public final class LuaExperimentSources: @unchecked Sendable {
    public let arms: [LuaPluginSource]
    public let shadow: LuaPluginSource?
    public let state: ExperimentState
    init(arms: [LuaPluginSource], shadow: LuaPluginSource?, state: ExperimentState) {
        self.arms = arms; self.shadow = shadow; self.state = state
    }
}

/// What one experiment keeps across loops and reloads: its arms, weights and the
/// guardrail's decisions. Kept while the plugin's experiment (arms, sources, weights,
/// guardrail) is unchanged; a changed config starts a new one (stats and rollbacks reset).
public final class ExperimentState: @unchecked Sendable {
    public let plugin: String
    public let armNames: [String]
    public let weights: [Int]
    public let armVersions: [String]
    public let shadowVersion: String?
    public let stickyBy: StickyKey
    public let guardrail: LuaPluginGuardrail?
    let fingerprint: String
    public let startedAt = Date()
    let lock = NIOLock()
    /// Arms the guardrail set to weight 0, with why.
    var _rolledBack: [Int: String] = [:]
    /// Latest (requests, 5xx) per arm each loop published (guardrail input).
    var published: [ObjectIdentifier: [(UInt64, UInt64)]] = [:]

    init(spec: LuaPluginSpec, armVersions: [String], shadowVersion: String?, fingerprint: String) {
        plugin = spec.name
        armNames = spec.variants.map(\.name)
        weights = spec.variants.map(\.weight)
        self.armVersions = armVersions
        self.shadowVersion = shadowVersion
        stickyBy = spec.stickyBy
        guardrail = spec.guardrail
        self.fingerprint = fingerprint
    }

    /// Arms rolled back by the guardrail (index: reason).
    public var rolledBack: [Int: String] { lock.withLock { _rolledBack } }

    /// A loop's latest counts; sums every loop's, applies the guardrail, returns the
    /// rolled-back arms. Called by a loop every `ExperimentFilter.publishEvery` streams.
    func publish(_ loop: ObjectIdentifier, _ counts: [(UInt64, UInt64)], logger: (String) -> Void) -> Set<Int> {
        var logLine: String?
        let out: Set<Int> = lock.withLock {
            published[loop] = counts
            if let g = guardrail, armNames.count > 1 {
                var n = [UInt64](repeating: 0, count: armNames.count), e = n
                for c in published.values { for (i, x) in c.enumerated() where i < n.count { n[i] += x.0; e[i] += x.1 } }
                for i in 1..<armNames.count where _rolledBack[i] == nil && n[i] >= UInt64(g.minRequests) {
                    let rc = Double(e[0]) / Double(max(n[0], 1)), ri = Double(e[i]) / Double(n[i])
                    if ri - rc > g.maxIncrease && ExperimentStatistics.rateVerdict(control: (e[0], n[0]), candidate: (e[i], n[i])) == .worse {
                        let why = String(format: "error rate %.4f vs control %.4f (+%.4f > maxIncrease %.4f) over %llu requests", ri, rc, ri - rc, g.maxIncrease, n[i])
                        _rolledBack[i] = why
                        logLine = "experiment \(plugin): guardrail rolled back variant \(armNames[i]) to weight 0: \(why)"
                    }
                }
            }
            return Set(_rolledBack.keys)
        }
        if let logLine { logger(logLine) }
        return out
    }
}

extension LuaHost {
    /// Reads and compiles the arms and shadow of an experiment plugin (`spec.variants`,
    /// `spec.shadow`) in the scratch VM, and finds or starts its shared state.
    func prepareExperiment(_ spec: LuaPluginSpec, scratch: LuaVM) throws -> LuaPluginSource {
        func load(_ path: String, _ config: ConfigValue, what: String) throws -> LuaPluginSource {
            var s = spec
            s.path = path; s.pluginConfig = config
            s.variants = []; s.shadow = nil; s.guardrail = nil
            guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
                throw LuaError.runtime("\(what): \(path): cannot read file")
            }
            let src = LuaPluginSource(spec: s, source: text, hash: Self.fnv(text), loadedAt: Date())
            do { try LuaPluginInstance(vm: scratch, source: src).release() } catch { throw LuaError.runtime("\(what): \(error)") }
            return src
        }
        var arms: [LuaPluginSource] = []
        for v in spec.variants { arms.append(try load(v.path, v.pluginConfig, what: "variant \(v.name)")) }
        let base = try arms.isEmpty ? load(spec.path, spec.pluginConfig, what: "url") : arms[0]
        if arms.isEmpty { arms = [base] }
        let shadow = try spec.shadow.map { try load($0.path, $0.pluginConfig, what: "shadow") }
        var fp = "\(spec.stickyBy)|\(String(describing: spec.guardrail))|"
        for (i, a) in arms.enumerated() { fp += "\(spec.variants.indices.contains(i) ? spec.variants[i].name : "")=\(spec.variants.indices.contains(i) ? spec.variants[i].weight : 100):\(a.hash):\(a.spec.pluginConfig.json);" }
        fp += "shadow:\(shadow.map { $0.hash + $0.spec.pluginConfig.json } ?? "")"
        var stateSpec = spec
        if stateSpec.variants.isEmpty { stateSpec.variants = [LuaPluginVariant(name: "enforced", path: spec.path, weight: 100, pluginConfig: spec.pluginConfig)] }
        // The running experiment goes on when nothing of it changed; a new state is
        // registered only with the generation that uses it (commitExperiments).
        let state = experimentLock.withLock { experimentStates[spec.name] }.flatMap { $0.fingerprint == fp ? $0 : nil }
            ?? ExperimentState(spec: stateSpec, armVersions: arms.map(\.hash), shadowVersion: shadow?.hash, fingerprint: fp)
        var top = base
        top.spec = spec
        top.hash = Self.fnv(arms.map(\.hash).joined() + (shadow?.hash ?? ""))
        top.experiment = LuaExperimentSources(arms: arms, shadow: shadow, state: state)
        return top
    }

    /// The experiments of the current generation (for /experiments), by plugin name.
    public func experiments() -> [ExperimentState] {
        experimentLock.withLock { experimentStates.values.sorted { $0.plugin < $1.plugin } }
    }

    /// The experiments of a generation that was accepted become the current ones.
    func commitExperiments(_ sources: [LuaPluginSource]) {
        var states: [String: ExperimentState] = [:]
        for src in sources { if let e = src.experiment { states[e.state.plugin] = e.state } }
        experimentLock.withLock { experimentStates = states }
    }
}

/// Counters of one arm on one loop.
public struct ArmCounters: Sendable {
    public var requests: UInt64 = 0
    /// Responses by code class: index 1...5 (1xx...5xx), 0 for none.
    public var codeClasses = [UInt64](repeating: 0, count: 6)
    public var localReplies: UInt64 = 0
    public var luaErrors: UInt64 = 0
    public var luaNanos: UInt64 = 0
    /// Latency histogram (ms) over `ExperimentStatistics.buckets`, last slot +Inf.
    public var buckets = [UInt64](repeating: 0, count: ExperimentStatistics.buckets.count + 1)
    public var latencySumMs: Double = 0
    /// A bounded uniform sample of latencies (ms), for p50/p99 and the latency verdict.
    public var reservoir: [Double] = []
    public init() {}

    public var errors5xx: UInt64 { codeClasses[5] }

    mutating func merge(_ o: ArmCounters) {
        requests += o.requests; localReplies += o.localReplies; luaErrors += o.luaErrors; luaNanos += o.luaNanos
        latencySumMs += o.latencySumMs
        for i in codeClasses.indices { codeClasses[i] += o.codeClasses[i] }
        for i in buckets.indices { buckets[i] += o.buckets[i] }
        reservoir += o.reservoir
        if reservoir.count > ExperimentStatistics.mergedReservoir {
            // Keep an even spread of the merged samples.
            let step = Double(reservoir.count) / Double(ExperimentStatistics.mergedReservoir)
            reservoir = (0..<ExperimentStatistics.mergedReservoir).map { reservoir[Int(Double($0) * step)] }
        }
    }
}

/// Divergences of a shadow from the enforced decision, by kind.
public struct ShadowCounters: Sendable {
    public var runs: UInt64 = 0
    /// A local reply (or its status) differs.
    public var respond: UInt64 = 0
    /// The request headers sent upstream differ.
    public var requestHeader: UInt64 = 0
    /// The route (cluster) differs.
    public var route: UInt64 = 0
    /// Runs not compared: the enforced filter or the shadow waited (moonlet.http.call).
    public var skipped: UInt64 = 0
    public var luaErrors: UInt64 = 0
    public var luaNanos: UInt64 = 0
    public init() {}
    mutating func merge(_ o: ShadowCounters) {
        runs += o.runs; respond += o.respond; requestHeader += o.requestHeader; route += o.route
        skipped += o.skipped; luaErrors += o.luaErrors; luaNanos += o.luaNanos
    }
}

/// One experiment's counters, for a scrape: per arm, and the shadow's.
public struct ExperimentCounters: Sendable {
    public var arms: [ArmCounters]
    public var shadow = ShadowCounters()
    public init(arms: Int) { self.arms = [ArmCounters](repeating: ArmCounters(), count: arms) }
    public mutating func merge(_ o: ExperimentCounters) {
        if arms.count < o.arms.count { arms += [ArmCounters](repeating: ArmCounters(), count: o.arms.count - arms.count) }
        for i in o.arms.indices { arms[i].merge(o.arms[i]) }
        shadow.merge(o.shadow)
    }
}

/// The per-loop side of one experiment: its counters, the arm of each running stream,
/// and the rollbacks this loop applies. Used only on its loop's thread; shared by the
/// filters of every generation with the same experiment state.
final class ExperimentLoopStats {
    let state: ExperimentState
    var counters: ExperimentCounters
    /// stream id -> arm index (arms.count: the shadow's copy).
    var streams: [UInt64: Int] = [:]
    /// Per arm: set to weight 0 by the guardrail (copied from the state).
    var rolledBack: [Bool]
    var sinceSample = 0
    var sincePublish = 0
    var rng = Xoshiro256(seed: SystemRandomNumberGenerator())
    init(state: ExperimentState) {
        self.state = state
        counters = ExperimentCounters(arms: state.armNames.count)
        rolledBack = (0..<state.armNames.count).map { state.rolledBack[$0] != nil }
    }
}

extension LuaVM {
    /// The offline harness (`variant:` of a case): `moonlet.variant()` in `plugin`'s
    /// phases of stream `id` returns `name`.
    func runAsVariant(_ name: String, plugin: LuaPluginSpec, stream id: UInt64) {
        var spec = plugin
        spec.variants = [LuaPluginVariant(name: name, path: plugin.path, weight: 100, pluginConfig: plugin.pluginConfig)]
        let st = ExperimentLoopStats(state: ExperimentState(spec: spec, armVersions: [""], shadowVersion: nil, fingerprint: ""))
        st.streams[id] = 0
        experiments[plugin.name] = st
    }

    /// This loop's counters of every experiment (for /experiments and the scrape).
    public func experimentCounters() -> [String: ExperimentCounters] {
        experiments.mapValues(\.counters)
    }
}

/// Stable hashing and the statistics of the verdicts.
public enum ExperimentStatistics {
    /// Istio's default latency buckets, milliseconds.
    public static let buckets: [Double] = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000]
    /// Latency samples one arm keeps per loop, and after merging loops.
    static let reservoir = 1024
    static let mergedReservoir = 4096

    /// FNV-1a (64 bit) of `plugin`, a NUL byte and `key`, mod 100: the bucket of a
    /// sticky key. The same on every sidecar and every run (not Swift's seeded Hasher).
    public static func bucket(plugin: String, key: String) -> Int {
        var h: UInt64 = 0xcbf29ce484222325
        for b in plugin.utf8 { h = (h ^ UInt64(b)) &* 0x100000001b3 }
        h = (h ^ 0) &* 0x100000001b3
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 0x100000001b3 }
        return Int(h % 100)
    }

    public enum Verdict: String, Sendable { case better, worse, inconclusive }

    /// Two-proportion z-test at 95% (|z| > 1.96) on error counts: worse when the
    /// candidate's rate is significantly higher.
    public static func rateVerdict(control: (UInt64, UInt64), candidate: (UInt64, UInt64)) -> Verdict {
        let (e1, n1) = (Double(control.0), Double(control.1)), (e2, n2) = (Double(candidate.0), Double(candidate.1))
        guard n1 > 0, n2 > 0 else { return .inconclusive }
        let p = (e1 + e2) / (n1 + n2)
        let se = (p * (1 - p) * (1 / n1 + 1 / n2)).squareRoot()
        guard se > 0 else { return .inconclusive }
        let z = (e2 / n2 - e1 / n1) / se
        return z > 1.96 ? .worse : z < -1.96 ? .better : .inconclusive
    }

    /// Mann-Whitney U (normal approximation with tie correction) at 95%: worse when the
    /// candidate's latencies are significantly larger.
    public static func latencyVerdict(control a: [Double], candidate b: [Double]) -> Verdict {
        let n1 = Double(a.count), n2 = Double(b.count)
        guard a.count >= 8, b.count >= 8 else { return .inconclusive }
        var all = a.map { ($0, 0) } + b.map { ($0, 1) }
        all.sort { $0.0 < $1.0 }
        var r2 = 0.0, tie = 0.0
        var i = 0
        while i < all.count {
            var j = i
            while j + 1 < all.count && all[j + 1].0 == all[i].0 { j += 1 }
            let rank = Double(i + j) / 2 + 1
            let t = Double(j - i + 1)
            if t > 1 { tie += t * t * t - t }
            for k in i...j where all[k].1 == 1 { r2 += rank }
            i = j + 1
        }
        let u2 = r2 - n2 * (n2 + 1) / 2
        let mu = n1 * n2 / 2
        let n = n1 + n2
        let sigma = (n1 * n2 / 12 * ((n + 1) - tie / (n * (n - 1)))).squareRoot()
        guard sigma > 0 else { return .inconclusive }
        let z = (u2 - mu) / sigma
        return z > 1.96 ? .worse : z < -1.96 ? .better : .inconclusive
    }

    /// The q-quantile (0...1) of samples, 0 without any.
    public static func quantile(_ xs: [Double], _ q: Double) -> Double {
        guard !xs.isEmpty else { return 0 }
        let s = xs.sorted()
        return s[min(s.count - 1, Int((Double(s.count - 1) * q).rounded()))]
    }
}

/// A LuaPlugin with variants or a shadow, as one filter of the chain: picks each
/// stream's arm at its first phase, runs that arm's phases, runs the shadow on a copy
/// after the enforced `on_request`, and counts per arm in `on_log`.
final class ExperimentFilter: Filter {
    let name: String
    let phase: FilterPhase
    let priority: Int
    let wantsRequestBody: Bool
    let wantsResponseBody: Bool
    let wantsUpstreamFailure: Bool
    let arms: [LuaPluginInstance]
    let shadow: LuaPluginInstance?
    let stats: ExperimentLoopStats
    let vm: LuaVM
    /// Cumulative weights (the arm of bucket b is the first with b < cumulative[i]).
    let cumulative: [Int]
    let sticky: StickyKey
    let guardrail: Bool
    /// Streams between two publications of this loop's counts (guardrail).
    static let publishEvery = 32
    /// Bit 58 marks the id of a shadow's copy of a stream (wrappers keep 60 bits of it).
    static let shadowBit: UInt64 = 1 << 58

    init(vm: LuaVM, sources e: LuaExperimentSources) throws {
        self.vm = vm
        arms = try e.arms.map { try LuaPluginInstance(vm: vm, source: $0) }
        shadow = try e.shadow.map { try LuaPluginInstance(vm: vm, source: $0) }
        let first = arms[0]
        name = first.name; phase = first.phase; priority = first.priority
        wantsRequestBody = arms.contains { $0.wantsRequestBody }
        wantsResponseBody = arms.contains { $0.wantsResponseBody }
        wantsUpstreamFailure = arms.contains { $0.wantsUpstreamFailure }
        var c = 0
        cumulative = e.state.weights.map { c += $0; return c }
        sticky = e.state.stickyBy
        guardrail = e.state.guardrail != nil
        if let s = vm.experiments[first.name], s.state === e.state { stats = s } else {
            let s = ExperimentLoopStats(state: e.state)
            vm.experiments[first.name] = s
            stats = s
        }
    }

    /// The sticky key of a stream, nil when it has none (then the arm is drawn).
    func key(_ s: ProxyStream) -> String? {
        switch sticky {
        case .random: return nil
        case .header(let n): return s.request.first(n)
        case .cookie(let n):
            guard let h = s.request.first("cookie") else { return nil }
            for part in h.split(separator: ";") {
                let kv = part.drop { $0 == " " }
                if kv.hasPrefix(n + "=") { return String(kv.dropFirst(n.count + 1)) }
            }
            return nil
        case .principal: return s.source.principal.isEmpty ? nil : s.source.principal
        case .sourceIP:
            let a = s.source.address
            if a.hasPrefix("["), let end = a.firstIndex(of: "]") { return String(a[a.index(after: a.startIndex)..<end]) }
            if let colon = a.lastIndex(of: ":"), a.firstIndex(of: ":") == colon { return String(a[..<colon]) }
            return a
        }
    }

    /// The stream's arm, chosen at its first phase.
    @inline(__always)
    func arm(_ s: ProxyStream) -> Int {
        if let a = stats.streams[s.id] { return a }
        let b = key(s).map { ExperimentStatistics.bucket(plugin: name, key: $0) } ?? Int(stats.rng.next() % 100)
        var a = cumulative.firstIndex { b < $0 } ?? 0
        if stats.rolledBack[a] { a = 0 }
        stats.streams[s.id] = a
        return a
    }

    /// Runs one phase of an arm (or the shadow), charging its Lua time and errors.
    @inline(__always)
    func run<R>(_ inst: LuaPluginInstance, shadow: Bool = false, arm a: Int, _ body: () -> R) -> R {
        let before = inst.cell?.stats
        let r = body()
        if let before, let after = inst.cell?.stats {
            if shadow {
                stats.counters.shadow.luaNanos &+= after.nanos &- before.nanos
                stats.counters.shadow.luaErrors &+= after.errors &- before.errors
            } else {
                stats.counters.arms[a].luaNanos &+= after.nanos &- before.nanos
                stats.counters.arms[a].luaErrors &+= after.errors &- before.errors
            }
        }
        return r
    }

    func onRequest(_ s: ProxyStream) -> FilterAction {
        let a = arm(s)
        guard let shadow else { return run(arms[a], arm: a) { arms[a].onRequest(s) } }
        // The shadow sees the request as the enforced arm did: a copy taken before it
        // runs (the head is copied on write, so only what the arm edits is duplicated).
        let copy = ProxyStream(id: s.id ^ Self.shadowBit, request: s.request, source: s.source, filterCount: 0, startNanos: s.startNanos, route: s.route)
        copy.destination = s.destination; copy.config = s.config; copy.listener = s.listener; copy.auth = s.auth
        copy.peerWorkload = s.peerWorkload; copy.protocolName = s.protocolName; copy.originalPath = s.originalPath
        let r = run(arms[a], arm: a) { arms[a].onRequest(s) }
        stats.counters.shadow.runs += 1
        stats.streams[copy.id] = arms.count
        let errorsBefore = shadow.cell?.stats.errors
        let sr = run(shadow, shadow: true, arm: a) { shadow.onRequest(copy) }
        let failed = errorsBefore != nil && shadow.cell?.stats.errors != errorsBefore
        if r == .pause || sr == .pause || failed {
            stats.counters.shadow.skipped += 1
        } else {
            let enforced = r == .respond || s.localReply != nil ? s.localReply?.status : nil
            let candidate = sr == .respond || copy.localReply != nil ? copy.localReply?.status : nil
            if enforced != candidate {
                stats.counters.shadow.respond += 1
            } else if enforced == nil {
                let a = s.request.allFields(), b = copy.request.allFields()
                if a.count != b.count || zip(a, b).contains(where: { x in x.0.name.lowercased() != x.1.name.lowercased() || x.0.value != x.1.value }) {
                    stats.counters.shadow.requestHeader += 1
                }
                if s.route.cluster != copy.route.cluster || s.route.host != copy.route.host || s.route.subset != copy.route.subset || s.request.target != copy.request.target {
                    stats.counters.shadow.route += 1
                }
            }
        }
        vm.endStream(copy)
        stats.streams[copy.id] = nil
        return r
    }

    func onRequestBody(_ s: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction {
        let a = arm(s)
        return run(arms[a], arm: a) { arms[a].onRequestBody(s, chunk: chunk, endOfStream: endOfStream) }
    }

    func onResponse(_ s: ProxyStream) -> FilterAction {
        let a = arm(s)
        return run(arms[a], arm: a) { arms[a].onResponse(s) }
    }

    func onResponseBody(_ s: ProxyStream, chunk: ByteBuffer, endOfStream: Bool) -> FilterAction {
        let a = arm(s)
        return run(arms[a], arm: a) { arms[a].onResponseBody(s, chunk: chunk, endOfStream: endOfStream) }
    }

    func onUpstreamFailure(_ s: ProxyStream, _ failure: UpstreamFailureInfo) -> RetryVerdict {
        let a = arm(s)
        return run(arms[a], arm: a) { arms[a].onUpstreamFailure(s, failure) }
    }

    func onLog(_ s: ProxyStream) {
        let a = arm(s)
        run(arms[a], arm: a) { arms[a].onLog(s) }
        stats.streams[s.id] = nil
        var c = stats.counters.arms[a]
        c.requests += 1
        let cls = s.status / 100
        c.codeClasses[(1...5).contains(cls) ? cls : 0] += 1
        if s.localReply != nil { c.localReplies += 1 }
        let ms = Double(LuaPluginInstance.nanos() &- s.startNanos) / 1e6
        c.latencySumMs += ms
        c.buckets[ExperimentStatistics.buckets.firstIndex { ms <= $0 } ?? ExperimentStatistics.buckets.count] += 1
        // Reservoir sampling (Algorithm R) over this loop's streams of the arm.
        if c.reservoir.count < ExperimentStatistics.reservoir { c.reservoir.append(ms) }
        else {
            let j = Int(stats.rng.next() % c.requests)
            if j < ExperimentStatistics.reservoir { c.reservoir[j] = ms }
        }
        stats.counters.arms[a] = c
        if guardrail {
            stats.sincePublish += 1
            if stats.sincePublish >= Self.publishEvery {
                stats.sincePublish = 0
                let counts = stats.counters.arms.map { ($0.requests, $0.errors5xx) }
                let logger = vm.logger
                let rolled = stats.state.publish(ObjectIdentifier(stats), counts) { logger.warning("\($0)") }
                for i in stats.rolledBack.indices { stats.rolledBack[i] = rolled.contains(i) }
            }
        }
    }
}

extension LuaAPI {
    /// `moonlet.variant()`: the experiment arm of the running plugin for this stream
    /// ("shadow" in a shadow's run), nil for a plugin without variants.
    static let variant: lua_CFunction = { L in
        let vm = LuaVM.vm(L)
        guard let st = vm.experiments[vm.currentPlugin], let a = st.streams[vm.currentID] else { lua_pushnil(L); return 1 }
        if a < st.state.armNames.count { LuaAPI.push(L, st.state.armNames[a]) } else { LuaAPI.push(L, "shadow") }
        return 1
    }
}

/// /experiments and the per-variant Prometheus series, from the experiments' states and
/// every loop's counters merged.
public enum ExperimentReport {
    public static func json(_ states: [ExperimentState], _ counters: [String: ExperimentCounters]) -> String {
        let fmt = ISO8601DateFormatter()
        let items = states.map { st -> String in
            let c = counters[st.plugin] ?? ExperimentCounters(arms: st.armNames.count)
            let rolled = st.rolledBack
            let control = c.arms.first ?? ArmCounters()
            var arms: [String] = []
            for (i, n) in st.armNames.enumerated() {
                let a = i < c.arms.count ? c.arms[i] : ArmCounters()
                let rate = a.requests == 0 ? 0 : Double(a.errors5xx) / Double(a.requests)
                var verdicts = "null"
                if i > 0 {
                    let ev = ExperimentStatistics.rateVerdict(control: (control.errors5xx, control.requests), candidate: (a.errors5xx, a.requests))
                    let lv = ExperimentStatistics.latencyVerdict(control: control.reservoir, candidate: a.reservoir)
                    verdicts = "{\"error_rate\":\"\(ev.rawValue)\",\"latency\":\"\(lv.rawValue)\"}"
                }
                let weight = rolled[i] != nil ? 0 : st.weights[i]
                arms.append("{\"name\":\(JSON.quote(n)),\"role\":\"\(i == 0 ? "control" : "candidate")\",\"version\":\(JSON.quote(st.armVersions[i])),\"configured_weight\":\(st.weights[i]),\"weight\":\(weight),"
                    + "\"rolled_back\":\(rolled[i].map(JSON.quote) ?? "null"),\"requests\":\(a.requests),\"errors\":\(a.errors5xx),\"error_rate\":\(num(rate)),"
                    + "\"local_replies\":\(a.localReplies),\"lua_errors\":\(a.luaErrors),\"lua_cpu_seconds\":\(num(Double(a.luaNanos) / 1e9)),"
                    + "\"responses\":{\"1xx\":\(a.codeClasses[1]),\"2xx\":\(a.codeClasses[2]),\"3xx\":\(a.codeClasses[3]),\"4xx\":\(a.codeClasses[4]),\"5xx\":\(a.codeClasses[5])},"
                    + "\"latency_ms\":{\"p50\":\(num(ExperimentStatistics.quantile(a.reservoir, 0.5))),\"p99\":\(num(ExperimentStatistics.quantile(a.reservoir, 0.99))),\"samples\":\(a.reservoir.count)},"
                    + "\"verdicts\":\(verdicts)}")
            }
            var shadow = "null"
            if let v = st.shadowVersion {
                let s = c.shadow
                shadow = "{\"version\":\(JSON.quote(v)),\"runs\":\(s.runs),\"compared\":\(s.runs - min(s.runs, s.skipped)),\"skipped\":\(s.skipped),\"lua_errors\":\(s.luaErrors),\"lua_cpu_seconds\":\(num(Double(s.luaNanos) / 1e9)),"
                    + "\"divergences\":{\"respond\":\(s.respond),\"request_header\":\(s.requestHeader),\"route\":\(s.route),\"total\":\(s.respond + s.requestHeader + s.route)}}"
            }
            var guardrail = "null"
            if let g = st.guardrail {
                guardrail = "{\"metric\":\(JSON.quote(g.metric)),\"maxIncrease\":\(num(g.maxIncrease)),\"minRequests\":\(g.minRequests),\"action\":\(JSON.quote(g.action)),\"tripped\":\(!rolled.isEmpty)}"
            }
            return "{\"plugin\":\(JSON.quote(st.plugin)),\"started_at\":\(JSON.quote(fmt.string(from: st.startedAt))),\"sticky_by\":\(JSON.quote(st.stickyBy.description)),"
                + "\"variants\":[" + arms.joined(separator: ",") + "],\"shadow\":\(shadow),\"guardrail\":\(guardrail)}"
        }
        return "{\"experiments\":[" + items.joined(separator: ",") + "]}"
    }

    /// A Prometheus label value: backslash, quote and newline escaped.
    static func label(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }

    static func num(_ d: Double) -> String { d.isFinite ? String(format: "%.6g", d) : "0" }

    /// Prometheus text: per plugin and variant (labels plugin, variant).
    public static func prometheus(_ states: [ExperimentState], _ counters: [String: ExperimentCounters]) -> String {
        guard !states.isEmpty else { return "" }
        var req = "", resp = "", local = "", errs = "", cpu = "", hist = "", div = "", weight = ""
        for st in states {
            let c = counters[st.plugin] ?? ExperimentCounters(arms: st.armNames.count)
            let rolled = st.rolledBack
            for (i, n) in st.armNames.enumerated() {
                let a = i < c.arms.count ? c.arms[i] : ArmCounters()
                let l = "plugin=\"\(label(st.plugin))\",variant=\"\(label(n))\""
                req += "moonlet_experiment_requests_total{\(l)} \(a.requests)\n"
                for k in 1...5 { resp += "moonlet_experiment_responses_total{\(l),response_code_class=\"\(k)xx\"} \(a.codeClasses[k])\n" }
                local += "moonlet_experiment_local_replies_total{\(l)} \(a.localReplies)\n"
                errs += "moonlet_experiment_lua_errors_total{\(l)} \(a.luaErrors)\n"
                cpu += "moonlet_experiment_lua_cpu_seconds_total{\(l)} \(num(Double(a.luaNanos) / 1e9))\n"
                weight += "moonlet_experiment_weight{\(l)} \(rolled[i] != nil ? 0 : st.weights[i])\n"
                var cum: UInt64 = 0
                for (k, b) in ExperimentStatistics.buckets.enumerated() {
                    cum += a.buckets[k]
                    hist += "moonlet_experiment_request_duration_milliseconds_bucket{\(l),le=\"\(num(b))\"} \(cum)\n"
                }
                cum += a.buckets[ExperimentStatistics.buckets.count]
                hist += "moonlet_experiment_request_duration_milliseconds_bucket{\(l),le=\"+Inf\"} \(cum)\n"
                hist += "moonlet_experiment_request_duration_milliseconds_sum{\(l)} \(num(a.latencySumMs))\n"
                hist += "moonlet_experiment_request_duration_milliseconds_count{\(l)} \(a.requests)\n"
            }
            if st.shadowVersion != nil {
                let l = "plugin=\"\(label(st.plugin))\",variant=\"shadow\""
                for (k, v) in [("respond", c.shadow.respond), ("request_header", c.shadow.requestHeader), ("route", c.shadow.route)] {
                    div += "moonlet_experiment_shadow_divergences_total{\(l),kind=\"\(k)\"} \(v)\n"
                }
                req += "moonlet_experiment_requests_total{\(l)} \(c.shadow.runs)\n"
                errs += "moonlet_experiment_lua_errors_total{\(l)} \(c.shadow.luaErrors)\n"
                cpu += "moonlet_experiment_lua_cpu_seconds_total{\(l)} \(num(Double(c.shadow.luaNanos) / 1e9))\n"
            }
        }
        var out = ""
        func family(_ name: String, _ type: String, _ help: String, _ body: String) {
            guard !body.isEmpty else { return }
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n" + body
        }
        family("moonlet_experiment_requests_total", "counter", "Streams served by each experiment variant (shadow: runs of the shadow).", req)
        family("moonlet_experiment_responses_total", "counter", "Responses of each experiment variant by code class.", resp)
        family("moonlet_experiment_local_replies_total", "counter", "Streams of each variant answered locally.", local)
        family("moonlet_experiment_request_duration_milliseconds", "histogram", "Stream duration per experiment variant.", hist)
        family("moonlet_experiment_lua_errors_total", "counter", "Lua errors of each variant.", errs)
        family("moonlet_experiment_lua_cpu_seconds_total", "counter", "Lua time of each variant.", cpu)
        family("moonlet_experiment_weight", "gauge", "Weight in force of each variant (0 once the guardrail rolled it back).", weight)
        family("moonlet_experiment_shadow_divergences_total", "counter", "Shadow decisions that differ from the enforced one, by kind.", div)
        return out
    }
}
