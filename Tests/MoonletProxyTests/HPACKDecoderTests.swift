import XCTest
import NIOCore
import MoonletCore
import MoonletHTTP
@testable import MoonletProxy

/// Moonlet's HPACK decoder (HPACKBlockDecoder) against RFC 7541's Appendix C examples and
/// malformed blocks, and the HTTP/2 request and response heads built from its fields.
final class HPACKDecoderTests: XCTestCase {
    struct Collect: HPACKFieldSink {
        var fields: [[String]] = []
        mutating func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) {
            fields.append([String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self)])
        }
    }

    static func bytes(_ hex: String) -> [UInt8] {
        let digits = Array(hex.filter { !$0.isWhitespace })
        return stride(from: 0, to: digits.count, by: 2).map { UInt8(String(digits[$0...$0 + 1]), radix: 16)! }
    }

    @discardableResult
    func decode(_ d: HPACKBlockDecoder, _ hex: String) throws -> [[String]] {
        var sink = Collect()
        try Self.bytes(hex).withUnsafeBytes { try d.decode($0, into: &sink) }
        return sink.fields
    }

    func assertRejects(_ hex: String, maxTableSize: Int = 4096, maxHeaderListSize: Int = 65536, _ why: String,
                       file: StaticString = #filePath, line: UInt = #line) {
        let d = HPACKBlockDecoder(maxTableSize: maxTableSize, maxHeaderListSize: maxHeaderListSize)
        XCTAssertThrowsError(try decode(d, hex), why, file: file, line: line)
    }

    // MARK: RFC 7541 Appendix C

    func testSingleFieldExamplesOfC2DecodeAndIndexAsTheRFCSays() throws {
        var d = HPACKBlockDecoder(maxHeaderListSize: 65536)
        XCTAssertEqual(try decode(d, "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"), [["custom-key", "custom-header"]])
        XCTAssertEqual(d.size, 55)
        XCTAssertEqual(d.dynamicEntries.map { [$0.name, $0.value] }, [["custom-key", "custom-header"]])
        d = HPACKBlockDecoder(maxHeaderListSize: 65536)
        XCTAssertEqual(try decode(d, "040c 2f73 616d 706c 652f 7061 7468"), [[":path", "/sample/path"]])
        XCTAssertEqual(d.count, 0)
        XCTAssertEqual(try decode(d, "1008 7061 7373 776f 7264 0673 6563 7265 74"), [["password", "secret"]])
        XCTAssertEqual(d.count, 0)
        XCTAssertEqual(try decode(d, "82"), [[":method", "GET"]])
        XCTAssertEqual(d.count, 0)
    }

    static let requests: [[String]] = [
        [":method", "GET"], [":scheme", "http"], [":path", "/"], [":authority", "www.example.com"],
    ]

    func checkRequests(_ blocks: [String]) throws {
        let d = HPACKBlockDecoder(maxHeaderListSize: 65536)
        XCTAssertEqual(try decode(d, blocks[0]), Self.requests)
        XCTAssertEqual(d.size, 57)
        XCTAssertEqual(try decode(d, blocks[1]), Self.requests + [["cache-control", "no-cache"]])
        XCTAssertEqual(d.size, 110)
        XCTAssertEqual(try decode(d, blocks[2]), [[":method", "GET"], [":scheme", "https"], [":path", "/index.html"],
                                                  [":authority", "www.example.com"], ["custom-key", "custom-value"]])
        XCTAssertEqual(d.size, 164)
        XCTAssertEqual(d.dynamicEntries.map { [$0.name, $0.value] },
                       [["custom-key", "custom-value"], ["cache-control", "no-cache"], [":authority", "www.example.com"]])
    }

    func testRequestExamplesWithoutHuffmanOfC3Decode() throws {
        try checkRequests([
            "828684410f7777772e6578616d706c652e636f6d",
            "828684be58086e6f2d6361636865",
            "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        ])
    }

    func testRequestExamplesWithHuffmanOfC4Decode() throws {
        try checkRequests([
            "828684418cf1e3c2e5f23a6ba0ab90f4ff",
            "828684be5886a8eb10649cbf",
            "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        ])
    }

    func checkResponses(_ blocks: [String]) throws {
        // The RFC's response examples use a 256-byte table: entries are evicted.
        let d = HPACKBlockDecoder(maxTableSize: 256, maxHeaderListSize: 65536)
        let first = [[":status", "302"], ["cache-control", "private"], ["date", "Mon, 21 Oct 2013 20:13:21 GMT"],
                     ["location", "https://www.example.com"]]
        XCTAssertEqual(try decode(d, blocks[0]), first)
        XCTAssertEqual(d.size, 222)
        var second = first
        second[0] = [":status", "307"]
        XCTAssertEqual(try decode(d, blocks[1]), second)
        XCTAssertEqual(d.size, 222)
        XCTAssertEqual(d.dynamicEntries.map { [$0.name, $0.value] },
                       [[":status", "307"], ["location", "https://www.example.com"], ["date", "Mon, 21 Oct 2013 20:13:21 GMT"],
                        ["cache-control", "private"]])
        let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
        XCTAssertEqual(try decode(d, blocks[2]), [[":status", "200"], ["cache-control", "private"], ["date", "Mon, 21 Oct 2013 20:13:22 GMT"],
                                                  ["location", "https://www.example.com"], ["content-encoding", "gzip"], ["set-cookie", cookie]])
        XCTAssertEqual(d.size, 215)
        XCTAssertEqual(d.dynamicEntries.map { [$0.name, $0.value] },
                       [["set-cookie", cookie], ["content-encoding", "gzip"], ["date", "Mon, 21 Oct 2013 20:13:22 GMT"]])
    }

    func testResponseExamplesWithoutHuffmanOfC5DecodeWithEviction() throws {
        try checkResponses([
            "4803333032 580770726976617465 611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54 6e1768747470733a2f2f7777772e6578616d706c652e636f6d",
            "4803333037 c1 c0 bf",
            "88 c1 611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54 c0 5a04677a6970 7738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076657273696f6e3d31",
        ])
    }

    func testResponseExamplesWithHuffmanOfC6DecodeWithEviction() throws {
        try checkResponses([
            "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
            "4883640effc1c0bf",
            "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
        ])
    }

    // MARK: Huffman and the dynamic table

    /// Huffman-codes `bytes` with the code table, padded with ones.
    static func huffman(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        var acc: UInt64 = 0, bits = 0
        for b in bytes {
            acc = acc << UInt64(HPACKTables.huffmanLengths[Int(b)]) | UInt64(HPACKTables.huffmanCodes[Int(b)])
            bits += Int(HPACKTables.huffmanLengths[Int(b)])
            while bits >= 8 { bits -= 8; out.append(UInt8(truncatingIfNeeded: acc >> UInt64(bits))) }
        }
        if bits > 0 { out.append(UInt8(truncatingIfNeeded: acc << UInt64(8 - bits)) | UInt8(0xff >> bits)) }
        return out
    }

    func testEveryByteSurvivesHuffmanCoding() throws {
        var rng = SystemRandomNumberGenerator()
        let d = HPACKBlockDecoder(maxHeaderListSize: 1 << 20)
        for length in [0, 1, 2, 3, 7, 8, 100, 256, 1000] {
            let value: [UInt8] = length == 256 ? (0...255).map { UInt8($0) } : (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let coded = Self.huffman(value)
            var block: [UInt8] = [0x00, 0x01, 0x61] // literal without indexing, new name "a"
            let n = coded.count
            if n < 127 { block.append(0x80 | UInt8(n)) } else {
                block.append(0xff)
                var rest = n - 127
                while rest >= 128 { block.append(UInt8(rest & 0x7f) | 0x80); rest >>= 7 }
                block.append(UInt8(rest))
            }
            block += coded
            var got: [UInt8] = []
            struct Raw: HPACKFieldSink {
                var value: [UInt8] = []
                mutating func field(name: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer) { self.value = Array(value) }
            }
            var sink = Raw()
            try block.withUnsafeBytes { try d.decode($0, into: &sink) }
            got = sink.value
            XCTAssertEqual(got, value, "length \(length)")
        }
    }

    func testIndexedNamesStayRightWhileTheTableEvictsAndCompacts() throws {
        // A small table: each insertion evicts, and its name is often the entry it evicts;
        // the live bytes move to the front again and again.
        let d = HPACKBlockDecoder(maxTableSize: 100, maxHeaderListSize: 65536)
        var model: [(name: String, value: String)] = []
        func insert(_ name: String, _ value: String) {
            let need = 32 + name.utf8.count + value.utf8.count
            guard need <= 100 else { model = []; return }
            while model.reduce(0, { $0 + 32 + $1.name.utf8.count + $1.value.utf8.count }) + need > 100 { model.removeLast() }
            model.insert((name, value), at: 0)
        }
        XCTAssertEqual(try decode(d, "40 01 6b 01 76"), [["k", "v"]])
        insert("k", "v")
        for i in 0..<300 {
            let value = String(repeating: Character(UnicodeScalar(UInt8(97 + i % 26))), count: 1 + (i * 37) % 60)
            let index = 62 + (i % max(1, model.count))
            let name = model[index - 62].name
            let prefix = index < 63 ? String(format: "%02x", 0x40 | index) : "7f" + String(format: "%02x", index - 63)
            let hex = prefix + String(format: "%02x", value.utf8.count)
                + value.utf8.map { String(format: "%02x", $0) }.joined()
            XCTAssertEqual(try decode(d, hex), [[name, value]], "round \(i)")
            insert(name, value)
            XCTAssertEqual(d.dynamicEntries.map { [$0.name, $0.value] }, model.map { [$0.name, $0.value] }, "round \(i)")
        }
        // An entry larger than the table empties it and is not added (RFC 7541 §4.4).
        let big = String(repeating: "z", count: 70)
        XCTAssertEqual(try decode(d, "7e" + String(format: "%02x", 70) + big.utf8.map { String(format: "%02x", $0) }.joined()), [[model[0].name, big]])
        XCTAssertEqual(d.count, 0)
        XCTAssertEqual(d.size, 0)
    }

    func testTableSizeUpdatesEvictAndAreBoundedBySettings() throws {
        let d = HPACKBlockDecoder(maxHeaderListSize: 65536)
        try decode(d, "828684410f7777772e6578616d706c652e636f6d")
        XCTAssertEqual(d.count, 1)
        XCTAssertEqual(try decode(d, "20 82"), [[":method", "GET"]])
        XCTAssertEqual(d.count, 0)
        XCTAssertEqual(d.capacity, 0)
        XCTAssertEqual(try decode(d, "3fe11f 3fe11f 82"), [[":method", "GET"]]) // 4096, twice
        XCTAssertEqual(d.capacity, 4096)
        assertRejects("3fe21f 82", "a table size update to 4097, above SETTINGS_HEADER_TABLE_SIZE")
        assertRejects("82 20", "a table size update after a field")
        assertRejects("20 20 20 82", "three table size updates")
    }

    // MARK: malformed blocks

    func testMalformedBlocksAreRejected() {
        assertRejects("ff", "a truncated integer")
        assertRejects("ff ff ff ff ff ff 0f", "an integer beyond 2^28")
        assertRejects("80", "index 0")
        assertRejects("be", "index 62 with an empty dynamic table")
        assertRejects("ff 80 01", "index 255")
        assertRejects("00 05 61", "a string beyond the block")
        assertRejects("00", "a literal without its name")
        assertRejects("00 01 61", "a literal without its value")
        assertRejects("00 01 61 81 18", "Huffman padding of zeros")
        assertRejects("00 01 61 82 1f ff", "Huffman padding longer than 7 bits")
        assertRejects("00 01 61 84 ff ff ff ff", "EOS inside a Huffman-coded string")
        assertRejects("82 82", maxHeaderListSize: 64, "a header list beyond the limit")
    }

    func testValidHuffmanPaddingIsAccepted() throws {
        let d = HPACKBlockDecoder(maxHeaderListSize: 65536)
        XCTAssertEqual(try decode(d, "00 01 61 81 1f"), [["a", "a"]])
        XCTAssertEqual(try decode(d, "00 01 61 80"), [["a", ""]])
    }

    // MARK: heads built from the fields

    func requestHead(_ fields: [(String, String)], limits: ProxyLimits = ProxyLimits()) -> HTTP2DecodedRequest? {
        var sink = HTTP2RequestHead(limits: limits, allocator: ByteBufferAllocator(), blockSize: 64)
        for (n, v) in fields {
            var n = n, v = v
            n.withUTF8 { np in v.withUTF8 { vp in sink.field(name: UnsafeRawBufferPointer(np), value: UnsafeRawBufferPointer(vp)) } }
        }
        return sink.finish()
    }

    static let get = [(":method", "GET"), (":scheme", "https"), (":path", "/a?b"), (":authority", "svc:8080")]

    func testRequestHeadJoinsCookiesMakesHostAndWritesOneCanonicalContentLength() throws {
        let r = try XCTUnwrap(requestHead(Self.get + [("cookie", "a=1"), ("x_y", "1"), ("content-length", "007"), ("cookie", "b=2"),
                                                      ("content-length", "7"), ("expect", "100-Continue"), ("host", "other")]))
        let head = try r.head.get()
        XCTAssertEqual(r.contentLength, 7)
        XCTAssertEqual(String(buffer: head.bytes),
                       "GET /a?b HTTP/1.1\r\nhost: svc:8080\r\nx_y: 1\r\ncontent-length: 7\r\nexpect: 100-Continue\r\ncookie: a=1; b=2\r\n\r\n")
        XCTAssertEqual(head.method, "GET")
        XCTAssertEqual(head.target, "/a?b")
        XCTAssertEqual(head.host, "svc:8080")
        XCTAssertTrue(head.underscoreInName)
        XCTAssertTrue(head.expectContinue)
        XCTAssertEqual(head.fields.map(\.kind), [.host, .other, .contentLength, .expect, .other])
    }

    func testMalformedRequestBlocksAreStreamErrors() {
        XCTAssertNil(requestHead(Self.get + [("connection", "close")]))
        XCTAssertNil(requestHead(Self.get + [("te", "gzip")]))
        XCTAssertNil(requestHead(Self.get + [("X-Upper", "1")]))
        XCTAssertNil(requestHead(Self.get + [("x", " padded")]))
        XCTAssertNil(requestHead(Self.get + [("x", "a\rb")]))
        XCTAssertNil(requestHead(Self.get + [("content-length", "1"), ("content-length", "2")]))
        XCTAssertNil(requestHead(Self.get + [("content-length", "+1")]))
        XCTAssertNil(requestHead(Self.get + [("x", "1"), (":path", "/again")]))
        XCTAssertNil(requestHead(Self.get + [(":method", "GET")]))
        XCTAssertNil(requestHead([(":method", "GET"), (":path", "/")]))
        XCTAssertNil(requestHead(Self.get + [(":protocol", "websocket")]))
        // A malformed field after a refused one: still malformed.
        XCTAssertNil(requestHead(Self.get + [("x", "a\u{1}b"), ("connection", "close")]))
    }

    func testRefusedRequestBlocksGetTheParsersStatus() throws {
        func status(_ fields: [(String, String)], limits: ProxyLimits = ProxyLimits()) -> Int? {
            guard let r = requestHead(fields, limits: limits), case .failure(let e) = r.head else { return nil }
            return e.status
        }
        XCTAssertEqual(status([(":method", "CONNECT"), (":authority", "a:443")]), 403)
        XCTAssertEqual(status([(":method", "GET"), (":scheme", "https"), (":path", "/a#b"), (":authority", "a")]), 400)
        XCTAssertEqual(status([(":method", "GET"), (":scheme", "https"), (":path", "*"), (":authority", "a")]), 400)
        XCTAssertEqual(status([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a@b")]), 400)
        XCTAssertEqual(status(Self.get + [("x", "a\u{1}b")]), 400)
        XCTAssertEqual(status(Self.get + [("x", "a\u{7f}b")]), 400)
        var limits = ProxyLimits()
        limits.maxHeaderCount = 3
        XCTAssertEqual(status(Self.get + [("a", "1"), ("b", "2"), ("c", "3")], limits: limits), 431)
        limits = ProxyLimits()
        limits.maxHeadBytes = 64
        XCTAssertEqual(status(Self.get + [("a", String(repeating: "x", count: 64))], limits: limits), 431)
        let options = try XCTUnwrap(requestHead([(":method", "OPTIONS"), (":scheme", "https"), (":path", "*"), (":authority", "a")]))
        XCTAssertEqual(try options.head.get().targetForm, .asterisk)
    }

    func responseHead(_ fields: [(String, String)]) -> UpstreamH2ResponseHead {
        var sink = UpstreamH2ResponseHead(allocator: ByteBufferAllocator(), capacity: 64)
        for (n, v) in fields {
            var n = n, v = v
            n.withUTF8 { np in v.withUTF8 { vp in sink.field(name: UnsafeRawBufferPointer(np), value: UnsafeRawBufferPointer(vp)) } }
        }
        return sink
    }

    func testResponseHeadDropsConnectionFieldsAndChecksStatusAndLength() throws {
        var r = responseHead([(":status", "200"), ("content-length", "5"), ("connection", "close"), ("content-length", "5"), ("x", "y")])
        XCTAssertNil(r.error)
        XCTAssertEqual(r.length, 5)
        let head = r.builder!.finish()
        XCTAssertEqual(head.status, 200)
        XCTAssertEqual(String(buffer: head.bytes), "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx: y\r\n\r\n")
        XCTAssertNotNil(responseHead([(":status", "20x")]).error)
        XCTAssertNotNil(responseHead([(":status", "099")]).error)
        XCTAssertNotNil(responseHead([(":status", "200"), (":status", "200")]).error)
        XCTAssertNotNil(responseHead([("x", "y"), (":status", "200")]).error)
        XCTAssertNotNil(responseHead([(":status", "200"), ("x", "a\nb")]).error)
        XCTAssertNotNil(responseHead([(":status", "200"), ("x", "a\u{1}b")]).error)
        XCTAssertNotNil(responseHead([(":status", "200"), ("x y", "1")]).error)
        XCTAssertNotNil(responseHead([(":status", "200"), ("content-length", "1"), ("content-length", "2")]).error)
        XCTAssertNotNil(responseHead([(":status", "200"), ("X-Foo", "1")]).error, "an uppercase name is malformed in HTTP/2")
    }

    func testFieldsAFilterAdded_thatHTTP2Forbids_areLeftOutOfTheRequestBlock_andTheRestKept() throws {
        var p = HTTPHeadParser()
        guard case .complete(var head, _) = p.parseRequest(ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")) else { return XCTFail("no head") }
        for n in ["Connection", "keep-alive", "Upgrade", "Proxy-Connection", "Transfer-Encoding", "HOST",
                  "x-forwarded-proto", "x-connection", "upgrades", "keep-alivf", "transfer-encodinx"] {
            head.added.append(HeaderLine(n, "v"))
        }
        var b = ByteBuffer()
        var table = HPACKEncoderTable()
        HPACKRequestWriter.write(head, scheme: "http", contentLength: 0, table: &table, into: &b)
        var sink = Collect()
        try Array(b.readableBytesView).withUnsafeBytes { try HPACKBlockDecoder(maxTableSize: 4096, maxHeaderListSize: 65536).decode($0, into: &sink) }
        let names = sink.fields.map { $0[0] }
        XCTAssertEqual(names, [":method", ":scheme", ":authority", ":path", "x-forwarded-proto", "x-connection", "upgrades", "keep-alivf", "transfer-encodinx"])
        XCTAssertTrue(sink.fields.contains([":authority", "v"]), "a Host a filter set is the authority: \(sink.fields)")
    }

    func testCredentialsAreWrittenAsNeverIndexedLiterals_andTheBlockDecodesBack() throws {
        var p = HTTPHeadParser()
        let req = "GET /a HTTP/1.1\r\nHost: svc\r\nAuthorization: Bearer t\r\nCookie: s=1\r\nProxy-Authorization: b\r\nX-Other: y\r\n\r\n"
        guard case .complete(let head, _) = p.parseRequest(ByteBuffer(string: req)) else { return XCTFail("no head") }
        var b = ByteBuffer()
        var table = HPACKEncoderTable()
        HPACKRequestWriter.write(head, scheme: "http", contentLength: 0, table: &table, into: &b)
        let block = Array(b.readableBytesView)
        func literal(_ flag: UInt8, _ name: String) -> [UInt8] { [flag, UInt8(name.utf8.count)] + Array(name.utf8) }
        func contains(_ needle: [UInt8]) -> Bool {
            guard block.count >= needle.count else { return false }
            return (0...(block.count - needle.count)).contains { Array(block[$0..<($0 + needle.count)]) == needle }
        }
        for n in ["authorization", "cookie", "proxy-authorization"] { XCTAssertTrue(contains(literal(0x10, n)), n) }
        XCTAssertTrue(contains(literal(0x00, "x-other")), "other fields: literal without indexing")
        var sink = Collect()
        try block.withUnsafeBytes { try HPACKBlockDecoder(maxTableSize: 4096, maxHeaderListSize: 65536).decode($0, into: &sink) }
        XCTAssertTrue(sink.fields.contains(["authorization", "Bearer t"]), "\(sink.fields)")
        XCTAssertTrue(sink.fields.contains(["cookie", "s=1"]), "\(sink.fields)")
    }

    // MARK: header blocks written in place, names lowercased

    /// A block written behind its reserved frame header is the same bytes as the block
    /// built apart and framed: one HEADERS frame (END_HEADERS, END_STREAM when asked)
    /// within the frame size, HEADERS and CONTINUATION frames past it.
    func testHeaderBlockWrittenInPlaceFramesAsTheBlockBuiltApart() {
        for (size, maxFrame, end) in [(0, 16_384, true), (30, 16_384, false), (16_384, 16_384, true), (16_385, 16_384, false), (40_000, 16_384, true)] {
            let block = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
            var apart = ByteBuffer(bytes: [0xaa, 0xbb]) // frames already queued before it
            var copy = ByteBuffer(bytes: block)
            HTTP2Wire.writeHeaderBlock(&copy, stream: 5, endStream: end, maxFrameSize: maxFrame, into: &apart)
            var inPlace = ByteBuffer(bytes: [0xaa, 0xbb])
            HTTP2Wire.writeHeaderBlock(stream: 5, endStream: end, maxFrameSize: maxFrame, into: &inPlace) { $0.writeBytes(block) }
            XCTAssertEqual(Array(inPlace.readableBytesView), Array(apart.readableBytesView), "block of \(size) bytes")
            // The first frame: HEADERS, its flags.
            let flags = inPlace.getInteger(at: 2 + 4, as: UInt8.self)!
            XCTAssertEqual(inPlace.getInteger(at: 2 + 3, as: UInt8.self), HTTP2Wire.headers)
            XCTAssertEqual(flags & 0x1 != 0, end)
            XCTAssertEqual(flags & 0x4 != 0, size <= maxFrame, "END_HEADERS on the HEADERS frame only when the block fits it")
        }
    }

    /// Names are lowercased eight bytes at a time: the same bytes as one at a time, for
    /// every byte value (bytes from 0x80 up and non-letters unchanged) and every length.
    func testLiteralNamesAreLowercasedLikeByteByByte() {
        var bytes = (0...255).map { UInt8($0) }
        bytes += Array("X-Envoy-Peer-Metadata-ID@[`{AZaz".utf8)
        for start in stride(from: 0, to: bytes.count, by: 5) {
            for length in [0, 1, 7, 8, 9, 15, 16, 17, 33] where start + length <= bytes.count {
                let name = Array(bytes[start..<(start + length)])
                var out = ByteBuffer()
                name.withUnsafeBytes { n in
                    HPACKRawWriter.write(into: &out, bound: HPACKRawWriter.bound(n.count)) { w in w.string(n, lowercase: true) }
                }
                let expected = name.map { $0 &- 65 < 26 ? $0 | 0x20 : $0 }
                XCTAssertEqual(Array(out.readableBytesView.dropFirst()), expected, "bytes \(start)..<\(start + length)")
            }
        }
    }

    /// The value check reads 16 and 8 bytes at a time: a forbidden byte is found at every
    /// position of a long value, with the same verdict as one byte at a time (CR, LF, NUL:
    /// malformed; another control byte or DEL: refused; obs-text and tabs inside: valid).
    func testFieldValueVerdictIsTheSameAtEveryPositionOfALongValue() {
        func verdict(_ v: [UInt8]) -> HTTP2FieldCheck.Value { v.withUnsafeBytes { HTTP2FieldCheck.value($0) } }
        for length in [1, 7, 8, 15, 16, 17, 31, 33, 700] {
            let clean = (0..<length).map { UInt8(33 + $0 % 90) }
            XCTAssertEqual(verdict(clean), .valid, "length \(length)")
            for at in 0..<length {
                for (byte, expected) in [(UInt8(0), HTTP2FieldCheck.Value.malformed), (10, .malformed), (13, .malformed), (1, .control),
                                         (31, .control), (127, .control), (0x80, .valid), (0xff, .valid)] {
                    var v = clean
                    v[at] = byte
                    XCTAssertEqual(verdict(v), expected, "byte \(byte) at \(at) of \(length)")
                }
                if at > 0 && at < length - 1 {
                    var v = clean
                    v[at] = 9 // a tab inside a value is allowed
                    XCTAssertEqual(verdict(v), .valid, "tab at \(at) of \(length)")
                }
            }
        }
    }
}
