import XCTest
import NIOConcurrencyHelpers
@testable import MoonletProxy

extension RawClient {
    /// A small kernel receive buffer: with slow reads the proxy sees a client that is behind.
    func setReceiveBuffer(_ bytes: Int32) {
        var v = bytes
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, socklen_t(MemoryLayout<Int32>.size))
    }
}

final class LargeBodyTests: XCTestCase {
    static func rssBytes() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return 0 }
        return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) * 1024
    }

    func test_aLargeResponseToASlowReader_leavesThePooledUpstreamConnectionReading() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: r.uri == "/big" ? String(repeating: "z", count: 8 << 20) : "small") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        // A small receive buffer and slow reads make the downstream unwritable, so the
        // proxy pauses reading the upstream while the response is relayed.
        c.setReceiveBuffer(16 * 1024)
        c.send("GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        var head = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 16 * 1024)
        while head.count < 4 << 20 {
            let n = recv(c.fd, &buf, buf.count, 0)
            if n <= 0 { break }
            head += buf[0..<n]
            if head.count % (1 << 20) < n { usleep(20_000) }
        }
        c.pending = head
        XCTAssertEqual(c.read()?.body.count, 8 << 20)
        for i in 0..<3 {
            c.send("GET /again\(i) HTTP/1.1\r\nHost: a\r\n\r\n")
            XCTAssertEqual(c.read()?.body, "small", "request \(i) after the large response")
        }
        XCTAssertEqual(up.connections, 1, "the upstream connection was reused")
    }

    func test_aLargeResponseOnAConnectionThatCloses_reachesAClientThatReadsLate_whole() throws {
        // `connection: close`: the proxy closes after the response. The response is far
        // larger than the socket buffers and the client reads only after it has all come
        // from the upstream: the close must wait for the writes still pending.
        let size = 8 << 20
        let up = try TestUpstream { _ in TestUpstream.Reply(body: String(repeating: "z", count: size)) }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        // A small receive buffer and slow reads: the client is behind until the end.
        c.setReceiveBuffer(16 * 1024)
        c.send("GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        Thread.sleep(forTimeInterval: 1)
        var got = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 16 * 1024)
        while true {
            let n = recv(c.fd, &buf, buf.count, 0)
            if n <= 0 { break }
            got += buf[0..<n]
            if got.count % (1 << 20) < n { usleep(20_000) }
        }
        c.pending = got
        let r = c.read()
        XCTAssertEqual(r?.status, 200)
        XCTAssertEqual(r?.body.count, size)
    }

    func test_aClientThatNeverReads_cannotHoldAClosingConnection_pastTheCloseFlushTimeout() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(body: String(repeating: "z", count: 8 << 20)) }
        defer { up.stop() }
        // A high-water mark above the response: the proxy reads all of it and queues it,
        // so the response ends (and the close begins) with megabytes still to send.
        let px = try ProxyFixture(appPort: up.port, concurrency: 1) { $0.limits.closeFlushTimeoutMs = 300; $0.limits.highWaterMarkBytes = 32 << 20 }
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.setReceiveBuffer(16 * 1024)
        c.send("GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        // The response never drains: the proxy's close waits 300 ms for it, then closes.
        Thread.sleep(forTimeInterval: 1.5)
        XCTAssertEqual(try px.liveHandlersOnceSettled(), 0, "the connection was closed though the client never read")
    }

    func test_100MBRequestBody_streamsThrough_withBoundedMemory() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: "got \(r.bodyBytes)") }
        up.keepBody = 0
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let total = 100 * 1024 * 1024
        let before = Self.rssBytes()
        let peak = NIOLockedValueBox(before)
        let sampling = NIOLockedValueBox(true)
        let sampler = Thread {
            while sampling.withLockedValue({ $0 }) {
                let r = Self.rssBytes()
                peak.withLockedValue { $0 = max($0, r) }
                usleep(20_000)
            }
        }
        sampler.start()
        let c = try RawClient(port: px.inbound, timeoutSeconds: 60)
        c.send("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: \(total)\r\n\r\n")
        let chunk = [UInt8](repeating: 0x61, count: 64 * 1024)
        for _ in 0..<(total / chunk.count) { c.send(chunk) }
        let r = try XCTUnwrap(c.read())
        sampling.withLockedValue { $0 = false }
        XCTAssertEqual(r.body, "got \(total)")
        let growth = peak.withLockedValue { $0 } - before
        XCTAssertLessThan(growth, 64 * 1024 * 1024, "RSS grew by \(growth / 1024 / 1024) MiB")
    }

    func test_100MBChunkedRequestBody_streamsThrough() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: "got \(r.bodyBytes)") }
        up.keepBody = 0
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound, timeoutSeconds: 60)
        c.send("POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        let payload = [UInt8](repeating: 0x62, count: 256 * 1024)
        var framed = Array("40000\r\n".utf8) + payload + Array("\r\n".utf8)
        framed.reserveCapacity(framed.count)
        for _ in 0..<400 { c.send(framed) }
        c.send("0\r\n\r\n")
        XCTAssertEqual(c.read()?.body, "got \(400 * 256 * 1024)")
    }
}
