import XCTest
import NIOCore
import NIOEmbedded
import NIOHTTP1
@testable import MoonletHTTP
import MoonletCore

final class ParserTests: XCTestCase {
    func parse(_ s: String) -> HeadParseResult {
        var p = HTTPHeadParser()
        return p.parseRequest(ByteBuffer(string: s))
    }

    func head(_ s: String, file: StaticString = #filePath, line: UInt = #line) -> HTTPHead? {
        if case .complete(let h, _) = parse(s) { return h }
        XCTFail("did not parse: \(parse(s))", file: file, line: line)
        return nil
    }

    func status(_ s: String) -> Int? {
        if case .error(let e) = parse(s) { return e.status }
        return nil
    }

    func test_simpleGet_parsesMethodTargetAndHeadersInPlace() throws {
        let h = try XCTUnwrap(head("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Test:  v  \r\n\r\n"))
        XCTAssertEqual(h.method, "GET")
        XCTAssertEqual(h.target, "/a?b=1")
        XCTAssertEqual(h.versionMinor, 1)
        XCTAssertEqual(h.first("x-test"), "v")
        XCTAssertEqual(h.first("HOST"), "x")
        XCTAssertTrue(h.keepAlive)
        XCTAssertEqual(h.framing, .none)
    }

    func test_incompleteHead_needsMore_thenCompletesAcrossReads() {
        var p = HTTPHeadParser()
        var buf = ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\n")
        guard case .needMore = p.parseRequest(buf) else { return XCTFail() }
        buf.writeString("\r\nGET /next")
        guard case .complete(_, let consumed) = p.parseRequest(buf) else { return XCTFail() }
        XCTAssertEqual(consumed, 27)
    }

    func test_smugglingShapes_areRefusedWith400() {
        let cases = [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n",
            "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
            "G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\rXHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\nY: b\r\n\r\n",
            "GET /\0 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHo\0st: x\r\n\r\n",
        ]
        for c in cases { XCTAssertEqual(status(c), 400, c.debugDescription) }
    }

    func test_aStatusLineWithACROnly_isRefusedAs502() {
        var p = HTTPHeadParser()
        guard case .error(let e) = p.parseResponse(ByteBuffer(string: "HTTP/1.1 200 OK\rXContent-Length: 0\r\n\r\n"), requestWasHead: false)
        else { return XCTFail("accepted a start line ended by CR alone") }
        XCTAssertEqual(e.status, 502)
    }

    func test_chunkHeaders_areHexWithoutLeadingZeros() {
        for (size, text) in [(0, "0"), (1, "1"), (15, "f"), (16, "10"), (255, "ff"), (4096, "1000"), (0x1234abcd, "1234abcd"), (Int.max, "7fffffffffffffff")] {
            var b = ByteBuffer()
            ChunkedEncoder.writeChunkHeader(size, into: &b)
            XCTAssertEqual(String(buffer: b), text + "\r\n")
        }
    }

    func test_longHeaderValues_areCheckedAtEveryByte_andTrimmedOfTrailingBlanks() throws {
        // Values are scanned eight bytes at a time: a bad byte must be found at any offset.
        for bad: UInt8 in [0x00, 0x01, 0x0b, 0x7f] {
            for pos in 0..<24 {
                var value = [UInt8](repeating: UInt8(ascii: "a"), count: 24)
                value[pos] = bad
                var buf = ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\nX-Long: ")
                buf.writeBytes(value)
                buf.writeString("\r\n\r\n")
                var p = HTTPHeadParser()
                guard case .error(let e) = p.parseRequest(buf) else { return XCTFail("byte \(bad) at \(pos) accepted") }
                XCTAssertEqual(e.status, 400)
            }
        }
        var buf = ByteBuffer(string: "GET / HTTP/1.1\r\nHost: x\r\nX-Long: abcdefgh\tijklmnopqrstuvwxyz0123456789  \t \r\nX-Utf8: ")
        buf.writeBytes(Array("caf\u{e9} na\u{ef}ve r\u{e9}sum\u{e9} \u{2713}".utf8))
        buf.writeString("\r\n\r\n")
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(buf) else { return XCTFail("valid long values refused") }
        XCTAssertEqual(h.first("x-long"), "abcdefgh\tijklmnopqrstuvwxyz0123456789")
        XCTAssertEqual(h.first("x-utf8"), "caf\u{e9} na\u{ef}ve r\u{e9}sum\u{e9} \u{2713}")
    }

