import NIOCore
import MoonletCore
import MoonletConfig
import MoonletLua
import MoonletTelemetry
import Logging

/// Which listener accepted a connection, and what it does with a stream.
public enum ListenerRole: String, Sendable {
    /// 15006: mesh -> app; every stream goes to 127.0.0.1:appPort.
    case inbound
    /// 15001: app -> mesh; streams go where the route decision says.
    case outbound
}

/// Everything one event loop owns: its metrics shard, its Lua VM, its filter chain
/// (swapped on reload, on this loop), its upstream pool and its stream counters.
/// Touched only from the loop's thread.
public final class LoopContext {
    public let loop: EventLoop
    public let metrics = MetricsShard()
    public let lua: LuaLoopRuntime
    public internal(set) var chain: FilterChain = .empty
    public internal(set) var snapshot: ConfigSnapshot = .empty
    let pool: UpstreamPool
    let settings: ProxySettings
    let logger: Logger
    var nextStreamID: UInt64
    var activeStreams = 0
    var activeConnections = 0
    var rng = SystemRandomNumberGenerator()

    init(loop: EventLoop, index: Int, settings: ProxySettings, host: LuaHost, logger: Logger) {
        self.loop = loop
        self.settings = settings
        self.logger = logger
        lua = LuaLoopRuntime(host: host, metrics: metrics)
        pool = UpstreamPool(loop: loop, limits: settings.limits)
        nextStreamID = UInt64(index) << 48 | 1
    }

    /// A new x-request-id (UUID v4 text).
    func requestID() -> String {
        var a = rng.next() as UInt64
        var b = rng.next() as UInt64
        a = (a & 0xFFFF_FFFF_FFFF_0FFF) | 0x4000
        b = (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000
        let hex: [UInt8] = Array("0123456789abcdef".utf8)
        var out = [UInt8](repeating: 45, count: 36)
        var pos = 0
        func put(_ v: UInt64, _ nibbles: Int) {
            for i in stride(from: nibbles - 1, through: 0, by: -1) {
                if pos == 8 || pos == 13 || pos == 18 || pos == 23 { pos += 1 }
                out[pos] = hex[Int((v >> UInt64(i * 4)) & 0xF)]
                pos += 1
            }
        }
        put(a, 16); put(b, 16)
        return String(decoding: out, as: UTF8.self)
    }
}

/// Settings of a running proxy (from flags and environment).
public struct ProxySettings: Sendable {
    public var inboundPort = 15006
    public var outboundPort = 15001
    public var adminPort = 15000
    public var prometheusPort = 15090
    public var healthPort = 15021
    public var appPort = 8080
    public var bindAddress = "127.0.0.1"
    public var concurrency = System.coreCount
    public var identity = WorkloadIdentity()
    public var limits = ProxyLimits()
    public var configPaths: [String] = []
    /// How often the config directory and plugin files are checked for changes.
    public var watchIntervalMs = 500
    public init() {}
}
