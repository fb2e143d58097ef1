import XCTest
import MoonletCore
import MoonletHTTP
@testable import MoonletConfig

/// `moonlet run --mesh-config`: Istio's MeshConfig keys Moonlet applies, the rest noted.
final class MeshConfigTests: XCTestCase {
    func test_meshConfig_readsTrustDomainAliasesAndMeshMTLS_andListsWhatItDoesNotApply() throws {
        let m = try MeshConfigFile.parse("""
        trustDomain: shop.example
        trustDomainAliases: [old.example, partner.local]
        accessLogFile: /dev/stdout
        meshMTLS:
          minProtocolVersion: TLSV1_3
          cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256]
          ecdhCurves: [P-256]
        """, file: "mesh.yaml")
        XCTAssertEqual(m.tls.trustDomain, "shop.example")
        XCTAssertEqual(m.tls.trustDomainAliases, ["old.example", "partner.local"])
        XCTAssertEqual(m.tls.minProtocolVersion, .tls13)
        XCTAssertEqual(m.tls.cipherSuites, ["ECDHE-ECDSA-AES128-GCM-SHA256"])
        XCTAssertEqual(m.notApplied, ["meshMTLS.ecdhCurves"])
        // Defaults: Istio's (TLS 1.2, ECDHE with AES-GCM or ChaCha20), no aliases.
        let d = try MeshConfigFile.parse("enableTracing: true\n", file: "m.yaml")
        XCTAssertEqual(d.tls, MeshTLSSettings())
        XCTAssertFalse(MeshTLSSettings.defaultCipherSuites.contains { $0.hasSuffix("-SHA") })
    }

    func test_meshConfig_inTheIstioConfigMap_isRead() throws {
        let m = try MeshConfigFile.parse("""
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: istio, namespace: istio-system}
        data:
          mesh: |-
            trustDomain: corp.example
            trustDomainAliases: [cluster.local]
        """, file: "cm.yaml")
        XCTAssertEqual(m.tls.trustDomain, "corp.example")
        XCTAssertEqual(m.tls.trustDomainAliases, ["cluster.local"])
    }

    func test_meshConfig_badValuesAreErrorsWithFileLineAndColumn() {
        XCTAssertThrowsError(try MeshConfigFile.parse("""
        trustDomain: "a/b"
        meshMTLS:
          minProtocolVersion: TLSV1_1
          cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256, RC4-MD5]
        """, file: "mesh.yaml")) { e in
            let text = "\(e)"
            XCTAssertTrue(text.contains("mesh.yaml:1:14: trustDomain: not a trust domain"), text)
            XCTAssertTrue(text.contains("mesh.yaml:3:23: meshMTLS.minProtocolVersion: TLSV1_1 is not allowed"), text)
            XCTAssertTrue(text.contains("mesh.yaml:4:49: meshMTLS.cipherSuites[1]: unknown cipher suite \"RC4-MD5\""), text)
        }
    }

    func test_meshConfig_caCertificates_namesRootsForTrustDomains_andNotesWhatIsNotApplied() throws {
        let m = try MeshConfigFile.parse("""
        trustDomainAliases: [partner.local]
        caCertificates:
        - pem: |
            -----BEGIN CERTIFICATE-----
            MIIB
            -----END CERTIFICATE-----
          trustDomains: [partner.local]
        - spiffeBundleUrl: https://bundle.example/partner
        - certSigners: [clusterissuers.cert-manager.io/foo]
          pem: "-----BEGIN CERTIFICATE-----\\nMIIC\\n-----END CERTIFICATE-----\\n"
        """, file: "mesh.yaml")
        XCTAssertEqual(m.tls.caCertificates.count, 2)
        XCTAssertEqual(m.tls.caCertificates[0].trustDomains, ["partner.local"])
        XCTAssertTrue(m.tls.caCertificates[0].pem.hasPrefix("-----BEGIN CERTIFICATE-----\nMIIB"))
        XCTAssertEqual(m.tls.caCertificates[0].source, "mesh.yaml: caCertificates[0].pem")
        XCTAssertEqual(m.tls.caCertificates[1].trustDomains, [])
        XCTAssertEqual(m.notApplied, ["caCertificates[1].spiffeBundleUrl", "caCertificates[2].certSigners"])
        XCTAssertThrowsError(try MeshConfigFile.parse("caCertificates:\n- pem: hello\n  trustDomains: [a b]\n", file: "mesh.yaml")) { e in
            XCTAssertTrue("\(e)".contains("mesh.yaml:2:8: caCertificates[0].pem: expected PEM certificates"), "\(e)")
            XCTAssertTrue("\(e)".contains("caCertificates[0].trustDomains[0]: not a trust domain"), "\(e)")
        }
    }