    func test_tcharMasks_holdExactlyRFC9110TokenCharacters() {
        let tchar = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~".utf8)
        for c in 0...255 { XCTAssertEqual(HeaderValidation.isTchar(UInt8(c)), tchar.contains(UInt8(c)), "byte \(c)") }
    }

    func test_unknownTransferEncoding_is501() {
        XCTAssertEqual(status("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"), 501)
    }

    func test_tooManyOrTooLargeHeaders_are431() {
        var many = "GET / HTTP/1.1\r\nHost: x\r\n"
        for i in 0..<101 { many += "h\(i): v\r\n" }
        XCTAssertEqual(status(many + "\r\n"), 431)
        let big = "GET / HTTP/1.1\r\nHost: x\r\nX: " + String(repeating: "a", count: 70_000)
        XCTAssertEqual(status(big), 431)
    }

    func test_connectionTokens_andKeepAliveRules() throws {
        let h = try XCTUnwrap(head("GET / HTTP/1.1\r\nHost: x\r\nConnection: close, X-Foo\r\nX-Foo: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n\r\n"))
        XCTAssertFalse(h.keepAlive)
        XCTAssertEqual(h.connectionTokens, ["x-foo"])
        var h2 = h
        h2.stripHopByHop()
        XCTAssertNil(h2.first("x-foo"))
        XCTAssertNil(h2.first("keep-alive"))
        XCTAssertEqual(h2.first("te"), "trailers", "TE: trailers goes on, as Envoy forwards it")
        var gz = try XCTUnwrap(head("GET / HTTP/1.1\r\nHost: x\r\nConnection: te\r\nTE: gzip\r\n\r\n"))
        gz.stripHopByHop()
        XCTAssertNil(gz.first("te"))
        XCTAssertEqual(h2.first("host"), "x")
        let h10 = try XCTUnwrap(head("GET / HTTP/1.0\r\n\r\n"))
        XCTAssertFalse(h10.keepAlive)
        let h10k = try XCTUnwrap(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))
        XCTAssertTrue(h10k.keepAlive)
    }

    func test_editsAreSplicedIntoOriginalBytes() throws {
        var h = try XCTUnwrap(head("GET /x HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"))
        h.remove("b")
        h.set("a", "9")
        h.add("d", "4")
        var out = ByteBuffer()
        HeadWriter.writeRequest(h, into: &out) { _ in }
        XCTAssertEqual(String(buffer: out), "GET /x HTTP/1.1\r\nHost: h\r\nC: 3\r\na: 9\r\nd: 4\r\n\r\n")
        h.targetOverride = "/y"
        out.clear()
        HeadWriter.writeRequest(h, into: &out) { _ in }
        XCTAssertTrue(String(buffer: out).hasPrefix("GET /y HTTP/1.1\r\n"))
    }

    func test_addedLinesOfEveryLength_areWrittenWholeAfterTheKeptLines() throws {
        // Added names and values are copied by words when short, by copyMemory when long,
        // and read in place from small (inline) and heap Strings alike.
        for len in 0...40 {
            var h = try XCTUnwrap(head("GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
            let value = String((0..<len).map { Character(UnicodeScalar(UInt8(97 + $0 % 26))) })
            let name = "x-" + String(repeating: "n", count: len)
            h.addLowercased(name, value)
            h.addLowercased("x-empty", "")
            h.add("X-Utf8", "é" + value)
            var out = ByteBuffer()
            HeadWriter.writeRequest(h, into: &out) { $0.writeString("x-extra: 1\r\n") }
            XCTAssertEqual(String(buffer: out), "GET / HTTP/1.1\r\nHost: h\r\n\(name): \(value)\r\nx-empty: \r\nx-utf8: é\(value)\r\nx-extra: 1\r\n\r\n", "length \(len)")
        }
    }

    func test_traceIDLines_areWrittenAsLowercaseHexAndReadAsTheSameText() throws {
        var h = try XCTUnwrap(head("GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
        let hi: UInt64 = 0x0123_4567_89AB_CDEF, lo: UInt64 = 0xFEDC_BA98_7654_3210, span: UInt64 = 0x00F0_67AA_0BA9_02B7
        h.added.append(HeaderLine("x-b3-traceid", hex: hi, lo))
        h.added.append(HeaderLine("x-b3-spanid", hex: span))
        h.added.append(HeaderLine("traceparent", traceparent: hi, lo, span: span, sampled: true))
        h.added.append(HeaderLine("traceparent", traceparent: 0, 1, span: 2, sampled: false))
        let want = ["0123456789abcdeffedcba9876543210", "00f067aa0ba902b7", "00-0123456789abcdeffedcba9876543210-00f067aa0ba902b7-01",
                    "00-00000000000000000000000000000001-0000000000000002-00"]
        var out = ByteBuffer()
        HeadWriter.writeRequest(h, into: &out) { _ in }
        XCTAssertEqual(String(buffer: out), "GET / HTTP/1.1\r\nHost: h\r\nx-b3-traceid: \(want[0])\r\nx-b3-spanid: \(want[1])\r\n"
                       + "traceparent: \(want[2])\r\ntraceparent: \(want[3])\r\n\r\n")
        for (line, text) in zip(h.added, want) {
            XCTAssertEqual(line.value, text)
            XCTAssertEqual(line.valueByteCount, text.utf8.count)
            XCTAssertFalse(line.valueIsEmpty)
            var bytes: [UInt8] = []
            line.withValueBytes { bytes = Array($0) }
            XCTAssertEqual(bytes, Array(text.utf8))
            XCTAssertEqual(line, HeaderLine(line.name, text))
        }
        XCTAssertEqual(h.first("x-b3-traceid"), want[0])
        XCTAssertEqual(h.all("traceparent"), [want[2], want[3]])
        // Setting a value makes it text again.
        h.added[1].value = "1"
        XCTAssertEqual(h.first("x-b3-spanid"), "1")
        XCTAssertNotEqual(HeaderLine("x-b3-spanid", hex: 1), HeaderLine("x-b3-spanid", hex: 2))
        for (a, b) in [(UInt64(0), UInt64(0)), (.max, .max), (0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210)] {
            let id = HeaderLine("x-request-id", uuid: a, b)
            XCTAssertEqual(id.value, Hex.uuidV4(a, b))
            XCTAssertEqual(id.valueByteCount, 36)
            var out = ByteBuffer()
            var h = try XCTUnwrap(head("GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
            h.added.append(id)
            HeadWriter.writeRequest(h, into: &out) { _ in }
            XCTAssertEqual(String(buffer: out), "GET / HTTP/1.1\r\nHost: h\r\nx-request-id: \(Hex.uuidV4(a, b))\r\n\r\n")
        }
    }

    func test_responseFraming_followsRFC9112() throws {
        func resp(_ s: String, head: Bool = false) -> HTTPHead? {
            var p = HTTPHeadParser()
            if case .complete(let h, _) = p.parseResponse(ByteBuffer(string: s), requestWasHead: head) { return h }
            return nil
        }
        XCTAssertEqual(resp("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")?.framing, .contentLength(3))
        XCTAssertEqual(resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?.framing, .chunked)
        XCTAssertEqual(resp("HTTP/1.1 200 OK\r\n\r\n")?.framing, .untilClose)
        XCTAssertEqual(resp("HTTP/1.1 204 No Content\r\n\r\n")?.framing, BodyFraming.none)
        XCTAssertEqual(resp("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n")?.framing, BodyFraming.none)
        XCTAssertEqual(resp("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", head: true)?.framing, BodyFraming.none)
        XCTAssertEqual(resp("HTTP/1.1 200\r\n\r\n")?.status, 200)
    }

    func test_chunkedDecoder_keepsTheTrailerSection_droppingFieldsThatMayNotBeTrailers_byteByByteToo() throws {
        let wire = Array("3\r\nabc\r\n0\r\nGrpc-Status: 0\r\nContent-Length: 5\r\nx-a:  spaced value \r\nx-a: 2\r\n\r\nNEXT".utf8)
        for step in [1, 7, wire.count] {
            var d = BodyDecoder(framing: .chunked)
            var got = "", done = false, i = 0
            while i < wire.count && !done {
                var piece = ByteBuffer(bytes: wire[i..<min(i + step, wire.count)])
                done = try d.decode(&piece) { got += String(buffer: $0) }
                i += step - piece.readableBytes
            }
            XCTAssertTrue(done)
            XCTAssertEqual(got, "abc")
            let t = try XCTUnwrap(d.trailers)
            XCTAssertEqual(t.fields.map { "\($0.name)=\($0.value)" }, ["grpc-status=0", "x-a=spaced value", "x-a=2"])
        }
        var none = BodyDecoder(framing: .chunked)
        var b = ByteBuffer(string: "0\r\n\r\n")
        XCTAssertTrue(try none.decode(&b) { _ in })
        XCTAssertNil(none.trailers)
        var bad = BodyDecoder(framing: .chunked)
        var bb = ByteBuffer(string: "0\r\nno colon\r\n\r\n")
        XCTAssertThrowsError(try bad.decode(&bb) { _ in })
        var out = ByteBuffer()
        var tr = HTTPTrailers()
        tr.append("grpc-status", "0")
        ChunkedEncoder.writeLastChunk(trailers: tr, into: &out)
        XCTAssertEqual(String(buffer: out), "0\r\ngrpc-status: 0\r\n\r\n")
    }

    func test_chunkedDecoder_yieldsPayloadAndLeavesPipelinedBytes() throws {
        var d = BodyDecoder(framing: .chunked)
        var buf = ByteBuffer(string: "4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\nGET /")
        var got = ""
        let done = try d.decode(&buf) { got += String(buffer: $0) }
        XCTAssertTrue(done)
        XCTAssertEqual(got, "Wikipedia")
        XCTAssertEqual(String(buffer: buf), "GET /")
    }

    func test_chunkedDecoder_worksByteByByte() throws {
        let wire = Array("a\r\n0123456789\r\n1\r\nX\r\n0\r\n\r\n".utf8)
        var d = BodyDecoder(framing: .chunked)
        var got = ""
        var done = false
        for b in wire {
            var one = ByteBuffer(bytes: [b])
            done = try d.decode(&one) { got += String(buffer: $0) }
        }
        XCTAssertTrue(done)
        XCTAssertEqual(got, "0123456789X")
    }

    func test_badChunking_isRefused() {
        for bad in ["g\r\n", "\r\n", "1\nX", "11111111111111111\r\n", "3\r\nabcd\r\n", "1 1\r\nx\r\n", "2\r\nab\n"] {
            var d = BodyDecoder(framing: .chunked)
            var buf = ByteBuffer(string: bad)
            XCTAssertThrowsError(try d.decode(&buf) { _ in }, bad.debugDescription)
        }
    }

    func test_chunkedEncoder_writesHexSizes() {
        var out = ByteBuffer()
        ChunkedEncoder.writeChunk(ByteBuffer(string: String(repeating: "z", count: 26)), into: &out)
        XCTAssertTrue(String(buffer: out).hasPrefix("1a\r\n"))
        XCTAssertTrue(String(buffer: out).hasSuffix("z\r\n"))
    }
}

/// Differential tests: NIOHTTP1 (llhttp) is the oracle for well-formed input, and
/// neither parser may accept what the other refuses on the smuggling-relevant shapes.
final class DifferentialTests: XCTestCase {
    /// What NIOHTTP1 makes of a request: (method, uri, headers) or nil if refused.
    func oracle(_ s: String) -> (String, String, [(String, String)])? {
        let ch = EmbeddedChannel()
        try! ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(HTTPRequestDecoder()))
        do {
            try ch.writeInbound(ByteBuffer(string: s))
        } catch { return nil }
        guard let part = try? ch.readInbound(as: HTTPServerRequestPart.self), case .head(let h) = part else { return nil }
        return ("\(h.method.rawValue)", h.uri, h.headers.map { ($0.name, $0.value) })
    }

    func ours(_ s: String) -> (String, String, [(String, String)])? {
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: s)) else { return nil }
        return (h.method, h.target, (0..<h.fields.count).map { (h.name(at: $0), h.value(at: $0)) })
    }

    func test_wellFormedRequests_parseLikeNIOHTTP1() {
        let corpus = [
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST /submit?x=1&y=%20 HTTP/1.1\r\nHost: example.com:8080\r\nContent-Length: 0\r\nAccept: */*\r\n\r\n",
            "DELETE /a/b/c HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-Tab:\tv\t\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET http://h/abs HTTP/1.1\r\nHost: h\r\nCookie: a=b; c=d\r\nUser-Agent: curl/8\r\n\r\n",
            "PUT /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n",
        ]
        for c in corpus {
            let a = ours(c), b = oracle(c)
            XCTAssertNotNil(a, c); XCTAssertNotNil(b, c)
            guard let a, let b else { continue }
            XCTAssertEqual(a.0, b.0); XCTAssertEqual(a.1, b.1)
            XCTAssertEqual(a.2.map { $0.0.lowercased() }, b.2.map { $0.0.lowercased() })
            // RFC 9110 §5.5: trailing OWS is not part of the value; llhttp keeps a trailing tab.
            XCTAssertEqual(a.2.map(\.1), b.2.map { $0.1.trimmingCharacters(in: .whitespaces) }, c)
        }
    }

    func test_whatNIOHTTP1Refuses_weRefuseToo() {
        let bad = [
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\u{0}b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        ]
        for c in bad where oracle(c) == nil { XCTAssertNil(ours(c), c.debugDescription) }
    }

    /// Fuzz: random mutations of valid requests never crash the parser, and every head
    /// it accepts is also accepted by NIOHTTP1 with the same method and target.
    func test_fuzzedRequests_neverCrash_andAcceptedOnesAgreeWithOracle() {
        var rng = SplitMix64(seed: 0x5EED)
        let seeds = [
            "GET /path?q=1 HTTP/1.1\r\nHost: example\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n",
            "POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
        ]
        let alphabet: [UInt8] = Array(" \r\n\t:;,/0aAzZ-\u{7f}".utf8) + [0, 0x80, 0xff]
        var accepted = 0
        for i in 0..<3000 {
            var bytes = Array(seeds[i % seeds.count].utf8)
            for _ in 0..<(1 + Int(rng.next() % 4)) {
                let pos = Int(rng.next() % UInt64(bytes.count))
                switch rng.next() % 3 {
                case 0: bytes[pos] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
                case 1: bytes.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: pos)
                default: if bytes.count > 4 { bytes.remove(at: pos) }
                }
            }
            var p = HTTPHeadParser()
            let r = p.parseRequest(ByteBuffer(bytes: bytes))
            if case .complete(let h, _) = r {
                accepted += 1
                let s = String(decoding: bytes, as: UTF8.self)
                guard String(decoding: bytes, as: UTF8.self).utf8.elementsEqual(bytes) else { continue }
                if let o = oracle(s) {
                    XCTAssertEqual(o.0, h.method, s.debugDescription)
                    XCTAssertEqual(o.1, h.target, s.debugDescription)
                }
            }
        }
        XCTAssertGreaterThan(accepted, 100)
    }
}

