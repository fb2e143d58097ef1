import XCTest
import MoonletCore
@testable import MoonletTelemetry

final class PeerMetadataTests: XCTestCase {
    /// What an Istio 1.5 sidecar (bookinfo details-v1) sent in x-envoy-peer-metadata.
    static let istioDetails = "Ch4KDElOU1RBTkNFX0lQUxIOGgwxNzIuMTYuMC4yMDYK1QEKBkxBQkVMUxLKASrHAQoQCgNhcHASCRoHZGV0YWlscwohChFwb2QtdGVtcGxhdGUtaGFzaBIMGgo3NWQ5NGM0OGY1CiQKGXNlY3VyaXR5LmlzdGlvLmlvL3Rsc01vZGUSBxoFaXN0aW8KLAofc2VydmljZS5pc3Rpby5pby9jYW5vbmljYWwtbmFtZRIJGgdkZXRhaWxzCisKI3NlcnZpY2UuaXN0aW8uaW8vY2Fub25pY2FsLXJldmlzaW9uEgQaAnYxCg8KB3ZlcnNpb24SBBoCdjEKGgoHTUVTSF9JRBIPGg1jbHVzdGVyLmxvY2FsCiUKBE5BTUUSHRobZGV0YWlscy12MS03NWQ5NGM0OGY1LTdibHhtChYKCU5BTUVTUEFDRRIJGgdkZWZhdWx0Ck4KBU9XTkVSEkUaQ2t1YmVybmV0ZXM6Ly9hcGlzL2FwcHMvdjEvbmFtZXNwYWNlcy9kZWZhdWx0L2RlcGxveW1lbnRzL2RldGFpbHMtdjEKJQoPU0VSVklDRV9BQ0NPVU5UEhIaEGJvb2tpbmZvLWRldGFpbHMKHQoNV09SS0xPQURfTkFNRRIMGgpkZXRhaWxzLXYx"

    func test_theMetadataAnIstioSidecarSends_isRead() throws {
        let m = try XCTUnwrap(PeerMetadata.decode(Self.istioDetails))
        XCTAssertEqual(m.workloadName, "details-v1")
        XCTAssertEqual(m.namespace, "default")
        XCTAssertEqual(m.name, "details-v1-75d94c48f5-7blxm")
        XCTAssertEqual(m.serviceAccount, "bookinfo-details")
        XCTAssertEqual(m.meshID, "cluster.local")
        XCTAssertEqual(m.app, "details")
        XCTAssertEqual(m.version, "v1")
        XCTAssertEqual(m.canonicalService, "details")
        XCTAssertEqual(m.canonicalRevision, "v1")
        XCTAssertEqual(m.labels["security.istio.io/tlsMode"], "istio")
    }

    func test_whatMoonletSends_readsBackTheSame_andIstiosNodeIDHasItsForm() throws {
        var m = PeerMetadata()
        m.name = "frontend-7d9f-abc"; m.namespace = "shop"; m.workloadName = "frontend"; m.serviceAccount = "frontend"
        m.clusterID = "Kubernetes"; m.meshID = "cluster.local"
        m.labels = ["app": "frontend", "version": "v2", "service.istio.io/canonical-name": "frontend"]
        XCTAssertEqual(PeerMetadata.decode(m.encoded()), m)
        XCTAssertEqual(m.nodeID(ip: "10.0.0.7"), "sidecar~10.0.0.7~frontend-7d9f-abc.shop~shop.svc.cluster.local")
    }

    func test_garbageAndHostileValues_areRefused_withoutCrashing() {
        XCTAssertNil(PeerMetadata.decode("!!!not base64"))
        XCTAssertNil(PeerMetadata.decode(String(repeating: "A", count: 20 << 10)), "longer than 16 KB")
        XCTAssertNil(PeerMetadata.decode(Base64.encode([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])), "a length past the end")
        // Structs nested 100 deep: refused by the depth bound, not a stack overflow.
        var v = ProtoStruct.Value.string("x")
        for _ in 0..<100 { v = .structure([("k", v)]) }
        XCTAssertNil(PeerMetadata.decode(Base64.encode(ProtoStruct.encode([("LABELS", v)]))))
        // Every truncation of a real value is refused or read; never a trap.
        let bytes = Base64.decode(Self.istioDetails)!
        for n in 0..<bytes.count { _ = ProtoStruct.decode(Array(bytes.prefix(n))) }
    }

