/// One iptables rule: its chain, table and the full argument list (`-A CHAIN ...` or `-I CHAIN N ...`).
public struct IptablesRule: Equatable, Sendable {
    /// The chain the rule goes in.
    public var chain: String
    /// The table (`nat`, `mangle`, `raw`, `filter`).
    public var table: String
    /// The arguments after `-t TABLE`, starting with `-A` or `-I`.
    public var params: [String]
}

/// The rules for both IP families, built in istio-iptables' order
/// (tools/istio-iptables/pkg/builder): the same order, the same chain creation, the same
/// iptables-restore text.
public struct IptablesRuleSet: Equatable, Sendable {
    /// IPv4 rules in order.
    public internal(set) var v4: [IptablesRule] = []
    /// IPv6 rules in order (empty when IPv6 is off).
    public internal(set) var v6: [IptablesRule] = []
    let enableIPv6: Bool

    /// Chains and targets iptables has built in: never created, never deleted.
    static let builtIn: Set<String> = ["INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING", "ACCEPT", "RETURN", "DROP"]

    init(enableIPv6: Bool) { self.enableIPv6 = enableIPv6 }

    mutating func appendV4(_ chain: String, _ table: String, _ params: [String]) {
        v4.append(IptablesRule(chain: chain, table: table, params: ["-A", chain] + params))
    }
    mutating func appendV6(_ chain: String, _ table: String, _ params: [String]) {
        guard enableIPv6 else { return }
        v6.append(IptablesRule(chain: chain, table: table, params: ["-A", chain] + params))
    }
    mutating func append(_ chain: String, _ table: String, _ params: String...) {
        appendV4(chain, table, params); appendV6(chain, table, params)
    }
    mutating func insertV4(_ chain: String, _ table: String, _ position: Int, _ params: [String]) {
        v4.append(IptablesRule(chain: chain, table: table, params: ["-I", chain, String(position)] + params))
    }
    mutating func insertV6(_ chain: String, _ table: String, _ position: Int, _ params: [String]) {
        guard enableIPv6 else { return }
        v6.append(IptablesRule(chain: chain, table: table, params: ["-I", chain, String(position)] + params))
    }
    mutating func insert(_ chain: String, _ table: String, _ position: Int, _ params: String...) {
        insertV4(chain, table, position, params); insertV6(chain, table, position, params)
    }
    /// A rule with an address that differs per family: `ipSpecific` in `params` is replaced.
    mutating func appendVersioned(_ ipv4: String, _ ipv6: String, _ chain: String, _ table: String, _ params: String...) {
        appendV4(chain, table, params.map { $0 == ipSpecific ? ipv4 : $0 })
        appendV6(chain, table, params.map { $0 == ipSpecific ? ipv6 : $0 })
    }

    /// iptables-restore input for IPv4 (to be applied with `--noflush`).
    public var v4Restore: String { Self.restore(v4) }
    /// ip6tables-restore input (empty when IPv6 is off).
    public var v6Restore: String { Self.restore(v6) }

    static func restore(_ rules: [IptablesRule]) -> String {
        var tables: [String: [String]] = ["filter": [], "nat": [], "mangle": []]
        var seen = Set<String>()
        for r in rules where seen.insert("\(r.chain):\(r.table)").inserted && !builtIn.contains(r.chain) {
            tables[r.table, default: []].append("-N \(r.chain)")
        }
        // Chains jumped to get created even when nothing is appended to them.
        for r in rules where r.params.count >= 2 && r.params[r.params.count - 2] == "-j" {
            let target = r.params[r.params.count - 1]
            if seen.insert("\(target):\(r.table)").inserted && !builtIn.contains(target) {
                tables[r.table, default: []].append("-N \(target)")
            }
        }
        for r in rules { tables[r.table, default: []].append(r.params.joined(separator: " ")) }
        var out = ""
        for name in tables.keys.sorted() {
            let lines = tables[name]!
            guard !lines.isEmpty else { continue }
            out += "* \(name)\n"
            for l in lines { out += l + "\n" }
            out += "COMMIT\n"
        }
        return out
    }

