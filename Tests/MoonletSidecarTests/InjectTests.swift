import XCTest
import Yams
@testable import MoonletSidecar

/// `moonlet inject -f`: what goes into each pod, what is left alone.
final class InjectTests: XCTestCase {
    static var bookinfoPath: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("shared/conformance/samples/bookinfo/platform/kube/bookinfo.yaml").path
    }

    let injector = SidecarInjector()

    func objects(_ yaml: String) throws -> [[String: Any]] {
        try Yams.load_all(yaml: yaml).compactMap { $0 as? [String: Any] }
    }
    func podSpec(_ o: [String: Any]) -> [String: Any] {
        let path = SidecarInjector.workloadKinds[o["kind"] as! String]!
        var n: Any = o
        for k in path { n = (n as! [String: Any])[k]! }
        return (n as! [String: Any])["spec"] as! [String: Any]
    }
    func podMeta(_ o: [String: Any]) -> [String: Any] {
        let path = SidecarInjector.workloadKinds[o["kind"] as! String]!
        var n: Any = o
        for k in path { n = (n as! [String: Any])[k]! }
        return (n as! [String: Any])["metadata"] as? [String: Any] ?? [:]
    }
    func container(_ spec: [String: Any], _ key: String, _ name: String) -> [String: Any]? {
        (spec[key] as? [[String: Any]])?.first { $0["name"] as? String == name }
    }

    static let deployment = """
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: orders-v1
    spec:
      selector:
        matchLabels: {app: orders}
      template:
        metadata:
          labels:
            app: orders
            version: v1
        spec:
          serviceAccountName: orders
          containers:
          - name: orders
            image: example/orders:1
            ports:
            - containerPort: 8081

    """

    func test_bookinfo_everyDeploymentGetsTheSidecar_andEveryOtherDocumentPassesThroughUnchanged() throws {
        guard FileManager.default.fileExists(atPath: Self.bookinfoPath) else { throw XCTSkip("conformance data not found at \(Self.bookinfoPath)") }
        let input = try String(contentsOfFile: Self.bookinfoPath, encoding: .utf8)
        let output = try injector.injectYAML(input)
        let before = try objects(input), after = try objects(output)
        XCTAssertEqual(before.count, after.count)
        XCTAssertEqual(after.filter { $0["kind"] as? String == "Deployment" }.count, 6)
        for (b, a) in zip(before, after) {
            XCTAssertEqual(b["kind"] as? String, a["kind"] as? String)
            if b["kind"] as? String == "Deployment" {
                let spec = podSpec(a)
                XCTAssertNotNil(container(spec, "containers", "istio-proxy"), "\(a["metadata"]!)")
                XCTAssertEqual((spec["initContainers"] as? [[String: Any]])?.first?["name"] as? String, "istio-init")
                // The app's containers are still there, first.
                XCTAssertEqual((spec["containers"] as! [[String: Any]]).first?["name"] as? String,
                               (podSpec(b)["containers"] as! [[String: Any]]).first?["name"] as? String)
                // Everything outside the pod template is as it was.
                XCTAssertEqual(NSDictionary(dictionary: b["metadata"] as! [String: Any]), NSDictionary(dictionary: a["metadata"] as! [String: Any]))
            } else {
                XCTAssertEqual(NSDictionary(dictionary: b), NSDictionary(dictionary: a))
            }
        }
        XCTAssertEqual(try injector.injectYAML(output), output, "injecting the injected file again changes nothing")
        // Services and ServiceAccounts come out as the same text.
        let service = SidecarInjector.splitDocuments(input).first { $0.contains("kind: Service\n") }!
        XCTAssertTrue(output.contains(service))
    }

    func test_injectedPod_hasIstiosContainers_ports_probe_resources_andSecurityContexts() throws {
        let out = try objects(injector.injectYAML(Self.deployment))[0]
        let spec = podSpec(out)
        let proxy = try XCTUnwrap(container(spec, "containers", "istio-proxy"))
        XCTAssertEqual(proxy["args"] as? [String], ["run"])
        XCTAssertEqual(proxy["command"] as? [String], ["moonlet"])
        let ports = proxy["ports"] as! [[String: Any]]
        XCTAssertTrue(ports.contains { $0["containerPort"] as? Int == 15090 && $0["name"] as? String == "http-envoy-prom" })
        XCTAssertTrue(ports.contains { $0["containerPort"] as? Int == 15021 })
        let probe = (proxy["readinessProbe"] as! [String: Any])["httpGet"] as! [String: Any]
        XCTAssertEqual(probe["path"] as? String, "/healthz/ready")
        XCTAssertEqual(probe["port"] as? Int, 15021)
        let res = proxy["resources"] as! [String: [String: Any]]
        XCTAssertEqual(res["requests"]?["cpu"] as? String, "100m")
        XCTAssertEqual(res["requests"]?["memory"] as? String, "128Mi")
        XCTAssertEqual(res["limits"]?["cpu"] as? String, "2000m")
        XCTAssertEqual(res["limits"]?["memory"] as? String, "1024Mi")
        let psc = proxy["securityContext"] as! [String: Any]
        XCTAssertEqual(psc["runAsUser"] as? Int, 1337)
        XCTAssertEqual(psc["runAsNonRoot"] as? Bool, true)
        let env = Dictionary((proxy["env"] as! [[String: Any]]).map { ($0["name"] as! String, $0) }, uniquingKeysWith: { a, _ in a })
        for (name, path) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"), ("SERVICE_ACCOUNT", "spec.serviceAccountName")] {
            let ref = ((env[name]?["valueFrom"] as? [String: Any])?["fieldRef"] as? [String: Any])?["fieldPath"] as? String
            XCTAssertEqual(ref, path, name)
        }
        XCTAssertEqual(env["MOONLET_LABELS"]?["value"] as? String, "app=orders,version=v1")
        XCTAssertEqual(env["MOONLET_APP_PORT"]?["value"] as? String, "8081")
        XCTAssertEqual(env["MOONLET_BIND"]?["value"] as? String, "0.0.0.0", "the kubelet and Prometheus reach 15021 and 15090 from outside the pod")

        let initC = try XCTUnwrap(container(spec, "initContainers", "istio-init"))
        XCTAssertEqual(initC["command"] as? [String], ["moonlet"])
        XCTAssertEqual((initC["args"] as? [String])?.first, "iptables")
        let isc = initC["securityContext"] as! [String: Any]
        XCTAssertEqual(isc["runAsUser"] as? Int, 0)
        XCTAssertEqual(isc["runAsNonRoot"] as? Bool, false)
        XCTAssertEqual((isc["capabilities"] as! [String: Any])["add"] as? [String], ["NET_ADMIN", "NET_RAW"])

        let volumes = (spec["volumes"] as! [[String: Any]]).map { $0["name"] as! String }
        XCTAssertTrue(volumes.contains("workload-certs") && volumes.contains("moonlet-config") && volumes.contains("istio-podinfo"))
        let podinfo = (spec["volumes"] as! [[String: Any]]).first { $0["name"] as? String == "istio-podinfo" }!
        XCTAssertNotNil(podinfo["downwardAPI"])

        let meta = podMeta(out)
        let labels = meta["labels"] as! [String: Any]
        XCTAssertEqual(labels["security.istio.io/tlsMode"] as? String, "istio")
        XCTAssertEqual(labels["service.istio.io/canonical-name"] as? String, "orders")
        XCTAssertEqual(labels["service.istio.io/canonical-revision"] as? String, "v1")
        let ann = meta["annotations"] as! [String: Any]
        XCTAssertEqual(ann["prometheus.io/scrape"] as? String, "true")
        XCTAssertEqual(ann["prometheus.io/port"] as? String, "15090", "a string, not a number: annotations are strings")
        XCTAssertEqual(ann["prometheus.io/path"] as? String, "/stats/prometheus")
        let status = try XCTUnwrap(ann["sidecar.istio.io/status"] as? String)
        let statusJSON = try JSONSerialization.jsonObject(with: Data(status.utf8)) as! [String: Any]
        XCTAssertEqual(statusJSON["containers"] as? [String], ["istio-proxy"])
        XCTAssertEqual(statusJSON["initContainers"] as? [String], ["istio-init"])
    }

    func test_injectingTwice_changesNothingTheSecondTime() throws {
        let once = try injector.injectYAML(Self.deployment)
        XCTAssertEqual(try injector.injectYAML(once), once)
    }

    func test_injectFalse_asAnnotationOrLabel_leavesThePodAlone() throws {
        let annotated = Self.deployment.replacingOccurrences(of: "    metadata:\n      labels:", with: "    metadata:\n      annotations:\n        sidecar.istio.io/inject: \"false\"\n      labels:")
        XCTAssertNotEqual(annotated, Self.deployment)
        XCTAssertEqual(try injector.injectYAML(annotated), annotated)
        let labelled = Self.deployment.replacingOccurrences(of: "        version: v1\n", with: "        version: v1\n        sidecar.istio.io/inject: \"false\"\n")
        XCTAssertNotEqual(labelled, Self.deployment)
        XCTAssertEqual(try injector.injectYAML(labelled), labelled)
    }

    func test_trafficAnnotations_becomeTheInitContainersFlags() throws {
        let annotations = [
            "traffic.sidecar.istio.io/includeInboundPorts: \"8081\"",
            "traffic.sidecar.istio.io/excludeInboundPorts: \"9000\"",
            "traffic.sidecar.istio.io/includeOutboundIPRanges: \"10.0.0.0/8\"",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges: \"10.96.0.1/32\"",
            "traffic.sidecar.istio.io/excludeOutboundPorts: \"5432,6379\"",
        ].map { "        " + $0 + "\n" }.joined()
        let yaml = Self.deployment.replacingOccurrences(of: "    metadata:\n      labels:", with: "    metadata:\n      annotations:\n" + annotations + "      labels:")
        XCTAssertNotEqual(yaml, Self.deployment)
        let spec = podSpec(try objects(injector.injectYAML(yaml))[0])
        let args = try XCTUnwrap(container(spec, "initContainers", "istio-init")?["args"] as? [String])
        func value(_ flag: String) -> String? { args.firstIndex(of: flag).map { args[$0 + 1] } }
        XCTAssertEqual(value("--istio-inbound-ports"), "8081")
        XCTAssertEqual(value("--istio-local-exclude-ports"), "15090,15021,9000")
        XCTAssertEqual(value("--istio-service-cidr"), "10.0.0.0/8")
        XCTAssertEqual(value("--istio-service-exclude-cidr"), "10.96.0.1/32")
        XCTAssertEqual(value("--istio-local-outbound-ports-exclude"), "5432,6379")
        XCTAssertEqual(value("--envoy-port"), "15001")
        XCTAssertEqual(value("--inbound-capture-port"), "15006")
        XCTAssertEqual(value("--proxy-uid"), "1337")
    }

    func test_tproxyInterceptionMode_givesTheProxyNETADMINAsRootWithGroup1337_andTheInitContainerTheMode() throws {
        let yaml = Self.deployment.replacingOccurrences(of: "    metadata:\n      labels:", with: "    metadata:\n      annotations:\n        sidecar.istio.io/interceptionMode: TPROXY\n      labels:")
        XCTAssertNotEqual(yaml, Self.deployment)
        let spec = podSpec(try objects(injector.injectYAML(yaml))[0])
        let args = try XCTUnwrap(container(spec, "initContainers", "istio-init")?["args"] as? [String])
        XCTAssertEqual(args.firstIndex(of: "--istio-inbound-interception-mode").map { args[$0 + 1] }, "TPROXY")
        let proxy = try XCTUnwrap(container(spec, "containers", "istio-proxy"))
        let sc = try XCTUnwrap(proxy["securityContext"] as? [String: Any])
        XCTAssertEqual((sc["capabilities"] as? [String: Any])?["add"] as? [String], ["NET_ADMIN"])
        XCTAssertEqual((sc["capabilities"] as? [String: Any])?["drop"] as? [String], ["ALL"])
        XCTAssertEqual(sc["runAsUser"] as? Int, 0)
        XCTAssertEqual(sc["runAsGroup"] as? Int, 1337)
        let env = try XCTUnwrap(proxy["env"] as? [[String: Any]])
        XCTAssertTrue(env.contains { $0["name"] as? String == "INBOUND_INTERCEPTION_MODE" && $0["value"] as? String == "TPROXY" })
    }

    func test_defaultInitFlags_captureEverything_butTheStatusPorts() throws {
        let spec = podSpec(try objects(injector.injectYAML(Self.deployment))[0])
        let args = try XCTUnwrap(container(spec, "initContainers", "istio-init")?["args"] as? [String])
        func value(_ flag: String) -> String? { args.firstIndex(of: flag).map { args[$0 + 1] } }
        XCTAssertEqual(value("--istio-inbound-ports"), "*")
        XCTAssertEqual(value("--istio-service-cidr"), "*")
        XCTAssertEqual(value("--istio-local-exclude-ports"), "15090,15021")
        XCTAssertNil(value("--istio-local-outbound-ports-exclude"))
    }

    func test_everyWorkloadKind_isInjected_atItsPodTemplate() throws {
        let pod = """
          metadata:
            labels: {app: w}
          spec:
            containers:
            - name: w
              image: example/w
        """
        func indent(_ s: String, _ n: Int) -> String { s.split(separator: "\n").map { String(repeating: " ", count: n) + $0 }.joined(separator: "\n") }
        let docs = [
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n" + pod.split(separator: "\n").dropFirst(2).map { String($0.dropFirst(2)) }.joined(separator: "\n"),
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: s}\nspec:\n  template:\n" + indent(pod, 2),
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec:\n  template:\n" + indent(pod, 2),
            "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: r}\nspec:\n  template:\n" + indent(pod, 2),
            "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\nspec:\n  template:\n" + indent(pod, 2),
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: \"* * * * *\"\n  jobTemplate:\n    spec:\n      template:\n" + indent(pod, 6),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: m}\ndata: {port: \"8080\", enabled: \"true\"}\n",
        ]
        let out = try objects(injector.injectYAML(docs.joined(separator: "\n---\n")))
        XCTAssertEqual(out.count, 7)
        for o in out.dropLast() {
            XCTAssertNotNil(container(podSpec(o), "containers", "istio-proxy"), "\(o["kind"]!)")
            XCTAssertNotNil(container(podSpec(o), "initContainers", "istio-init"), "\(o["kind"]!)")
        }
        let cm = out.last!
        XCTAssertEqual(cm["data"] as? [String: String], ["port": "8080", "enabled": "true"])
    }

    func test_hostNetworkPods_areLeftAlone() throws {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: h}\nspec:\n  hostNetwork: true\n  containers:\n  - {name: h, image: x}\n"
        XCTAssertEqual(try injector.injectYAML(yaml), yaml)
    }

    func test_quotedNumbersAndBooleans_inTheAppsPodSpec_stayStrings() throws {
        let yaml = Self.deployment.replacingOccurrences(of: "        image: example/orders:1\n", with: "        image: example/orders:1\n        env:\n        - {name: PORT, value: \"8080\"}\n        - {name: DEBUG, value: \"yes\"}\n")
        XCTAssertNotEqual(yaml, Self.deployment)
        let spec = podSpec(try objects(injector.injectYAML(yaml))[0])
        let env = (spec["containers"] as! [[String: Any]])[0]["env"] as! [[String: Any]]
        XCTAssertEqual(env[0]["value"] as? String, "8080")
        XCTAssertEqual(env[1]["value"] as? String, "yes")
    }

    func test_aPodFromAReplicaSet_isNamedAfterItsWorkload_withoutTheGeneratedSuffix() throws {
        let pod = try XCTUnwrap(Yams.compose(yaml: "metadata:\n  generateName: details-v1-5f4d7c9b8-\n  labels: {pod-template-hash: 5f4d7c9b8}\n"))
        XCTAssertEqual(SidecarInjector.workloadName(ofPod: pod), "details-v1")
        let named = try XCTUnwrap(Yams.compose(yaml: "metadata: {name: standalone}\n"))
        XCTAssertEqual(SidecarInjector.workloadName(ofPod: named), "standalone")
    }

    func test_documentSplitting_keepsCommentsAndDocumentMarkers_andDropsEmptyDocuments() {
        let docs = SidecarInjector.splitDocuments("---\n# only a comment\n---\na: 1\n---\n\n---\nb: 2\n...\n")
        XCTAssertEqual(docs, ["# only a comment\n", "a: 1\n", "b: 2\n"])
    }

    func test_aDocumentThatIsNotYAML_passesThroughUntouched() throws {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x\n"
        XCTAssertEqual(try injector.injectYAML(text), text)
    }

    func test_aList_fromKubectlGet_hasEachWorkloadItemInjected() throws {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s}\n" +
            "- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n  spec:\n    containers: [{name: a, image: x}]\n"
        let out = try objects(injector.injectYAML(list))[0]
        let items = out["items"] as! [[String: Any]]
        XCTAssertEqual(items[0]["kind"] as? String, "Service")
        XCTAssertNotNil(container(podSpec(items[1]), "containers", "istio-proxy"))
    }
}
