#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The settings of `moonlet iptables`: the same fields, defaults and meaning as
/// istio-iptables' `Config` (tools/common/config), so a pod spec written for
/// istio-init works with Moonlet's init container unchanged.
///
/// Lists are kept as istio-iptables keeps them, comma-separated strings, because the
/// rules depend on their exact spelling (an empty element is skipped, `*` is a wildcard).
public struct IptablesConfig: Equatable, Sendable {
    /// `--envoy-port`: where outbound TCP is redirected (15001).
    public var proxyPort = "15001"
    /// `--inbound-capture-port`: where inbound TCP is redirected (15006).
    public var inboundCapturePort = "15006"
    /// `--inbound-tunnel-port`: the HBONE tunnel port, never captured (15008).
    public var inboundTunnelPort = "15008"
    /// `--proxy-uid`: comma-separated UIDs whose traffic is not redirected (1337).
    public var proxyUID = "1337"
    /// `--proxy-gid`: comma-separated GIDs whose traffic is not redirected (1337).
    public var proxyGID = "1337"
    /// `--istio-inbound-interception-mode`: `REDIRECT` (also when empty) or `TPROXY`.
    public var inboundInterceptionMode = ""
    /// `--istio-inbound-tproxy-mark` (1337).
    public var inboundTProxyMark = "1337"
    /// `--istio-inbound-tproxy-route-table` (133).
    public var inboundTProxyRouteTable = "133"
    /// `--istio-inbound-ports`: ports captured inbound, `*` for all, empty for none.
    public var inboundPortsInclude = ""
    /// `--istio-local-exclude-ports`: inbound ports left alone when all are captured.
    public var inboundPortsExclude = ""
    /// `ISTIO_OUTBOUND_OWNER_GROUPS`: groups whose outbound traffic is captured (`*`).
    public var ownerGroupsInclude = "*"
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`: groups left alone when all are captured.
    public var ownerGroupsExclude = ""
    /// `--istio-outbound-ports`: outbound ports always captured.
    public var outboundPortsInclude = ""
    /// `--istio-local-outbound-ports-exclude`: outbound ports never captured.
    public var outboundPortsExclude = ""
    /// `--istio-service-cidr`: outbound CIDRs captured, `*` for all, empty for none.
    public var outboundIPRangesInclude = ""
    /// `--istio-service-exclude-cidr`: outbound CIDRs never captured.
    public var outboundIPRangesExclude = ""
    /// `--kube-virt-interfaces`: interfaces whose inbound traffic is treated as outbound.
    public var rerouteVirtualInterfaces = ""
    /// `--istio-exclude-interfaces`: interfaces neither captured inbound nor outbound.
    public var excludeInterfaces = ""
    /// Whether ip6tables rules are written too (istio-iptables: the pod has an IPv6 address, or `--dual-stack`).
    public var enableIPv6 = false
    /// `--redirect-dns`: DNS to the resolvers in /etc/resolv.conf goes to port 15053.
    public var redirectDNS = false
    /// `--capture-all-dns`: every port-53 destination is redirected, not only the resolvers.
    public var captureAllDNS = false
    /// IPv4 resolvers (from /etc/resolv.conf when `--redirect-dns`).
    public var dnsServersV4: [String] = []
    /// IPv6 resolvers (from /etc/resolv.conf when `--redirect-dns`).
    public var dnsServersV6: [String] = []
    /// `--drop-invalid`: conntrack-INVALID packets are dropped rather than reset.
    public var dropInvalid = false
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` (127.0.0.1/32).
    public var hostIPv4LoopbackCidr = "127.0.0.1/32"

    /// istio-iptables' defaults.
    public init() {}
}

/// An error in the settings, phrased with the flag it came from.
public struct IptablesConfigError: Error, CustomStringConvertible, Equatable {
    /// What is wrong, naming the flag.
    public let description: String
    /// An error with this message.
    public init(_ description: String) { self.description = description }
}

/// istio-iptables' `config.Split`: comma-separated, empty elements dropped.
func splitList(_ s: String) -> [String] {
    s.split(separator: ",", omittingEmptySubsequences: true).map(String.init)
}

