import MoonletCore

/// The workload metadata Istio's sidecars exchange so that both ends of a call can label
/// their metrics with the peer's workload, app and version (Envoy's
/// `istio.metadata_exchange` filter): the header `x-envoy-peer-metadata` carries a
/// base64 `google.protobuf.Struct` with Istio's node metadata keys (NAME, NAMESPACE,
/// WORKLOAD_NAME, LABELS, CLUSTER_ID, MESH_ID, SERVICE_ACCOUNT, ...), and
/// `x-envoy-peer-metadata-id` the node id. Moonlet uses this form (not the newer baggage
/// one) so it interoperates with Istio's own sidecars.
public struct PeerMetadata: Sendable, Equatable {
    public static let header = "x-envoy-peer-metadata"
    public static let idHeader = "x-envoy-peer-metadata-id"

    /// The pod (or VM) name.
    public var name: String = ""
    public var namespace: String = ""
    /// The workload: Deployment name and the like (Istio's WORKLOAD_NAME).
    public var workloadName: String = ""
    public var serviceAccount: String = ""
    public var clusterID: String = ""
    public var meshID: String = ""
    /// The pod labels Istio sends (app, version, service.istio.io/canonical-name and -revision, ...).
    public var labels: [String: String] = [:]
    public init() {}

    /// The app label, else the canonical service name.
    public var app: String { labels["app"] ?? labels["service.istio.io/canonical-name"] ?? "" }
    public var version: String { labels["version"] ?? labels["service.istio.io/canonical-revision"] ?? "" }
    /// Istio's canonical service: the label, else `app`, else the workload name.
    public var canonicalService: String { labels["service.istio.io/canonical-name"] ?? labels["app"] ?? workloadName }
    /// Istio's canonical revision: the label, else `version`, else "latest".
    public var canonicalRevision: String { labels["service.istio.io/canonical-revision"] ?? labels["version"] ?? "latest" }

    /// The node id Istio sends beside the metadata: `sidecar~IP~NAME.NAMESPACE~NAMESPACE.svc.cluster.local`.
    public func nodeID(ip: String) -> String { "sidecar~\(ip)~\(name).\(namespace)~\(namespace).svc.cluster.local" }

    /// The header value: base64 of the protobuf Struct.
    public func encoded() -> String { Base64.encode(structBytes()) }

    /// The protobuf `google.protobuf.Struct` of the metadata (the header's and the TCP
    /// exchange's payload).
    public func structBytes() -> [UInt8] { ProtoStruct.encode(structFields()) }

    /// The Struct's fields (Istio's node metadata keys).
    public func structFields() -> [(String, ProtoStruct.Value)] {
        var fields: [(String, ProtoStruct.Value)] = []
        func put(_ k: String, _ v: String) { if !v.isEmpty { fields.append((k, .string(v))) } }
        put("NAME", name); put("NAMESPACE", namespace); put("WORKLOAD_NAME", workloadName)
        put("SERVICE_ACCOUNT", serviceAccount); put("CLUSTER_ID", clusterID); put("MESH_ID", meshID)
        if !labels.isEmpty { fields.append(("LABELS", .structure(labels.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) }))) }
        return fields
    }

    /// Reads a header value; nil when it is not base64 of a Struct within the bounds
    /// (16 KB, nesting 8), so a hostile peer cannot make the sidecar do much work.
    public static func decode(_ value: String) -> PeerMetadata? {
        guard value.utf8.count <= 16 << 10, let bytes = Base64.decode(value) else { return nil }
        return decode(structBytes: bytes)
    }

    /// Reads a protobuf Struct of node metadata; nil when malformed (nesting beyond 8).
    public static func decode(structBytes bytes: [UInt8]) -> PeerMetadata? {
        guard let fields = ProtoStruct.decode(bytes) else { return nil }
        return decode(fields: fields)
    }

    /// Reads the fields of a node metadata Struct.
    public static func decode(fields: [(String, ProtoStruct.Value)]) -> PeerMetadata {
        var m = PeerMetadata()
        for (k, v) in fields {
            switch (k, v) {
            case ("NAME", .string(let s)): m.name = s
            case ("NAMESPACE", .string(let s)): m.namespace = s
            case ("WORKLOAD_NAME", .string(let s)): m.workloadName = s
            case ("SERVICE_ACCOUNT", .string(let s)): m.serviceAccount = s
            case ("CLUSTER_ID", .string(let s)): m.clusterID = s
            case ("MESH_ID", .string(let s)): m.meshID = s
            case ("LABELS", .structure(let kv)):
                for (lk, lv) in kv { if case .string(let s) = lv { m.labels[lk] = s } }
            default: break
            }
        }
        return m
    }
}

