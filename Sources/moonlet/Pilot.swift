import MoonletCore
import ArgumentParser
import Logging
import MoonletConfig
import MoonletPilot
import MoonletProxy
import MoonletTLS
import NIOCore
import NIOPosix
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet pilot`: validates a config directory and pushes it to sidecars (Galley + Pilot).
struct Pilot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate a config directory (Galley's role) and push it to sidecars that run with --pilot (Pilot's role).")
    @Option(help: "YAML configuration directory (watched; an invalid change is not served)") var config: String
    @Option(help: "Listen port (default: \(PilotProtocol.defaultPort))") var port: Int = PilotProtocol.defaultPort
    @Option(help: "Bind address") var bind: String = "127.0.0.1"
    @Option(help: "Pilot's mesh certificate directory (cert-chain.pem, key.pem, root-cert.pem; watched): mutual TLS, sidecars must present mesh certificates") var certs: String?
    @Option(help: "Istio MeshConfig file: its trust domains and meshMTLS apply to the listener. Env: MESH_CONFIG_FILE or MOONLET_MESH_CONFIG") var meshConfig: String?
    @Option(help: "Connections served at once (a waiting sidecar holds one)") var maxConnections: Int = 4096
    @Option(help: "How often the directory is checked for changes, in ms") var watchIntervalMs: Int = 500

    func run() throws {
        guard (0...65535).contains(port) else { throw ValidationError("--port: 0 to 65535") }
        guard maxConnections > 0 else { throw ValidationError("--max-connections: a positive number") }
        guard watchIntervalMs >= 10 else { throw ValidationError("--watch-interval-ms: 10 or more") }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: config, isDirectory: &isDir), isDir.boolValue else {
            throw ValidationError("--config: \(config) is not a directory")
        }
        var s = PilotServer.Settings(configDirectory: config, certsDirectory: certs)
        s.maxConnections = maxConnections
        s.watchIntervalMs = watchIntervalMs
        if let path = meshConfig ?? MeshConfigFile.pathFromEnvironment() {
            do { s.meshTLS = try MeshConfigFile.load(path: path).tls } catch { throw ValidationError("--mesh-config: \(error)") }
        }
        let server = PilotServer(settings: s) { line in FileHandle.standardError.write((line + "\n").data(using: .utf8)!) }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ch: Channel
        do { ch = try server.bind(group: group, host: bind, port: port) } catch {
            FileHandle.standardError.write("pilot: cannot start: \(error)\n".data(using: .utf8)!)
            throw ExitCode(1)
        }
        print("moonlet pilot serving \(config) on \(bind):\(ch.localAddress?.port ?? port)\(certs == nil ? " (plaintext)" : " (mutual TLS)")")
        fflush(stdout)
        try ch.closeFuture.wait()
    }
}

/// `moonlet run`'s flags for subscribing to pilot.
struct PilotSubscribeOptions: ParsableArguments {
    @Option(help: "Pilot address host:port (moonlet pilot): subscribe to its configuration, beside --config if given. Env: MOONLET_PILOT") var pilot: String?
    @Option(help: "SAN pilot must present under mTLS (default: spiffe://<trust-domain>/ns/istio-system/sa/moonlet-pilot). Env: MOONLET_PILOT_IDENTITY") var pilotIdentity: [String] = []
    @Option(help: "This sidecar's node id on pilot's /status (default: <POD_NAME or host name>.<namespace>). Env: MOONLET_NODE_ID") var nodeId: String?
    @Option(help: "Directory pushed versions are written to (default: a new temporary directory). Env: MOONLET_PILOT_CACHE") var pilotCache: String?

    func env(_ name: String) -> String? { ProcessInfo.processInfo.environment[name].flatMap { $0.isEmpty ? nil : $0 } }

    /// Whether --pilot (or MOONLET_PILOT) is set.
    var enabled: Bool { (pilot ?? env("MOONLET_PILOT")) != nil }

    /// Starts the subscription when --pilot (or MOONLET_PILOT) is set; nil otherwise.
    func start(server: ProxyServer, logger: Logger) throws -> PilotClient? {
        guard let address = pilot ?? env("MOONLET_PILOT") else { return nil }
        let s = server.settings
        let host = env("POD_NAME") ?? ProcessInfo.processInfo.hostName
        let node = PilotNode(id: nodeId ?? env("MOONLET_NODE_ID") ?? "\(host).\(s.identity.namespace)", namespace: s.identity.namespace,
                             serviceAccount: s.identity.serviceAccount, labels: s.identity.labels)
        let cache = pilotCache ?? env("MOONLET_PILOT_CACHE") ?? (NSTemporaryDirectory() + "moonlet-pilot-\(getpid())")
        var settings = PilotClient.Settings(address: address, node: node, cacheDirectory: cache, certsDirectory: s.certsDirectory)
        settings.meshTLS = server.currentMeshConfig.tls
        settings.expectedIdentities = pilotIdentity.isEmpty ? (env("MOONLET_PILOT_IDENTITY").map { $0.split(separator: ",").map(String.init) } ?? []) : pilotIdentity
        let client: PilotClient
        do {
            client = try PilotClient(settings: settings, apply: { dir, set in
                // The YAML goes to the incremental reload as texts (PilotApply.swift); the
                // directory holds the pushed Lua files.
                switch server.applyPushedConfig(files: set.files.map { (path: $0.path, text: $0.content) }, directory: dir, reason: "pilot version \(set.version)") {
                case .success: return nil
                case .failure(let e): return e.message
                }
            }, log: { line in logger.notice("\(line)") })
        } catch { throw ValidationError("\(error)") }
        client.start()
        logger.info("subscribed to pilot", metadata: ["pilot": "\(address)", "node": "\(node.id)", "mtls": "\(s.certsDirectory != nil)"])
        return client
    }
}
