import ArgumentParser
import MoonletSidecar
import MoonletWebhook
import NIOPosix
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet iptables`: istio-iptables' flags, defaults and rules (the init container's job).
struct Iptables: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write the traffic-capture rules istio-iptables writes (run as root with NET_ADMIN, e.g. in the istio-init container).")

    @Option(name: [.customShort("p"), .long], help: "Port all outbound TCP is redirected to") var envoyPort = "15001"
    @Option(name: [.customShort("z"), .long], help: "Port all inbound TCP is redirected to") var inboundCapturePort = "15006"
    @Option(name: [.customShort("e"), .long], help: "Tunnel port, never captured") var inboundTunnelPort = "15008"
    @Option(name: [.customShort("u"), .long], help: "UIDs whose traffic is not redirected (the proxy's)") var proxyUid = "1337"
    @Option(name: [.customShort("g"), .long], help: "GIDs whose traffic is not redirected (default: the --proxy-uid value)") var proxyGid: String?
    @Option(name: [.customShort("m"), .long], help: "REDIRECT or TPROXY") var istioInboundInterceptionMode = "REDIRECT"
    @Option(name: [.customShort("t"), .long], help: "TPROXY mark") var istioInboundTproxyMark = "1337"
    @Option(name: [.customShort("r"), .long], help: "TPROXY route table") var istioInboundTproxyRouteTable = "133"
    @Option(name: [.customShort("b"), .long], help: "Inbound ports to capture, \"*\" for all, empty for none") var istioInboundPorts = ""
    @Option(name: [.customShort("d"), .long], help: "Inbound ports not captured when all are") var istioLocalExcludePorts = ""
    @Option(name: [.customShort("i"), .long], help: "Outbound CIDRs to capture, \"*\" for all, empty for none") var istioServiceCidr = ""
    @Option(name: [.customShort("x"), .long], help: "Outbound CIDRs never captured") var istioServiceExcludeCidr = ""
    @Option(name: [.customShort("q"), .long], help: "Outbound ports always captured") var istioOutboundPorts = ""
    @Option(name: [.customShort("o"), .long], help: "Outbound ports never captured") var istioLocalOutboundPortsExclude = ""
    @Option(name: [.customShort("k"), .long], help: "Virtual interfaces whose inbound traffic is treated as outbound") var kubeVirtInterfaces = ""
    @Option(name: [.customShort("c"), .long], help: "Interfaces neither captured inbound nor outbound") var istioExcludeInterfaces = ""
    @Flag(help: "Drop conntrack-INVALID packets instead of resetting the connection. Env: INVALID_DROP") var dropInvalid = false
    @Flag(help: "Send DNS to the resolvers in /etc/resolv.conf to port 15053. Env: ISTIO_META_DNS_CAPTURE") var redirectDns = false
    @Flag(help: "With --redirect-dns: capture DNS to every address, not only the resolvers") var captureAllDns = false
    @Flag(help: "Write IPv6 rules too even when the pod's first address is IPv4. Env: ISTIO_DUAL_STACK") var dualStack = false
    @Flag(name: [.customShort("n"), .long], help: "Print the iptables-restore input (IPv4, then IPv6 when the pod has an IPv6 address or --dual-stack; each after a # comment line) and change nothing") var dryRun = false
    @Flag(name: [.long, .customLong("cleanup-only")], help: "Remove the ISTIO_* chains and the jumps to them instead of adding them") var clean = false

    func env(_ name: String) -> String? { ProcessInfo.processInfo.environment[name].flatMap { $0.isEmpty ? nil : $0 } }
    func envTrue(_ name: String) -> Bool { ["1", "true", "TRUE", "True"].contains(env(name) ?? "") }

    func config() throws -> IptablesConfig {
        var c = IptablesConfig()
        c.proxyPort = envoyPort
        c.inboundCapturePort = inboundCapturePort
        c.inboundTunnelPort = inboundTunnelPort
        c.proxyUID = proxyUid
        c.proxyGID = proxyGid ?? proxyUid
        guard ["REDIRECT", "TPROXY", ""].contains(istioInboundInterceptionMode) else {
            throw ValidationError("--istio-inbound-interception-mode: REDIRECT or TPROXY, got \(istioInboundInterceptionMode)")
        }
        c.inboundInterceptionMode = istioInboundInterceptionMode
        c.inboundTProxyMark = istioInboundTproxyMark
        c.inboundTProxyRouteTable = istioInboundTproxyRouteTable
        c.inboundPortsInclude = istioInboundPorts
        c.inboundPortsExclude = istioLocalExcludePorts
        c.outboundIPRangesInclude = istioServiceCidr
        c.outboundIPRangesExclude = istioServiceExcludeCidr
        c.outboundPortsInclude = istioOutboundPorts
        c.outboundPortsExclude = istioLocalOutboundPortsExclude
        c.rerouteVirtualInterfaces = kubeVirtInterfaces
        c.excludeInterfaces = istioExcludeInterfaces
        c.dropInvalid = dropInvalid || envTrue("INVALID_DROP")
        c.redirectDNS = redirectDns || envTrue("ISTIO_META_DNS_CAPTURE")
        c.captureAllDNS = captureAllDns
        // istio-iptables' environment-only settings.
        c.ownerGroupsInclude = env("ISTIO_OUTBOUND_OWNER_GROUPS") ?? "*"
        c.ownerGroupsExclude = env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE") ?? ""
        c.hostIPv4LoopbackCidr = env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR") ?? "127.0.0.1/32"
        c.enableIPv6 = IptablesHost.podHasIPv6(dualStack: dualStack || envTrue("ISTIO_DUAL_STACK"))
        if c.redirectDNS && !c.captureAllDNS, let text = try? String(contentsOfFile: "/etc/resolv.conf", encoding: .utf8) {
            (c.dnsServersV4, c.dnsServersV6) = IptablesHost.resolvers(resolvConf: text)
        }
        return c
    }

    func run() throws {
        let c = try config()
        let rules: IptablesRuleSet
        do { rules = try c.rules() } catch { throw ValidationError("\(error)") }
        if dryRun {
            if clean {
                for cmd in rules.cleanupCommands(ipv6: false) { print((["iptables"] + cmd).joined(separator: " ")) }
                if c.enableIPv6 { for cmd in rules.cleanupCommands(ipv6: true) { print((["ip6tables"] + cmd).joined(separator: " ")) } }
            } else {
                // Comment lines, which iptables-restore skips, say which input is which.
                print("# IPv4: iptables-restore --noflush")
                print(rules.v4Restore, terminator: "")
                if c.enableIPv6 {
                    print("# IPv6: ip6tables-restore --noflush")
                    print(rules.v6Restore, terminator: "")
                }
                for args in c.routeCommands() { print("# then: ip " + args.joined(separator: " ")) }
            }
            return
        }
        if clean {
            let ran = IptablesHost.clean(rules, ipv6: c.enableIPv6)
            print("moonlet iptables: cleanup ran \(ran.count) commands (failures ignored: rules already gone)")
            return
        }
        do {
            try IptablesHost.apply(rules, ipv6: c.enableIPv6)
            try IptablesHost.configureRoutes(c)
        } catch {
            FileHandle.standardError.write("moonlet iptables: \(error)\n".data(using: .utf8)!)
            throw ExitCode(1)
        }
        print("moonlet iptables: rules applied (IPv4\(c.enableIPv6 ? " and IPv6" : ""))")
    }
}

/// `moonlet inject`: `istioctl kube-inject` (`-f FILE`) and the injection webhook (`--webhook`).
struct Inject: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Add the istio-proxy sidecar and istio-init container to workloads (a file, or as a mutating admission webhook).")

    @Option(name: [.customShort("f"), .long], help: "Multi-document YAML to inject (- for standard input); the result goes to standard output") var filename: String?
    @Flag(help: "Serve as a mutating admission webhook over HTTPS instead") var webhook = false
    @Option(help: "Webhook listen port") var port: Int = 9443
    @Option(help: "Webhook bind address") var bind: String = "0.0.0.0"
    @Option(help: "Webhook directory with cert-chain.pem and key.pem (the serving certificate the API server trusts)") var certs: String?
    @Option(help: "Image of the injected containers") var image: String = InjectionSettings().image
    @Option(help: "CA address the sidecars get their certificate from (CA_ADDR)") var caAddress: String = InjectionSettings().caAddress
    @Option(help: "ConfigMap with the mesh's Istio YAML, mounted in every sidecar (optional in the pod)") var configMap: String = InjectionSettings().configMap
    @Option(help: "Revision written in sidecar.istio.io/status") var revision: String = InjectionSettings().revision
    @Option(help: "Pilot address host:port the sidecars subscribe to (MOONLET_PILOT; default: none, the ConfigMap only)") var pilotAddress: String?

    func injector() -> SidecarInjector {
        var s = InjectionSettings()
        s.image = image
        s.caAddress = caAddress
        s.configMap = configMap
        s.revision = revision
        s.pilotAddress = pilotAddress.flatMap { $0.isEmpty ? nil : $0 }
        return SidecarInjector(settings: s)
    }

    func validate() throws {
        if webhook {
            guard certs != nil else { throw ValidationError("--webhook needs --certs DIR (cert-chain.pem, key.pem)") }
            guard (0...65535).contains(port) else { throw ValidationError("--port: 0 to 65535, got \(port)") }
            if filename != nil { throw ValidationError("-f and --webhook are exclusive") }
        } else if filename == nil {
            throw ValidationError("give -f FILE (- for standard input) or --webhook")
        }
    }

    func run() throws {
        if webhook {
            let server = try InjectionWebhook(reviewer: AdmissionReviewer(injector: injector()), certsDirectory: certs!) { line in
                FileHandle.standardError.write((line + "\n").data(using: .utf8)!)
            }
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            let ch = try server.bind(group: group, host: bind, port: port)
            print("moonlet inject webhook on https://\(bind):\(ch.localAddress?.port ?? port) (image \(image))")
            try ch.closeFuture.wait()
            return
        }
        let text: String
        if filename == "-" {
            text = String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
        } else {
            do { text = try String(contentsOfFile: filename!, encoding: .utf8) } catch { throw ValidationError("-f \(filename!): \(error.localizedDescription)") }
        }
        do { print(try injector().injectYAML(text), terminator: "") } catch {
            FileHandle.standardError.write("moonlet inject: \(filename!): \(error)\n".data(using: .utf8)!)
            throw ExitCode(1)
        }
    }
}