    func test_meshConfig_pathNormalization_selectsTheMode_defaultsToBase_andRefusesAnUnknownModeWithFileAndLine() throws {
        XCTAssertEqual(try MeshConfigFile.parse("enableTracing: true\n", file: "m.yaml").pathNormalization, .base)
        for (name, mode) in [("NONE", PathNormalization.none), ("BASE", .base), ("MERGE_SLASHES", .mergeSlashes),
                             ("DECODE_AND_MERGE_SLASHES", .decodeAndMergeSlashes), ("DEFAULT", .base)] {
            let m = try MeshConfigFile.parse("pathNormalization:\n  normalization: \(name)\n", file: "m.yaml")
            XCTAssertEqual(m.pathNormalization, mode, name)
            // Checked, and said at start as not applied until requests are normalized.
            XCTAssertEqual(m.notApplied, ["pathNormalization.normalization (checked; requests are not normalized yet)"], name)
        }
        XCTAssertThrowsError(try MeshConfigFile.parse("trustDomain: a.example\npathNormalization:\n  normalization: MERGE\n", file: "mesh.yaml")) { e in
            XCTAssertTrue("\(e)".contains("mesh.yaml:3:18: pathNormalization.normalization: unknown mode \"MERGE\""), "\(e)")
        }
    }

    // MARK: extensionProviders and the keys parsed but not applied yet

    func test_extensionProviders_ofEveryKindIstioDocuments_areParsedIntoTheTypedModel_theTelemetryOnesNotedAsNotAppliedYet() throws {
        let m = try MeshConfigFile.parse("""
        extensionProviders:
        - name: ext-authz
          envoyExtAuthzHttp:
            service: ext-authz.foo.svc.cluster.local
            port: 8000
            timeout: 0.5s
            pathPrefix: /check
            failOpen: true
            statusOnError: "503"
            includeRequestHeadersInCheck: [x-ext-authz]
            headersToUpstreamOnAllow: [x-user]
            headersToDownstreamOnDeny: [x-reason]
            includeAdditionalHeadersInCheck: {x-from: moonlet}
        - name: log
          envoyFileAccessLog:
            path: /dev/stdout
            logFormat:
              labels: {method: "%REQ(:METHOD)%"}
        - name: text-log
          envoyFileAccessLog:
            path: /var/log/a.log
            logFormat: {text: "%START_TIME% %RESPONSE_CODE%\\n"}
        - name: zipkin
          zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411, maxTagLength: 256}
        - name: otel
          opentelemetry: {service: otel.observability.svc.cluster.local, port: 4317}
        """, file: "mesh.yaml")
        XCTAssertEqual(m.extensionProviders.map(\.name), ["ext-authz", "log", "text-log", "zipkin", "otel"])
        guard case .envoyExtAuthzHttp(let a) = m.extensionProviders[0].kind else { return XCTFail("\(m.extensionProviders[0])") }
        XCTAssertEqual(a.service, "ext-authz.foo.svc.cluster.local")
        XCTAssertEqual(a.port, 8000)
        XCTAssertEqual(a.timeoutMs, 500)
        XCTAssertEqual(a.pathPrefix, "/check")
        XCTAssertTrue(a.failOpen)
        XCTAssertEqual(a.statusOnError, 503)
        XCTAssertEqual(a.includeRequestHeadersInCheck, ["x-ext-authz"])
        XCTAssertEqual(a.headersToUpstreamOnAllow, ["x-user"])
        XCTAssertEqual(a.headersToDownstreamOnDeny, ["x-reason"])
        XCTAssertEqual(a.includeAdditionalHeadersInCheck, ["x-from": "moonlet"])
        guard case .envoyFileAccessLog(let l) = m.extensionProviders[1].kind else { return XCTFail() }
        XCTAssertEqual(l.path, "/dev/stdout")
        XCTAssertEqual(l.labels, ["method": "%REQ(:METHOD)%"])
        XCTAssertNil(l.text)
        guard case .envoyFileAccessLog(let t) = m.extensionProviders[2].kind else { return XCTFail() }
        XCTAssertEqual(t.text, "%START_TIME% %RESPONSE_CODE%\n")
        guard case .zipkin(let z) = m.extensionProviders[3].kind else { return XCTFail() }
        XCTAssertEqual([z.service, "\(z.port)", "\(z.maxTagLength ?? -1)"], ["zipkin.istio-system.svc.cluster.local", "9411", "256"])
        guard case .opentelemetry(let o) = m.extensionProviders[4].kind else { return XCTFail() }
        XCTAssertEqual(o.port, 4317)
        XCTAssertEqual(m.notApplied, [
        ])
    }

