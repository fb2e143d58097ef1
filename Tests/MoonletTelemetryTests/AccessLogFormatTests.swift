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

    func test_anUnknownOrMalformedOperator_isAnErrorNamingIt() {
        XCTAssertThrowsError(try AccessLogFormat(text: "%FILTER_STATE(x)%")) { XCTAssertTrue("\($0)".contains("FILTER_STATE"), "\($0)") }
        XCTAssertThrowsError(try AccessLogFormat(text: "%REQ(X):abc%")) { XCTAssertTrue("\($0)".contains("REQ(X):abc"), "\($0)") }
        XCTAssertThrowsError(try AccessLogFormat(text: "[%START_TIME")) { XCTAssertTrue("\($0)".contains("unterminated"), "\($0)") }
    }
}
