import XCTest
import NIOCore
import MoonletCore
import MoonletConfig
@testable import MoonletLua

/// Istio semantics the review found missing in istio-router, each as Envoy applies it.
final class RouterReviewFixTests: RouterHarness {
    func test_aRedirectKeepsTheQuery_unlessItsNewUriHasOne() throws {
        try configure(vs: Self.vs("""
          - match: [{uri: {prefix: /old/}}]
            redirect: {uri: /new, authority: example.com}
          - match: [{uri: {prefix: /own/}}]
            redirect: {uri: "/new?fixed=1"}
        """))
        XCTAssertTrue(route("/old/x?q=1").localReply?.headers.contains { $0 == ("location", "http://example.com/new?q=1") } ?? false)
        XCTAssertTrue(route("/own/x?q=1").localReply?.headers.contains { $0 == ("location", "http://svc/new?fixed=1") } ?? false,
                      "\(String(describing: route("/own/x?q=1").localReply?.headers))")
    }

    func test_aUriRewriteWithoutAUriMatch_replacesThePrefixSlash_asIstioDoes() throws {
        try configure(vs: Self.vs("""
          - match: [{headers: {x-v2: {exact: "1"}}}]
            rewrite: {uri: /v2}
            route: [{destination: {host: svc, subset: v2}}]
          - rewrite: {uri: /all/}
            route: [{destination: {host: svc, subset: v1}}]
        """))
        XCTAssertEqual(route("/foo?q=1", headers: [("x-v2", "1")]).request.target, "/v2foo?q=1")
        XCTAssertEqual(route("/foo").request.target, "/all/foo", "a rule without match entries too")
    }

    func test_aHeaderSentTwice_isMatchedOnItsValuesJoinedWithAComma() throws {
        try configure(vs: Self.vs("""
          - match: [{headers: {x-user: {exact: jason}}}]
            route: [{destination: {host: svc, subset: v2}}]
          - match: [{headers: {x-user: {exact: "jason,ann"}}}]
            route: [{destination: {host: svc, subset: v1}}]
          - route: [{destination: {host: svc, subset: v1}}]
        """))
        XCTAssertEqual(subset(route("/", headers: [("x-user", "jason")])), "v2")
        let both = route("/", headers: [("x-user", "jason"), ("x-user", "ann")])
        XCTAssertEqual(subset(both), "v1", "jason twice-listed with ann is not exactly jason")
    }

    func test_aPortMatch_comparesThePortTheAppAddressed() throws {
        try configure(vs: Self.vs("""
          - match: [{port: 8080}]
            route: [{destination: {host: svc, subset: v2}}]
          - route: [{destination: {host: svc, subset: v1}}]
        """))
        XCTAssertEqual(subset(route("/", host: "svc:8080", port: 8080)), "v2")
        XCTAssertEqual(subset(route("/", host: "svc", port: 80)), "v1")
    }
}
