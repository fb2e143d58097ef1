import MoonletCore
import ArgumentParser
import MoonletTLS
import MoonletConfig
import NIOCore
import NIOPosix
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet ca`: Citadel's role at small scale.
struct CA: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The mesh CA: create a root, issue SPIFFE workload certificates, sign sidecars' CSRs.",
        subcommands: [Init.self, Issue.self, Serve.self])

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a self-signed mesh root (root-cert.pem, root-key.pem).")
        @Option(help: "Output directory") var out: String
        @Option(help: "Trust domain of the mesh") var trustDomain: String = MeshIdentity.trustDomain
        @Option(help: "ecdsa-p256 or rsa-2048") var keyType: String = "ecdsa-p256"
        func run() throws {
            guard let kt = KeyType(rawValue: keyType) else { throw ValidationError("--key-type: ecdsa-p256 or rsa-2048") }
            let ca = try MeshCA.create(trustDomain: trustDomain, keyType: kt)
            try ca.write(to: out)
            print("mesh root for trust domain \(trustDomain) written to \(out)/\(MeshCA.rootCertFile) and \(MeshCA.rootKeyFile)")
        }
    }

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Issue a workload certificate (cert-chain.pem, key.pem, root-cert.pem).")
        @Option(help: "CA directory (from ca init)") var ca: String
        @Option(help: "Workload namespace") var namespace: String
        @Option(help: "Workload service account") var serviceAccount: String
        @Option(help: "Output directory") var out: String
        @Option(help: "Lifetime, e.g. 24h, 90m") var ttl: String = "24h"
        @Option(help: "ecdsa-p256 or rsa-2048") var keyType: String = "ecdsa-p256"
        func run() throws {
            guard let kt = KeyType(rawValue: keyType) else { throw ValidationError("--key-type: ecdsa-p256 or rsa-2048") }
            guard let life = parseTTL(ttl) else { throw ValidationError("--ttl: a duration like 24h, 90m or 3600s") }
            let authority = try MeshCA.load(dir: ca)
            let id = try authority.identity(namespace: namespace, serviceAccount: serviceAccount)
            try authority.issue(id, keyType: kt, ttl: life).write(to: out)
            print("\(id.uri) issued for \(ttl), written to \(out)")
        }
    }

    /// A timeout flag: a duration from a millisecond (zero would drop every connection) to
    /// a day (longer would hold a slot for good, and overflows a TimeAmount's nanoseconds far out).
    static func timeout(_ text: String, _ flag: String, example: String) throws -> TimeAmount {
        guard let s = parseTTL(text), s >= 0.001, s <= 86_400 else { throw ValidationError("\(flag): a duration from 1ms to 24h, like \(example)") }
        return .milliseconds(Int64(s * 1000))
    }

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Sign sidecars' CSRs over TLS (a small-scale stand-in for Istiod's CA).")
        @Option(help: "CA directory (from ca init)") var ca: String
        @Option(help: "Listen port (Istiod's is 15012)") var port: Int = 15012
        @Option(help: "Bind address") var bind: String = "127.0.0.1"
        @Option(help: "Token file: lines of \"<token> <namespace>/<service-account>\"") var tokenFile: String?
        @Option(help: "Longest lifetime issued") var maxTtl: String = "24h"
        @Option(help: "Connections served at once; more are refused (logged). Lowered to the open file limit minus 64") var maxConnections: Int = 1024
        @Option(help: "Connections served at once from one source address; more are refused (logged)") var maxConnectionsPerAddress: Int = 32
        @Option(help: "Time a client has to finish the TLS handshake") var handshakeTimeout: String = "10s"
        @Option(help: "Time a client has, after the handshake, to send its whole request") var requestTimeout: String = "10s"
        @Option(help: "An idle connection is closed after this") var idleTimeout: String = "60s"
        @Option(help: "Istio MeshConfig file: its meshMTLS (minProtocolVersion, cipherSuites) applies to the CA's listener. Env: MESH_CONFIG_FILE or MOONLET_MESH_CONFIG") var meshConfig: String?
        func run() throws {
            guard let life = parseTTL(maxTtl) else { throw ValidationError("--max-ttl: a duration like 24h") }
            let hs = try CA.timeout(handshakeTimeout, "--handshake-timeout", example: "10s")
            let idle = try CA.timeout(idleTimeout, "--idle-timeout", example: "60s")
            let request = try CA.timeout(requestTimeout, "--request-timeout", example: "10s")
            guard maxConnections > 0 else { throw ValidationError("--max-connections: a positive number") }
            guard maxConnectionsPerAddress > 0 else { throw ValidationError("--max-connections-per-address: a positive number") }
            let authority = try MeshCA.load(dir: ca)
            let tokens = try tokenFile.map { try CAService.loadTokens($0, trustDomain: authority.trustDomain) } ?? [:]
            let limits = CAService.Limits(maxConnections: maxConnections, maxConnectionsPerAddress: maxConnectionsPerAddress,
                                          handshakeTimeout: hs, requestTimeout: request, idleTimeout: idle)
            var policy = MeshTLSSettings()
            if let path = meshConfig ?? MeshConfigFile.pathFromEnvironment() {
                do { policy = try MeshConfigFile.load(path: path).tls } catch { throw ValidationError("--mesh-config: \(error)") }
            }
            let service = CAService(ca: authority, tokens: tokens, maxTTL: life, limits: limits, policy: policy) { line in
                FileHandle.standardError.write((line + "\n").data(using: .utf8)!)
            }
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            let ch = try service.bind(group: group, host: bind, port: port)
            print("moonlet ca serving trust domain \(authority.trustDomain) as \(try CAService.identity(trustDomain: authority.trustDomain).uri) on \(bind):\(ch.localAddress?.port ?? port) (\(tokens.count) bootstrap tokens)")
            try ch.closeFuture.wait()
        }
    }
}
