/// Istio's TCP metadata exchange (istio/proxy's `envoy.tcp.metadata_exchange` filter):
/// on an mTLS connection whose ALPN is `istio-peer-exchange`, each side first writes a
/// header: the magic 0x3D230467 and a length (both 32-bit big-endian), then that many
/// bytes of a protobuf `google.protobuf.Any` of a `google.protobuf.Struct` with two
/// fields, as Istio writes it: `x-envoy-peer-metadata`, the node metadata Struct (the
/// keys of the HTTP header of that name: NAME, NAMESPACE, WORKLOAD_NAME, LABELS, ...),
/// and `x-envoy-peer-metadata-id`, the node id. The connection's own bytes follow. A side
/// that reads no magic passes what it read on unchanged and knows no peer (as Istio's
/// filter does).
public enum TCPMetadataExchange {
    /// The ALPN value that turns the exchange on.
    public static let alpn = "istio-peer-exchange"
    public static let magic: UInt32 = 0x3D23_0467
    /// Bytes of the header after magic and length Moonlet reads (a hostile peer cannot
    /// make the sidecar buffer more; Istio's own headers are one or two KB). A longer one
    /// ends the connection (`.tooLarge`): its bytes are no stream data to pass on.
    public static let maxPayload = 64 << 10
    static let typeURL = "type.googleapis.com/google.protobuf.Struct"

    /// The header this side writes: magic, length, Any{type_url, value: Struct{
    /// x-envoy-peer-metadata: the node Struct, x-envoy-peer-metadata-id: `id`}}.
    public static func header(_ meta: PeerMetadata, id: String) -> [UInt8] {
        let outer = ProtoStruct.encode([(PeerMetadata.header, .structure(meta.structFields())), (PeerMetadata.idHeader, .string(id))])
        var any: [UInt8] = []
        ProtoStruct.bytesField(1, Array(typeURL.utf8), into: &any)
        ProtoStruct.bytesField(2, outer, into: &any)
        var out: [UInt8] = []
        out.reserveCapacity(8 + any.count)
        for v in [magic, UInt32(any.count)] { withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) } }
        out.append(contentsOf: any)
        return out
    }

    public enum Parse: Equatable {
        /// Fewer bytes than the header needs so far.
        case needMore
        /// No exchange header (another magic): the bytes are the connection's own.
        case absent
        /// The magic, then a length above `maxPayload`.
        case tooLarge
        /// The header took `consumed` bytes; `structBytes` is the exchanged Struct (read
        /// with `peer(structBytes:)`), nil when the Any held something else.
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
        guard n <= maxPayload else { return .tooLarge }
        guard bytes.count >= 8 + n else { return .needMore }
        return .header(structBytes: structOfAny(Array(bytes[8..<(8 + n)])), consumed: 8 + n)
    }

    /// The peer's node metadata in an exchanged Struct (its `x-envoy-peer-metadata`
    /// field); nil when malformed or absent.
    public static func peer(structBytes: [UInt8]) -> PeerMetadata? {
        guard let fields = ProtoStruct.decode(structBytes) else { return nil }
        for (k, v) in fields where k == PeerMetadata.header {
            if case .structure(let node) = v { return PeerMetadata.decode(fields: node) }
        }
        return nil
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
