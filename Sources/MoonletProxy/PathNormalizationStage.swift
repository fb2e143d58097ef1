import NIOCore
import MoonletCore
import MoonletHTTP

/// Istio's path normalization (mesh config `pathNormalization.normalization`, BASE by
/// default), applied natively to every request before any filter runs: routing,
/// authorization, Lua filters, logs and the upstream all see the normalized path.
extension DownstreamHandler {

    /// Normalizes the request target of `head` in place for the snapshot's mode. Returns
    /// the target as received when it changed (nil when it did not), or a 400 for a path
    /// that cannot be normalized (`%00`). The common case is one scan, no allocation.
    func normalizePath(_ head: inout HTTPHead, mode: PathNormalization) -> Result<String?, HTTPParseError> {
        guard head.isRequest, head.targetForm == .origin || head.targetOverride != nil else { return .success(nil) }
        let result: PathNormalizationResult
        if let o = head.targetOverride {
            result = mode.normalize(o)
        } else {
            // targetRange is in buffer indices; the readable bytes start at readerIndex.
            let base = head.bytes.readerIndex
            let r = (head.targetRange.lowerBound - base)..<(head.targetRange.upperBound - base)
            result = head.bytes.withUnsafeReadableBytes { raw in
                mode.normalize(UnsafeRawBufferPointer(rebasing: raw[r]))
            }
        }
        switch result {
        case .unchanged: return .success(nil)
        case .rejected: return .failure(HTTPParseError(400, "the request path cannot be normalized (%00)"))
        case .normalized(let bytes):
            let original = head.target
            head.targetOverride = String(decoding: bytes, as: UTF8.self)
            return .success(original)
        }
    }
}