extension PeerMetadata {
    /// This workload's metadata, as its sidecar sends it.
    public init(name: String, namespace: String, workloadName: String, serviceAccount: String, clusterID: String, labels: [String: String]) {
        self.init()
        self.name = name; self.namespace = namespace; self.workloadName = workloadName
        self.serviceAccount = serviceAccount; self.clusterID = clusterID; self.labels = labels
    }

    /// The workload as metric labels name it (`serial`: see MeshWorkload.serial).
    public func workload(serial: Int) -> MeshWorkload {
        MeshWorkload(workload: workloadName.isEmpty ? name : workloadName, namespace: namespace, labels: labels,
                     cluster: clusterID, serviceAccount: serviceAccount, serial: serial)
    }
}

/// The peers one event loop has decoded, by header value: a peer sidecar sends the same
/// value on every request, so it is decoded once (and a connection's handler keeps the
/// last one, so most requests do not even look here). Bounded: past `capacity` distinct
/// values the cache starts over. Used on its loop only.
public final class PeerMetadataCache {
    var entries: [String: MeshWorkload?] = [:]
    var nextSerial = 1
    public let capacity: Int
    public init(capacity: Int = 512) { self.capacity = capacity }

    /// The workload of metadata decoded elsewhere (the TCP exchange), cached by the bytes
    /// it came in.
    public func workload(_ m: PeerMetadata, key bytes: [UInt8]) -> MeshWorkload {
        let key = "tcp:" + Base64.encode(bytes)
        if let hit = entries[key], let w = hit { return w }
        if entries.count >= capacity { entries.removeAll(keepingCapacity: true) }
        defer { nextSerial += 1 }
        let w = m.workload(serial: nextSerial)
        entries[key] = .some(w)
        return w
    }

    /// The workload a header value names, or nil when the value does not decode.
    public func workload(header value: String) -> MeshWorkload? {
        if let hit = entries[value] { return hit }
        if entries.count >= capacity { entries.removeAll(keepingCapacity: true) }
        let w = PeerMetadata.decode(value).map { m -> MeshWorkload in
            defer { nextSerial += 1 }
            return m.workload(serial: nextSerial)
        }
        entries[value] = .some(w)
        return w
    }
}

