import XCTest
import Yams
import NIOCore
import NIOPosix
import NIOHTTP1
import NIOSSL
import MoonletTLS
@testable import MoonletSidecar
@testable import MoonletWebhook

/// `moonlet inject --webhook`: a real HTTPS listener on 127.0.0.1, an AdmissionReview POSTed
/// to it, and the JSONPatch it answers applied to the pod.
final class WebhookTests: XCTestCase {
    static let pod = """
    {"apiVersion":"v1","kind":"Pod","metadata":{"name":"orders-1","namespace":"shop","labels":{"app":"orders","version":"v2"},
     "annotations":{"traffic.sidecar.istio.io/excludeOutboundPorts":"5432"}},
     "spec":{"serviceAccountName":"orders","containers":[{"name":"orders","image":"example/orders:2","ports":[{"containerPort":8080}],
     "env":[{"name":"N","value":"42"}]}]}}
    """

    static func review(_ object: String, kind: String = "Pod") -> String {
        """
        {"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002",
         "kind":{"group":"","version":"v1","kind":"\(kind)"},"resource":{"group":"","version":"v1","resource":"pods"},
         "namespace":"shop","operation":"CREATE","object":\(object)}}
        """
    }

    /// RFC 6902 `add`/`replace`/`remove` on JSONSerialization values (what the API server does with the patch).
    static func apply(_ patch: [[String: Any]], to doc: Any) throws -> Any {
        func unescape(_ s: Substring) -> String { s.replacingOccurrences(of: "~1", with: "/").replacingOccurrences(of: "~0", with: "~") }
        func set(_ node: Any, _ path: ArraySlice<String>, _ value: Any?, op: String) throws -> Any {
            guard let key = path.first else { return value as Any }
            if var obj = node as? [String: Any] {
                if path.count == 1 {
                    if op == "remove" { obj[key] = nil } else { obj[key] = value }
                } else {
                    guard let child = obj[key] else { throw NSError(domain: "patch: no \(key)", code: 1) }
                    obj[key] = try set(child, path.dropFirst(), value, op: op)
                }
                return obj
            }
            if var arr = node as? [Any] {
                let i = key == "-" ? arr.count : Int(key)!
                if path.count == 1 {
                    if op == "add" { arr.insert(value!, at: i) } else if op == "replace" { arr[i] = value! } else { arr.remove(at: i) }
                } else { arr[i] = try set(arr[i], path.dropFirst(), value, op: op) }
                return arr
            }
            throw NSError(domain: "patch: path through a scalar", code: 2)
        }
        var doc = doc
        for op in patch {
            let path = (op["path"] as! String).split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(unescape)
            doc = try set(doc, ArraySlice(path), op["value"], op: op["op"] as! String)
        }
        return doc
    }

