import XCTest
@testable import MoonletTelemetry

final class TraceContextTests: XCTestCase {
    func headers(_ h: [String: String]) -> (String) -> String? { { h[$0] } }

    func test_aW3CTraceparent_isRead_andItsTraceIDIsKeptOnTheNextHop() throws {
        let c = try XCTUnwrap(TracePropagation.extract(headers(["traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "rojo=00f067aa0ba902b7"])))
        XCTAssertEqual(c.traceIDHex, "4bf92f3577b34da6a3ce929d0e0e4736")
        XCTAssertEqual(c.spanIDHex, "00f067aa0ba902b7")
        XCTAssertEqual(c.sampled, true)
        let child = c.child(newSpanID: 0x1234)
        let out = Dictionary(TracePropagation.headers(child), uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(out["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000001234-01")
        XCTAssertEqual(out["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736")
        XCTAssertEqual(out["x-b3-parentspanid"], "00f067aa0ba902b7")
        XCTAssertEqual(out["tracestate"], "rojo=00f067aa0ba902b7")
    }

    func test_malformedTraceparents_areIgnored_notErrors() {
        for bad in ["", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"] {
            XCTAssertNil(TracePropagation.parseTraceparent(bad), bad)
        }
        // A later version is read by its first four fields.
        XCTAssertNotNil(TracePropagation.parseTraceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"))
    }

    func test_B3MultiHeaders_with64And128BitTraceIDs_areContinued() throws {
        let c64 = try XCTUnwrap(TracePropagation.extract(headers(["x-b3-traceid": "a3ce929d0e0e4736", "x-b3-spanid": "00f067aa0ba902b7", "x-b3-sampled": "1"])))
        XCTAssertFalse(c64.is128Bit)
        XCTAssertEqual(c64.traceIDHex, "a3ce929d0e0e4736")
        let out = Dictionary(TracePropagation.headers(c64.child(newSpanID: 7)), uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(out["x-b3-traceid"], "a3ce929d0e0e4736")
        XCTAssertEqual(out["x-b3-sampled"], "1")
        XCTAssertEqual(out["traceparent"], "00-0000000000000000a3ce929d0e0e4736-0000000000000007-01")
        let c128 = try XCTUnwrap(TracePropagation.extract(headers(["x-b3-traceid": "4BF92F3577B34DA6A3CE929D0E0E4736", "x-b3-spanid": "00f067aa0ba902b7", "x-b3-flags": "1"])))
        XCTAssertTrue(c128.is128Bit)
        XCTAssertTrue(c128.debug)
        XCTAssertTrue(c128.isSampled)
    }

    func test_theB3SingleHeader_winsOverMultiAndW3C_andASamplingOnlyValueKeepsTheDecision() throws {
        let c = try XCTUnwrap(TracePropagation.extract(headers([
            "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90",
            "x-b3-traceid": "a3ce929d0e0e4736", "x-b3-spanid": "00f067aa0ba902b7",
        ])))
        XCTAssertEqual(c.traceIDHex, "80f198ee56343ba864fe8b2a57d3eff7")
        XCTAssertEqual(c.sampled, false)
        XCTAssertEqual(c.parentSpanID, 0x05e3ac9a4f6e3b90)
        let deny = TracePropagation.extract(headers(["b3": "0"]))
        let started = TracePropagation.start(deny, random: { 42 }, sample: { true })
        XCTAssertEqual(started.sampled, false, "the caller's 'do not sample' holds for the new trace")
        XCTAssertNotEqual(started.traceIDLow, 0)
    }

    func test_withoutTraceHeaders_theFirstSidecarStartsA128BitTrace_andSamples() {
        var n: UInt64 = 0
        let c = TracePropagation.start(nil, random: { n += 1; return n }, sample: { true })
        XCTAssertTrue(c.is128Bit)
        XCTAssertEqual(c.traceIDHex.count, 32)
        XCTAssertEqual(c.sampled, true)
        let kept = TracePropagation.start(TracePropagation.parseTraceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"), random: { 9 }, sample: { true })
        XCTAssertEqual(kept.traceIDHex, "4bf92f3577b34da6a3ce929d0e0e4736")
        XCTAssertEqual(kept.sampled, false, "a caller's decision is honoured")
    }

    func test_theFirstSidecarsHeaders_writtenDirectly_areTheOnesTheGeneralPathWrites() {
        for sampled in [true, false] {
            let c = TraceContext(traceIDHigh: 0x0123_4567_89ab_cdef, traceIDLow: 0xfedc_ba98_7654_3210, is128Bit: true, spanID: 0x00f0_67aa_0ba9_02b7, sampled: sampled)
            let general = Dictionary(uniqueKeysWithValues: TracePropagation.headers(c))
            XCTAssertEqual(TracePropagation.traceparent(c.traceIDHigh, c.traceIDLow, c.spanID, sampled: sampled), general["traceparent"])
            XCTAssertEqual(TraceHex.hex(c.traceIDHigh, c.traceIDLow), general["x-b3-traceid"])
            XCTAssertEqual(TraceHex.hex(c.spanID), general["x-b3-spanid"])
        }
        XCTAssertEqual(TracePropagation.parseTraceparent(TracePropagation.traceparent(1, 2, 3, sampled: true))?.traceIDLow, 2)
    }

    func test_zipkinV2JSON_hasTheModelsFields() throws {
        let s = Span(traceIDHigh: 1, traceIDLow: 2, id: 3, parentID: 4, name: "order-service.default.svc.cluster.local:8080/*", kind: .server,
                     timestampMicros: 1_700_000_000_000_000, durationMicros: 1500, localService: "order-service.default", localIP: "10.0.0.1",
                     remoteIP: "10.0.0.2", remotePort: 40000, tags: [("http.status_code", "503"), ("error", "true")])
        let json = SpanEncoding.zipkinV2([s])
        let obj = try XCTUnwrap((try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]])?.first)
        XCTAssertEqual(obj["traceId"] as? String, "00000000000000010000000000000002")
        XCTAssertEqual(obj["id"] as? String, "0000000000000003")
        XCTAssertEqual(obj["parentId"] as? String, "0000000000000004")
        XCTAssertEqual(obj["kind"] as? String, "SERVER")
        XCTAssertEqual(obj["timestamp"] as? Int, 1_700_000_000_000_000)
        XCTAssertEqual(obj["duration"] as? Int, 1500)
        XCTAssertEqual((obj["localEndpoint"] as? [String: Any])?["serviceName"] as? String, "order-service.default")
        XCTAssertEqual((obj["remoteEndpoint"] as? [String: Any])?["ipv4"] as? String, "10.0.0.2")
        XCTAssertEqual((obj["tags"] as? [String: String])?["error"], "true")
    }

    func test_zipkinV2_keepsTheFirstValueOfARepeatedTag_escapesStrings_andWritesA64BitTraceIDAndIPv6() throws {
        let s = Span(traceIDHigh: 9, traceIDLow: 0xabc, is128Bit: false, id: 0xffff_ffff_ffff_ffff, parentID: nil, name: "a\"b\\c\nd\u{1}é",
                     kind: .client, timestampMicros: 0, durationMicros: 0, localService: "svc", remoteIP: "fd00::1", remotePort: 8080,
                     tags: [("k", "first"), ("other", "x"), ("k", "second")], debug: true)
        let bytes = SpanEncoding.zipkinV2Bytes([s, s])
        XCTAssertEqual(String(decoding: bytes, as: UTF8.self), SpanEncoding.zipkinV2([s, s]))
        let all = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(bytes)) as? [[String: Any]])
        XCTAssertEqual(all.count, 2)
        let obj = all[0]
        XCTAssertEqual(obj["traceId"] as? String, "0000000000000abc")
        XCTAssertEqual(obj["id"] as? String, "ffffffffffffffff")
        XCTAssertNil(obj["parentId"])
        XCTAssertEqual(obj["kind"] as? String, "CLIENT")
        XCTAssertEqual(obj["name"] as? String, "a\"b\\c\nd\u{1}é")
        XCTAssertEqual(obj["timestamp"] as? Int, 0)
        XCTAssertEqual(obj["duration"] as? Int, 1, "Zipkin wants a positive duration")
        XCTAssertEqual(obj["debug"] as? Bool, true)
        XCTAssertEqual((obj["remoteEndpoint"] as? [String: Any])?["ipv6"] as? String, "fd00::1")
        XCTAssertEqual((obj["remoteEndpoint"] as? [String: Any])?["port"] as? Int, 8080)
        XCTAssertEqual(obj["tags"] as? [String: String], ["k": "first", "other": "x"])
    }

    func test_OTLPJSON_followsTheOTLPMapping() throws {
        let s = Span(traceIDHigh: 0, traceIDLow: 0xabc, is128Bit: false, id: 5, parentID: nil, name: "x", kind: .client,
                     timestampMicros: 10, durationMicros: 0, localService: "frontend.default", tags: [("error", "true")])
        let json = SpanEncoding.otlpJSON([s])
        let obj = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let rs = try XCTUnwrap((obj["resourceSpans"] as? [[String: Any]])?.first)
        let attrs = try XCTUnwrap((rs["resource"] as? [String: Any])?["attributes"] as? [[String: Any]])
        XCTAssertEqual(attrs.first?["key"] as? String, "service.name")
        let span = try XCTUnwrap(((rs["scopeSpans"] as? [[String: Any]])?.first?["spans"] as? [[String: Any]])?.first)
        XCTAssertEqual(span["traceId"] as? String, "00000000000000000000000000000abc")
        XCTAssertEqual(span["kind"] as? Int, 3)
        XCTAssertEqual(span["startTimeUnixNano"] as? String, "10000")
        XCTAssertEqual(span["endTimeUnixNano"] as? String, "11000")
        XCTAssertEqual((span["status"] as? [String: Any])?["code"] as? Int, 2)
    }
}

final class LogSinkTests: XCTestCase {
    func test_linesHandedOverByALoopBuffer_reachTheFile_andReopenFollowsARotation() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moonlet-logsink-\(getpid())")
        try? FileManager.default.removeItem(at: dir)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("access.log").path
        let sink = try LogSink(path: path)
        let buf = LogBuffer(sink: sink)
        for i in 0..<100 { buf.append("line \(i)") }
        buf.flush()
        // logrotate: move the file away, then ask for a reopen.
        Thread.sleep(forTimeInterval: 0.2)
        try FileManager.default.moveItem(atPath: path, toPath: path + ".1")
        sink.reopen()
        buf.append("after rotation")
        buf.flush()
        sink.close()
        let old = try String(contentsOfFile: path + ".1", encoding: .utf8)
        XCTAssertEqual(old.split(separator: "\n").count, 100)
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "after rotation\n")
        XCTAssertEqual(sink.droppedLines, 0)
    }

    func test_aBatchThatDoesNotFitTheQueue_isDroppedAndItsLinesCounted_insteadOfBlocking() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("moonlet-logsink-full-\(getpid()).log").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let sink = try LogSink(path: path, maxQueuedBytes: 64 << 10)
        XCTAssertFalse(sink.submit([UInt8](repeating: 97, count: 100 << 10), lines: 7))
        XCTAssertTrue(sink.submit(Array("ok\n".utf8), lines: 1))
        sink.close()
        XCTAssertEqual(sink.droppedLines, 7)
        XCTAssertEqual(sink.acceptedLines, 1)
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "ok\n")
        XCTAssertFalse(sink.submit(Array("late\n".utf8), lines: 1), "a closed sink takes nothing")
    }

    func test_aWrittenBatchsBuffer_isHandedBackForTheNextBatch_andEveryLineReachesTheFileInOrder() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("moonlet-logsink-reuse-\(getpid()).log").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let sink = try LogSink(path: path)
        let buf = LogBuffer(sink: sink, flushBytes: 4096)
        var reused = false
        for i in 0..<2000 {
            buf.append("line \(i) " + String(repeating: "x", count: 40))
            if i % 200 == 199 {
                // Give the writer the time to write and hand the buffers back.
                Thread.sleep(forTimeInterval: 0.02)
                var spare: [UInt8]? = nil
                XCTAssertTrue(sink.submit(Array("marker \(i)\n".utf8), lines: 1, spare: &spare))
                if let s = spare { reused = true; XCTAssertTrue(s.isEmpty, "a spare is emptied"); XCTAssertGreaterThanOrEqual(s.capacity, 4096) }
            }
        }
        buf.flush()
        sink.close()
        XCTAssertTrue(reused, "written buffers come back to be reused")
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").filter { $0.hasPrefix("line ") }
        XCTAssertEqual(lines.map { Int($0.split(separator: " ")[1])! }, Array(0..<2000), "every line, in order")
        XCTAssertEqual(sink.droppedLines, 0)
    }

    func test_aLoopBuffersBatch_isAtMostAQuarterOfTheSinksQueue() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("moonlet-logsink-quarter-\(getpid()).log").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let sink = try LogSink(path: path, maxQueuedBytes: 64 << 10)
        XCTAssertEqual(LogBuffer(sink: sink).flushBytes, 16 << 10)
        let big = try LogSink(path: path)
        XCTAssertEqual(LogBuffer(sink: big).flushBytes, 128 << 10)
        sink.close()
        big.close()
    }

    func test_anUnwritablePath_isAnErrorNamingIt() {
        XCTAssertThrowsError(try LogSink(path: "/nonexistent-dir/access.log")) { e in
            XCTAssertTrue("\(e)".contains("/nonexistent-dir/access.log"), "\(e)")
        }
    }
}