/// Just enough protobuf to read and write `google.protobuf.Struct` (fields map of
/// string to Value: null, number, string, bool, struct, list).
public enum ProtoStruct {
    public indirect enum Value: Sendable, Equatable {
        case null
        case number(Double)
        case string(String)
        case bool(Bool)
        case structure([(String, Value)])
        case list([Value])

        public static func == (a: Value, b: Value) -> Bool {
            switch (a, b) {
            case (.null, .null): return true
            case let (.number(x), .number(y)): return x == y
            case let (.string(x), .string(y)): return x == y
            case let (.bool(x), .bool(y)): return x == y
            case let (.structure(x), .structure(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
            case let (.list(x), .list(y)): return x == y
            default: return false
            }
        }
    }

    public static func encode(_ fields: [(String, Value)]) -> [UInt8] {
        var out: [UInt8] = []
        for (k, v) in fields {
            var entry: [UInt8] = []
            bytesField(1, Array(k.utf8), into: &entry)
            bytesField(2, encodeValue(v), into: &entry)
            bytesField(1, entry, into: &out)
        }
        return out
    }

    static func encodeValue(_ v: Value) -> [UInt8] {
        var out: [UInt8] = []
        switch v {
        case .null: out.append(0x08); out.append(0)
        case .number(let d):
            out.append(0x11)
            withUnsafeBytes(of: d.bitPattern.littleEndian) { out.append(contentsOf: $0) }
        case .string(let s): bytesField(3, Array(s.utf8), into: &out)
        case .bool(let b): out.append(0x20); out.append(b ? 1 : 0)
        case .structure(let f): bytesField(5, encode(f), into: &out)
        case .list(let l):
            var lv: [UInt8] = []
            for e in l { bytesField(1, encodeValue(e), into: &lv) }
            bytesField(6, lv, into: &out)
        }
        return out
    }

    static func bytesField(_ n: UInt64, _ b: [UInt8], into out: inout [UInt8]) {
        varint(n << 3 | 2, into: &out)
        varint(UInt64(b.count), into: &out)
        out.append(contentsOf: b)
    }

    static func varint(_ v: UInt64, into out: inout [UInt8]) {
        var v = v
        while v >= 0x80 { out.append(UInt8(v & 0x7F) | 0x80); v >>= 7 }
        out.append(UInt8(v))
    }

    /// Decodes a Struct; nil on malformed input or nesting deeper than `maxDepth`.
    public static func decode(_ b: [UInt8], maxDepth: Int = 8) -> [(String, Value)]? {
        var r = Reader(bytes: b[...])
        return r.structure(depth: maxDepth)
    }

    struct Reader {
        var bytes: ArraySlice<UInt8>

        mutating func varint() -> UInt64? {
            var v: UInt64 = 0, shift: UInt64 = 0
            while let c = bytes.first {
                bytes = bytes.dropFirst()
                v |= UInt64(c & 0x7F) << shift
                if c & 0x80 == 0 { return v }
                shift += 7
                if shift > 63 { return nil }
            }
            return nil
        }

        mutating func lengthDelimited() -> ArraySlice<UInt8>? {
            guard let n = varint(), n <= UInt64(bytes.count) else { return nil }
            let part = bytes.prefix(Int(n))
            bytes = bytes.dropFirst(Int(n))
            return part
        }

        /// Skips a field of an unknown number (wire types 0, 1, 2, 5).
        mutating func skip(_ wire: UInt64) -> Bool {
            switch wire {
            case 0: return varint() != nil
            case 1: guard bytes.count >= 8 else { return false }; bytes = bytes.dropFirst(8); return true
            case 2: return lengthDelimited() != nil
            case 5: guard bytes.count >= 4 else { return false }; bytes = bytes.dropFirst(4); return true
            default: return false
            }
        }

        mutating func structure(depth: Int) -> [(String, Value)]? {
            guard depth > 0 else { return nil }
            var out: [(String, Value)] = []
            while !bytes.isEmpty {
                guard let tag = varint() else { return nil }
                guard tag >> 3 == 1, tag & 7 == 2 else { if skip(tag & 7) { continue } else { return nil } }
                guard let entry = lengthDelimited() else { return nil }
                var e = Reader(bytes: entry)
                var key = "", value = Value.null
                while !e.bytes.isEmpty {
                    guard let t = e.varint() else { return nil }
                    switch (t >> 3, t & 7) {
                    case (1, 2):
                        guard let k = e.lengthDelimited() else { return nil }
                        key = String(decoding: k, as: UTF8.self)
                    case (2, 2):
                        guard let vb = e.lengthDelimited() else { return nil }
                        var vr = Reader(bytes: vb)
                        guard let v = vr.value(depth: depth) else { return nil }
                        value = v
                    default:
                        guard e.skip(t & 7) else { return nil }
                    }
                }
                out.append((key, value))
            }
            return out
        }

        mutating func value(depth: Int) -> Value? {
            var v = Value.null
            while !bytes.isEmpty {
                guard let t = varint() else { return nil }
                switch (t >> 3, t & 7) {
                case (1, 0): guard varint() != nil else { return nil }; v = .null
                case (2, 1):
                    guard bytes.count >= 8 else { return nil }
                    var bits: UInt64 = 0
                    for (i, c) in bytes.prefix(8).enumerated() { bits |= UInt64(c) << UInt64(8 * i) }
                    bytes = bytes.dropFirst(8)
                    v = .number(Double(bitPattern: bits))
                case (3, 2): guard let s = lengthDelimited() else { return nil }; v = .string(String(decoding: s, as: UTF8.self))
                case (4, 0): guard let b = varint() else { return nil }; v = .bool(b != 0)
                case (5, 2):
                    guard let s = lengthDelimited() else { return nil }
                    var r = Reader(bytes: s)
                    guard let f = r.structure(depth: depth - 1) else { return nil }
                    v = .structure(f)
                case (6, 2):
                    guard let s = lengthDelimited(), depth > 1 else { return nil }
                    var r = Reader(bytes: s)
                    var items: [Value] = []
                    while !r.bytes.isEmpty {
                        guard let lt = r.varint() else { return nil }
                        guard lt >> 3 == 1, lt & 7 == 2 else { guard r.skip(lt & 7) else { return nil }; continue }
                        guard let eb = r.lengthDelimited() else { return nil }
                        var er = Reader(bytes: eb)
                        guard let e = er.value(depth: depth - 1) else { return nil }
                        items.append(e)
                    }
                    v = .list(items)
                default: guard skip(t & 7) else { return nil }
                }
            }
            return v
        }
    }
}
