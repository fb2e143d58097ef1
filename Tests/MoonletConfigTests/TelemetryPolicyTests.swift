import XCTest
@testable import MoonletConfig
import MoonletCore

/// Telemetry resources compiled per workload (TelemetryPolicy): scoping, providers,
/// access log filter expressions, tracing settings and metric overrides.
final class TelemetryPolicyTests: XCTestCase {
    let workload = WorkloadIdentity(namespace: "shop", serviceAccount: "cart", labels: ["app": "cart", "version": "v2"], rootNamespace: "istio-system")

    func resources(_ yaml: String, file: String = "t.yaml") -> (istio: [IstioResource], errors: [ConfigError]) {
        let r = ConfigLoader().loadText(yaml, file: file, baseDir: "/")
        return (r.istio, r.errors)
    }

    func mesh(_ text: String) throws -> MeshConfigFile { try MeshConfigFile.parse(text, file: "mesh.yaml") }

    func telemetry(_ name: String, _ ns: String, _ spec: String) -> String {
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: \(name), namespace: \(ns)}\nspec:\n" + spec + "\n---\n"
    }

    func test_accessLogIsOffByDefault_andOnWithTheMeshConfigsAccessLogFile() throws {
        var p = try TelemetryPolicy.compile([], mesh: MeshConfigFile(), workload: workload).get()
        XCTAssertFalse(p.accessLogging.enabled)
        XCTAssertFalse(p.tracing.enabled)
        p = try TelemetryPolicy.compile([], mesh: try mesh("accessLogFile: /var/log/a.log\naccessLogEncoding: JSON\n"), workload: workload).get()
        XCTAssertTrue(p.accessLogging.enabled)
        XCTAssertEqual(p.accessLogging.outputs.first?.path, "/var/log/a.log")
        XCTAssertEqual(p.accessLogging.outputs.first?.labels?.map(\.0), AccessLogFormatKeys.istioJSON.map(\.0))
    }

    func test_theMostSpecificTelemetryWins_workloadOverNamespaceOverMesh() throws {
        let y = telemetry("mesh", "istio-system", "  accessLogging:\n  - providers: [{name: envoy}]\n  tracing:\n  - randomSamplingPercentage: 10")
            + telemetry("ns", "shop", "  accessLogging:\n  - disabled: true\n  tracing:\n  - customTags: {team: {literal: {value: payments}}}")
            + telemetry("wl", "shop", "  selector: {matchLabels: {app: cart}}\n  accessLogging:\n  - filter: {expression: 'response.code >= 500'}")
            + telemetry("other", "shop", "  selector: {matchLabels: {app: orders}}\n  accessLogging:\n  - disabled: true")
            + telemetry("elsewhere", "billing", "  accessLogging:\n  - disabled: true")
        let (istio, errors) = resources(y)
        XCTAssertEqual(errors, [])
        var p = try TelemetryPolicy.compile(istio, mesh: MeshConfigFile(), workload: workload).get()
        XCTAssertTrue(p.accessLogging.enabled, "the workload's Telemetry wins over the namespace's disabled")
        XCTAssertEqual(p.accessLogging.source, "Telemetry shop/wl")
        XCTAssertEqual(p.accessLogging.filter?.clauses.first?.number, 500)
        XCTAssertEqual(p.accessLogging.outputs.first?.path, "/dev/stdout")
        // Tracing merges field by field: the mesh's rate, the namespace's tags.
        XCTAssertEqual(p.tracing.samplingPercent, 10)
        XCTAssertEqual(p.tracing.customTags, [.init(tag: "team", kind: .literal, value: "payments", defaultValue: nil)])
        // Another workload of the namespace: the namespace's disabled wins over the mesh.
        var orders = workload
        orders.labels = ["app": "orders"]
        p = try TelemetryPolicy.compile(istio, mesh: MeshConfigFile(), workload: orders).get()
        XCTAssertFalse(p.accessLogging.enabled)
    }

    func test_filterExpressions_compileTheSupportedCEL_andRefuseTheRestWithFileLineColumn() throws {
        let f = try AccessLogFilter.parse("response.code >= 400 && request.method == 'GET'")
        XCTAssertEqual(f.clauses, [.init(attribute: "response.code", op: ">=", number: 400, text: nil),
                                   .init(attribute: "request.method", op: "==", number: nil, text: "GET")])
        XCTAssertEqual(try AccessLogFilter.parse("true").clauses, [])
        XCTAssertTrue(try AccessLogFilter.parse("false").never)
        let (_, errors) = resources(telemetry("t", "shop", "  accessLogging:\n  - filter:\n      expression: response.headers['x'] == 'y' || response.code > 1"))
        XCTAssertEqual(errors.count, 1)
        XCTAssertTrue(errors.first?.description.hasPrefix("t.yaml:7:19: Telemetry shop/t: spec.accessLogging[0].filter.expression: filter expression") ?? false, "\(errors)")
        XCTAssertTrue(errors.first?.description.contains("|| is unsupported") ?? false, "\(errors)")
        XCTAssertThrowsError(try AccessLogFilter.parse("response.code >= 4xx"))
        XCTAssertThrowsError(try AccessLogFilter.parse("request.method > 'GET'"))
    }

    func test_providers_resolveToTheMeshConfigsExtensionProviders_andAnUnknownOneIsSkippedWithANote() throws {
        let m = try mesh("""
        extensionProviders:
        - name: file-json
          envoyFileAccessLog: {path: /var/log/j.log, logFormat: {labels: {code: "%RESPONSE_CODE%", a: "%REQ(:AUTHORITY)%"}}}
        - name: zk
          zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411, maxTagLength: 64}
        - name: otel
          opentelemetry: {service: otel-collector.observability, port: 4318}
        """)
        let y = telemetry("mesh", "istio-system", "  accessLogging:\n  - providers: [{name: file-json}, {name: envoy}]\n  tracing:\n  - providers: [{name: zk}, {name: otel}]\n    disableSpanReporting: false")
        let p = try TelemetryPolicy.compile(resources(y).istio, mesh: m, workload: workload).get()
        XCTAssertEqual(p.accessLogging.outputs.map(\.path), ["/var/log/j.log", "/dev/stdout"])
        XCTAssertEqual(p.accessLogging.outputs[0].labels?.map(\.0), ["a", "code"])
        XCTAssertEqual(p.accessLogging.outputs[1].text, AccessLogFormatKeys.istioText)
        XCTAssertEqual(p.tracing.collectors, [.init(provider: "zk", address: "zipkin.istio-system.svc.cluster.local:9411", format: .zipkin, maxTagLength: 64),
                                              .init(provider: "otel", address: "otel-collector.observability:4318", format: .otlp)])
        XCTAssertTrue(p.tracing.enabled)
        let bad = telemetry("mesh", "istio-system", "  tracing:\n  - providers: [{name: jaeger}]")
        // A provider the mesh config does not define is skipped with a note, as istiod skips it.
        let skipped = try TelemetryPolicy.compile(resources(bad, file: "bad.yaml").istio, mesh: m, workload: workload).get()
        XCTAssertEqual(skipped.tracing.collectors, [])
        XCTAssertEqual(skipped.notes, ["bad.yaml:1: Telemetry istio-system/mesh: spec.tracing[0].providers: provider \"jaeger\" is not among the mesh config's extensionProviders: skipped, as Istio skips it"])
    }

    func test_tracing_samplingComesFromTheMeshConfig_thenTelemetry_andEnableTracingFalseTurnsItOff() throws {
        var p = try TelemetryPolicy.compile([], mesh: try mesh("defaultConfig:\n  tracing:\n    sampling: 2.5\n    zipkin: {address: zipkin:9411}\n"), workload: workload).get()
        XCTAssertTrue(p.tracing.enabled)
        XCTAssertEqual(p.tracing.samplingPercent, 2.5)
        XCTAssertEqual(p.tracing.collectors.first?.address, "zipkin:9411")
        let y = telemetry("mesh", "istio-system", "  tracing:\n  - randomSamplingPercentage: 40")
        p = try TelemetryPolicy.compile(resources(y).istio, mesh: try mesh("defaultConfig:\n  tracing:\n    sampling: 2.5\n"), workload: workload).get()
        XCTAssertEqual(p.tracing.samplingPercent, 40)
        p = try TelemetryPolicy.compile([], mesh: try mesh("enableTracing: false\ndefaultConfig:\n  tracing:\n    sampling: 2.5\n"), workload: workload).get()
        XCTAssertFalse(p.tracing.enabled)
        let config = p.tracingPluginConfig(workload: workload, meshID: "cluster.local", appPort: 8080, podIP: "10.0.0.7", podName: "cart-1")
        XCTAssertEqual(config["service"], .string("cart.shop"))
        XCTAssertEqual(config["node_id"], .string("sidecar~10.0.0.7~cart-1.shop~shop.svc.cluster.local"))
    }

    func test_metricOverrides_takeAttributesAndLiterals_andRefuseOtherCELWithTheResourcesPlace() throws {
        let y = telemetry("m", "shop", """
          metrics:
          - providers: [{name: prometheus}]
            overrides:
            - match: {metric: REQUEST_COUNT, mode: CLIENT}
              tagOverrides:
                request_method: {value: request.method}
                team: {value: "'payments'"}
                response_flags: {operation: REMOVE}
            - match: {metric: REQUEST_DURATION}
              disabled: true
        """)
        let p = try TelemetryPolicy.compile(resources(y).istio, mesh: MeshConfigFile(), workload: workload).get()
        XCTAssertEqual(p.metrics.overrides.count, 2)
        XCTAssertEqual(p.metrics.overrides[0].metric, "REQUEST_COUNT")
        XCTAssertEqual(p.metrics.overrides[0].mode, .client)
        XCTAssertEqual(p.metrics.overrides[0].tags.map(\.0), ["request_method", "team", "response_flags"])
        XCTAssertEqual(p.metrics.overrides[0].tags.map(\.1), [.attribute("request.method"), .literal("payments"), .remove])
        XCTAssertEqual(p.metrics.overrides[1].disabled, true)
        let bad = telemetry("m", "shop", "  metrics:\n  - overrides:\n    - tagOverrides:\n        x: {value: \"request.size > 10 ? 'big' : 'small'\"}")
        guard case .failure(let e) = TelemetryPolicy.compile(resources(bad, file: "m.yaml").istio, mesh: MeshConfigFile(), workload: workload) else { return XCTFail() }
        XCTAssertTrue(e.description.hasPrefix("m.yaml:1:1: Telemetry shop/m: spec.metrics[0].overrides[0].tagOverrides.x.value: \"request.size > 10 ? 'big' : 'small'\" is unsupported"), e.description)
    }
}

