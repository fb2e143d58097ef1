import XCTest
import NIOCore
import MoonletHTTP
@testable import MoonletProxy

/// The open-stream table both HTTP/2 connection kinds use: found by id whatever the
/// number of open streams, removed by identity, ids only growing.
final class HTTP2StreamTableTests: XCTestCase {
    final class FakeWriter: HTTP2DataWriter {
        var sendWindow = 65_535
        var peerMaxFrameSize = 16_384
        func writeData(stream: UInt32, _ payload: ByteBuffer, endStream: Bool) {}
        func writeTrailers(stream: UInt32, _ trailers: HTTPTrailers) {}
    }
    final class FakeStream: HTTP2FlowControlledSender {
        let id: UInt32
        let connection = FakeWriter()
        var sendWindow = 65_535
        var pending = HTTP2Wire.noneQueued
        var pendingBytes = 0
        var pendingTrailers: HTTPTrailers?
        init(_ id: UInt32) { self.id = id }
        func sent() {}
        func updateWritability() {}
        func reset(_ code: HTTP2ErrorCode) {}
    }

    func testEveryOpenStreamIsFoundById_amongThousands_andAnIdNotOpenIsNot() {
        var t = HTTP2StreamTable<FakeStream>()
        let streams = (0..<3000).map { FakeStream(UInt32(2 * $0 + 1)) }
        for s in streams { t.append(s) }
        for s in streams { XCTAssertTrue(t[s.id] === s, "stream \(s.id)") }
        for id in [0, 2, 4000, 6001, 6002, UInt32.max] as [UInt32] { XCTAssertNil(t[id], "id \(id)") }
        // Streams end in any order: the rest stay found.
        var open = streams
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let k = Int.random(in: 0..<open.count, using: &rng)
            XCTAssertTrue(t.remove(open[k]))
            XCTAssertNil(t[open[k].id])
            open.remove(at: k)
        }
        XCTAssertEqual(t.count, open.count)
        for s in open { XCTAssertTrue(t[s.id] === s) }
        XCTAssertEqual(t.values.map(\.id), open.map(\.id), "still in opening order")
    }

    func testRemoveTakesOnlyThatObject_notAnotherWithItsId() {
        var t = HTTP2StreamTable<FakeStream>()
        let a = FakeStream(5)
        t.append(FakeStream(1))
        t.append(a)
        XCTAssertFalse(t.remove(FakeStream(5)), "another object with the same id")
        XCTAssertFalse(t.remove(FakeStream(3)), "an id never opened")
        XCTAssertTrue(t.remove(a))
        XCTAssertFalse(t.remove(a), "already removed")
        XCTAssertEqual(t.values.map(\.id), [1])
        t.removeAll()
        XCTAssertTrue(t.isEmpty)
        XCTAssertNil(t[1])
    }
}
