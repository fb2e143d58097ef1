import NIOCore
import MoonletHTTP

/// Composes a local reply as the client gets it, without sockets: the one builder the
/// proxy (StreamExecutor.localReply) and the offline filter harness (`moonlet filter
/// test`) share, so a case tested offline gets the reply the proxy sends.
///
/// From `stream.localReply`: the reply is held to LocalReplyCheck (a reply that would
/// break the client's framing becomes a clean 500); a reply to a gRPC request becomes a
/// gRPC error (GRPC.replaceLocalReply: HTTP 200, grpc-status mapped from the status,
/// trailers-only; on HTTP/2 no content-length); its head gets the route's response
/// edits; then the response filters run (`FilterChain.runResponse`), which may edit the
/// head, replace the reply (`respond`) or change its status. A filter that asked for the
/// whole body (`stopAndBuffer`) gets the reply's body once in `onResponseBody` and may
/// replace it. Header retention: when the reply was replaced or its status changed, the
/// head is rebuilt from the final reply and keeps the headers the filters added only if
/// the status stayed the same; otherwise the edited head goes out. The proxy frames the
/// reply (a content-length a filter set is dropped); the final head is held to
/// LocalReplyCheck and to the head size limit.
public enum LocalReplyBuilder {
    /// The head and body to write; sets `s.response`, `s.responseCode` and
    /// `s.responseBodyBytes`. `requestWasHead`: a HEAD request gets no body.
    /// `rejected` is told why a reply was replaced by the 500 (to count and log it).
    public static func build(_ s: ProxyStream, chain: FilterChain, limits: ProxyLimits, requestWasHead: Bool,
                             allocator: ByteBufferAllocator, rejected: (String) -> Void) -> (head: HTTPHead, body: ByteBuffer?) {
        func reject(_ why: String) -> LocalReply {
            rejected(why)
            s.localReply = LocalReplyCheck.replacement
            return LocalReplyCheck.replacement
        }
        guard var reply = s.localReply else { return (localHead(LocalReplyCheck.replacement, allocator: allocator), nil) }
        if let why = LocalReplyCheck.problem(reply, limits: limits) { reply = reject(why) }
        let grpc = s.withRequest { GRPC.isGRPCRequest($0) }
        let h2 = s.protocolName == "HTTP/2"
        if grpc { reply = GRPC.replaceLocalReply(of: s, reply) }
        s.responseCode = reply.status
        var head = localHead(reply, allocator: allocator, grpcOverHTTP2: grpc && h2)
        applyRouteResponseEdits(s, to: &head)
        s.response = head
        var action = chain.runResponse(s)
        // A filter asked for the whole body: the reply's (Envoy's local replies pass
        // through the encoder filters' data callbacks too).
        var newBody: ByteBuffer? = nil
        if action == .stopAndBuffer && chain.wantsResponseBody && s.response != nil {
            let original = ByteBuffer(string: reply.body)
            s.bufferedResponseBody = original
            if chain.runBufferedResponseBody(s) == .respond { action = .respond }
            else if s.bufferedResponseBody != original { newBody = s.bufferedResponseBody }
            s.bufferedResponseBody = nil
        }
        let replaced = action == .respond
        let current = s.localReply ?? reply
        if replaced || current.status != reply.status {
            newBody = nil
            reply = current
            if let why = LocalReplyCheck.problem(reply, limits: limits) { reply = reject(why) }
            if grpc { reply = GRPC.replaceLocalReply(of: s, reply) }
            head = localHead(reply, allocator: allocator, grpcOverHTTP2: grpc && h2)
            if reply.status == current.status, let edited = s.response {
                head.added.append(contentsOf: edited.added.filter { a in !head.added.contains { $0.name == a.name } })
            }
        } else if let edited = s.response {
            head = edited
        }
        // The proxy frames the reply: a content-length a filter set is dropped.
        if head.added.contains(where: { $0.name == "content-length" }) {
            head.added.removeAll { $0.name == "content-length" }
            for i in head.fields.indices where head.fields[i].kind == .contentLength { head.fields[i].removed = false }
        }
        let noBody = requestWasHead || reply.status == 204 || reply.status == 304
        if let nb = newBody, !noBody {
            // The body a filter set: its length.
            for i in head.fields.indices where head.fields[i].kind == .contentLength { head.fields[i].removed = true }
            head.addLowercased("content-length", String(nb.readableBytes))
            head.framing = nb.readableBytes == 0 ? .none : .contentLength(Int64(nb.readableBytes))
        }
        if let why = LocalReplyCheck.problem(head, limits: limits) {
            newBody = nil
            reply = reject(why)
            if grpc { reply = GRPC.replaceLocalReply(of: s, reply) }
            head = localHead(reply, allocator: allocator, grpcOverHTTP2: grpc && h2)
        }
        let size = writtenSize(head)
        if size > limits.maxHeadBytes {
            newBody = nil
            reply = reject("head of \(size) bytes (at most \(limits.maxHeadBytes))")
            if grpc { reply = GRPC.replaceLocalReply(of: s, reply) }
            head = localHead(reply, allocator: allocator, grpcOverHTTP2: grpc && h2)
        }
        let bodyOK = !requestWasHead && reply.status != 204 && reply.status != 304
        s.response = head
        s.responseCode = reply.status
        if let nb = newBody {
            s.responseBodyBytes = Int64(bodyOK ? nb.readableBytes : 0)
            return (head, bodyOK && nb.readableBytes > 0 ? nb : nil)
        }
        s.responseBodyBytes = Int64(bodyOK ? reply.body.utf8.count : 0)
        return (head, bodyOK && !reply.body.isEmpty ? ByteBuffer(string: reply.body) : nil)
    }

