import XCTest
@testable import MoonletProxy

/// HTTP/2 with prior knowledge (h2c), driven by curl and h2load (nghttp2) as real clients.
final class HTTP2Tests: XCTestCase {
    func run(_ tool: String, _ args: [String]) throws -> String { try runTool(tool, args) }

    /// Reads frames until the server closes; returns the frame types seen and when it closed.
    static func readUntilClosed(_ c: RawClient, within seconds: Double) -> (types: [UInt8], closedAfter: Double?) {
        let start = Date()
        var closed = false
        let frames = readFrames(c, within: seconds, closed: &closed) { _ in false }
        return (frames.map(\.type), closed ? Date().timeIntervalSince(start) : nil)
    }

    func test_anIdleHTTP2Connection_isClosedAfterTheIdleTimeout_butNotWhileAStreamIsOpen() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(body: "slow", delayMs: 900) }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port) { $0.limits.downstreamIdleTimeoutMs = 300 }
        defer { px.stop() }
        let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
        let settings: [UInt8] = [0, 0, 0, 4, 0, 0, 0, 0, 0]
        // Idle: no stream at all.
        let idle = try RawClient(port: px.inbound)
        idle.send(preface + settings)
        let r1 = Self.readUntilClosed(idle, within: 5)
        XCTAssertNotNil(r1.closedAfter, "an idle HTTP/2 connection stays open")
        XCTAssertGreaterThan(r1.closedAfter ?? 0, 0.2)
        // One GET whose response takes 900 ms, three times the idle timeout.
        let busy = try RawClient(port: px.inbound)
        let authority = Array("a".utf8)
        let block: [UInt8] = [0x82, 0x86, 0x84, 0x41, UInt8(authority.count)] + authority // GET http / a (HPACK)
        let headers: [UInt8] = [0, 0, UInt8(block.count), 1, 0x05, 0, 0, 0, 1] + block  // HEADERS, END_STREAM|END_HEADERS, stream 1
        busy.send(preface + settings + headers)
        let r2 = Self.readUntilClosed(busy, within: 5)
        XCTAssertTrue(r2.types.contains(1), "the response headers arrived before the connection closed: frames \(r2.types)")
        XCTAssertGreaterThan(r2.closedAfter ?? 0, 0.9, "closed while the stream was open")
        XCTAssertNotNil(r2.closedAfter, "the connection idles out once the stream is done")
    }

    func test_h2cPriorKnowledge_requestsGoThroughTheFilterChain() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: "\(r.method) \(r.uri) \(r.headers["x-seen-by"].first ?? "-") \(r.bodyBytes)") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, files: [
            "hdr.lua": LuaIntegrationTests.headerFilter,
            "hdr.yaml": ProxyFixture.plugin("hdr"),
        ])
        defer { px.stop() }
        let get = try run("curl", ["-s", "-i", "--max-time", "10", "--http2-prior-knowledge", "http://127.0.0.1:\(px.inbound)/h2?x=1"])
        XCTAssertTrue(get.hasPrefix("HTTP/2 200"), get)
        XCTAssertTrue(get.contains("x-variant: a"), get)
        XCTAssertTrue(get.contains("GET /h2?x=1 moonlet 0"), get)
        let post = try run("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-d", "0123456789", "http://127.0.0.1:\(px.inbound)/p"])
        XCTAssertEqual(post, "POST /p moonlet 10")
        let blocked = try run("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--http2-prior-knowledge", "-H", "x-block: 1", "http://127.0.0.1:\(px.inbound)/"])
        XCTAssertEqual(blocked, "403")
    }

    /// The bridge turns frames into HTTP/1.1 and back without HTTP/1-style parts: cookie
    /// crumbs are joined into one field, a body without content-length goes chunked, a
    /// HEAD response ends the stream on its HEADERS, and a large response streams whole.
    func test_h2cRequests_becomeWellFormedHTTP1_andResponsesComeBackWhole() throws {
        let big = String(repeating: "0123456789abcdef", count: 8192) // 128 KB
        let up = try TestUpstream { r in
            if r.uri == "/big" { return TestUpstream.Reply(body: big) }
            let te = r.headers["transfer-encoding"].first ?? "-"
            let host = r.headers["host"].joined(separator: ",")
            return TestUpstream.Reply(body: "\(r.method) cookie=\(r.headers["cookie"]) host=\(host) te=\(te) body=\(r.body)")
        }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let base = "http://127.0.0.1:\(px.inbound)"
        let cookies = try run("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "-H", "cookie: a=1", "-H", "cookie: b=2", "\(base)/c"])
        XCTAssertEqual(cookies, "GET cookie=[\"a=1; b=2\"] host=127.0.0.1:\(px.inbound) te=- body=")
        let upload = try runTool("sh", ["-c", "printf 'streamed body' | curl -s --max-time 10 --http2-prior-knowledge -T - \(base)/u"])
        XCTAssertEqual(upload, "PUT cookie=[] host=127.0.0.1:\(px.inbound) te=chunked body=streamed body")
        let head = try run("curl", ["-s", "-I", "--max-time", "10", "--http2-prior-knowledge", "\(base)/h"])
        XCTAssertTrue(head.hasPrefix("HTTP/2 200"), head)
        let whole = try run("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "\(base)/big"])
        XCTAssertEqual(whole.count, big.count)
        XCTAssertTrue(whole == big)
    }

    func test_h2cMultiplexedLoad_allSucceed_andEveryStreamsHandlerIsReleased() throws {
        let up = try TestUpstream()
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, concurrency: 1)
        defer { px.stop() }
        let out = try run("h2load", ["-n", "1000", "-c", "4", "-m", "10", "http://127.0.0.1:\(px.inbound)/"])
        XCTAssertTrue(out.contains("1000 succeeded, 0 failed, 0 errored"), out)
        XCTAssertLessThanOrEqual(up.connections, 2 * 64, "upstream connections are pooled")
        XCTAssertEqual(try px.liveHandlersOnceSettled(), 0, "handlers of ended streams or closed connections are still alive")
    }

    /// Response DATA stays within the client's windows: with SETTINGS_INITIAL_WINDOW_SIZE
    /// 0 only the HEADERS come; each WINDOW_UPDATE lets exactly that many bytes through.
    func test_responseData_staysWithinTheClientsFlowControlWindows() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(body: "0123456789abcdefghij") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound, timeoutSeconds: 1)
        c.send(Self.preface + Self.frame(4, 0, 0, [0, 4, 0, 0, 0, 0]) + Self.frame(1, 0x5, 1, Self.getBlock()))
        var frames = Self.readFrames(c, within: 3) { fs in fs.contains { $0.type == 1 && $0.stream == 1 } }
        XCTAssertTrue(frames.contains { $0.type == 1 && $0.stream == 1 }, "no response HEADERS")
        frames += Self.readFrames(c, within: 0.5) { _ in false }
        XCTAssertFalse(frames.contains { $0.type == 0 }, "DATA sent into a closed window")
        c.send(Self.frame(8, 0, 1, [0, 0, 0, 5]))
        frames = Self.readFrames(c, within: 3) { fs in fs.contains { $0.type == 0 } }
        XCTAssertEqual(frames.filter { $0.type == 0 }.flatMap(\.payload), Array("01234".utf8))
        c.send(Self.frame(8, 0, 1, [0, 0, 1, 0]))
        frames = Self.readFrames(c, within: 3) { fs in fs.contains { $0.type == 0 && $0.flags & 1 != 0 } }
        XCTAssertEqual(String(decoding: frames.filter { $0.type == 0 }.flatMap(\.payload), as: UTF8.self), "56789abcdefghij")
    }

    /// On drain an HTTP/2 client gets GOAWAY (NO_ERROR, naming the last stream it
    /// opened), the stream in flight still completes, a later stream is refused, and the
    /// connection then closes.
    func test_drain_sendsGoAway_finishesTheOpenStream_refusesLaterOnes_andCloses() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(body: "slow", delayMs: 400) }
        defer { up.stop() }
        var px: ProxyFixture? = try ProxyFixture(appPort: up.port)
        defer { px?.stop() }
        let c = try RawClient(port: px!.inbound)
        c.send(Self.preface + Self.frame(4, 0, 0) + Self.frame(1, 0x5, 1, Self.getBlock()))
        usleep(100_000)
        let done = expectation(description: "drained")
        let server = px!.server!
        DispatchQueue.global().async { server.drainAndStop(); done.fulfill() }
        var frames = Self.readFrames(c, within: 3) { fs in fs.contains { $0.type == 7 } }
        let goAway = try XCTUnwrap(frames.first { $0.type == 7 }, "no GOAWAY")
        XCTAssertEqual(Self.errorCode(goAway), 0)
        XCTAssertEqual(Array(goAway.payload[0..<4]), [0, 0, 0, 1], "last stream id")
        c.send(Self.frame(1, 0x5, 3, Self.getBlock()))
        frames += Self.readFrames(c, within: 5) { _ in false } // until the server closes
        XCTAssertEqual(String(decoding: frames.filter { $0.type == 0 && $0.stream == 1 }.flatMap(\.payload), as: UTF8.self), "slow")
        XCTAssertEqual(frames.filter { $0.type == 3 && $0.stream == 3 }.map(Self.errorCode), [7], "stream 3 not refused")
        XCTAssertTrue(c.pending.isEmpty && !c.fill(), "the connection stays open")
        wait(for: [done], timeout: 10)
        px = nil
    }

    /// Garbage after the preface (random frame types, flags, stream ids, lengths and
    /// payloads, from a fixed seed) never takes the proxy down: each connection ends or
    /// goes on, and afterwards HTTP/2 and HTTP/1.1 requests are served as before.
    func test_randomFramesAfterThePreface_neverBreakTheProxy() throws {
        let up = try TestUpstream()
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, concurrency: 1)
        defer { px.stop() }
        var seed: UInt64 = 0x5eed_1234
        func next() -> UInt64 { seed = seed &* 6364136223846793005 &+ 1442695040888963407; return seed >> 33 }
        for conn in 0..<40 {
            let c = try RawClient(port: px.inbound, timeoutSeconds: 1)
            var bytes = Self.preface
            if conn % 2 == 0 { bytes += Self.frame(4, 0, 0) } // half of them start properly
            for _ in 0..<(20 + Int(next() % 40)) {
                let type = UInt8(next() % 12)
                let flags = UInt8(next() % 256)
                let stream = UInt32(next() % 8)
                let length = Int(next() % 64)
                var payload = (0..<length).map { _ in UInt8(next() % 256) }
                if type == 1 && next() % 2 == 0 { payload = Self.getBlock() } // sometimes a valid head
                bytes += Self.frame(type, flags, stream, payload)
            }
            c.send(bytes)
            _ = Self.readFrames(c, within: 1) { fs in fs.contains { $0.type == 7 } }
        }
        let h2 = try run("curl", ["-s", "--max-time", "10", "--http2-prior-knowledge", "http://127.0.0.1:\(px.inbound)/after"])
        XCTAssertEqual(h2, "hello")
        let c = try RawClient(port: px.inbound)
        c.send("GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        XCTAssertEqual(c.read()?.status, 200)
        XCTAssertEqual(try px.liveHandlersOnceSettled(), 1, "only the HTTP/1.1 connection above should be left")
    }

    /// `expect: 100-continue` gets an interim HEADERS (`:status` 100) before the body is
    /// sent, then the final response.
    func test_expectContinue_getsAnInterim100_thenTheResponse() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: "got \(r.body)") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        let post: [UInt8] = [0x83, 0x86, 0x84, 0x41, 1, UInt8(ascii: "a")] + Self.literal("content-length", "5") + Self.literal("expect", "100-continue")
        c.send(Self.preface + Self.frame(4, 0, 0) + Self.frame(1, 0x4, 1, post))
        var frames = Self.readFrames(c, within: 3) { fs in fs.contains { $0.type == 1 && $0.stream == 1 } }
        let interim = try XCTUnwrap(frames.first { $0.type == 1 && $0.stream == 1 }, "no interim HEADERS")
        XCTAssertEqual(interim.flags & 1, 0, "the interim HEADERS ended the stream")
        XCTAssertTrue(interim.payload.suffix(4) == [0x03] + Array("100".utf8), "not :status 100: \(interim.payload)")
        c.send(Self.frame(0, 1, 1, Array("hello".utf8)))
        frames = Self.readFrames(c, within: 3) { fs in fs.contains { $0.type == 0 && $0.flags & 1 != 0 } }
        XCTAssertEqual(String(decoding: frames.filter { $0.type == 0 }.flatMap(\.payload), as: UTF8.self), "got hello")
    }

    // MARK: raw frames

    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    struct Frame { var type: UInt8; var flags: UInt8; var stream: UInt32; var payload: [UInt8] }

    static func frame(_ type: UInt8, _ flags: UInt8, _ stream: UInt32, _ payload: [UInt8] = []) -> [UInt8] {
        let n = payload.count
        return [UInt8(n >> 16), UInt8((n >> 8) & 0xff), UInt8(n & 0xff), type, flags,
                UInt8(stream >> 24), UInt8((stream >> 16) & 0xff), UInt8((stream >> 8) & 0xff), UInt8(stream & 0xff)] + payload
    }

    /// HPACK literal field without indexing, new name, no Huffman (names and values < 127 bytes).
    static func literal(_ name: String, _ value: String) -> [UInt8] {
        [0x00, UInt8(name.utf8.count)] + Array(name.utf8) + [UInt8(value.utf8.count)] + Array(value.utf8)
    }

    /// GET http://a/ as HPACK (indexed :method GET, :scheme http, :path /; :authority a), plus `extra`.
    static func getBlock(_ extra: [UInt8] = []) -> [UInt8] { [0x82, 0x86, 0x84, 0x41, 1, UInt8(ascii: "a")] + extra }

    /// Reads frames until `done` says so, the server closes, or `seconds` pass.
    static func readFrames(_ c: RawClient, within seconds: Double = 5, until done: ([Frame]) -> Bool) -> [Frame] {
        var closed = false
        return readFrames(c, within: seconds, closed: &closed, until: done)
    }

    /// As above; `closed` tells whether the server closed (or a read timed out).
    static func readFrames(_ c: RawClient, within seconds: Double, closed: inout Bool, until done: ([Frame]) -> Bool) -> [Frame] {
        let start = Date()
        var frames: [Frame] = []
        while Date().timeIntervalSince(start) < seconds {
            while c.pending.count >= 9 {
                let len = Int(c.pending[0]) << 16 | Int(c.pending[1]) << 8 | Int(c.pending[2])
                guard c.pending.count >= 9 + len else { break }
                let sid = UInt32(c.pending[5] & 0x7f) << 24 | UInt32(c.pending[6]) << 16 | UInt32(c.pending[7]) << 8 | UInt32(c.pending[8])
                frames.append(Frame(type: c.pending[3], flags: c.pending[4], stream: sid, payload: Array(c.pending[9..<(9 + len)])))
                c.pending.removeFirst(9 + len)
            }
            if done(frames) { return frames }
            if !c.fill() { closed = true; return frames }
        }
        return frames
    }

    static func errorCode(_ f: Frame) -> UInt32 {
        let p = f.type == 7 ? Array(f.payload[4..<8]) : f.payload
        return UInt32(p[0]) << 24 | UInt32(p[1]) << 16 | UInt32(p[2]) << 8 | UInt32(p[3])
    }

    /// Malformed requests are stream errors: the stream is reset with PROTOCOL_ERROR,
    /// nothing reaches the app, and the connection keeps serving the next stream.
    func test_malformedHTTP2Requests_areResetWithProtocolError_nothingReachesTheApp_andTheConnectionGoesOn() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: "ok \(r.uri)") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let bad: [(String, [UInt8], [UInt8]?)] = [
            ("CR LF in a value", Self.getBlock(Self.literal("x-a", "1\r\nx-injected: 1")), nil),
            ("NUL in a value", Self.getBlock(Self.literal("x-a", "1\u{0}2")), nil),
            ("uppercase name", Self.getBlock(Self.literal("X-Upper", "1")), nil),
            ("connection-specific field", Self.getBlock(Self.literal("transfer-encoding", "chunked")), nil),
            ("te other than trailers", Self.getBlock(Self.literal("te", "gzip")), nil),
            ("no :path", [0x82, 0x86, 0x41, 1, UInt8(ascii: "a")], nil),
            ("pseudo-header after a field", [0x82, 0x86] + Self.literal("x-a", "1") + [0x84], nil),
            ("unknown pseudo-header", Self.getBlock(Self.literal(":protocol", "websocket")), nil),
            ("space in :path", [0x82, 0x86, 0x41, 1, UInt8(ascii: "a")] + [0x04, 6] + Array("/a b/c".utf8), nil),
            ("body longer than content-length", [0x83, 0x86, 0x84, 0x41, 1, UInt8(ascii: "a")] + Self.literal("content-length", "3"), Array("0123456789".utf8)),
            ("body shorter than content-length", [0x83, 0x86, 0x84, 0x41, 1, UInt8(ascii: "a")] + Self.literal("content-length", "30"), Array("0123456789".utf8)),
        ]
        for (what, block, body) in bad {
            let c = try RawClient(port: px.inbound)
            var bytes = Self.preface + Self.frame(4, 0, 0)
            bytes += Self.frame(1, body == nil ? 0x5 : 0x4, 1, block)
            if let body { bytes += Self.frame(0, 1, 1, body) }
            // Then a good request on stream 3.
            bytes += Self.frame(1, 0x5, 3, [0x82, 0x86, 0x41, 1, UInt8(ascii: "a"), 0x04, 3] + Array("/ok".utf8))
            c.send(bytes)
            let frames = Self.readFrames(c) { fs in fs.contains { $0.type == 0 && $0.stream == 3 && $0.flags & 1 != 0 } }
            let rst = frames.first { $0.type == 3 && $0.stream == 1 }
            XCTAssertNotNil(rst, "\(what): no RST_STREAM on stream 1: \(frames.map { ($0.type, $0.stream) })")
            if let rst { XCTAssertEqual(Self.errorCode(rst), 1, what) }
            XCTAssertFalse(frames.contains { $0.type == 1 && $0.stream == 1 }, "\(what): stream 1 got a response")
            let body3 = frames.filter { $0.type == 0 && $0.stream == 3 }.flatMap(\.payload)
            XCTAssertEqual(String(decoding: body3, as: UTF8.self), "ok /ok", what)
        }
        XCTAssertEqual(up.seen.map(\.uri).filter { $0 != "/ok" }, [], "a malformed request reached the app")
    }

    /// A connection's streams one after another (each handler is reused for the next
    /// stream once its stream ended): each request is served from its own head only,
    /// whatever the stream before it was (refused, with a body, with its own request id).
    func test_streamsOneAfterAnother_onOneConnection_eachGetTheirOwnAnswer_afterRefusedAndBodyStreams() throws {
        let up = try TestUpstream { r in
            TestUpstream.Reply(body: "\(r.method) \(r.uri) id=\(r.headers["x-request-id"].joined(separator: ",")) xff=\(r.headers["x-forwarded-for"].count) body=\(r.body)")
        }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send(Self.preface + Self.frame(4, 0, 0))
        func exchange(_ stream: UInt32, _ block: [UInt8], body: [UInt8]? = nil) -> (status: String, body: String) {
            var bytes = Self.frame(1, body == nil ? 0x5 : 0x4, stream, block)
            if let body { bytes += Self.frame(0, 1, stream, body) }
            c.send(bytes)
            let frames = Self.readFrames(c) { fs in fs.contains { $0.stream == stream && ($0.type == 3 || ($0.type <= 1 && $0.flags & 1 != 0)) } }
            var head: [UInt8] = frames.first(where: { $0.type == 1 && $0.stream == stream })?.payload ?? []
            if head.first == 0x20 { head.removeFirst() } // the connection's first block: table size 0
            // The status is the first field: indexed from the static table (0x88...0x8e)
            // or a literal with an indexed name (0x08, length 3, three digits).
            let indexed: [UInt8: String] = [0x88: "200", 0x89: "204", 0x8a: "206", 0x8b: "304", 0x8c: "400", 0x8d: "404", 0x8e: "500"]
            let status = head.first.flatMap { indexed[$0] } ?? (head.count >= 5 ? String(decoding: head[2..<5], as: UTF8.self) : "none")
            let data = frames.filter { $0.type == 0 && $0.stream == stream }.flatMap(\.payload)
            return (status, String(decoding: data, as: UTF8.self))
        }
        let path: (String) -> [UInt8] = { [0x04, UInt8($0.utf8.count)] + Array($0.utf8) }
        let one = exchange(1, [0x82, 0x86, 0x41, 1, UInt8(ascii: "a")] + path("/one") + Self.literal("x-request-id", "r1"))
        XCTAssertEqual(one.status, "200", one.body)
        XCTAssertEqual(one.body, "GET /one id=r1 xff=1 body=")
        let refused = exchange(3, [0x82, 0x86, 0x41, 1, UInt8(ascii: "a")] + path("*"))
        XCTAssertEqual(refused.status, "400", refused.body)
        let post = exchange(5, [0x83, 0x86, 0x41, 1, UInt8(ascii: "a")] + path("/three") + Self.literal("content-length", "3"), body: Array("abc".utf8))
        XCTAssertEqual(post.status, "200")
        XCTAssertTrue(post.body.hasPrefix("POST /three id=") && post.body.hasSuffix(" xff=1 body=abc"), post.body)
        XCTAssertFalse(post.body.contains("id=r1"), post.body)
        let four = exchange(7, [0x82, 0x86, 0x41, 1, UInt8(ascii: "a")] + path("/four"))
        XCTAssertTrue(four.body.hasPrefix("GET /four id="), four.body)
        XCTAssertFalse(four.body.contains("id=r1") || four.body.contains("body=abc"), four.body)
        XCTAssertEqual(up.seen.map(\.uri), ["/one", "/three", "/four"])
    }

    /// Request smuggling class: Int(_:) took "+5" and "-0", and the value went to the
    /// HTTP/1.1 upstream as sent. Every content-length value must be what the HTTP/1.1
    /// parser accepts (digits only, bounded, all values agreeing); otherwise the stream is
    /// reset as malformed. The upstream gets one content-length, in canonical form.
    func test_http2ContentLength_thatTheHTTP1ParserWouldRefuse_isResetAsMalformed_andTheUpstreamGetsOneCanonicalContentLength() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: "cl=\(r.headers["content-length"]) body=\(r.body)") }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let post: [UInt8] = [0x83, 0x86, 0x84, 0x41, 1, UInt8(ascii: "a")]
        let hello = Array("hello".utf8)
        let bad: [(String, [String], [UInt8]?)] = [
            ("plus sign", ["+5"], hello),
            ("minus zero", ["-0"], nil),
            ("plus zero", ["+0"], nil),
            ("a list", ["5, 5"], hello),
            ("hex", ["0x5"], hello),
            ("19 digits", ["0000000000000000005"], hello),
            ("two values, one signed", ["5", "+5"], hello),
        ]
        for (what, values, body) in bad {
            let c = try RawClient(port: px.inbound)
            var bytes = Self.preface + Self.frame(4, 0, 0)
            bytes += Self.frame(1, body == nil ? 0x5 : 0x4, 1, post + values.flatMap { Self.literal("content-length", $0) })
            if let body { bytes += Self.frame(0, 1, 1, body) }
            bytes += Self.frame(1, 0x5, 3, [0x82, 0x86, 0x41, 1, UInt8(ascii: "a"), 0x04, 3] + Array("/ok".utf8))
            c.send(bytes)
            let frames = Self.readFrames(c) { fs in fs.contains { $0.type == 0 && $0.stream == 3 && $0.flags & 1 != 0 } }
            let rst = frames.first { $0.type == 3 && $0.stream == 1 }
            XCTAssertNotNil(rst, "\(what): no RST_STREAM on stream 1: \(frames.map { ($0.type, $0.stream) })")
            if let rst { XCTAssertEqual(Self.errorCode(rst), 1, what) }
            XCTAssertFalse(frames.contains { $0.type == 1 && $0.stream == 1 }, "\(what): stream 1 got a response")
        }
        XCTAssertEqual(up.seen.map(\.uri).filter { $0 != "/ok" }, [], "a request with a bad content-length reached the app")

        // Agreeing values, one with leading zeros: one "content-length: 5" goes upstream.
        let c = try RawClient(port: px.inbound)
        var bytes = Self.preface + Self.frame(4, 0, 0)
        bytes += Self.frame(1, 0x4, 1, post + Self.literal("content-length", "005") + Self.literal("content-length", "5"))
        bytes += Self.frame(0, 1, 1, hello)
        c.send(bytes)
        let frames = Self.readFrames(c) { fs in fs.contains { $0.type == 0 && $0.stream == 1 && $0.flags & 1 != 0 } }
        let body1 = frames.filter { $0.type == 0 && $0.stream == 1 }.flatMap(\.payload)
        XCTAssertEqual(String(decoding: body1, as: UTF8.self), "cl=[\"5\"] body=hello")
    }

    /// Connection errors end the connection with GOAWAY and the right code: a first
    /// frame that is not SETTINGS, an even stream id, DATA on a stream never opened, a
    /// frame above the maximum size, and a rapid-reset flood.
    func test_http2ConnectionErrors_sendGoAwayWithTheirCode_includingRapidReset() throws {
        let up = try TestUpstream { _ in TestUpstream.Reply(body: "slow", delayMs: 200) }
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        func goAway(_ bytes: [UInt8]) throws -> UInt32? {
            let c = try RawClient(port: px.inbound)
            c.send(bytes)
            let frames = Self.readFrames(c, within: 10) { fs in fs.contains { $0.type == 7 } }
            return frames.first { $0.type == 7 }.map(Self.errorCode)
        }
        XCTAssertEqual(try goAway(Self.preface + Self.frame(6, 0, 0, Array(repeating: 0, count: 8))), 1, "PING before SETTINGS")
        XCTAssertEqual(try goAway(Self.preface + Self.frame(4, 0, 0) + Self.frame(1, 0x5, 2, Self.getBlock())), 1, "even stream id")
        XCTAssertEqual(try goAway(Self.preface + Self.frame(4, 0, 0) + Self.frame(0, 0, 5, [1, 2, 3])), 1, "DATA on an idle stream")
        XCTAssertEqual(try goAway(Self.preface + Self.frame(4, 0, 0) + Self.frame(0, 0, 1, Array(repeating: 0, count: 16_385))), 6, "frame above 16 KB")
        var flood = Self.preface + Self.frame(4, 0, 0)
        for s in stride(from: UInt32(1), to: 1000, by: 2) { flood += Self.frame(1, 0x5, s, Self.getBlock()) + Self.frame(3, 0, s, [0, 0, 0, 8]) }
        XCTAssertEqual(try goAway(flood), 11, "rapid reset")
        // A PING is answered, and a stream beyond 100 concurrent ones is refused.
        let c = try RawClient(port: px.inbound)
        var many = Self.preface + Self.frame(4, 0, 0) + Self.frame(6, 0, 0, Array(1...8))
        for s in stride(from: UInt32(1), through: 201, by: 2) { many += Self.frame(1, 0x5, s, Self.getBlock()) }
        c.send(many)
        let frames = Self.readFrames(c, within: 10) { fs in fs.filter { $0.type == 0 && $0.flags & 1 != 0 }.count >= 100 }
        XCTAssertTrue(frames.contains { $0.type == 6 && $0.flags == 1 && $0.payload == Array(1...8) }, "no PING ACK")
        let refused = frames.filter { $0.type == 3 }
        XCTAssertEqual(refused.map(\.stream), [201])
        XCTAssertEqual(refused.first.map(Self.errorCode), 7)
        XCTAssertEqual(frames.filter { $0.type == 0 && $0.flags & 1 != 0 }.count, 100)
    }
}
