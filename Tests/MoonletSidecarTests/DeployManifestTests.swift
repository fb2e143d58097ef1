import XCTest
import Yams
@testable import MoonletSidecar

/// deploy/kubernetes and deploy/Dockerfile agree with the code: every manifest parses and
/// has its required fields, images, ports and service names match the CLI's defaults,
/// and every flag a manifest passes is one `moonlet` accepts.
final class DeployManifestTests: XCTestCase {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static var manifestDir: URL { packageRoot.appendingPathComponent("deploy/kubernetes") }

    func manifests() throws -> [(file: String, object: [String: Any])] {
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.manifestDir.path).filter { $0.hasSuffix(".yaml") }.sorted()
        XCTAssertFalse(files.isEmpty)
        var out: [(String, [String: Any])] = []
        for f in files {
            let text = try String(contentsOf: Self.manifestDir.appendingPathComponent(f), encoding: .utf8)
            for doc in try Yams.load_all(yaml: text) {
                guard let o = doc as? [String: Any] else { XCTFail("\(f): a document that is not a mapping"); continue }
                out.append((f, o))
            }
        }
        return out
    }

    func objects(_ kind: String) throws -> [[String: Any]] { try manifests().filter { $0.object["kind"] as? String == kind }.map(\.object) }
    func named(_ kind: String, _ name: String) throws -> [String: Any] {
        try XCTUnwrap(objects(kind).first { ($0["metadata"] as? [String: Any])?["name"] as? String == name }, "\(kind)/\(name)")
    }
    func podContainers(_ deployment: [String: Any]) -> [[String: Any]] {
        (((deployment["spec"] as! [String: Any])["template"] as! [String: Any])["spec"] as! [String: Any])["containers"] as! [[String: Any]]
    }
    func flagValue(_ args: [String], _ flag: String) -> String? { args.firstIndex(of: flag).flatMap { $0 + 1 < args.count ? args[$0 + 1] : nil } }

    func test_everyManifest_parses_andHasApiVersionKindAndName() throws {
        let all = try manifests()
        XCTAssertGreaterThanOrEqual(all.count, 7)
        for (file, o) in all {
            XCTAssertNotNil(o["apiVersion"] as? String, file)
            XCTAssertNotNil(o["kind"] as? String, file)
            XCTAssertNotNil((o["metadata"] as? [String: Any])?["name"] as? String, "\(file): \(o["kind"] ?? "?")")
            if ["Deployment", "Service", "ServiceAccount"].contains(o["kind"] as? String) {
                XCTAssertEqual((o["metadata"] as? [String: Any])?["namespace"] as? String, "istio-system", file)
            }
            if o["kind"] as? String == "Deployment" {
                let spec = o["spec"] as! [String: Any]
                let selector = (spec["selector"] as! [String: Any])["matchLabels"] as! [String: String]
                let labels = ((spec["template"] as! [String: Any])["metadata"] as! [String: Any])["labels"] as! [String: String]
                for (k, v) in selector { XCTAssertEqual(labels[k], v, "\(file): the selector matches the pod template") }
                XCTAssertEqual(labels["sidecar.istio.io/inject"], "false", "\(file): control-plane pods are never injected")
            }
        }
        XCTAssertEqual(Set(try objects("Namespace").compactMap { ($0["metadata"] as? [String: Any])?["name"] as? String }), ["istio-system"])
    }

    func test_everyContainer_usesTheImageTheInjectorInjects_andTheMakefileBuilds() throws {
        let image = InjectionSettings().image
        for d in try objects("Deployment") {
            for c in podContainers(d) { XCTAssertEqual(c["image"] as? String, image) }
        }
        let makefile = try String(contentsOf: Self.packageRoot.appendingPathComponent("Makefile"), encoding: .utf8)
        XCTAssertTrue(makefile.contains("IMAGE ?= \(image)"), "make image tags \(image)")
        let dockerfile = try String(contentsOf: Self.packageRoot.appendingPathComponent("deploy/Dockerfile"), encoding: .utf8)
        XCTAssertTrue(dockerfile.contains("USER 1337:1337"))
        XCTAssertTrue(dockerfile.contains("liblua5.4-0") && dockerfile.contains("libpcre2-8-0"))
    }

    func test_caService_matchesTheInjectedCAAddress_andTheCAsPort() throws {
        let ca = try named("Deployment", "moonlet-ca")
        let args = podContainers(ca)[0]["args"] as! [String]
        XCTAssertEqual(Array(args.prefix(2)), ["ca", "serve"])
        let port = try XCTUnwrap(flagValue(args, "--port"))
        let service = try named("Service", "moonlet-ca")
        let sp = ((service["spec"] as! [String: Any])["ports"] as! [[String: Any]])[0]
        XCTAssertEqual("\(sp["targetPort"]!)", port)
        XCTAssertEqual(InjectionSettings().caAddress, "moonlet-ca.istio-system.svc:\(sp["port"]!)")
        let injectorArgs = podContainers(try named("Deployment", "moonlet-injector"))[0]["args"] as! [String]
        XCTAssertEqual(flagValue(injectorArgs, "--ca-address"), InjectionSettings().caAddress)
    }

    func test_pilotService_matchesThePilotsPort_andPilotServesMutualTLSFromAMountedConfigMap() throws {
        let pilot = try named("Deployment", "moonlet-pilot")
        let c = podContainers(pilot)[0]
        let args = c["args"] as! [String]
        XCTAssertEqual(args.first, "pilot")
        let port = try XCTUnwrap(flagValue(args, "--port"))
        XCTAssertEqual(flagValue(args, "--bind"), "0.0.0.0")
        XCTAssertEqual((c["ports"] as! [[String: Any]]).map { "\($0["containerPort"]!)" }, [port])
        let service = try named("Service", "moonlet-pilot")
        let sp = ((service["spec"] as! [String: Any])["ports"] as! [[String: Any]])[0]
        XCTAssertEqual("\(sp["targetPort"]!)", port)
        // The injector points every sidecar at this Service (MOONLET_PILOT).
        let injectorArgs = podContainers(try named("Deployment", "moonlet-injector"))[0]["args"] as! [String]
        let pilotAddress = try XCTUnwrap(flagValue(injectorArgs, "--pilot-address"))
        XCTAssertEqual(pilotAddress, "moonlet-pilot.istio-system.svc:\(sp["port"]!)")
        var s = InjectionSettings()
        s.pilotAddress = pilotAddress
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, image: x}\n"
        let injected = try Yams.load(yaml: SidecarInjector(settings: s).injectYAML(pod)) as! [String: Any]
        let proxy = ((injected["spec"] as! [String: Any])["containers"] as! [[String: Any]]).first { $0["name"] as? String == "istio-proxy" }!
        let env = (proxy["env"] as! [[String: Any]]).first { $0["name"] as? String == "MOONLET_PILOT" }
        XCTAssertEqual(env?["value"] as? String, pilotAddress)
        // --config and --certs are mounted volumes.
        let mounts = (c["volumeMounts"] as! [[String: Any]]).compactMap { $0["mountPath"] as? String }
        for flag in ["--config", "--certs"] { XCTAssertTrue(mounts.contains(try XCTUnwrap(flagValue(args, flag))), flag) }
        let sa = ((((pilot["spec"] as! [String: Any])["template"] as! [String: Any])["spec"] as! [String: Any])["serviceAccountName"] as? String)
        XCTAssertNotNil(try objects("ServiceAccount").first { ($0["metadata"] as? [String: Any])?["name"] as? String == sa }, "service account \(sa ?? "?")")
    }

    func test_webhookConfiguration_pointsAtTheInjectorService_onTheWebhooksPort() throws {
        let injector = try named("Deployment", "moonlet-injector")
        let args = podContainers(injector)[0]["args"] as! [String]
        XCTAssertEqual(Array(args.prefix(2)), ["inject", "--webhook"])
        let listen = try XCTUnwrap(flagValue(args, "--port"))
        XCTAssertEqual(flagValue(args, "--image"), InjectionSettings().image)
        let containerPorts = (podContainers(injector)[0]["ports"] as! [[String: Any]]).map { "\($0["containerPort"]!)" }
        XCTAssertEqual(containerPorts, [listen])
        let service = try named("Service", "moonlet-injector")
        let sp = ((service["spec"] as! [String: Any])["ports"] as! [[String: Any]])[0]
        XCTAssertEqual("\(sp["targetPort"]!)", listen)

        let mwc = try named("MutatingWebhookConfiguration", "moonlet-sidecar-injector")
        let hook = (mwc["webhooks"] as! [[String: Any]])[0]
        let svc = (hook["clientConfig"] as! [String: Any])["service"] as! [String: Any]
        XCTAssertEqual(svc["name"] as? String, "moonlet-injector")
        XCTAssertEqual(svc["namespace"] as? String, "istio-system")
        XCTAssertEqual("\(svc["port"]!)", "\(sp["port"]!)")
        XCTAssertEqual(hook["admissionReviewVersions"] as? [String], ["v1"])
        XCTAssertEqual(hook["sideEffects"] as? String, "None")
        let selector = (hook["namespaceSelector"] as! [String: Any])["matchLabels"] as! [String: String]
        XCTAssertEqual(selector, ["istio-injection": "enabled"])
        let rule = (hook["rules"] as! [[String: Any]])[0]
        XCTAssertEqual(rule["resources"] as? [String], ["pods"])
        XCTAssertEqual(rule["operations"] as? [String], ["CREATE"])
    }

    /// The `moonlet` executable built next to the test bundle (swift build --build-tests builds both).
    func moonletBinary() throws -> String {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("moonlet").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir.deleteLastPathComponent()
        }
        let built = Self.packageRoot.appendingPathComponent(".build/debug/moonlet").path
        guard FileManager.default.isExecutableFile(atPath: built) else { throw XCTSkip("moonlet executable not built") }
        return built
    }

    func help(_ binary: String, _ subcommand: [String]) throws -> String {
        try run(binary, subcommand + ["--help"]).output
    }

    func run(_ binary: String, _ args: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    func test_iptablesDryRun_printsTheRestoreInput_forTheFlagsGiven_andChangesNothing() throws {
        let binary = try moonletBinary()
        let (status, out) = try run(binary, ["iptables", "--dry-run", "--istio-inbound-ports", "*", "--istio-service-cidr", "*",
                                             "--istio-service-exclude-cidr", "", "--istio-local-exclude-ports", "15090,15021"])
        XCTAssertEqual(status, 0, out)
        var c = IptablesConfig()
        c.inboundPortsInclude = "*"; c.outboundIPRangesInclude = "*"; c.inboundPortsExclude = "15090,15021"; c.inboundInterceptionMode = "REDIRECT"
        XCTAssertTrue(out.hasPrefix("# IPv4: iptables-restore --noflush\n" + (try c.rules().v4Restore)), out)
        XCTAssertTrue(out.contains("-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN"))
        XCTAssertTrue(out.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"))

        let (cleanStatus, cleanOut) = try run(binary, ["iptables", "--dry-run", "--clean", "--istio-inbound-ports", "*"])
        XCTAssertEqual(cleanStatus, 0)
        XCTAssertTrue(cleanOut.contains("iptables -t nat -D PREROUTING -p tcp -j ISTIO_INBOUND"), cleanOut)
        XCTAssertTrue(cleanOut.contains("iptables -t nat -X ISTIO_INBOUND"), cleanOut)

        let (bad, badOut) = try run(binary, ["iptables", "--dry-run", "--istio-service-cidr", "10.0.0.0/99"])
        XCTAssertNotEqual(bad, 0)
        XCTAssertTrue(badOut.contains("--istio-service-cidr"), badOut)
    }

    func test_everyFlagInTheManifests_andInTheInjectedInitContainer_isOneTheCLIAccepts() throws {
        let binary = try moonletBinary()
        var checked = 0
        var commands: [[String]] = []
        for d in try objects("Deployment") { for c in podContainers(d) { commands.append(c["args"] as! [String]) } }
        // The injected init container's command line too.
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, image: x}\n"
        let injected = try Yams.load(yaml: SidecarInjector().injectYAML(pod)) as! [String: Any]
        let initC = ((injected["spec"] as! [String: Any])["initContainers"] as! [[String: Any]])[0]
        commands.append(initC["args"] as! [String])
        for args in commands {
            let sub = args.prefix { !$0.hasPrefix("-") }
            let text = try help(binary, Array(sub))
            XCTAssertTrue(text.contains("USAGE"), "moonlet \(sub.joined(separator: " ")) --help: \(text)")
            for flag in args where flag.hasPrefix("--") {
                XCTAssertTrue(text.contains(flag + " ") || text.contains(flag + "\n") || text.contains(flag + ","), "moonlet \(sub.joined(separator: " ")) does not accept \(flag)")
                checked += 1
            }
        }
        XCTAssertGreaterThan(checked, 15)

        // The injected sidecar is configured through environment variables `moonlet run` reads.
        let runHelp = try help(binary, ["run"])
        let proxy = ((injected["spec"] as! [String: Any])["containers"] as! [[String: Any]]).first { $0["name"] as? String == "istio-proxy" }!
        XCTAssertEqual(proxy["args"] as? [String], ["run"])
        let names = (proxy["env"] as! [[String: Any]]).map { $0["name"] as! String }
        let read = names.filter { $0.hasPrefix("MOONLET_") || ["CA_ADDR", "POD_NAMESPACE", "SERVICE_ACCOUNT"].contains($0) }
        XCTAssertGreaterThan(read.count, 8)
        for n in read { XCTAssertTrue(runHelp.contains(n), "moonlet run does not read \(n)") }
    }
}