/// A parsed CIDR as Go's `netip.ParsePrefix` parses it (not masked; printed canonically).
struct IPPrefix: Equatable {
    var isIPv4: Bool
    var bytes: [UInt8]
    var bits: Int

    init?(_ text: String) {
        guard let slash = text.lastIndex(of: "/") else { return nil }
        let addr = String(text[..<slash]), lenText = String(text[text.index(after: slash)...])
        guard !lenText.isEmpty, lenText.allSatisfy({ $0.isASCII && $0.isNumber }), lenText.count <= 3,
              !(lenText.count > 1 && lenText.first == "0"), let n = Int(lenText) else { return nil }
        if let v4 = IPPrefix.parseV4(addr) {
            guard n <= 32 else { return nil }
            isIPv4 = true; bytes = v4; bits = n
        } else if !addr.contains("%"), let v6 = IPPrefix.parseV6(addr) {
            guard n <= 128 else { return nil }
            isIPv4 = false; bytes = v6; bits = n
        } else { return nil }
    }

    static func parseV4(_ s: String) -> [UInt8]? {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var out: [UInt8] = []
        for p in parts {
            guard !p.isEmpty, p.count <= 3, p.allSatisfy({ $0.isASCII && $0.isNumber }),
                  !(p.count > 1 && p.first == "0"), let v = UInt8(p) else { return nil }
            out.append(v)
        }
        return out
    }

    static func parseV6(_ s: String) -> [UInt8]? {
        var a = in6_addr()
        guard inet_pton(AF_INET6, s, &a) == 1 else { return nil }
        return withUnsafeBytes(of: &a) { Array($0) }
    }

    /// Whether the address (not the range) is a loopback address, as Go's `Addr.IsLoopback`.
    var isLoopback: Bool {
        isIPv4 ? bytes[0] == 127 : bytes == [UInt8](repeating: 0, count: 15) + [1]
    }

    /// RFC 5952 text, as Go's `netip.Prefix.String`.
    var text: String {
        if isIPv4 { return bytes.map(String.init).joined(separator: ".") + "/\(bits)" }
        var groups: [UInt16] = []
        for i in stride(from: 0, to: 16, by: 2) { groups.append(UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1])) }
        // Longest run of zero groups (length >= 2), first one on a tie.
        var bestStart = -1, bestLen = 0, i = 0
        while i < 8 {
            if groups[i] == 0 {
                var j = i
                while j < 8 && groups[j] == 0 { j += 1 }
                if j - i > bestLen && j - i >= 2 { bestStart = i; bestLen = j - i }
                i = j
            } else { i += 1 }
        }
        var out = ""
        var k = 0
        while k < 8 {
            if k == bestStart {
                out += "::"
                k += bestLen
                continue
            }
            if !out.isEmpty && !out.hasSuffix(":") { out += ":" }
            out += String(groups[k], radix: 16)
            k += 1
        }
        return out + "/\(bits)"
    }
}

/// istio-iptables' `config.NetworkRange`, one per IP family.
struct NetworkRange {
    var isWildcard = false
    var cidrs: [IPPrefix] = []
    var hasLoopbackIP = false

    /// istio-iptables' `SeparateV4V6`.
    static func separate(_ list: String, flag: String) throws -> (v4: NetworkRange, v6: NetworkRange) {
        if list == "*" { return (NetworkRange(isWildcard: true), NetworkRange(isWildcard: true)) }
        var v4 = NetworkRange(), v6 = NetworkRange()
        for item in splitList(list) {
            guard let p = IPPrefix(item) else { throw IptablesConfigError("\(flag): \"\(item)\" is not a CIDR (address/bits)") }
            if p.isIPv4 {
                v4.cidrs.append(p)
                if p.isLoopback { v4.hasLoopbackIP = true }
            } else {
                v6.cidrs.append(p)
                if p.isLoopback { v6.hasLoopbackIP = true }
            }
        }
        return (v4, v6)
    }
}
