import XCTest
import NIOCore
import MoonletHTTP
import MoonletTelemetry
@testable import MoonletProxy

/// The HPACK encoder's dynamic table for Istio's metadata exchange headers, read back by
/// Moonlet's own decoder as the peer sidecar reads it.
final class HPACKEncoderTableTests: XCTestCase {
    typealias Collect = HPACKDecoderTests.Collect
    let metadata = String(repeating: "Q2hJS0JtbGhjMU5oWm1VPQ", count: 32)
    let id = "sidecar~10.0.0.1~app-7d9f.prod~prod.svc.cluster.local"

    func requestHead(_ extra: [(String, String)] = []) -> HTTPHead {
        var p = HTTPHeadParser()
        guard case .complete(var head, _) = p.parseRequest(ByteBuffer(string: "GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")) else { fatalError("no head") }
        head.addLowercased(PeerMetadata.header, metadata)
        head.addLowercased(PeerMetadata.idHeader, id)
        for (n, v) in extra { head.addLowercased(n, v) }
        return head
    }

    func block(_ head: HTTPHead, _ table: inout HPACKEncoderTable) -> [UInt8] {
        var b = ByteBuffer()
        HPACKRequestWriter.write(head, scheme: "https", contentLength: 0, table: &table, into: &b)
        return Array(b.readableBytesView)
    }

    func decode(_ block: [UInt8], _ decoder: HPACKBlockDecoder) throws -> [[String]] {
        var sink = Collect()
        try block.withUnsafeBytes { try decoder.decode($0, into: &sink) }
        return sink.fields
    }

    func testTheMetadataHeadersGoLiteralAndIndexedOnce_thenAsOneByteIndexes_andDecodeTheSameEveryTime() throws {
        var table = HPACKEncoderTable()
        let decoder = HPACKBlockDecoder(maxTableSize: 4096, maxHeaderListSize: 65536)
        let first = block(requestHead([("x-other", "1")]), &table)
        let second = block(requestHead([("x-other", "2")]), &table)
        XCTAssertGreaterThan(first.count, metadata.utf8.count, "the first block carries the metadata")
        XCTAssertLessThan(second.count, 40, "later blocks refer to it by index: \(second)")
        // Literal with incremental indexing (0x40) for both, the newest (the id) at 62.
        XCTAssertTrue(first.contains(0x40))
        XCTAssertTrue(second.contains(0x80 | 63) && second.contains(0x80 | 62), "\(second)")
        for (b, other) in [(first, "1"), (second, "2")] {
            let fields = try decode(b, decoder)
            XCTAssertTrue(fields.contains([PeerMetadata.header, metadata]), "\(fields)")
            XCTAssertTrue(fields.contains([PeerMetadata.idHeader, id]), "\(fields)")
            XCTAssertTrue(fields.contains(["x-other", other]), "\(fields)")
            XCTAssertTrue(fields.contains([":authority", "svc"]), "\(fields)")
        }
        XCTAssertEqual(decoder.dynamicEntries.map(\.name), [PeerMetadata.idHeader, PeerMetadata.header])
    }

    func testAChangedValueIsIndexedAnew_andOtherAddedFieldsStayLiteralsWithoutIndexing() throws {
        var table = HPACKEncoderTable()
        let decoder = HPACKBlockDecoder(maxTableSize: 4096, maxHeaderListSize: 65536)
        _ = try decode(block(requestHead(), &table), decoder)
        var head = requestHead()
        head.removeLowercased(PeerMetadata.header)
        head.addLowercased(PeerMetadata.header, "bmV3")
        let fields = try decode(block(head, &table), decoder)
        XCTAssertTrue(fields.contains([PeerMetadata.header, "bmV3"]), "\(fields)")
        XCTAssertEqual(decoder.dynamicEntries.count, 3)
        XCTAssertEqual(decoder.dynamicEntries.first?.value, "bmV3")
        XCTAssertEqual(decoder.dynamicEntries.map(\.name).filter { $0 == "x-other" }, [])
    }