    /// Sends one HTTP/1.1 request over TLS trusting `root`, returns the status and body.
    static func post(port: Int, root: String, path: String, body: String, group: EventLoopGroup) throws -> (Int, String) {
        var cfg = TLSConfiguration.makeClientConfiguration()
        cfg.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(root.utf8)))
        cfg.certificateVerification = .noHostnameVerification
        let ctx = try NIOSSLContext(configuration: cfg)
        let collector = Collector(promise: group.next().makePromise())
        let ch = try ClientBootstrap(group: group).channelInitializer { ch in
            ch.eventLoop.makeCompletedFuture {
                try ch.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: ctx, serverHostname: nil))
                try ch.pipeline.syncOperations.addHandler(collector)
            }
        }.connect(host: "127.0.0.1", port: port).wait()
        let req = "POST \(path) HTTP/1.1\r\nHost: moonlet-injector\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        try ch.writeAndFlush(ByteBuffer(string: req)).wait()
        let raw = try collector.promise.futureResult.wait()
        guard let split = raw.range(of: "\r\n\r\n") else { return (0, raw) }
        let status = Int(raw.split(separator: " ")[1]) ?? 0
        return (status, String(raw[split.upperBound...]))
    }

    final class Collector: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let promise: EventLoopPromise<String>
        var text = ""
        init(promise: EventLoopPromise<String>) { self.promise = promise }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var b = unwrapInboundIn(data)
            text += b.readString(length: b.readableBytes) ?? ""
        }
        func channelInactive(context: ChannelHandlerContext) { promise.succeed(text) }
        func errorCaught(context: ChannelHandlerContext, error: Error) {
            if case NIOSSLError.uncleanShutdown = error { return }
            promise.fail(error); context.close(promise: nil)
        }
    }

    func test_webhook_servesARenewedCertificate_onceItsFilesAreReplaced() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moonlet-webhook-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try MeshCA.create(), second = try MeshCA.create()
        try first.issue(try first.identity(namespace: "istio-system", serviceAccount: "moonlet-injector")).write(to: dir)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let server = try InjectionWebhook(reviewer: AdmissionReviewer(injector: SidecarInjector()), certsDirectory: dir)
        let ch = try server.bind(group: group, host: "127.0.0.1", port: 0)
        defer { try? ch.close().wait() }
        let port = ch.localAddress!.port!
        XCTAssertEqual(try Self.post(port: port, root: first.rootCertPEM, path: "/inject", body: Self.review(Self.pod), group: group).0, 200)
        XCTAssertThrowsError(try Self.post(port: port, root: second.rootCertPEM, path: "/inject", body: Self.review(Self.pod), group: group))

        // Renewal by another CA: new connections get the new certificate.
        try second.issue(try second.identity(namespace: "istio-system", serviceAccount: "moonlet-injector")).write(to: dir)
        XCTAssertEqual(try Self.post(port: port, root: second.rootCertPEM, path: "/inject", body: Self.review(Self.pod), group: group).0, 200)

        // A broken replacement is refused and the last good certificate keeps serving.
        try "not a key".write(toFile: dir + "/key.pem", atomically: true, encoding: .utf8)
        XCTAssertEqual(try Self.post(port: port, root: second.rootCertPEM, path: "/inject", body: Self.review(Self.pod), group: group).0, 200)
    }

    func withWebhook(_ body: (Int, String, EventLoopGroup) throws -> Void) throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("moonlet-webhook-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ca = try MeshCA.create()
        try ca.issue(try ca.identity(namespace: "istio-system", serviceAccount: "moonlet-injector")).write(to: dir)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let server = try InjectionWebhook(reviewer: AdmissionReviewer(injector: SidecarInjector()), certsDirectory: dir)
        let ch = try server.bind(group: group, host: "127.0.0.1", port: 0)
        defer { try? ch.close().wait() }
        try body(ch.localAddress!.port!, ca.rootCertPEM, group)
    }

    func test_webhook_answersAPodReview_withAPatch_thatYieldsWhatInjectFileYields() throws {
        try withWebhook { port, root, group in
            let (status, body) = try Self.post(port: port, root: root, path: "/inject", body: Self.review(Self.pod), group: group)
            XCTAssertEqual(status, 200, body)
            let review = try JSONSerialization.jsonObject(with: Data(body.utf8)) as! [String: Any]
            XCTAssertEqual(review["apiVersion"] as? String, "admission.k8s.io/v1")
            XCTAssertEqual(review["kind"] as? String, "AdmissionReview")
            let response = review["response"] as! [String: Any]
            XCTAssertEqual(response["uid"] as? String, "705ab4f5-6393-11e8-b7cc-42010a800002")
            XCTAssertEqual(response["allowed"] as? Bool, true)
            XCTAssertEqual(response["patchType"] as? String, "JSONPatch")
            let patchData = try XCTUnwrap(Data(base64Encoded: response["patch"] as! String))
            let patch = try JSONSerialization.jsonObject(with: patchData) as! [[String: Any]]
            let original = try JSONSerialization.jsonObject(with: Data(Self.pod.utf8))
            let patched = try Self.apply(patch, to: original)

            // The same pod through `moonlet inject -f` (as YAML), read back as JSON values.
            let injectedYAML = try SidecarInjector().injectYAML(Self.pod)
            let viaFile = try JSONSerialization.jsonObject(with: Data(jsonText(try XCTUnwrap(Yams.compose(yaml: injectedYAML))).utf8))
            XCTAssertEqual(NSDictionary(dictionary: patched as! [String: Any]), NSDictionary(dictionary: viaFile as! [String: Any]))
            let containers = ((patched as! [String: Any])["spec"] as! [String: Any])["containers"] as! [[String: Any]]
            XCTAssertEqual(containers.map { $0["name"] as! String }, ["orders", "istio-proxy"])
            let env = containers[0]["env"] as! [[String: Any]]
            XCTAssertEqual(env[0]["value"] as? String, "42", "a string in the pod stays a string through the patch")
        }
    }

    func test_webhook_allowsWithoutPatch_anOptedOutPod_andAnythingThatIsNotAPod() throws {
        let optedOut = Self.pod.replacingOccurrences(of: "\"annotations\":{", with: "\"annotations\":{\"sidecar.istio.io/inject\":\"false\",")
        try withWebhook { port, root, group in
            for body in [Self.review(optedOut), Self.review("{\"metadata\":{\"name\":\"x\"}}", kind: "ConfigMap")] {
                let (status, text) = try Self.post(port: port, root: root, path: "/inject", body: body, group: group)
                XCTAssertEqual(status, 200)
                let response = (try JSONSerialization.jsonObject(with: Data(text.utf8)) as! [String: Any])["response"] as! [String: Any]
                XCTAssertEqual(response["allowed"] as? Bool, true)
                XCTAssertNil(response["patch"])
            }
        }
    }

    func test_webhook_rejectsABodyThatIsNotAnAdmissionReview_with400() throws {
        try withWebhook { port, root, group in
            let (status, _) = try Self.post(port: port, root: root, path: "/inject", body: "[1,2]", group: group)
            XCTAssertEqual(status, 400)
        }
    }
}
