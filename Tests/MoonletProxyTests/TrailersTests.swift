import XCTest
import NIOCore
import NIOPosix
import NIOConcurrencyHelpers
@testable import MoonletProxy

/// An HTTP/1.1 upstream that answers every complete request with fixed bytes and keeps
/// each request's bytes as they came (heads, chunk framing, trailer sections), which
/// NIOHTTP1's server would hide.
final class ScriptedUpstream: @unchecked Sendable {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var channel: Channel!
    let lock = NIOLock()
    private var _requests: [String] = []
    let response: String
    var port: Int { channel.localAddress!.port! }
    var requests: [String] { lock.withLock { _requests } }

    init(response: String) throws {
        self.response = response
        channel = try ServerBootstrap(group: group)
            .childChannelInitializer { ch in ch.eventLoop.makeCompletedFuture { try ch.pipeline.syncOperations.addHandler(Handler(owner: self)) } }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    func stop() { try? channel.close().wait(); try? group.syncShutdownGracefully() }

    /// Whether `text` holds one whole request (content-length, chunked with its trailer
    /// section, or no body).
    static func complete(_ text: String) -> Bool {
        guard let r = text.range(of: "\r\n\r\n") else { return false }
        let head = text[..<r.lowerBound].lowercased(), rest = text[r.upperBound...]
        if head.contains("transfer-encoding: chunked") {
            return rest.hasSuffix("\r\n\r\n") && (rest.hasPrefix("0\r\n") || rest.contains("\r\n0\r\n"))
        }
        if let l = head.components(separatedBy: "\r\n").first(where: { $0.hasPrefix("content-length:") }),
           let n = Int(l.dropFirst(15).trimmingCharacters(in: .whitespaces)) {
            return rest.utf8.count >= n
        }
        return true
    }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let owner: ScriptedUpstream
        var text = ""
        init(owner: ScriptedUpstream) { self.owner = owner }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            text += String(buffer: unwrapInboundIn(data))
            guard ScriptedUpstream.complete(text) else { return }
            let seen = text
            text = ""
            owner.lock.withLock { owner._requests.append(seen) }
            context.writeAndFlush(NIOAny(ByteBuffer(string: owner.response)), promise: nil)
        }
    }
}

/// Trailers end to end: HTTP/1.1 chunked trailer sections and HTTP/2 trailers are
/// forwarded both ways (no longer dropped), between the two protocols as Envoy does,
/// and filters read and edit them (`s.request.trailers`, `s.response.trailers`).
final class TrailersTests: XCTestCase {
    static let trailedResponse = "HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\n\r\n" +
        "5\r\nhello\r\n0\r\ngrpc-status: 7\r\ngrpc-message: denied by app\r\n\r\n"