extension TelemetryPolicyTests {
    /// `moonlet validate` compiles Telemetry as a sidecar does, so the two agree.
    func test_validateCompilesEveryTelemetryAsASidecarWould_errorsAndNotesAlike() throws {
        let good = telemetry("t", "default", "  tracing:\n  - providers: [{name: otlp}]")
        let (noErrors, notes, _) = TelemetryPolicy.validate(resources(good, file: "t.yaml").istio, mesh: MeshConfigFile())
        XCTAssertEqual(noErrors, [])
        XCTAssertTrue(notes.contains { $0.contains("provider \"otlp\" is not among") }, "\(notes)")
        let bad = telemetry("t", "default", "  accessLogging:\n  - filter: {expression: \"request.size > 3\"}")
        let (errors, _, _) = TelemetryPolicy.validate(resources(bad, file: "b.yaml").istio, mesh: MeshConfigFile())
        XCTAssertEqual(errors.count, 1)
        XCTAssertTrue(errors.first?.description.contains("b.yaml:1:1: Telemetry default/t: spec.accessLogging[0].filter.expression") == true, "\(errors)")
        // The outputs a sidecar would open come back, for their formats to be compiled.
        let json = try mesh("accessLogFile: /dev/stdout\naccessLogEncoding: JSON\n")
        XCTAssertEqual(TelemetryPolicy.validate([], mesh: json).outputs.map(\.path), ["/dev/stdout"])
    }
}