    func test_extAuthzHttpIsApplied_withoutANote_whileGrpcAndTheRequestBodyAreNotedAsNotSupported() throws {
        let m = try MeshConfigFile.parse("""
        extensionProviders:
        - name: http
          envoyExtAuthzHttp:
            service: a.foo.svc.cluster.local
            port: 8000
            headersToDownstreamOnAllow: [x-trace]
            includeRequestBodyInCheck: {maxRequestBytes: 100}
        - name: grpc
          envoyExtAuthzGrpc: {service: b.foo.svc.cluster.local, port: 9000}
        """, file: "mesh.yaml")
        guard case .envoyExtAuthzHttp(let a) = m.extensionProviders[0].kind else { return XCTFail() }
        XCTAssertEqual(a.headersToDownstreamOnAllow, ["x-trace"])
        XCTAssertTrue(a.includeRequestBodyInCheck)
        guard case .envoyExtAuthzGrpc(let service, let port) = m.extensionProviders[1].kind else { return XCTFail() }
        XCTAssertEqual("\(service):\(port)", "b.foo.svc.cluster.local:9000")
        XCTAssertEqual(m.notApplied, [
            "extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck (not supported: the check request is sent without the request body)",
            "extensionProviders[1] (envoyExtAuthzGrpc \"grpc\": not supported; an AuthorizationPolicy CUSTOM naming it denies every request of the workloads it selects)",
        ])
    }

    func test_invalidExtensionProviders_areRefused_eachWithFileLineAndField() {
        let text = """
        extensionProviders:
        - name: ext-authz
          envoyExtAuthzHttp:
            port: 99999
            timeout: soon
            pathPrefix: check
            statusOnError: "42"
            failOpen: maybe
        - name: ext-authz
          zipkin: {service: z, port: 9411}
        - envoyFileAccessLog: {path: /dev/stdout, logFormat: {text: a, labels: {a: b}}}
        - name: two
          zipkin: {service: z, port: 9411}
          opentelemetry: {service: o, port: 4317}
        """
        XCTAssertThrowsError(try MeshConfigFile.parse(text, file: "mesh.yaml")) { e in
            let d = "\(e)"
            for expected in [
                "mesh.yaml:4:5: extensionProviders[0].envoyExtAuthzHttp.service: missing",
                "mesh.yaml:4:11: extensionProviders[0].envoyExtAuthzHttp.port: expected a port number (1 to 65535)",
                "mesh.yaml:5:14: extensionProviders[0].envoyExtAuthzHttp.timeout: expected a duration such as 10s, 0.5s or 250ms",
                "mesh.yaml:6:17: extensionProviders[0].envoyExtAuthzHttp.pathPrefix: expected a path starting with /",
                "mesh.yaml:7:20: extensionProviders[0].envoyExtAuthzHttp.statusOnError: expected an HTTP status (200 to 599)",
                "mesh.yaml:8:15: extensionProviders[0].envoyExtAuthzHttp.failOpen: expected true or false",
                "mesh.yaml:9:9: extensionProviders[1].name: duplicate provider name \"ext-authz\"",
                "mesh.yaml:11:3: extensionProviders[2].name: missing",
                "extensionProviders[2].envoyFileAccessLog.logFormat: text and labels are exclusive",
                "extensionProviders[3]: more than one provider kind (zipkin, opentelemetry)",
            ] { XCTAssertTrue(d.contains(expected), "\(expected)\n\(d)") }
        }
    }

    func test_telemetryAndTrafficKeys_areCheckedAndNoted_andEveryOtherKeyIsNamed() throws {
        let m = try MeshConfigFile.parse("""
        accessLogFile: /dev/stdout
        accessLogEncoding: JSON
        accessLogFormat: "%START_TIME%"
        enableTracing: true
        defaultConfig:
          discoveryAddress: istiod.istio-system.svc:15012
          tracing:
            sampling: 12.5
            zipkin: {address: zipkin.istio-system:9411}
        outboundTrafficPolicy: {mode: REGISTRY_ONLY}
        enableAutoMtls: true
        """, file: "mesh.yaml")
        XCTAssertEqual(m.telemetry.accessLogFile, "/dev/stdout")
        XCTAssertEqual(m.telemetry.accessLogEncoding, .json)
        XCTAssertEqual(m.telemetry.accessLogFormat, "%START_TIME%")
        XCTAssertEqual(m.telemetry.enableTracing, true)
        XCTAssertEqual(m.telemetry.tracingSampling, 12.5)
        XCTAssertEqual(m.telemetry.zipkinAddress, "zipkin.istio-system:9411")
        XCTAssertEqual(m.telemetry.outboundTrafficPolicy, .registryOnly)
        XCTAssertEqual(m.notApplied, [
            "defaultConfig.discoveryAddress", "enableAutoMtls",
        ])
        XCTAssertThrowsError(try MeshConfigFile.parse("""
        accessLogEncoding: XML
        defaultConfig:
          tracing: {sampling: 150, zipkin: {address: nowhere}}
        outboundTrafficPolicy: {mode: DENY}
        enableTracing: yes please
        """, file: "m.yaml")) { e in
            let d = "\(e)"
            for expected in ["m.yaml:1:20: accessLogEncoding: expected TEXT or JSON", "m.yaml:3:23: defaultConfig.tracing.sampling: expected a percentage (0 to 100)",
                             "defaultConfig.tracing.zipkin.address: expected host:port", "outboundTrafficPolicy.mode: expected ALLOW_ANY or REGISTRY_ONLY",
                             "m.yaml:5:16: enableTracing: expected true or false"] {
                XCTAssertTrue(d.contains(expected), "\(expected)\n\(d)")
            }
        }
    }
}
