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
        XCTAssertEqual(m.notApplied, ["accessLogFile", "meshMTLS.ecdhCurves"])
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
}
