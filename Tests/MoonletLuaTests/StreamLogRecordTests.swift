import XCTest
import NIOCore
import MoonletCore
import MoonletHTTP
import MoonletTelemetry
@testable import MoonletLua

/// The access log's per-request path (a stream's record located in one pass over its
/// parsed head, rendered by the compiled format) against the String path
/// (`renderString`, header by header through `requestHeader`), on the same stream.
final class StreamLogRecordTests: XCTestCase {
    /// A stream's record with its clock fixed (the two renderings read the time once each).
    struct Fixed: AccessLogRecord {
        let r: StreamLogRecord
        func requestHeader(_ name: String) -> String? { r.requestHeader(name) }
        func responseHeader(_ name: String) -> String? { r.responseHeader(name) }
        var startTimeMillis: Int64 { 1_796_529_907_123 }
        var protocolName: String { r.protocolName }
        var responseCode: Int { r.responseCode }
        var responseFlags: String { r.responseFlags }
        var responseCodeDetails: String { r.responseCodeDetails }
        var connectionTerminationDetails: String { r.connectionTerminationDetails }
        var upstreamTransportFailureReason: String { r.upstreamTransportFailureReason }
        var bytesReceived: Int64 { r.bytesReceived }
        var bytesSent: Int64 { r.bytesSent }
        var durationMillis: Int64 { 5 }
        var upstreamHost: String { r.upstreamHost }
        var upstreamCluster: String { r.upstreamCluster }
        var upstreamLocalAddress: String { r.upstreamLocalAddress }
        var downstreamLocalAddress: String { r.downstreamLocalAddress }
        var downstreamRemoteAddress: String { r.downstreamRemoteAddress }
        var requestedServerName: String { r.requestedServerName }
        var routeName: String { r.routeName }
        func withRequestHead(_ names: AccessLogHeaderNames, _ spans: UnsafeMutablePointer<AccessLogValueSpan>, _ body: (UnsafeRawBufferPointer) -> Void) {
            r.withRequestHead(names, spans, body)
        }
        func withOtherRequestHeader(_ span: AccessLogValueSpan, index: Int, _ names: AccessLogHeaderNames, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
            r.withOtherRequestHeader(span, index: index, names, body)
        }
        func withResponseHeader(lowercased name: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> Void) -> Bool {
            r.withResponseHeader(lowercased: name, body)
        }
    }

    func stream(_ head: String, response: String?) -> ProxyStream {
        var p = HTTPHeadParser()
        guard case .complete(let h, _) = p.parseRequest(ByteBuffer(string: head)) else { fatalError(head) }
        let s = ProxyStream(id: 1, request: h, source: PeerInfo(address: "127.0.0.1:53122"), filterCount: 0, startNanos: 0)
        if let response {
            var rp = HTTPHeadParser()
            guard case .complete(let r, _) = rp.parseResponse(ByteBuffer(string: response), requestWasHead: false) else { fatalError(response) }
            s.response = r
        }
        s.upstreamHost = "127.0.0.1:9081"
        s.route.cluster = "outbound|8080|v1|order-service.default.svc.cluster.local"
        s.requestBodyBytes = 12
        s.responseBodyBytes = 1_234_567_890_123
        return s
    }

    var formats: [(String, AccessLogFormat)] {
        [("Istio text", try! AccessLogFormat(text: AccessLogFormat.istioText)),
         ("Istio JSON", try! AccessLogFormat(json: AccessLogFormat.istioJSONLabels)),
         ("every REQ form", try! AccessLogFormat(json: [("m", "%REQ(:METHOD)% %REQ(:SCHEME)% %REQ(:AUTHORITY)% %REQ(:PATH)%"),
                                                        ("alt", "%REQ(X-MISSING?USER-AGENT)%"), ("empty", "%REQ(X-EMPTY)%"),
                                                        ("empty-then-alt", "%REQ(X-EMPTY?X-REQUEST-ID)%"), ("again", "%REQ(user-agent)%"),
                                                        ("clip", "%REQ(USER-AGENT):3%"), ("resp", "%RESP(X-MISSING?X-ENVOY-UPSTREAM-SERVICE-TIME)%")]))]
    }

