import XCTest
@testable import MoonletTelemetry

struct Record: AccessLogRecord {
    var req: [String: String] = [":method": "GET", ":path": "/api/order/1?x=1", ":authority": "order-service", "user-agent": "curl/8.0",
                                 "x-request-id": "2f6a", "x-forwarded-for": "10.0.0.9"]
    var resp: [String: String] = ["x-envoy-upstream-service-time": "4"]
    func requestHeader(_ name: String) -> String? { req[name] }
    func responseHeader(_ name: String) -> String? { resp[name] }
    var startTimeMillis: Int64 = 1_796_529_907_123   // 2026-12-06T04:05:07.123Z
    var protocolName = "HTTP/1.1"
    var responseCode = 200
    var responseFlags = "-"
    var responseCodeDetails = "via_upstream"
    var connectionTerminationDetails = ""
    var upstreamTransportFailureReason = ""
    var bytesReceived: Int64 = 0
    var bytesSent: Int64 = 178
    var durationMillis: Int64 = 5
    var upstreamHost = "127.0.0.1:9081"
    var upstreamCluster = "outbound|8080|v1|order-service.default.svc.cluster.local"
    var upstreamLocalAddress = "127.0.0.1:40112"
    var downstreamLocalAddress = "127.0.0.1:15001"
    var downstreamRemoteAddress = "127.0.0.1:53122"
    var requestedServerName = ""
    var routeName = "default"
}

final class AccessLogFormatTests: XCTestCase {
    func test_IstiosDefaultTextFormat_printsEveryFieldInOrder_withDashesForWhatIsMissing() throws {
        let f = try AccessLogFormat(text: AccessLogFormat.istioText)
        XCTAssertEqual(f.render(Record()), "[2026-12-06T04:05:07.123Z] \"GET /api/order/1?x=1 HTTP/1.1\" 200 - via_upstream - \"-\" 0 178 5 4 \"10.0.0.9\" \"curl/8.0\" \"2f6a\" \"order-service\" \"127.0.0.1:9081\" outbound|8080|v1|order-service.default.svc.cluster.local 127.0.0.1:40112 127.0.0.1:15001 127.0.0.1:53122 - default\n")
        var r = Record()
        r.req["x-envoy-original-path"] = "/original"
        XCTAssertTrue(f.render(r).contains("\"GET /original HTTP/1.1\""), "X-ENVOY-ORIGINAL-PATH wins over :path")
    }

    func test_IstiosJSONFormat_hasItsKeys_numbersAsNumbers_andNullForMissing() throws {
        let f = try AccessLogFormat(json: AccessLogFormat.istioJSONLabels)
        let line = f.render(Record())
        XCTAssertTrue(line.hasSuffix("}\n"))
        let obj = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        XCTAssertEqual(Set(obj.keys), Set(AccessLogFormat.istioJSONLabels.map(\.0)))
        XCTAssertEqual(obj["response_code"] as? Int, 200)
        XCTAssertEqual(obj["bytes_sent"] as? Int, 178)
        XCTAssertEqual(obj["method"] as? String, "GET")
        XCTAssertEqual(obj["upstream_service_time"] as? String, "4")
        XCTAssertTrue(obj["requested_server_name"] is NSNull)
        XCTAssertEqual(obj["start_time"] as? String, "2026-12-06T04:05:07.123Z")
    }

    func test_headerOperators_takeAnAlternativeAndATruncation_andValuesAreEscapedInJSON() throws {
        var r = Record()
        r.req["user-agent"] = "evil\"\n{"
        XCTAssertEqual(try AccessLogFormat(text: "%REQ(USER-AGENT):4% %REQ(X-MISSING?:AUTHORITY)% 100%%").render(r), "evil order-service 100%")
        let line = try AccessLogFormat(json: [("ua", "%REQ(USER-AGENT)%")]).render(r)
        XCTAssertEqual(line, "{\"ua\":\"evil\\\"\\n{\"}\n")
    }