    func test_http1ChunkedTrailers_areForwarded_toTheAppWithTheRequest_andToTheClientWithTheResponse() throws {
        let up = try ScriptedUpstream(response: Self.trailedResponse)
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: sha-abc\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.body, "hello")
        XCTAssertEqual(r.trailer("grpc-status"), "7")
        XCTAssertEqual(r.trailer("grpc-message"), "denied by app")
        let seen = try XCTUnwrap(up.requests.first)
        XCTAssertTrue(seen.hasSuffix("3\r\nabc\r\n0\r\nx-checksum: sha-abc\r\n\r\n"), seen)
        XCTAssertTrue(seen.lowercased().contains("\r\nte: trailers\r\n"), "TE: trailers goes on, as Envoy forwards it: \(seen)")
        // The connection stays in step after a trailer section both ways.
        c.send("GET /again HTTP/1.1\r\nHost: app\r\n\r\n")
        XCTAssertEqual(c.read()?.trailer("grpc-status"), "7")
        XCTAssertEqual(up.requests.count, 2)
    }

    func test_trailersThatMayNotBeTrailers_areDropped_andAMalformedTrailerSectionIsRefused() throws {
        let up = try ScriptedUpstream(response: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nContent-Length: 9\r\nHost: evil\r\nx-ok: 1\r\n\r\n")
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nTransfer-Encoding: gzip\r\nx-fine: 2\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.trailers.map(\.0), ["x-ok"])
        XCTAssertTrue(up.requests.first?.hasSuffix("0\r\nx-fine: 2\r\n\r\n") ?? false, up.requests.first ?? "")
        let bad = try RawClient(port: px.inbound)
        bad.send("POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nno colon here\r\n\r\n")
        XCTAssertEqual(bad.read()?.status, 400)
    }

    /// nghttp prints every received header field with its stream id; the trailers are
    /// the fields after the first DATA frame.
    static func fieldsAfterData(_ verbose: String) -> [String] {
        guard let data = verbose.range(of: "recv DATA frame") else { return [] }
        return verbose[data.upperBound...].components(separatedBy: "\n").compactMap { line in
            guard let r = line.range(of: "recv (stream_id=") else { return nil }
            return line[r.upperBound...].split(separator: ")", maxSplits: 1).last.map { $0.trimmingCharacters(in: .whitespaces) }
        }
    }

    func test_http2Client_getsTheAppsChunkedTrailers_asATrailingHeadersFrame_andItsOwnTrailersReachTheApp() throws {
        let up = try ScriptedUpstream(response: Self.trailedResponse)
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let body = NSTemporaryDirectory() + "moonlet-trailers-\(UUID().uuidString)"
        try "0123456789".write(toFile: body, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: body) }
        let out = try runTool("nghttp", ["-v", "-t", "10", "--no-content-length", "--trailer=x-checksum: sha-123", "-d", body, "http://127.0.0.1:\(px.inbound)/grpc.Svc/Call"])
        XCTAssertTrue(out.contains(":status: 200"), out)
        XCTAssertEqual(Self.fieldsAfterData(out), ["grpc-status: 7", "grpc-message: denied by app"], out)
        XCTAssertTrue(out.range(of: "recv HEADERS frame <length=[0-9]+, flags=0x05", options: .regularExpression) != nil, "the trailers end the stream: \(out)")
        let seen = try XCTUnwrap(up.requests.first)
        XCTAssertTrue(seen.lowercased().contains("transfer-encoding: chunked"), seen)
        XCTAssertTrue(seen.hasSuffix("0\r\nx-checksum: sha-123\r\n\r\n"), seen)
        XCTAssertTrue(seen.contains("0123456789"), seen)
    }

    /// A chunked response with no body but trailers (gRPC's trailers after an empty
    /// message stream): its HEADERS frame, written as soon as the head came, does not
    /// take END_STREAM; the trailers' HEADERS frame does, and it is the only one.
    func test_http2Client_getsAnEmptyChunkedBodyWithTrailers_endedOnceByTheTrailers() throws {
        let up = try ScriptedUpstream(response: "HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n0\r\ngrpc-status: 0\r\n\r\n")
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port)
        defer { px.stop() }
        let out = try runTool("nghttp", ["-v", "-t", "10", "http://127.0.0.1:\(px.inbound)/grpc.Svc/Empty"])
        XCTAssertTrue(out.contains(":status: 200"), out)
        XCTAssertTrue(out.contains("grpc-status: 0"), out)
        let headers = out.components(separatedBy: "\n").filter { $0.contains("recv HEADERS frame") }
        XCTAssertEqual(headers.count, 2, "the head and the trailers: \(out)")
        let ending = headers.filter { $0.range(of: "flags=0x0[15]", options: .regularExpression) != nil }
        XCTAssertEqual(ending.count, 1, "exactly one END_STREAM: \(out)")
        XCTAssertTrue(headers.last.map { $0.contains("flags=0x05") } ?? false, "on the trailers: \(out)")
        XCTAssertFalse(out.contains("RST_STREAM"), out)
    }

    func test_filters_readRequestTrailers_andEditResponseTrailers() throws {
        let up = try ScriptedUpstream(response: Self.trailedResponse)
        defer { up.stop() }
        let px = try ProxyFixture(appPort: up.port, files: [
            "tr.lua": """
            return {
              on_response_body = function(s, conf, chunk, eos)
                if not eos then return end
                local t = s.response.trailers
                t:set("x-app-status", t:get("grpc-status") or "none")
                t:remove("grpc-message")
                t:set("x-request-checksum", s.request.trailers:get("X-Checksum") or "none")
                local n = 0
                for k, v in t:pairs() do n = n + 1 end
                t:set("x-count", tostring(n))
                local ok, err = pcall(function() t:set("content-length", "1") end)
                t:set("x-refused", ok and "no" or "yes")
                ok = pcall(function() s.request.trailers:set("a", "b") end)
                t:set("x-request-readonly", ok and "no" or "yes")
              end,
            }
            """,
            "tr.yaml": ProxyFixture.plugin("tr"),
        ])
        defer { px.stop() }
        let c = try RawClient(port: px.inbound)
        c.send("POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: sha-abc\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.status, 200, r.body)
        XCTAssertEqual(r.trailer("grpc-status"), "7")
        XCTAssertNil(r.trailer("grpc-message"))
        XCTAssertEqual(r.trailer("x-app-status"), "7")
        XCTAssertEqual(r.trailer("x-request-checksum"), "sha-abc")
        XCTAssertEqual(r.trailer("x-count"), "3")
        XCTAssertEqual(r.trailer("x-refused"), "yes")
        XCTAssertEqual(r.trailer("x-request-readonly"), "yes")
    }
}