    func test_base64_roundTrips_andReadsURLSafeAndUnpaddedForms() {
        for n in 0..<10 {
            let b = (0..<n).map { UInt8(($0 * 37 + 11) & 0xFF) }
            XCTAssertEqual(Base64.decode(Base64.encode(b)), b)
        }
        XCTAssertEqual(Base64.encode(Array("any carnal pleas".utf8)), "YW55IGNhcm5hbCBwbGVhcw==")
        XCTAssertEqual(Base64.decode("YW55IGNhcm5hbCBwbGVhcw").map { String(decoding: $0, as: UTF8.self) }, "any carnal pleas")
        XCTAssertEqual(Base64.decode("-_8"), [0xFB, 0xFF])
    }

    func test_TCPExchangeHeader_isMagicLengthAndAnAnyOfStruct_andParsesBackFromAnyPrefix() {
        let meta = PeerMetadata(name: "orders-1", namespace: "production", workloadName: "orders", serviceAccount: "orders",
                                clusterID: "Kubernetes", labels: ["app": "orders", "version": "v2"])
        let h = TCPMetadataExchange.header(meta, id: "sidecar~10.0.0.7~orders-1.production~production.svc.cluster.local")
        XCTAssertEqual(Array(h.prefix(4)), [0x3D, 0x23, 0x04, 0x67])
        XCTAssertEqual(Int(h[4]) << 24 | Int(h[5]) << 16 | Int(h[6]) << 8 | Int(h[7]), h.count - 8)
        XCTAssertTrue(String(decoding: h, as: UTF8.self).contains("type.googleapis.com/google.protobuf.Struct"))
        // The header then the connection's own bytes: every prefix short of the header waits.
        let stream = h + Array("hello".utf8)
        for n in 0..<h.count {
            XCTAssertEqual(stream.prefix(n).withUnsafeBytes { TCPMetadataExchange.parse($0) }, .needMore, "prefix \(n)")
        }
        guard case .header(let bytes?, let consumed) = stream.withUnsafeBytes({ TCPMetadataExchange.parse($0) }) else { return XCTFail("no header") }
        XCTAssertEqual(consumed, h.count)
        XCTAssertEqual(TCPMetadataExchange.peer(structBytes: bytes), meta)
        // Istio's layout: a Struct of the node Struct under x-envoy-peer-metadata and the
        // node id under x-envoy-peer-metadata-id.
        let outer = ProtoStruct.decode(bytes) ?? []
        XCTAssertEqual(outer.map { $0.0 }, ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"])
        XCTAssertEqual(outer.last?.1, .string("sidecar~10.0.0.7~orders-1.production~production.svc.cluster.local"))
    }

    func test_TCPExchange_readsAnIstioSidecarsStruct_andAFlatStructIsNoPeer() {
        // What an Istio sidecar writes (built here from Istio's keys, as its filter does).
        let node = PeerMetadata.decode(Self.istioDetails)!
        let istio = ProtoStruct.encode([("x-envoy-peer-metadata-id", .string("sidecar~172.16.0.206~details-v1-75d94c48f5-7blxm.default~default.svc.cluster.local")),
                                        ("x-envoy-peer-metadata", .structure(ProtoStruct.decode(Base64.decode(Self.istioDetails)!)!))])
        let m = TCPMetadataExchange.peer(structBytes: istio)
        XCTAssertEqual(m?.workloadName, "details-v1")
        XCTAssertEqual(m?.app, "details")
        XCTAssertEqual(m, node)
        XCTAssertNil(TCPMetadataExchange.peer(structBytes: node.structBytes()), "the node Struct without Istio's wrapping names no peer")
    }

    func test_TCPExchange_withoutTheMagic_isTheConnectionsOwnBytes_andALengthBeyondTheBoundIsTooLarge() {
        XCTAssertEqual(Array("GET / HTTP/1.1".utf8).withUnsafeBytes { TCPMetadataExchange.parse($0) }, .absent)
        XCTAssertEqual(([0x3D, 0x23] as [UInt8]).withUnsafeBytes { TCPMetadataExchange.parse($0) }, .needMore, "a prefix of the magic waits")
        XCTAssertEqual(([0x3D, 0x24] as [UInt8]).withUnsafeBytes { TCPMetadataExchange.parse($0) }, .absent, "a prefix that is not the magic's")
        XCTAssertEqual(([0x3D, 0x23, 0x04, 0x67, 0x7F, 0, 0, 0] as [UInt8]).withUnsafeBytes { TCPMetadataExchange.parse($0) }, .tooLarge, "2 GB announced")
        // A well-framed Any of another type: the header is consumed, no peer is known.
        var any: [UInt8] = [0x0A, 3] + Array("x/y".utf8)
        any += [0x12, 0]
        let h: [UInt8] = [0x3D, 0x23, 0x04, 0x67, 0, 0, 0, UInt8(any.count)] + any
        XCTAssertEqual(h.withUnsafeBytes { TCPMetadataExchange.parse($0) }, .header(structBytes: nil, consumed: h.count))
    }
}