    func assertSame(_ s: ProxyStream, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let rec = Fixed(r: StreamLogRecord(s, now: 0))
        for (name, f) in formats {
            let fast = f.render(rec), slow = f.renderString(rec)
            XCTAssertEqual(fast, slow, "\(what), \(name)", file: file, line: line)
            guard name != "Istio text" else { continue }
            // Field by field, so a difference names its key.
            let a = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(fast.utf8)) as? [String: Any], "\(what), \(name): \(fast)", file: file, line: line)
            let b = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(slow.utf8)) as? [String: Any], file: file, line: line)
            XCTAssertEqual(Set(a.keys), Set(b.keys), file: file, line: line)
            for (k, v) in b { XCTAssertEqual("\(a[k] ?? "absent")", "\(v)", "\(what), \(name): key \(k)", file: file, line: line) }
        }
    }

    func test_IstiosTextAndJSONLines_fromAParsedHead_areTheStringPathsLines_fieldByField() throws {
        let head = "GET /api/order/1?x=1 HTTP/1.1\r\nHost: order-service\r\nUser-Agent: curl/8.0 \"q\"\tx\r\nX-Forwarded-For: 10.0.0.9\r\n"
            + "X-Empty:\r\nx-request-id: 2f6a\r\nX-Request-Id: second\r\n\r\n"
        let s = stream(head, response: "HTTP/1.1 200 OK\r\nX-Envoy-Upstream-Service-Time: 4\r\nContent-Length: 3\r\n\r\n")
        try assertSame(s, "headers in the head")
        let line = try AccessLogFormat(json: AccessLogFormat.istioJSONLabels).render(Fixed(r: StreamLogRecord(s, now: 0)))
        XCTAssertTrue(line.contains("\"request_id\":\"2f6a\""), line)
        XCTAssertTrue(line.contains("\"user_agent\":\"curl/8.0 \\\"q\\\"\\tx\""), line)
        XCTAssertTrue(line.contains("\"upstream_service_time\":\"4\""), line)
        XCTAssertTrue(line.contains("\"bytes_sent\":1234567890123"), line)
    }

    func test_headersAddedOrEditedByFilters_areFoundAsTheStringPathFindsThem() throws {
        let s = stream("GET /a HTTP/1.1\r\nHost: h\r\nUser-Agent: old\r\n\r\n", response: nil)
        // As trace.start and filters do: an added x-request-id, a removed and re-added
        // user-agent, a rewritten path with the original kept, Host replaced.
        s.request.addLowercased("x-request-id", "added-id")
        s.request.removeLowercased("user-agent")
        s.request.addLowercased("user-agent", "new")
        s.request.targetOverride = "/rewritten"
        s.request.addLowercased("x-envoy-original-path", "/a")
        s.request.setHost("other-host")
        s.request.addLowercased("x-empty", "")
        s.localReply = LocalReply(status: 503, body: "", headers: [(name: "X-Envoy-Upstream-Service-Time", value: "7")])
        try assertSame(s, "added and edited headers")
        let line = try AccessLogFormat(text: "%REQ(X-REQUEST-ID)% %REQ(USER-AGENT)% %REQ(:PATH)% %REQ(:AUTHORITY)% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%")
            .render(Fixed(r: StreamLogRecord(s, now: 0)))
        XCTAssertEqual(line, "added-id new /rewritten other-host 7")
    }

    func test_theTraceHeaderScan_findsTraceNamesAndXRequestIDAddedByFilters_smallOrNot() throws {
        func scan(_ added: [(String, String)]) -> (Bool, Bool) {
            let s = stream("GET / HTTP/1.1\r\nHost: h\r\n\r\n", response: nil)
            for (n, v) in added { s.request.addLowercased(n, v) }
            let r = s.withRequest { LogTraceLoopState.scanTraceHeaders(&$0) }
            return (r.trace, r.requestID)
        }
        XCTAssertTrue(scan([]) == (false, false))
        XCTAssertTrue(scan([("x-forwarded-for", "1.2.3.4"), ("x-forwarded-proto", "http")]) == (false, false))
        XCTAssertTrue(scan([("x-request-id", "1")]) == (false, true))
        for n in ["b3", "tracestate", "x-b3-flags", "traceparent", "x-b3-spanid", "x-b3-traceid", "x-b3-sampled", "x-b3-parentspanid"] {
            XCTAssertTrue(scan([("x-forwarded-for", "1"), (n, "1")]) == (true, false), n)
            // The same name as a heap String (not small): found by its bytes.
            var big = String(repeating: "n", count: 40)
            big.removeAll()
            big += n
            XCTAssertTrue(scan([(big, "1"), ("x-request-id", "2")]) == (true, true), n)
        }
        XCTAssertTrue(scan([("x-b3-traceix", "1"), ("é", "1"), ("x-request-ie", "1")]) == (false, false))
    }

    func test_aNameAddedTwice_readsItsFirstAddedLine_andAnEmptyFirstLineIsAbsent() throws {
        let s = stream("GET /a HTTP/1.1\r\nHost: h\r\n\r\n", response: nil)
        s.request.addLowercased("x-forwarded-proto", "http")
        s.request.addLowercased("x-request-id", "first")
        s.request.addLowercased("x-empty", "")
        s.request.addLowercased("x-request-id", "second")
        s.request.addLowercased("x-empty", "later")
        s.request.addLowercased("user-agent", "ua")
        try assertSame(s, "names added twice")
        let line = try AccessLogFormat(text: "%REQ(X-REQUEST-ID)% %REQ(X-EMPTY)% %REQ(USER-AGENT)% %REQ(X-EMPTY?USER-AGENT)%")
            .render(Fixed(r: StreamLogRecord(s, now: 0)))
        XCTAssertEqual(line, "first - ua ua")
    }
}