extension TelemetryPolicyTests {
    /// Istio's mergeMetrics: overrides of every level apply in order, mesh first.
    func test_metricOverridesOfEveryLevelApplyInOrder_andALaterOverrideLiftsAMeshWideDisable() throws {
        let mesh = telemetry("mesh", "istio-system", """
          metrics:
          - overrides:
            - match: {metric: ALL_METRICS}
              disabled: true
        """)
        let ns = telemetry("ns", "shop", """
          metrics:
          - overrides:
            - match: {metric: REQUEST_COUNT}
              tagOverrides: {team: {value: "'payments'"}}
        """)
        let p = try TelemetryPolicy.compile(resources(mesh + "\n---\n" + ns).istio, mesh: MeshConfigFile(), workload: workload).get()
        XCTAssertEqual(p.metrics.overrides.map(\.metric), ["REQUEST_COUNT"], "the mesh-wide disable is lifted by the namespace's override, as in Istio")
        XCTAssertEqual(p.metrics.source, "Telemetry istio-system/mesh, Telemetry shop/ns")
        let onlyMesh = try TelemetryPolicy.compile(resources(mesh).istio, mesh: MeshConfigFile(), workload: workload).get()
        XCTAssertEqual(onlyMesh.metrics.overrides.first?.disabled, true)
        XCTAssertTrue(onlyMesh.notes.contains { $0.contains("istio_tcp_") }, "\(onlyMesh.notes)")
        let wl = telemetry("wl", "shop", """
          selector: {matchLabels: {app: cart}}
          metrics:
          - overrides:
            - match: {metric: REQUEST_COUNT}
              tagOverrides: {team: {operation: REMOVE}}
        """)
        let three = try TelemetryPolicy.compile(resources([mesh, ns, wl].joined(separator: "\n---\n")).istio, mesh: MeshConfigFile(), workload: workload).get()
        XCTAssertEqual(three.metrics.overrides.flatMap { $0.tags.map(\.1) }, [.literal("payments"), .remove], "namespace then workload, in order")
    }
}
