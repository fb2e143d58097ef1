import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
#if canImport(Foundation)
import Foundation
#endif

/// Sends finished spans to a collector off the event loops: Zipkin v2 JSON
/// (`POST /api/v2/spans`) or OTLP/HTTP JSON (`POST /v1/traces`). Loops `submit` spans (a
/// short lock per sampled span); a thread of its own posts them in batches of up to
/// `batchSize`, at least every `flushInterval`. The queue is bounded: past `maxQueued`
/// spans are dropped and counted, so a slow or dead collector never holds requests.
public final class SpanExporter: @unchecked Sendable {
    public enum Format: String, Sendable { case zipkin, otlp }
    public let host: String
    public let port: Int
    public let path: String
    public let format: Format
    public let maxQueued: Int
    public let batchSize: Int
    public let flushInterval: Double
    public let timeoutSeconds: Int
    let cond = ConditionLock(value: 0)
    var queue: [Span] = []
    var stopping = false
    var counters = (sent: UInt64(0), dropped: UInt64(0), failedPosts: UInt64(0))
    var thread: Thread?

    /// `address` is "host:port" (Istio's zipkin.address) or an http:// URL; the path
    /// defaults to the format's (Zipkin /api/v2/spans, OTLP /v1/traces).
    public init(address: String, format: Format, maxQueued: Int = 4096, batchSize: Int = 100, flushInterval: Double = 1, timeoutSeconds: Int = 2) throws {
        var a = address
        if a.hasPrefix("https://") { throw SpanExporterError(message: "tracing collector \(address): https is not supported; use http:// (the sidecar-to-collector hop can go through the mesh's mTLS)") }
        if a.hasPrefix("http://") { a.removeFirst(7) }
        var p = format == .zipkin ? "/api/v2/spans" : "/v1/traces"
        if let slash = a.firstIndex(of: "/") { let given = String(a[slash...]); if given != "/" { p = given }; a = String(a[..<slash]) }
        guard let colon = a.lastIndex(of: ":"), let port = Int(a[a.index(after: colon)...]), (1...65535).contains(port), colon != a.startIndex else {
            throw SpanExporterError(message: "tracing collector \(address): expected host:port")
        }
        host = String(a[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
        self.port = port; path = p; self.format = format
        self.maxQueued = max(1, maxQueued); self.batchSize = max(1, batchSize); self.flushInterval = flushInterval; self.timeoutSeconds = timeoutSeconds
        let t = Thread { [unowned self] in self.run() }
        t.name = "moonlet-span-exporter"
        t.qualityOfService = .utility
        thread = t
        t.start()
    }

    /// Queues a span; false (counted as dropped) when the queue is full.
    @discardableResult
    public func submit(_ s: Span) -> Bool {
        cond.lock()
        guard !stopping, queue.count < maxQueued else { counters.dropped &+= 1; cond.unlock(); return false }
        queue.append(s)
        let full = queue.count >= batchSize
        cond.unlock(withValue: full ? 1 : 0)
        return true
    }

    public var sentSpans: UInt64 { cond.lock(); defer { cond.unlock() }; return counters.sent }
    public var droppedSpans: UInt64 { cond.lock(); defer { cond.unlock() }; return counters.dropped }
    public var failedPosts: UInt64 { cond.lock(); defer { cond.unlock() }; return counters.failedPosts }

    /// Sends what is queued, then stops the thread.
    public func close() {
        cond.lock(); stopping = true; cond.unlock(withValue: 1)
        while !(thread?.isFinished ?? true) { usleep(1000) }
    }

    func run() {
        while true {
            // On timeout the condition lock is not held: take it plainly (the batch period).
            if !cond.lock(whenValue: 1, timeoutSeconds: flushInterval) { cond.lock() }
            let batch = Array(queue.prefix(batchSize))
            queue.removeFirst(batch.count)
            let stop = stopping && queue.isEmpty
            cond.unlock(withValue: queue.count >= batchSize || stopping ? 1 : 0)
            if !batch.isEmpty {
                let body = format == .zipkin ? SpanEncoding.zipkinV2Bytes(batch) : Array(SpanEncoding.otlpJSON(batch).utf8)
                let ok = post(body)
                cond.lock()
                if ok { counters.sent &+= UInt64(batch.count) } else { counters.failedPosts &+= 1; counters.dropped &+= UInt64(batch.count) }
                cond.unlock()
            }
            if stop { return }
        }
    }

    /// One HTTP/1.1 POST on a new connection; true for a 2xx answer.
    func post(_ payload: [UInt8]) -> Bool {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &res) == 0, let ai = res else { return false }
        defer { freeaddrinfo(res) }
        let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype, ai.pointee.ai_protocol)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        guard connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 else { return false }
        let hostHeader = host.utf8.contains(58) ? "[\(host)]:\(port)" : "\(host):\(port)"
        let head = "POST \(path) HTTP/1.1\r\nhost: \(hostHeader)\r\ncontent-type: application/json\r\ncontent-length: \(payload.count)\r\nconnection: close\r\n\r\n"
        for chunk in [Array(head.utf8), payload] {
            var off = 0
            while off < chunk.count {
                let n = chunk.withUnsafeBytes { send(fd, $0.baseAddress!.advanced(by: off), chunk.count - off, Int32(MSG_NOSIGNAL)) }
                if n <= 0 { if n < 0 && errno == EINTR { continue }; return false }
                off += n
            }
        }
        var buf = [UInt8](repeating: 0, count: 64)
        var got = 0
        while got < 12 {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!.advanced(by: got), 64 - got, 0) }
            if n <= 0 { if n < 0 && errno == EINTR { continue }; break }
            got += n
        }
        // "HTTP/1.1 2xx"
        return got >= 12 && buf[9] == UInt8(ascii: "2")
    }
}

public struct SpanExporterError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}