extension MTLSTests {
    func test_sidecarToSidecarOverHTTP2_carriesTrailersBothWays() throws {
        let up = try ScriptedUpstream(response: TrailersTests.trailedResponse)
        defer { up.stop() }
        let (client, server) = try twoSidecars(clientFiles: {
            ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "orders", portName: "grpc")]
        }, appPort: up.port)
        defer { client.stop(); server.stop() }
        let body = NSTemporaryDirectory() + "moonlet-trailers-\(UUID().uuidString)"
        try "0123456789".write(toFile: body, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: body) }
        let out = try runTool("nghttp", ["-v", "-t", "10", "-H", ":authority: orders.production.svc.cluster.local", "--no-content-length", "--trailer=x-checksum: sha-123",
                                         "-d", body, "http://127.0.0.1:\(client.outbound)/grpc.Svc/Call"])
        XCTAssertTrue(out.contains(":status: 200"), out)
        XCTAssertEqual(TrailersTests.fieldsAfterData(out), ["grpc-status: 7", "grpc-message: denied by app"], out)
        let seen = try XCTUnwrap(up.requests.first)
        XCTAssertTrue(seen.hasSuffix("0\r\nx-checksum: sha-123\r\n\r\n"), seen)
        let stats = try XCTUnwrap(adminGet(client.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_upstream_cx_http2_total 1\n"), "the sidecars spoke HTTP/2:\n\(stats)")
        // An HTTP/1.1 client of the same service gets them as a chunked trailer section.
        let c = try RawClient(port: client.outbound)
        c.send("GET /h1 HTTP/1.1\r\nHost: orders.production.svc.cluster.local\r\n\r\n")
        let r = try XCTUnwrap(c.read())
        XCTAssertEqual(r.body, "hello")
        XCTAssertEqual(r.trailer("grpc-status"), "7")
    }
}

extension MTLSTests {
    /// The client's small windows make the sidecar stop reading the HTTP/2 stream from its
    /// peer sidecar, then start again: the rest of the response must follow (a 4 MB gRPC
    /// message stalled here before).
    func test_sidecarToSidecarOverHTTP2_aLargeResponseToAClientWithSmallWindows_arrivesWhole() throws {
        app.stop()
        app = try TestUpstream { _ in TestUpstream.Reply(body: String(repeating: "z", count: 4_000_000)) }
        let (client, server) = try twoSidecars(clientFiles: { ["se.yaml": Self.ordersEntry(port: $0, serviceAccount: "orders", portName: "grpc")] })
        defer { client.stop(); server.stop() }
        let out = try runTool("nghttp", ["-n", "-s", "-w", "16", "-W", "16", "-t", "20", "-H", ":authority: orders.production.svc.cluster.local",
                                         "http://127.0.0.1:\(client.outbound)/big"])
        XCTAssertFalse(out.contains("Timeout") || out.contains("ERROR"), out)
        let stats = try XCTUnwrap(adminGet(client.admin, "/stats/prometheus")).body
        XCTAssertTrue(stats.contains("moonlet_upstream_cx_http2_total 1\n"), stats)
        XCTAssertTrue(stats.contains("response_code=\"200\",response_flags=\"-\""), stats)
    }
}