    func test_theByteRendering_writesTheSameLinesAsTheStringPath_forEveryOperatorAndEscape() throws {
        var r = Record()
        r.req["user-agent"] = "tab\there \"q\" back\\slash \u{1} é"
        r.req["x-forwarded-for"] = ""
        r.bytesReceived = 1_234_567_890_123
        r.responseCode = 0
        r.responseFlags = ""
        let every = "%START_TIME% %REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(USER-AGENT):7% %REQ(X-FORWARDED-FOR)% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "
            + "%PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% %UPSTREAM_TRANSPORT_FAILURE_REASON% "
            + "%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% "
            + "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %REQUESTED_SERVER_NAME% %ROUTE_NAME% 100%%"
        let formats = [try AccessLogFormat(text: every), try AccessLogFormat(text: AccessLogFormat.istioText),
                       try AccessLogFormat(json: AccessLogFormat.istioJSONLabels),
                       try AccessLogFormat(json: [("ua", "%REQ(USER-AGENT)%"), ("mixed", "%RESPONSE_CODE% of %REQ(X-MISSING)% \"x\""), ("n", "%BYTES_RECEIVED%")])]
        for f in formats {
            XCTAssertEqual(f.render(r), f.renderString(r))
            XCTAssertEqual(f.render(Record()), f.renderString(Record()))
        }
        // One clock across lines: a later millisecond of the same second, then the next second.
        let clock = AccessLogClock()
        let f = try AccessLogFormat(text: "%START_TIME%")
        for (ms, want) in [(Int64(1_796_529_907_123), "2026-12-06T04:05:07.123Z"), (1_796_529_907_999, "2026-12-06T04:05:07.999Z"),
                           (1_796_529_908_004, "2026-12-06T04:05:08.004Z")] {
            var rec = Record(); rec.startTimeMillis = ms
            var out: [UInt8] = []
            f.render(rec, into: &out, clock: clock)
            XCTAssertEqual(String(decoding: out, as: UTF8.self), want)
        }
    }

    func test_IstiosDefaultJSON_isWrittenStraightLine_withTheInstructionLoopsBytes_forEveryValueShape() throws {
        let fast = try AccessLogFormat(json: AccessLogFormat.istioJSONLabels)
        let loop = try AccessLogFormat(json: AccessLogFormat.istioJSONLabels, straightLine: false)
        XCTAssertTrue(fast.isStraightLine)
        XCTAssertFalse(loop.isStraightLine)
        XCTAssertFalse(try AccessLogFormat(json: Array(AccessLogFormat.istioJSONLabels.dropLast())).isStraightLine)
        XCTAssertFalse(try AccessLogFormat(json: AccessLogFormat.istioJSONLabels.map { ($0.0, $0.0 == "method" ? "%PROTOCOL%" : $0.1) }).isStraightLine)
        let folded = fast.folding(alwaysEmpty: [.connectionTerminationDetails, .upstreamTransportFailureReason, .upstreamLocalAddress])
        XCTAssertTrue(folded.isStraightLine)
        var records = [Record()]
        var r = Record()
        r.req = [:]; r.resp = [:]
        r.protocolName = ""; r.responseFlags = ""; r.responseCodeDetails = ""; r.upstreamHost = ""; r.upstreamCluster = ""
        r.upstreamLocalAddress = ""; r.downstreamLocalAddress = ""; r.downstreamRemoteAddress = ""; r.routeName = ""
        r.responseCode = 0; r.bytesSent = -12; r.durationMillis = 1_234_567_890_123
        records.append(r)
        // Numbers of every digit count (the short ones are written without a loop).
        for v: Int64 in [0, 7, 10, 42, 99, 100, 404, 999, 1000, 1024, 9999, 10_000, 123_456, -1, -99, -1000, -10_000, .max] {
            var x = Record()
            x.bytesReceived = v; x.bytesSent = v / 3; x.durationMillis = v; x.responseCode = Int(v % 1000)
            records.append(x)
        }
        // Short String values (stored inline by Swift) of every length, with a byte to
        // escape at every position, and non-ASCII ones; header values likewise.
        for n in 1...16 {
            for at in 0..<n {
                var x = Record()
                var b = Array(repeating: UInt8(ascii: "a"), count: n)
                b[at] = [34, 92, 10, 1, 0x1f][at % 5]
                let v = String(decoding: b, as: UTF8.self)
                x.protocolName = v; x.routeName = v; x.upstreamHost = String(v.reversed())
                x.req["user-agent"] = v; x.req["x-envoy-original-path"] = v
                x.requestedServerName = String(repeating: "é", count: n / 2)
                x.resp["x-envoy-upstream-service-time"] = v
                records.append(x)
            }
        }
        for rec in records {
            XCTAssertEqual(fast.render(rec), loop.render(rec))
            var e = rec   // what the folding is for: a record that leaves these empty
            e.upstreamLocalAddress = ""; e.connectionTerminationDetails = ""; e.upstreamTransportFailureReason = ""
            XCTAssertEqual(folded.render(e), loop.render(e))
            XCTAssertEqual(fast.render(rec), fast.renderString(rec))
        }
    }