    /// The matched route's `headers.response` set/add/remove (Envoy applies them in the
    /// router, before the response filters see the head).
    /// Reads the edits through the stream: taking the RouteDecision as an argument would
    /// copy it (a retain of each of its strings and arrays) on every response.
    @inline(__always)
    public static func applyRouteResponseEdits(_ s: ProxyStream, to head: inout HTTPHead) {
        for n in s.route.responseRemove { head.remove(n) }
        for (n, v) in s.route.responseSet { head.set(n, v) }
        for (n, v) in s.route.responseAdd { head.addLowercased(n, v) }
    }

    /// The head of a local reply that passed LocalReplyCheck (names are tokens, values
    /// have no control byte, no framing field, within the limits): content-length (none on
    /// 204 and 304), content-type for a text body, the filter's headers. Built in place
    /// (HTTPHeadBuilder), not written as bytes and parsed.
    /// `grpcOverHTTP2`: a gRPC trailers-only reply on HTTP/2, written without
    /// content-length (END_STREAM on its HEADERS frame ends it), as Envoy writes it.
    public static func localHead(_ r: LocalReply, allocator: ByteBufferAllocator, grpcOverHTTP2: Bool = false) -> HTTPHead {
        var b = HTTPHeadBuilder(status: r.status, buffer: allocator.buffer(capacity: 128))
        let noBody = r.status == 204 || r.status == 304 || grpcOverHTTP2
        let length = r.body.utf8.count
        if !noBody { b.add("content-length", String(length), kind: .contentLength) }
        if !noBody && !r.headers.contains(where: { $0.name == "content-type" }) && !r.body.isEmpty { b.add("content-type", "text/plain", kind: .other) }
        for h in r.headers where h.name.lowercased() != "content-length" { b.add(h.name, h.value) }
        b.set(framing: noBody || length == 0 ? .none : .contentLength(Int64(length)))
        return b.finish()
    }

    /// The size of `head` as HeadWriter writes it to an HTTP/1.1 client (status line, kept
    /// lines, added lines, the proxy's server and connection lines): HTTP/2 replies are
    /// held to the same head limit.
    public static func writtenSize(_ head: HTTPHead) -> Int {
        var n = 17 + 24 + 2 // "server: moonlet", "connection: keep-alive" (at most), the empty line
        if let first = head.fields.first { n += Int(first.lineStart) } else { n += head.bytes.readableBytes - 2 }
        for f in head.fields where !f.removed { n += Int(f.lineEnd - f.lineStart) }
        for a in head.added { n += a.name.utf8.count + a.value.utf8.count + 4 }
        return n
    }
}
