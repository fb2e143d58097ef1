import XCTest
@testable import MoonletSidecar

/// istio-iptables' own golden files (../shared/conformance/iptables, from
/// tools/istio-iptables/pkg/capture/testdata at istio/istio 86c9f01f) and the settings of
/// each case (cases.json, from run_test.go's getCommonTestCases).
final class IptablesGoldenTests: XCTestCase {
    static var root: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("shared/conformance/iptables").path
    }

    /// A config from istio's Go field names, as its test builds one (constructTestConfig + the case's overrides).
    static func config(_ fields: [String: Any]) throws -> IptablesConfig {
        var c = IptablesConfig()
        // Zero values for everything the base config does not set.
        c.proxyPort = ""; c.inboundCapturePort = ""; c.inboundTunnelPort = ""; c.proxyUID = ""; c.proxyGID = ""
        c.inboundTProxyMark = ""; c.inboundTProxyRouteTable = ""; c.ownerGroupsInclude = ""; c.hostIPv4LoopbackCidr = ""
        for (k, v) in fields {
            let s = v as? String ?? "", b = v as? Bool ?? false, list = v as? [String] ?? []
            switch k {
            case "ProxyPort": c.proxyPort = s
            case "InboundCapturePort": c.inboundCapturePort = s
            case "InboundTunnelPort": c.inboundTunnelPort = s
            case "ProxyUID": c.proxyUID = s
            case "ProxyGID": c.proxyGID = s
            case "InboundTProxyMark": c.inboundTProxyMark = s
            case "InboundTProxyRouteTable": c.inboundTProxyRouteTable = s
            case "OwnerGroupsInclude": c.ownerGroupsInclude = s
            case "OwnerGroupsExclude": c.ownerGroupsExclude = s
            case "HostIPv4LoopbackCidr": c.hostIPv4LoopbackCidr = s
            case "InboundInterceptionMode": c.inboundInterceptionMode = s
            case "InboundPortsInclude": c.inboundPortsInclude = s
            case "InboundPortsExclude": c.inboundPortsExclude = s
            case "OutboundPortsInclude": c.outboundPortsInclude = s
            case "OutboundPortsExclude": c.outboundPortsExclude = s
            case "OutboundIPRangesInclude": c.outboundIPRangesInclude = s
            case "OutboundIPRangesExclude": c.outboundIPRangesExclude = s
            case "RerouteVirtualInterfaces": c.rerouteVirtualInterfaces = s
            case "ExcludeInterfaces": c.excludeInterfaces = s
            case "EnableIPv6": c.enableIPv6 = b
            case "RedirectDNS": c.redirectDNS = b
            case "CaptureAllDNS": c.captureAllDNS = b
            case "DropInvalid": c.dropInvalid = b
            case "DNSServersV4": c.dnsServersV4 = list
            case "DNSServersV6": c.dnsServersV6 = list
            case "DryRun": break
            default: throw XCTSkip("cases.json has a field this test does not map: \(k)")
            }
        }
        return c
    }

    func test_everyIstioGoldenCase_producesIstioIptablesOutput_exactly() throws {
        let path = Self.root + "/cases.json"
        guard FileManager.default.fileExists(atPath: path) else { throw XCTSkip("conformance data not found at \(path)") }
        let doc = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        let base = doc["base_config"] as! [String: Any]
        let cases = doc["cases"] as! [[String: Any]]
        XCTAssertGreaterThanOrEqual(cases.count, 27)
        var checked = 0
        for tc in cases {
            let name = tc["name"] as! String
            let fields = base.merging(tc["config_overrides"] as? [String: Any] ?? [:]) { $1 }
            let got = try Self.config(fields).transcript().joined(separator: "\n")
            let golden = try String(contentsOfFile: Self.root + "/\(name).golden", encoding: .utf8)
            // istio's comparison: both sides trimmed of surrounding whitespace.
            XCTAssertEqual(got.trimmingCharacters(in: .whitespacesAndNewlines), golden.trimmingCharacters(in: .whitespacesAndNewlines), "case \(name)")
            checked += 1
        }
        XCTAssertEqual(checked, cases.count)
    }

    func test_defaults_areIstioIptablesDefaults() {
        let c = IptablesConfig()
        XCTAssertEqual([c.proxyPort, c.inboundCapturePort, c.inboundTunnelPort, c.proxyUID, c.proxyGID], ["15001", "15006", "15008", "1337", "1337"])
    }

    func test_wildcardServiceExcludeCidr_isRejected() {
        var c = IptablesConfig()
        c.outboundIPRangesExclude = "*"
        XCTAssertThrowsError(try c.rules())
    }

    func test_badCidr_isAnErrorNamingTheFlag() {
        var c = IptablesConfig()
        c.outboundIPRangesInclude = "10.0.0.0/8,not-a-cidr"
        XCTAssertThrowsError(try c.rules()) { XCTAssertTrue("\($0)".contains("--istio-service-cidr")) }
    }

    func test_cleanup_deletesJumpsFromBuiltInChains_thenFlushesAndDeletesIstioChains() throws {
        var c = IptablesConfig()
        c.inboundPortsInclude = "*"
        c.outboundIPRangesInclude = "*"
        let cmds = try c.rules().cleanupCommands(ipv6: false).map { $0.joined(separator: " ") }
        XCTAssertTrue(cmds.contains("-t nat -D OUTPUT -j ISTIO_OUTPUT"))
        XCTAssertTrue(cmds.contains("-t nat -D PREROUTING -p tcp -j ISTIO_INBOUND"))
        XCTAssertTrue(cmds.contains("-t nat -F ISTIO_OUTPUT") && cmds.contains("-t nat -X ISTIO_OUTPUT"))
        XCTAssertFalse(cmds.contains("-t nat -D ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN"), "non-jump rules inside ISTIO_ chains go with the flush, as in istio-iptables")
        XCTAssertLessThan(cmds.firstIndex(of: "-t nat -D OUTPUT -j ISTIO_OUTPUT")!, cmds.firstIndex(of: "-t nat -X ISTIO_OUTPUT")!)
    }

    func test_ipv6Addresses_printCanonically() {
        XCTAssertEqual(IPPrefix("2001:0db8:0:0::/32")?.text, "2001:db8::/32")
        XCTAssertEqual(IPPrefix("::1/128")?.text, "::1/128")
        XCTAssertEqual(IPPrefix("1:0:0:2:0:0:0:3/64")?.text, "1:0:0:2::3/64")
        XCTAssertNil(IPPrefix("10.0.0.256/8"))
        XCTAssertNil(IPPrefix("10.0.0.0/33"))
    }

    func test_resolvConf_nameserversSplitByFamily() {
        let r = IptablesHost.resolvers(resolvConf: "search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10\noptions ndots:5\n")
        XCTAssertEqual(r.v4, ["10.96.0.10"])
        XCTAssertEqual(r.v6, ["fd00::10"])
    }

    func test_tproxyMode_routesMarkedPacketsToLo_andRedirectModeNeedsNoRoutes() {
        var c = IptablesConfig()
        c.inboundPortsInclude = "*"
        XCTAssertEqual(c.routeCommands(), [])
        c.inboundInterceptionMode = "TPROXY"
        XCTAssertEqual(c.routeCommands(), [["-4", "rule", "add", "fwmark", "1337", "lookup", "133"],
                                           ["-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "133"]])
        c.enableIPv6 = true
        XCTAssertEqual(c.routeCommands().first, ["-6", "addr", "add", "::6/128", "dev", "lo"])
        XCTAssertTrue(c.routeCommands().contains(["-6", "route", "add", "local", "::/0", "dev", "lo", "table", "133"]))
    }
}