    func testASmallerPeerTableSizeStartsTheNextBlockWithASizeUpdate_andWhatNoLongerFitsGoesWithoutIndexing() throws {
        var table = HPACKEncoderTable()
        let decoder = HPACKBlockDecoder(maxTableSize: 4096, maxHeaderListSize: 65536)
        _ = try decode(block(requestHead(), &table), decoder)
        XCTAssertEqual(decoder.dynamicEntries.count, 2)
        // The peer's SETTINGS_HEADER_TABLE_SIZE drops to 100: neither entry fits any more
        // (an entry takes its name, its value and 32).
        table.peerTableSize(100)
        let b = block(requestHead(), &table)
        XCTAssertEqual(Array(b.prefix(3)), [0x3f, 100 - 31, 0x82], "a size update to 100 first, then :method GET")
        let fields = try decode(b, decoder)
        XCTAssertTrue(fields.contains([PeerMetadata.header, metadata]), "\(fields)")
        XCTAssertTrue(fields.contains([PeerMetadata.idHeader, id]), "\(fields)")
        XCTAssertEqual(decoder.dynamicEntries.count, 0, "the decoder evicted both and took nothing new")
        XCTAssertEqual(decoder.size, 0)
        // No size update in the blocks after it; a larger SETTINGS value never grows the table.
        table.peerTableSize(4096)
        let next = block(requestHead(), &table)
        XCTAssertEqual(next.first, 0x82)
        XCTAssertEqual(try decode(next, decoder).count, 6)
    }

    func testAResponseBlockIndexesTheMetadataTheSameWay() throws {
        var writer = HPACKResponseWriter()
        let decoder = HPACKBlockDecoder(maxTableSize: 4096, maxHeaderListSize: 65536)
        var p = HTTPHeadParser()
        guard case .complete(var head, _) = p.parseResponse(ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"), requestWasHead: false) else { return XCTFail("no head") }
        head.addLowercased(PeerMetadata.header, metadata)
        head.addLowercased(PeerMetadata.idHeader, id)
        var sizes: [Int] = []
        for _ in 0..<2 {
            var b = ByteBuffer()
            writer.write(head, server: nil, into: &b)
            sizes.append(b.readableBytes)
            let fields = try decode(Array(b.readableBytesView), decoder)
            XCTAssertEqual(fields.first, [":status", "200"])
            XCTAssertTrue(fields.contains([PeerMetadata.header, metadata]), "\(fields)")
            XCTAssertTrue(fields.contains([PeerMetadata.idHeader, id]), "\(fields)")
        }
        XCTAssertLessThan(sizes[1], 10, "\(sizes)")
    }

    func testResponseFieldNamesInTheStaticTableAreWrittenByIndexInAnyCaseAndReadBackLowercase() throws {
        let names: [(String, Int)] = [("date", 33), ("etag", 34), ("vary", 59), ("expires", 36), ("location", 46), ("content-type", 31),
                                      ("last-modified", 44), ("accept-ranges", 18), ("cache-control", 24), ("content-encoding", 26)]
        for (name, index) in names {
            for spelled in [name, name.uppercased(), name.prefix(1).uppercased() + name.dropFirst()] {
                var n = spelled
                XCTAssertEqual(n.withUTF8 { HPACKResponseWriter.nameIndex(.other, UnsafeRawBufferPointer($0)) }, index, spelled)
            }
        }
        // Near misses: one byte off at either end, another length, a byte that folds onto no letter.
        for miss in ["datf", "eate", "vars", "expirer", "locatioo", "content-typ_", "Content-Types", "last-modifieD2", "accept-rangez",
                     "cache_control", "content-encodinf", "x-date", "dat@", "set-cookie", "server-timing"] {
            var n = miss
            XCTAssertEqual(n.withUTF8 { HPACKResponseWriter.nameIndex(.other, UnsafeRawBufferPointer($0)) }, 0, miss)
        }
        // A whole block: the names leave as indexes and are read back lowercase.
        var writer = HPACKResponseWriter()
        let decoder = HPACKBlockDecoder(maxTableSize: 4096, maxHeaderListSize: 65536)
        var p = HTTPHeadParser()
        let response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nLast-Modified: Sun, 06 Dec 2026 10:00:00 GMT\r\nETag: \"5-a\"\r\nAccept-Ranges: bytes\r\nX-Other: 1\r\n\r\n"
        guard case .complete(let head, _) = p.parseResponse(ByteBuffer(string: response), requestWasHead: false) else { return XCTFail("no head") }
        var b = ByteBuffer()
        writer.write(head, server: "moonlet", into: &b)
        XCTAssertEqual(try decode(Array(b.readableBytesView), decoder),
                       [[":status", "200"], ["content-length", "2"], ["last-modified", "Sun, 06 Dec 2026 10:00:00 GMT"], ["etag", "\"5-a\""],
                        ["accept-ranges", "bytes"], ["x-other", "1"], ["server", "moonlet"]])
        XCTAssertEqual(Array(b.readableBytesView.prefix(3)), [0x88, 0x0f, 0x0d], "status 200, then content-length by index 28")
    }
}