    func test_aFormatFoldedForOperatorsARecordAlwaysLeavesEmpty_writesTheSameLines() throws {
        var r = Record()
        r.upstreamLocalAddress = ""
        let all: AccessLogFormat.AlwaysEmpty = [.connectionTerminationDetails, .upstreamTransportFailureReason, .upstreamLocalAddress]
        let formats = [try AccessLogFormat(text: AccessLogFormat.istioText), try AccessLogFormat(json: AccessLogFormat.istioJSONLabels),
                       try AccessLogFormat(json: [("t", "%CONNECTION_TERMINATION_DETAILS%"), ("mixed", "a %UPSTREAM_LOCAL_ADDRESS% b"),
                                                  ("f", "%UPSTREAM_TRANSPORT_FAILURE_REASON%")]),
                       try AccessLogFormat(text: "%UPSTREAM_LOCAL_ADDRESS%%CONNECTION_TERMINATION_DETAILS%|%UPSTREAM_TRANSPORT_FAILURE_REASON%")]
        for f in formats {
            let folded = f.folding(alwaysEmpty: all)
            XCTAssertEqual(folded.render(r), f.render(r))
            XCTAssertEqual(folded.render(r), f.renderString(r))
            XCTAssertLessThan(folded.program.count, f.program.count)
        }
        XCTAssertEqual(try AccessLogFormat(json: [("t", "%CONNECTION_TERMINATION_DETAILS%")]).folding(alwaysEmpty: all).render(r), "{\"t\":null}\n")
    }

    func test_jsonEscaping_findsEverySpecialByte_atEveryPositionOfShortAndLongValues() throws {
        // The escape check reads eight bytes at a time: a special byte in every lane of a
        // word and in the tail, next to bytes just above and below the control range.
        let f = try AccessLogFormat(json: [("ua", "%REQ(USER-AGENT)%"), ("t", "%REQ(USER-AGENT)% x")])
        for special in ["\"", "\\", "\n", "\u{1f}", "\u{0}", "\t"] {
            for len in 1...40 {
                for at in 0..<len {
                    var chars = Array(repeating: "a", count: len)
                    if len > 2 { chars[(at + 1) % len] = " " ; chars[(at + 2) % len] = "é" }
                    chars[at] = special
                    var r = Record()
                    r.req["user-agent"] = chars.joined()
                    XCTAssertEqual(f.render(r), f.renderString(r), "\(special.unicodeScalars.first!.value) at \(at) of \(len)")
                }
            }
        }
    }

    func test_literalsOfEveryLength_areWrittenWhole_beforeAndAfterValues() throws {
        // Literals are folded into the operator after them and copied by words when short.
        var r = Record()
        r.req["user-agent"] = "ua"
        for len in 0...40 {
            let lit = String((0..<len).map { Character(UnicodeScalar(UInt8(65 + $0 % 26))) })
            let formats = [try AccessLogFormat(text: lit + "%REQ(USER-AGENT)%" + lit + "%RESPONSE_CODE%" + lit),
                           try AccessLogFormat(text: lit),
                           try AccessLogFormat(json: [(lit + "k", "%REQ(USER-AGENT)%"), ("m" + lit, "%REQ(X-MISSING)%"), ("n", lit + "%RESPONSE_CODE%" + lit)])]
            for f in formats {
                XCTAssertEqual(f.render(r), f.renderString(r), "length \(len)")
                XCTAssertEqual(f.render(Record()), f.renderString(Record()), "length \(len)")
            }
        }
    }

    func test_anUnknownOrMalformedOperator_isAnErrorNamingIt() {
        XCTAssertThrowsError(try AccessLogFormat(text: "%FILTER_STATE(x)%")) { XCTAssertTrue("\($0)".contains("FILTER_STATE"), "\($0)") }
        XCTAssertThrowsError(try AccessLogFormat(text: "%REQ(X):abc%")) { XCTAssertTrue("\($0)".contains("REQ(X):abc"), "\($0)") }
        XCTAssertThrowsError(try AccessLogFormat(text: "[%START_TIME")) { XCTAssertTrue("\($0)".contains("unterminated"), "\($0)") }
    }
}
