import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What `moonlet iptables` reads from and does to the host: the pod's address family,
/// its resolvers, and running iptables-restore / iptables.
public enum IptablesHost {
    /// istio-iptables' rule for IPv6: the first address that is not loopback or link-local
    /// is IPv6 (with `dualStack`, any such IPv6 address turns it on).
    public static func podHasIPv6(dualStack: Bool) -> Bool {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else { return false }
        defer { freeifaddrs(head) }
        var p: UnsafeMutablePointer<ifaddrs>? = first
        var sawIPv4 = false
        while let a = p {
            defer { p = a.pointee.ifa_next }
            guard let sa = a.pointee.ifa_addr else { continue }
            let family = Int32(sa.pointee.sa_family)
            if family == AF_INET {
                let v = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt32(bigEndian: $0.pointee.sin_addr.s_addr) }
                if v >> 24 == 127 || v >> 16 == 0xA9FE { continue }
                if !dualStack { return false }
                sawIPv4 = true
            } else if family == AF_INET6 {
                let b = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { s in withUnsafeBytes(of: s.pointee.sin6_addr) { Array($0) } }
                if b == [UInt8](repeating: 0, count: 15) + [1] { continue }
                if b[0] == 0xFE && b[1] & 0xC0 == 0x80 { continue }
                if b[0] == 0xFF && b[1] & 0x0F == 0x02 { continue }
                return true
            }
        }
        _ = sawIPv4
        return false
    }

    /// The `nameserver` lines of a resolv.conf, split by family.
    public static func resolvers(resolvConf text: String) -> (v4: [String], v6: [String]) {
        var v4: [String] = [], v6: [String] = []
        for line in text.split(separator: "\n") {
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 2, f[0] == "nameserver" else { continue }
            let addr = String(f[1])
            if IPPrefix.parseV4(addr) != nil { v4.append(addr) } else if IPPrefix.parseV6(addr) != nil { v6.append(addr) }
        }
        return (v4, v6)
    }

    /// Runs a program with `input` on its standard input; throws with its output when it fails.
    @discardableResult
    public static func run(_ program: String, _ args: [String], input: String? = nil) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = [program] + args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        let inPipe = Pipe()
        if input != nil { p.standardInput = inPipe }
        do { try p.run() } catch { throw IptablesConfigError("\(program): cannot run: \(error)") }
        if let input {
            inPipe.fileHandleForWriting.write(input.data(using: .utf8)!)
            try? inPipe.fileHandleForWriting.close()
        }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0 else {
            throw IptablesConfigError("\(([program] + args).joined(separator: " ")) exited with \(p.terminationStatus): \(text.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return text
    }

    /// Applies the rules as istio-iptables does on a clean host: `iptables-restore --noflush`
    /// with the IPv4 input, then `ip6tables-restore --noflush` when IPv6 is on.
    public static func apply(_ rules: IptablesRuleSet, ipv6: Bool) throws {
        try run("iptables-restore", ["--noflush"], input: rules.v4Restore)
        if ipv6 { try run("ip6tables-restore", ["--noflush"], input: rules.v6Restore) }
    }

    /// Runs `routeCommands()` with `ip`; an "exists" answer (a second run) is not an error.
    public static func configureRoutes(_ config: IptablesConfig) throws {
        for args in config.routeCommands() {
            do { try run("ip", args) } catch let e as IptablesConfigError where e.description.contains("File exists") { continue }
        }
    }

    /// Removes what `apply` added (best effort, as istio-iptables' cleanup): every
    /// command is tried, failures (a rule already gone) are ignored. Returns the commands run.
    @discardableResult
    public static func clean(_ rules: IptablesRuleSet, ipv6: Bool) -> [String] {
        var ran: [String] = []
        for (binary, cmds) in [("iptables", rules.cleanupCommands(ipv6: false))] + (ipv6 ? [("ip6tables", rules.cleanupCommands(ipv6: true))] : []) {
            for c in cmds {
                ran.append(([binary] + c).joined(separator: " "))
                _ = try? run(binary, c)
            }
        }
        return ran
    }
}
