import XCTest
@testable import MoonletTelemetry

/// A one-thread HTTP collector on 127.0.0.1 that records request bodies and answers 202.
final class TestCollector: @unchecked Sendable {
    let fd: Int32
    let port: Int
    let lock = NSLock()
    var requests: [(head: String, body: String)] = []
    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        listen(fd, 16)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        self.fd = fd
        port = Int(UInt16(bigEndian: addr.sin_port))
        Thread { [self] in self.serve(); self.served.signal() }.start()
    }
    /// Signalled when `serve` returned: `stop` closes the socket only then, so a serving
    /// thread never accepts on a later collector's socket that reused the number.
    let served = DispatchSemaphore(value: 0)
    func serve() {
        while true {
            let c = accept(fd, nil, nil)
            if c < 0 { return }
            var data = [UInt8]()
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = recv(c, &buf, buf.count, 0)
                if n <= 0 { break }
                data += buf[0..<n]
                let text = String(decoding: data, as: UTF8.self)
                if let r = text.range(of: "\r\n\r\n") {
                    let head = String(text[..<r.lowerBound])
                    let len = head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }.flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
                    let body = String(text[r.upperBound...])
                    if body.utf8.count >= len {
                        lock.lock(); requests.append((head, body)); lock.unlock()
                        let ok = Array("HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n".utf8)
                        _ = send(c, ok, ok.count, 0)
                        break
                    }
                }
            }
            close(c)
        }
    }
    func stop() {
        // accept on a shut-down listening socket fails at once, blocked or not yet called.
        shutdown(fd, Int32(SHUT_RDWR))
        served.wait()
        close(fd)
    }
    var bodies: [String] { lock.lock(); defer { lock.unlock() }; return requests.map(\.body) }
}

final class SpanExporterTests: XCTestCase {
    func span(_ i: UInt64) -> Span {
        Span(traceIDHigh: 1, traceIDLow: i, id: i, parentID: nil, name: "order-service:8080/*", kind: .client,
             timestampMicros: 1_000_000 + i, durationMicros: 10, localService: "frontend.default")
    }

    func test_spansArePostedToAZipkinCollectorInBatches_asV2JSON() throws {
        let collector = try TestCollector()
        defer { collector.stop() }
        let ex = try SpanExporter(address: "127.0.0.1:\(collector.port)", format: .zipkin, batchSize: 10, flushInterval: 0.05)
        for i in 1...25 { ex.submit(span(UInt64(i))) }
        ex.close()
        let spans = try collector.bodies.flatMap { try XCTUnwrap(try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [[String: Any]]) }
        XCTAssertEqual(spans.count, 25)
        XCTAssertEqual(Set(spans.compactMap { $0["id"] as? String }).count, 25)
        XCTAssertEqual(ex.sentSpans, 25)
        XCTAssertTrue(collector.requests.allSatisfy { $0.head.hasPrefix("POST /api/v2/spans HTTP/1.1") })
    }

    func test_OTLPGoesToV1Traces() throws {
        let collector = try TestCollector()
        defer { collector.stop() }
        let ex = try SpanExporter(address: "http://127.0.0.1:\(collector.port)", format: .otlp, flushInterval: 0.05)
        ex.submit(span(1))
        ex.close()
        XCTAssertTrue(collector.requests.first?.head.hasPrefix("POST /v1/traces HTTP/1.1") ?? false)
        XCTAssertTrue(collector.bodies.first?.contains("\"resourceSpans\"") ?? false)
    }

    func test_aDeadCollector_dropsAndCountsSpans_andAFullQueueRefusesMore() throws {
        // A port nothing listens on: bind one and close it.
        let c = try TestCollector(); let dead = c.port; c.stop()
        let ex = try SpanExporter(address: "127.0.0.1:\(dead)", format: .zipkin, maxQueued: 5, batchSize: 100, flushInterval: 10)
        var accepted = 0
        for i in 1...8 where ex.submit(span(UInt64(i))) { accepted += 1 }
        XCTAssertEqual(accepted, 5)
        ex.close()
        XCTAssertEqual(ex.sentSpans, 0)
        XCTAssertEqual(ex.droppedSpans, 8)
        XCTAssertEqual(ex.failedPosts, 1)
    }

    func test_badCollectorAddresses_areErrorsNamingThem() {
        XCTAssertThrowsError(try SpanExporter(address: "zipkin", format: .zipkin)) { XCTAssertTrue("\($0)".contains("zipkin")) }
        XCTAssertThrowsError(try SpanExporter(address: "https://z:9411", format: .zipkin)) { XCTAssertTrue("\($0)".contains("https")) }
    }
}