    /// The `iptables` argument lists that undo the rules (istio-iptables' cleanup): jumps
    /// from built-in chains deleted in reverse order, then each ISTIO_* chain flushed and deleted.
    public func cleanupCommands(ipv6: Bool) -> [[String]] {
        let rules = Array((ipv6 ? v6 : v4).reversed())
        var out: [[String]] = []
        for r in rules {
            var params: [String] = []
            var skip = false
            var insertIndex = -1
            for (i, e) in r.params.enumerated() {
                if insertIndex >= 0 && i == insertIndex + 2 { continue }
                if e == "-A" || e == "--append" { params.append("-D") }
                else if e == "-I" || e == "--insert" { insertIndex = i; params.append("-D") }
                else { params.append(e) }
                if ["-A", "--append", "-I", "--insert"].contains(e), i < r.params.count - 1, r.params[i + 1].hasPrefix("ISTIO_") {
                    skip = true
                } else if e == "-j" || e == "--jump", i < r.params.count - 1, r.params[i + 1].hasPrefix("ISTIO_") {
                    skip = false
                }
            }
            if !skip { out.append(["-t", r.table] + params) }
        }
        var seen = Set<String>()
        for r in rules where seen.insert("\(r.chain):\(r.table)").inserted && !Self.builtIn.contains(r.chain) {
            out.append(["-t", r.table, "-F", r.chain])
            out.append(["-t", r.table, "-X", r.chain])
        }
        return out
    }
}

let ipSpecific = "PLACEHOLDER_IP_VERSION_SPECIFIC"
let istioOutput = "ISTIO_OUTPUT", istioOutputDNS = "ISTIO_OUTPUT_DNS", istioInbound = "ISTIO_INBOUND"
let istioDivert = "ISTIO_DIVERT", istioTProxy = "ISTIO_TPROXY", istioRedirect = "ISTIO_REDIRECT"
let istioInRedirect = "ISTIO_IN_REDIRECT", istioDrop = "ISTIO_DROP"
/// istio-agent's DNS port, where captured DNS goes.
let dnsListenerPort = "15053"
/// The mark on packets from the proxy's outbound side to the app by pod IP (TPROXY mode).
let outboundMark = "1338"

