/// Istio's TCP metadata exchange (istio/proxy's `envoy.tcp.metadata_exchange` filter):
/// on an mTLS connection whose ALPN is `istio-peer-exchange`, each side first writes a
/// header: the magic 0x3D230467 and a length (both 32-bit big-endian), then that many
/// bytes of a protobuf `google.protobuf.Any` holding its node metadata Struct (the same
/// keys as the `x-envoy-peer-metadata` header: NAME, NAMESPACE, WORKLOAD_NAME, LABELS,
/// ...). The connection's own bytes follow. A side that reads no magic passes what it
/// read on unchanged and knows no peer (as Istio's filter does).
public enum TCPMetadataExchange {
    /// The ALPN value that turns the exchange on.
    public static let alpn = "istio-peer-exchange"
    public static let magic: UInt32 = 0x3D23_0467
    /// Bytes of the header after magic and length Moonlet accepts (a hostile peer cannot
    /// make the sidecar buffer more; Istio's own headers are a few hundred bytes).
    public static let maxPayload = 16 << 10
    static let typeURL = "type.googleapis.com/google.protobuf.Struct"

    /// The header this side writes: magic, length, Any{type_url, value: the Struct}.
    public static func header(_ meta: PeerMetadata) -> [UInt8] {
        var any: [UInt8] = []
        ProtoStruct.bytesField(1, Array(typeURL.utf8), into: &any)
        ProtoStruct.bytesField(2, meta.structBytes(), into: &any)
        var out: [UInt8] = []
        out.reserveCapacity(8 + any.count)
        for v in [magic, UInt32(any.count)] { withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) } }
        out.append(contentsOf: any)
        return out
    }

    public enum Parse: Equatable {
        /// Fewer bytes than the header needs so far.
        case needMore
        /// No exchange header (wrong magic or an oversized length): the bytes are the
        /// connection's own.
        case absent
        /// The header took `consumed` bytes; `structBytes` is the node metadata Struct
        /// (PeerMetadata.decode(structBytes:)), nil when the Any held something else.
        case header(structBytes: [UInt8]?, consumed: Int)
    }

    /// Reads the header at the start of `bytes` (what has arrived so far).
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> Parse {
        guard bytes.count >= 4 else {
            // A prefix of the magic may still become one.
            var m = magic.bigEndian
            return withUnsafeBytes(of: &m) { Array($0.prefix(bytes.count)) == Array(bytes) } ? .needMore : .absent
        }
        let got = UInt32(bytes[0]) << 24 | UInt32(bytes[1]) << 16 | UInt32(bytes[2]) << 8 | UInt32(bytes[3])
        guard got == magic else { return .absent }
        guard bytes.count >= 8 else { return .needMore }
        let n = Int(UInt32(bytes[4]) << 24 | UInt32(bytes[5]) << 16 | UInt32(bytes[6]) << 8 | UInt32(bytes[7]))
        guard n <= maxPayload else { return .absent }
        guard bytes.count >= 8 + n else { return .needMore }
        return .header(structBytes: structOfAny(Array(bytes[8..<(8 + n)])), consumed: 8 + n)
    }

    /// The Struct's bytes inside an Any of Struct's type URL; nil otherwise.
    static func structOfAny(_ b: [UInt8]) -> [UInt8]? {
        var r = ProtoStruct.Reader(bytes: b[...])
        var url: ArraySlice<UInt8>?, value: ArraySlice<UInt8>?
        while !r.bytes.isEmpty {
            guard let tag = r.varint() else { return nil }
            switch tag {
            case 0x0A: url = r.lengthDelimited(); if url == nil { return nil }
            case 0x12: value = r.lengthDelimited(); if value == nil { return nil }
            default: guard r.skip(tag & 7) else { return nil }
            }
        }
        guard let url, String(decoding: url, as: UTF8.self) == typeURL, let value else { return nil }
        return Array(value)
    }
}
