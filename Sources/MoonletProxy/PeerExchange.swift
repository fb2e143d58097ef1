import MoonletCore
import MoonletHTTP
import MoonletTelemetry
#if canImport(Glibc)
import Glibc
#endif

/// Istio's metadata exchange between sidecars (Envoy's `istio.metadata_exchange`), with
/// Istio's headers `x-envoy-peer-metadata` (base64 protobuf Struct of the workload's
/// metadata) and `x-envoy-peer-metadata-id` (node id):
///
/// - outbound, to a mesh workload over mTLS: the request carries this sidecar's headers
///   (UpstreamDispatch.start); to anything else, none;
/// - inbound: the caller's headers are read over mTLS only, and removed before the app;
///   the response to an mTLS caller carries this sidecar's headers;
/// - outbound response: the answering sidecar's headers are read over mTLS only, and
///   removed before the app.
///
/// Headers an app or a plaintext client sends are always removed (they would be forged).
/// One value per peer sidecar is decoded once: the connection keeps the last one (a byte
/// comparison), the loop's PeerMetadataCache the others.
struct PeerExchange {
    static let header = PeerMetadata.header
    static let idHeader = PeerMetadata.idHeader
    private var lastValue: [UInt8] = []
    private var lastPeer: MeshWorkload?

    /// Removes both headers from `head`; when `read`, returns the workload the metadata
    /// header names (nil when absent or malformed).
    mutating func take(_ head: inout HTTPHead, read: Bool, cache: PeerMetadataCache) -> MeshWorkload? {
        // Found first, removed after: a loop that may write the field array gets its
        // uniqueness check hoisted, which copies a shared array even when nothing is removed.
        var found = -1, id = -1, more = false
        for i in 0..<head.fields.count where !head.fields[i].removed {
            let n = head.fields[i].nameLength
            guard n == 21 || n == 24 else { continue }
            if n == 21 && head.nameEquals(i, lowercased: Self.header) {
                if found < 0 { found = i } else { more = true }
            } else if n == 24 && head.nameEquals(i, lowercased: Self.idHeader) {
                if id < 0 { id = i } else { more = true }
            }
        }
        if found >= 0 { head.fields[found].removed = true }
        if id >= 0 { head.fields[id].removed = true }
        if more {
            // Repeated: every one goes.
            for i in 0..<head.fields.count where !head.fields[i].removed
                && (head.nameEquals(i, lowercased: Self.header) || head.nameEquals(i, lowercased: Self.idHeader)) {
                head.fields[i].removed = true
            }
        }
        guard read, found >= 0 else { return nil }
        let f = head.fields[found]
        let same = head.bytes.withUnsafeReadableBytes { raw -> Bool in
            let v = UnsafeRawBufferPointer(rebasing: raw[Int(f.valueStart)..<Int(f.valueStart + f.valueLength)])
            return v.count == lastValue.count && (v.count == 0 || lastValue.withUnsafeBytes { memcmp($0.baseAddress!, v.baseAddress!, v.count) == 0 })
        }
        if same && lastPeer != nil { return lastPeer }
        let value = head.value(at: found)
        lastPeer = cache.workload(header: value)
        lastValue = Array(value.utf8)
        return lastPeer
    }

    /// Adds this sidecar's headers.
    static func addOwn(_ head: inout HTTPHead, ctx: LoopContext) {
        head.addLowercased(header, ctx.ownPeerMetadata)
        head.addLowercased(idHeader, ctx.ownPeerID)
    }

    /// The upstream response head (before the response filters): reads the answering
    /// sidecar's metadata on the outbound side over mTLS; on the inbound side replaces
    /// the app's with this sidecar's when the caller came over mTLS.
    mutating func responseHead(_ head: inout HTTPHead, _ s: ProxyStream, inbound: Bool, downstreamMTLS: Bool, ctx: LoopContext) {
        if inbound {
            _ = take(&head, read: false, cache: ctx.peerCache)
            if downstreamMTLS { Self.addOwn(&head, ctx: ctx) }
        } else if let w = take(&head, read: s.upstreamMeshMTLS, cache: ctx.peerCache) {
            s.peerWorkload = w
        }
    }
}
