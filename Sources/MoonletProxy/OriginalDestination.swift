import NIOCore
import NIOPosix
import MoonletConfig
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Where an intercepted connection was going before iptables sent it to a listener.
///
/// REDIRECT (Istio's default on both listeners): the kernel's NAT keeps it, read with
/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv4) or `getsockopt(SOL_IPV6,
/// IP6T_SO_ORIGINAL_DST)` (IPv6) on the accepted socket, through NIO's public
/// `SocketOptionProvider`. TPROXY (inbound `--inbound-interception TPROXY`): the socket's
/// local address is the original destination (the listener is IP_TRANSPARENT).
///
/// A connection that was not redirected (the client called the listener's own port) has
/// no NAT entry (ENOENT) or one whose original destination is the listener itself: both
/// mean "not intercepted", and the listener serves it as before (HTTP, routed by Host;
/// inbound to `--app-port`).
enum OriginalDestination {
    /// SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST
    /// (linux/netfilter_ipv6/ip6_tables.h) are both 80.
    static let soOriginalDst: CInt = 80
    static let solIP: CInt = 0
    static let solIPv6: CInt = 41
    /// IP_TRANSPARENT (linux/in.h), for a TPROXY listener.
    static let ipTransparent: CInt = 19

    /// Reads the original destination of accepted channel `ch` (on its event loop, in the
    /// child initializer: the socket option read completes at once). nil when the
    /// connection was not redirected, or was redirected to the listener itself.
    static func read(_ ch: Channel, tproxy: Bool) -> SocketAddress? {
        guard let local = ch.localAddress else { return nil }
        if tproxy { return local }
        guard let provider = ch as? SocketOptionProvider else { return nil }
        var found: SocketAddress?
        switch local.protocol {
        case .inet:
            let f: EventLoopFuture<sockaddr_in> = provider.unsafeGetSocketOption(level: NIOBSDSocket.OptionLevel(rawValue: solIP),
                                                                                    name: NIOBSDSocket.Option(rawValue: soOriginalDst))
            // Completed already: the read ran on this loop (whenSuccess runs at once).
            f.whenSuccess { a in found = SocketAddress(a, host: "") }
        case .inet6:
            let f: EventLoopFuture<sockaddr_in6> = provider.unsafeGetSocketOption(level: NIOBSDSocket.OptionLevel(rawValue: solIPv6),
                                                                                     name: NIOBSDSocket.Option(rawValue: soOriginalDst))
            f.whenSuccess { a in found = SocketAddress(a, host: "") }
        default:
            return nil
        }
        guard let dst = found else { return nil }
        if dst.port == local.port && AddressIndex.canonicalIP(dst.ipAddress ?? "") == AddressIndex.canonicalIP(local.ipAddress ?? "") { return nil }
        return dst
    }

    /// Whether `ip`:`port` is one of this proxy's own listeners (a loopback address or
    /// the address the connection arrived on, on a proxy port): a connection sent there
    /// would come back to the proxy forever.
    static func isSelf(ip: String, port: Int, local: SocketAddress?, ownPorts: [Int]) -> Bool {
        guard ownPorts.contains(port) else { return false }
        let c = AddressIndex.canonicalIP(ip)
        if c.hasPrefix("127.") || c == "::1" || c == "0.0.0.0" || c == "::" { return true }
        if let l = local?.ipAddress, AddressIndex.canonicalIP(l) == c { return true }
        return false
    }
}