extension IptablesConfig {
    /// The rules istio-iptables' `IptablesConfigurator.Run` writes for these settings, in its order.
    public func rules() throws -> IptablesRuleSet {
        var b = IptablesRuleSet(enableIPv6: enableIPv6)
        let tproxy = inboundInterceptionMode == "TPROXY"
        let (v4Exclude, v6Exclude) = try NetworkRange.separate(outboundIPRangesExclude, flag: "--istio-service-exclude-cidr")
        if v4Exclude.isWildcard { throw IptablesConfigError("--istio-service-exclude-cidr: \"*\" is not allowed (it would exclude everything)") }
        let (v4Include, v6Include) = try NetworkRange.separate(outboundIPRangesInclude, flag: "--istio-service-cidr")

        var redirectDNS = self.redirectDNS
        if redirectDNS && !captureAllDNS && dnsServersV4.isEmpty && dnsServersV6.isEmpty { redirectDNS = false }

        // Interfaces excluded from capture.
        for nic in splitList(excludeInterfaces) {
            b.append("PREROUTING", "nat", "-i", nic, "-j", "RETURN")
            b.append("OUTPUT", "nat", "-o", nic, "-j", "RETURN")
        }
        if tproxy {
            for nic in splitList(excludeInterfaces) {
                b.append("PREROUTING", "mangle", "-i", nic, "-j", "RETURN")
                b.append("OUTPUT", "mangle", "-o", nic, "-j", "RETURN")
            }
        }
        for nic in splitList(rerouteVirtualInterfaces) {
            b.insert("PREROUTING", "nat", 1, "-i", nic, "-j", "RETURN")
        }
        if dropInvalid {
            b.append("PREROUTING", "mangle", "-m", "conntrack", "--ctstate", "INVALID", "-j", istioDrop)
            b.append(istioDrop, "mangle", "-j", "DROP")
        }
        b.append(istioInbound, "nat", "-p", "tcp", "--dport", inboundTunnelPort, "-j", "RETURN")
        b.append(istioRedirect, "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", proxyPort)
        b.append(istioInRedirect, "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", inboundCapturePort)

        // Inbound ports.
        if !inboundPortsInclude.isEmpty {
            let table: String
            if tproxy {
                b.append(istioDivert, "mangle", "-j", "MARK", "--set-mark", inboundTProxyMark)
                b.append(istioDivert, "mangle", "-j", "ACCEPT")
                b.appendVersioned(hostIPv4LoopbackCidr, "::1/128", istioTProxy, "mangle", "!", "-d", ipSpecific,
                                  "-p", "tcp", "-j", "TPROXY", "--tproxy-mark", inboundTProxyMark + "/0xffffffff", "--on-port", inboundCapturePort)
                table = "mangle"
            } else {
                table = "nat"
            }
            b.append("PREROUTING", table, "-p", "tcp", "-j", istioInbound)
            if inboundPortsInclude == "*" {
                for port in splitList(inboundPortsExclude) {
                    b.append(istioInbound, table, "-p", "tcp", "--dport", port, "-j", "RETURN")
                }
                if tproxy {
                    b.append(istioInbound, "mangle", "-p", "tcp", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", istioDivert)
                    b.append(istioInbound, "mangle", "-p", "tcp", "-j", istioTProxy)
                } else {
                    b.append(istioInbound, "nat", "-p", "tcp", "-j", istioInRedirect)
                }
            } else {
                for port in splitList(inboundPortsInclude) {
                    if tproxy {
                        b.append(istioInbound, "mangle", "-p", "tcp", "--dport", port, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", istioDivert)
                        b.append(istioInbound, "mangle", "-p", "tcp", "--dport", port, "-j", istioTProxy)
                    } else {
                        b.append(istioInbound, "nat", "-p", "tcp", "--dport", port, "-j", istioInRedirect)
                    }
                }
            }
        }

        b.append("OUTPUT", "nat", "-j", istioOutput)
        for port in splitList(outboundPortsExclude) {
            b.append(istioOutput, "nat", "-p", "tcp", "--dport", port, "-j", "RETURN")
            b.append(istioOutput, "nat", "-p", "udp", "--dport", port, "-j", "RETURN")
        }
        // 127.0.0.6 / ::6: the inbound passthrough's bind address.
        b.appendVersioned("127.0.0.6/32", "::6/128", istioOutput, "nat", "-o", "lo", "-s", ipSpecific, "-j", "RETURN")

        let keepLoopbackReturn = !v4Include.hasLoopbackIP && !v6Include.hasLoopbackIP
        for uid in splitList(proxyUID) {
            if redirectDNS {
                b.appendVersioned(hostIPv4LoopbackCidr, "::1/128", istioOutput, "nat", "-o", "lo", "!", "-d", ipSpecific, "-p", "tcp",
                                  "-m", "multiport", "!", "--dports", "53," + inboundTunnelPort, "-m", "owner", "--uid-owner", uid, "-j", istioInRedirect)
            } else {
                b.appendVersioned(hostIPv4LoopbackCidr, "::1/128", istioOutput, "nat", "-o", "lo", "!", "-d", ipSpecific, "-p", "tcp",
                                  "!", "--dport", inboundTunnelPort, "-m", "owner", "--uid-owner", uid, "-j", istioInRedirect)
            }
            if keepLoopbackReturn {
                if redirectDNS {
                    b.append(istioOutput, "nat", "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!", "--uid-owner", uid, "-j", "RETURN")
                } else {
                    b.append(istioOutput, "nat", "-o", "lo", "-m", "owner", "!", "--uid-owner", uid, "-j", "RETURN")
                }
            }
            b.append(istioOutput, "nat", "-m", "owner", "--uid-owner", uid, "-j", "RETURN")
        }
        for gid in splitList(proxyGID) {
            b.appendVersioned(hostIPv4LoopbackCidr, "::1/128", istioOutput, "nat", "-o", "lo", "!", "-d", ipSpecific, "-p", "tcp",
                              "!", "--dport", inboundTunnelPort, "-m", "owner", "--gid-owner", gid, "-j", istioInRedirect)
            if keepLoopbackReturn {
                if redirectDNS {
                    b.append(istioOutput, "nat", "-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!", "--gid-owner", gid, "-j", "RETURN")
                } else {
                    b.append(istioOutput, "nat", "-o", "lo", "-m", "owner", "!", "--gid-owner", gid, "-j", "RETURN")
                }
            }
            b.append(istioOutput, "nat", "-m", "owner", "--gid-owner", gid, "-j", "RETURN")
        }

        // Capture by owner group.
        if ownerGroupsInclude == "*" {
            for group in splitList(ownerGroupsExclude) {
                b.append(istioOutput, "nat", "-m", "owner", "--gid-owner", group, "-j", "RETURN")
            }
        } else {
            let groups = splitList(ownerGroupsInclude)
            let matchers = groups.flatMap { ["-m", "owner", "!", "--gid-owner", $0] }
            b.appendV4(istioOutput, "nat", matchers + ["-j", "RETURN"])
            b.appendV6(istioOutput, "nat", matchers + ["-j", "RETURN"])
        }

        if redirectDNS { setUpDNSRedirect(&b) }

        b.appendVersioned(hostIPv4LoopbackCidr, "::1/128", istioOutput, "nat", "-d", ipSpecific, "-j", "RETURN")
        for c in v4Exclude.cidrs { b.appendV4(istioOutput, "nat", ["-d", c.text, "-j", "RETURN"]) }
        for c in v6Exclude.cidrs { b.appendV6(istioOutput, "nat", ["-d", c.text, "-j", "RETURN"]) }
        for port in splitList(outboundPortsInclude) {
            b.append(istioOutput, "nat", "-p", "tcp", "--dport", port, "-j", istioRedirect)
        }
        outboundInclude(v4Include, &b, v6: false)
        outboundInclude(v6Include, &b, v6: true)

        if tproxy {
            b.append("PREROUTING", "mangle", "-p", "tcp", "-m", "mark", "--mark", inboundTProxyMark, "-j", "CONNMARK", "--save-mark")
            b.append("OUTPUT", "mangle", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", inboundTProxyMark, "-j", "RETURN")
            for uid in splitList(proxyUID) {
                b.appendVersioned(hostIPv4LoopbackCidr, "::1/128", "OUTPUT", "mangle", "!", "-d", ipSpecific, "-p", "tcp", "-o", "lo",
                                  "-m", "owner", "--uid-owner", uid, "-j", "MARK", "--set-mark", outboundMark)
            }
            for gid in splitList(proxyGID) {
                b.appendVersioned(hostIPv4LoopbackCidr, "::1/128", "OUTPUT", "mangle", "!", "-d", ipSpecific, "-p", "tcp", "-o", "lo",
                                  "-m", "owner", "--gid-owner", gid, "-j", "MARK", "--set-mark", outboundMark)
            }
            b.append("OUTPUT", "mangle", "-p", "tcp", "-m", "connmark", "--mark", inboundTProxyMark, "-j", "CONNMARK", "--restore-mark")
            b.insert(istioInbound, "mangle", 1, "-p", "tcp", "-m", "mark", "--mark", inboundTProxyMark, "-j", "RETURN")
            b.insertV4(istioInbound, "mangle", 2, ["-p", "tcp", "-s", "127.0.0.6/32", "-i", "lo", "-j", "RETURN"])
            b.insertV6(istioInbound, "mangle", 2, ["-p", "tcp", "-s", "::6/128", "-i", "lo", "-j", "RETURN"])
            b.insert(istioInbound, "mangle", 3, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", outboundMark, "-j", "RETURN")
        }
        return b
    }

    private func outboundInclude(_ range: NetworkRange, _ b: inout IptablesRuleSet, v6: Bool) {
        func add(_ chain: String, _ table: String, _ p: [String]) { v6 ? b.appendV6(chain, table, p) : b.appendV4(chain, table, p) }
        func ins(_ chain: String, _ table: String, _ n: Int, _ p: [String]) { v6 ? b.insertV6(chain, table, n, p) : b.insertV4(chain, table, n, p) }
        if range.isWildcard {
            add(istioOutput, "nat", ["-j", istioRedirect])
            for nic in splitList(rerouteVirtualInterfaces) { ins("PREROUTING", "nat", 1, ["-i", nic, "-j", istioRedirect]) }
        } else {
            for c in range.cidrs {
                for nic in splitList(rerouteVirtualInterfaces) { ins("PREROUTING", "nat", 1, ["-i", nic, "-d", c.text, "-j", istioRedirect]) }
                add(istioOutput, "nat", ["-d", c.text, "-j", istioRedirect])
            }
        }
    }

    private func setUpDNSRedirect(_ b: inout IptablesRuleSet) {
        b.append("OUTPUT", "raw", "-j", istioOutputDNS)
        if captureAllDNS || !dnsServersV4.isEmpty { b.appendV4(istioOutput, "nat", ["-j", istioOutputDNS]) }
        if captureAllDNS || !dnsServersV6.isEmpty { b.appendV6(istioOutput, "nat", ["-j", istioOutputDNS]) }
        if captureAllDNS {
            b.append(istioOutputDNS, "nat", "-p", "tcp", "--dport", "53", "-j", "REDIRECT", "--to-ports", dnsListenerPort)
        } else {
            for s in dnsServersV4 { b.appendV4(istioOutputDNS, "nat", ["-p", "tcp", "--dport", "53", "-d", s + "/32", "-j", "REDIRECT", "--to-ports", dnsListenerPort]) }
            for s in dnsServersV6 { b.appendV6(istioOutputDNS, "nat", ["-p", "tcp", "--dport", "53", "-d", s + "/128", "-j", "REDIRECT", "--to-ports", dnsListenerPort]) }
        }
        if captureAllDNS {
            b.append(istioOutputDNS, "nat", "-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-port", dnsListenerPort)
        } else {
            for s in dnsServersV4 { b.appendV4(istioOutputDNS, "nat", ["-p", "udp", "--dport", "53", "-d", s + "/32", "-j", "REDIRECT", "--to-port", dnsListenerPort]) }
            for s in dnsServersV6 { b.appendV6(istioOutputDNS, "nat", ["-p", "udp", "--dport", "53", "-d", s + "/128", "-j", "REDIRECT", "--to-port", dnsListenerPort]) }
        }
        // Conntrack zones: proxy <-> resolvers in zone 1, clients <-> proxy in zone 2.
        for uid in splitList(proxyUID) {
            b.append(istioOutputDNS, "raw", "-p", "udp", "--dport", "53", "-m", "owner", "--uid-owner", uid, "-j", "CT", "--zone", "1")
            b.append(istioOutputDNS, "raw", "-p", "udp", "--sport", dnsListenerPort, "-m", "owner", "--uid-owner", uid, "-j", "CT", "--zone", "2")
        }
        for gid in splitList(proxyGID) {
            b.append(istioOutputDNS, "raw", "-p", "udp", "--dport", "53", "-m", "owner", "--gid-owner", gid, "-j", "CT", "--zone", "1")
            b.append(istioOutputDNS, "raw", "-p", "udp", "--sport", dnsListenerPort, "-m", "owner", "--gid-owner", gid, "-j", "CT", "--zone", "2")
        }
        if captureAllDNS {
            b.append("PREROUTING", "raw", "-j", istioInbound)
            b.append(istioOutputDNS, "raw", "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2")
            b.append(istioInbound, "raw", "-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
        } else {
            if !dnsServersV4.isEmpty { b.appendV4("PREROUTING", "raw", ["-j", istioInbound]) }
            for s in dnsServersV4 {
                b.appendV4(istioOutputDNS, "raw", ["-p", "udp", "--dport", "53", "-d", s + "/32", "-j", "CT", "--zone", "2"])
                b.appendV4(istioInbound, "raw", ["-p", "udp", "--sport", "53", "-s", s + "/32", "-j", "CT", "--zone", "1"])
            }
            if !dnsServersV6.isEmpty { b.appendV6("PREROUTING", "raw", ["-j", istioInbound]) }
            for s in dnsServersV6 {
                b.appendV6(istioOutputDNS, "raw", ["-p", "udp", "--dport", "53", "-d", s + "/128", "-j", "CT", "--zone", "2"])
                b.appendV6(istioInbound, "raw", ["-p", "udp", "--sport", "53", "-s", s + "/128", "-j", "CT", "--zone", "1"])
            }
        }
    }

    /// What istio-iptables runs for these settings on a clean host, one command or
    /// restore-input line per element (its test stub's record): the two `-save` probes,
    /// the iptables-restore input, the ip6tables-restore input when IPv6 is on, and the
    /// final `-save` calls that log the state.
    public func transcript() throws -> [String] {
        let r = try rules()
        var out = ["iptables-save", "ip6tables-save"]
        out += r.v4Restore.split(separator: "\n", omittingEmptySubsequences: true).map(String.init)
        if enableIPv6 { out += r.v6Restore.split(separator: "\n", omittingEmptySubsequences: true).map(String.init) }
        out.append("iptables-save")
        if enableIPv6 { out.append("ip6tables-save") }
        return out
    }
}

extension IptablesConfig {
    /// The `ip` commands istio-iptables runs after the rules (its `tproxy.ConfigureRoutes`),
    /// as argument lists: with IPv6, the `::6` address on lo (the inbound passthrough's
    /// source); in TPROXY mode with inbound capture, a rule sending marked packets to the
    /// TPROXY table and a local default route to lo in it, per family. An "exists" failure
    /// of these is not an error (a second run).
    public func routeCommands() -> [[String]] {
        var out: [[String]] = []
        if enableIPv6 { out.append(["-6", "addr", "add", "::6/128", "dev", "lo"]) }
        if !inboundPortsInclude.isEmpty && inboundInterceptionMode == "TPROXY" {
            let families = enableIPv6 ? [("-4", "0.0.0.0/0"), ("-6", "::/0")] : [("-4", "0.0.0.0/0")]
            for (f, _) in families { out.append([f, "rule", "add", "fwmark", inboundTProxyMark, "lookup", inboundTProxyRouteTable]) }
            for (f, dst) in families { out.append([f, "route", "add", "local", dst, "dev", "lo", "table", inboundTProxyRouteTable]) }
        }
        return out
    }
}
