import NIOCore
import MoonletHTTP

/// A local reply (from a filter's `s:respond`, a response filter's edits, or the proxy)
/// is checked whole before a byte of it is written: a reply that would break the
/// client's framing (a 1xx or out-of-range status as the final response, a framing or
/// connection header, more header lines or bytes than the limits allow) is replaced by
/// a clean 500, so the client never reads part of one reply as the next response.
public enum LocalReplyCheck {
    /// Fields the proxy frames itself (ManagedHeaders' framing and hop-by-hop list): a
    /// filter may not set them on a local reply; content-length is dropped and recomputed
    /// instead, see `localHead`.
    public static func isFramingField(_ lowercased: String) -> Bool {
        lowercased != "content-length" && ManagedHeaders.isFramingOrHopByHop(lowercased)
    }

    /// Why `r` cannot be sent as it is, or nil when it can.
    public static func problem(_ r: LocalReply, limits: ProxyLimits) -> String? {
        guard r.status >= 200 && r.status <= 599 else { return "status \(r.status) is not a final status (200-599)" }
        // content-length and content-type come with it.
        guard r.headers.count + 2 <= limits.maxHeaderCount else { return "\(r.headers.count) headers (at most \(limits.maxHeaderCount - 2))" }
        // The lines the proxy writes besides the filter's: the longest status line,
        // content-length, content-type, server, connection (sendLocalReply measures the
        // head it wrote as well).
        var bytes = 48 + 38 + 26 + 17 + 24 + 2
        for h in r.headers {
            guard HeaderValidation.isToken(h.name) else { return "header name \(h.name.debugDescription) is not a token" }
            guard HeaderValidation.isFieldValue(h.value) else { return "header \(h.name) has a control character in its value" }
            let lower = h.name.lowercased()
            if isFramingField(lower) { return "header \(lower) is set by the proxy" }
            bytes += h.name.utf8.count + h.value.utf8.count + 4
        }
        guard bytes <= limits.maxHeadBytes else { return "head of \(bytes) bytes (at most \(limits.maxHeadBytes))" }
        return nil
    }

    /// Why the head a response filter left (on a local reply or an upstream response)
    /// cannot be sent, or nil. A head nothing was added to is sent as received (the
    /// upstream parser took it, removals only shrink it); the lines the proxy writes
    /// itself (date, server, framing) are not counted against the parser's limit. The
    /// values the proxy added before the filters ran (`HTTPHead.markFiltersStart`: the
    /// route's edits, checked at config load, and the metadata exchange headers) are
    /// counted, not checked again; those the filters added are.
    public static func problem(_ head: HTTPHead, limits: ProxyLimits) -> String? {
        guard head.status >= 200 && head.status <= 599 else { return "status \(head.status) is not a final status (200-599)" }
        guard !head.added.isEmpty else { return nil }
        var count = head.added.count
        for f in head.fields where !f.removed { count += 1 }
        guard count <= limits.maxHeaderCount else { return "\(count) headers (at most \(limits.maxHeaderCount))" }
        // The head as received (removed lines included: an upper bound) and what was added.
        let before = min(head.addedBeforeFilters, head.added.count)
        var bytes = head.bytes.readableBytes + head.addedBytesBeforeFilters + 4 * before
        for a in head.added[before...] {
            if isFramingField(a.name) { return "header \(a.name) is set by the proxy" }
            guard HeaderValidation.isFieldValue(a.value) else { return "header \(a.name) has a control character in its value" }
            bytes += a.name.utf8.count + a.value.utf8.count + 4
        }
        guard bytes <= limits.maxHeadBytes else { return "head of \(bytes) bytes (at most \(limits.maxHeadBytes))" }
        return nil
    }

    /// The reply sent instead of an invalid one.
    public static let replacement = LocalReply(status: 500, body: "invalid local reply\n")
}
