import XCTest
import NIOCore
@testable import MoonletProxy

/// A VirtualService fault delay holds the request before it goes upstream; the body the
/// client sends meanwhile goes with it.
final class FaultDelayTests: XCTestCase {
    func testABodySentDuringAFaultDelay_reachesTheApp_withContentLengthAndChunked() throws {
        let up = try TestUpstream { r in TestUpstream.Reply(body: "\(r.method) \(r.uri) \(r.body)") }
        defer { up.stop() }
        let config = """
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata: {name: slow, namespace: default}
        spec:
          hosts: [slow.example]
          resolution: STATIC
          ports: [{number: 80, name: http}]
          endpoints: [{address: 127.0.0.1, ports: {http: \(up.port)}}]
        ---
        apiVersion: networking.istio.io/v1beta1
        kind: VirtualService
        metadata: {name: slow, namespace: default}
        spec:
          hosts: [slow.example]
          http:
          - fault: {delay: {fixedDelay: 200ms, percentage: {value: 100}}}
            route: [{destination: {host: slow.example}}]
        """
        let px = try ProxyFixture(appPort: up.port, files: ["slow.yaml": config], concurrency: 1)
        defer { px.stop() }
        let c = try RawClient(port: px.outbound)
        let start = Date()
        c.send("POST /cl HTTP/1.1\r\nHost: slow.example\r\ncontent-length: 5\r\n\r\nhello")
        let r1 = c.read()
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), 0.2, "delayed")
        XCTAssertEqual(r1?.status, 200)
        XCTAssertEqual(r1?.body, "POST /cl hello")
        c.send("POST /ch HTTP/1.1\r\nHost: slow.example\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        let r2 = c.read()
        XCTAssertEqual(r2?.status, 200)
        XCTAssertEqual(r2?.body, "POST /ch abcdefg")
        // A body that comes in parts, the last after the delay.
        c.send("POST /late HTTP/1.1\r\nHost: slow.example\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        usleep(300_000)
        c.send("2\r\nde\r\n0\r\n\r\n")
        XCTAssertEqual(c.read()?.body, "POST /late abcde")
        XCTAssertEqual(up.seen.map(\.bodyBytes), [5, 7, 5])
    }
}
