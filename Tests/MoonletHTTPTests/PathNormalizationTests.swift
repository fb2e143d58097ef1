import XCTest
import Foundation
@testable import MoonletHTTP

/// Istio's path normalization modes against Istio's own vectors
/// (../shared/conformance/path-normalization, from tests/integration/security/normalization_test.go).
final class PathNormalizationTests: XCTestCase {
    static var vectorsPath: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("shared/conformance/path-normalization/path-normalization-vectors.json").path
    }

    /// The path the upstream gets, or "400" for a rejection (the vectors' notation).
    static func outcome(_ mode: PathNormalization, _ input: String) -> String {
        switch mode.normalize(input) {
        case .unchanged: return input
        case .normalized(let b): return String(decoding: b, as: UTF8.self)
        case .rejected: return "400"
        }
    }

    /// Runs every case of the TestNormalization group `name`; each failure names in, expected and got.
    func runGroup(_ name: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let path = Self.vectorsPath
        guard let data = FileManager.default.contents(atPath: path) else { throw XCTSkip("vectors not found at \(path)") }
        let root = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let groups = try XCTUnwrap((root["TestNormalization"] as? [String: Any])?["groups"] as? [[String: Any]])
        let group = try XCTUnwrap(groups.first { $0["name"] as? String == name }, "no group \(name)")
        let mode = try XCTUnwrap(PathNormalization(rawValue: group["normalization"] as? String ?? ""))
        let cases = try XCTUnwrap(group["cases"] as? [[String: String]])
        XCTAssertFalse(cases.isEmpty)
        var passed = 0
        for c in cases {
            let input = c["in"]!, expected = c["out"]!
            let got = Self.outcome(mode, input)
            if got == expected { passed += 1 } else {
                XCTFail("\(name) (\(mode.rawValue)): in \(input) expected \(expected) got \(got)", file: file, line: line)
            }
        }
        print("PathNormalization \(name): \(passed)/\(cases.count) vectors passed")
    }

    func test_istioVectors_modeNone_leavesThePathAsSentButDropsTheFragment() throws { try runGroup("None") }
    func test_istioVectors_modeBase_resolvesDotSegmentsDecodesUnreservedAndTurnsBackslashesIntoSlashes() throws { try runGroup("Base") }
    func test_istioVectors_modeMergeSlashes_alsoMergesRepeatedSlashes() throws { try runGroup("MergeSlashes") }
    func test_istioVectors_modeDecodeAndMergeSlashes_alsoDecodesEscapedSlashesAndBackslashes() throws { try runGroup("DecodeAndMergeSlashes") }
    func test_istioVectors_lookalikesOfDotsAndSlashes_areNotNormalized() throws { try runGroup("NotNormalized") }
    func test_istioVectors_everyPercentEncodedByte_isDecodedOnlyWhenUnreservedOrASlash() throws { try runGroup("PercentEncoded") }
    func test_istioVectors_anEscapedNul_isRejected() throws { try runGroup("Invalid") }

    /// TestAuthz_PathNormalization: under BASE, an ALLOW rule for paths "/public*" must match
    /// the normalized path exactly when Istio allows the request.
    func test_istioAuthzVectors_underBase_thePublicPrefixMatchesTheNormalizedPathOnlyWhenAllowed() throws {
        let path = Self.vectorsPath
        guard let data = FileManager.default.contents(atPath: path) else { throw XCTSkip("vectors not found at \(path)") }
        let root = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let cases = try XCTUnwrap((root["TestAuthz_PathNormalization"] as? [String: Any])?["cases"] as? [[String: Any]])
        XCTAssertFalse(cases.isEmpty)
        var passed = 0
        for c in cases {
            let input = try XCTUnwrap(c["path"] as? String), allow = try XCTUnwrap(c["allow"] as? Bool)
            let normalized = Self.outcome(.base, input)
            if normalized.hasPrefix("/public") == allow { passed += 1 } else {
                XCTFail("authz: \(input) normalized to \(normalized), expected allow=\(allow)")
            }
        }
        print("PathNormalization TestAuthz_PathNormalization: \(passed)/\(cases.count) vectors passed")
    }

    func test_anEscapedNulInThePath_isRejectedInEveryMode() {
        for mode in PathNormalization.allCases {
            XCTAssertEqual(mode.normalize("/a%00b"), .rejected, mode.rawValue)
            XCTAssertEqual(mode.normalize("/a/%00/../b"), .rejected, mode.rawValue)
        }
    }

    func test_theQuery_isKeptAsIs_evenWithEscapedSlashesDotsOrNul() {
        XCTAssertEqual(Self.outcome(.decodeAndMergeSlashes, "/a%2Fb/../c?x=%2F..//y&z=%00"), "/a/c?x=%2F..//y&z=%00")
        XCTAssertEqual(Self.outcome(.base, "/a/./b?p=/./%2e"), "/a/b?p=/./%2e")
        XCTAssertEqual(PathNormalization.mergeSlashes.normalize("/a?u=http://x//y"), .unchanged)
    }

    func test_aFragment_isDroppedInEveryMode_alsoAfterAQuery() {
        for mode in PathNormalization.allCases {
            XCTAssertEqual(Self.outcome(mode, "/app#x/../y"), "/app", mode.rawValue)
            XCTAssertEqual(Self.outcome(mode, "/app?q=1#frag"), "/app?q=1", mode.rawValue)
        }
    }

    func test_aPathWithNothingToNormalize_comesBackUnchanged() {
        for mode in PathNormalization.allCases {
            for p in ["/", "/api/v1/items", "/a.b/c..d/.e?x=1", "/x-y_z~1;a=b,c", "/a?b=//c/../d"] {
                XCTAssertEqual(mode.normalize(p), .unchanged, "\(mode.rawValue) \(p)")
            }
        }
        // Something to do, but the result is the input: still unchanged.
        XCTAssertEqual(PathNormalization.base.normalize("/a%2Fb"), .unchanged)
        // Not origin-form: left alone.
        XCTAssertEqual(PathNormalization.base.normalize("*"), .unchanged)
    }

    func test_dotSegments_neverClimbAboveTheRoot_andTrailingDotsKeepTheSlash() {
        XCTAssertEqual(Self.outcome(.base, "/../../etc/passwd"), "/etc/passwd")
        XCTAssertEqual(Self.outcome(.base, "/a/b/.."), "/a/")
        XCTAssertEqual(Self.outcome(.base, "/a/b/."), "/a/b/")
        XCTAssertEqual(Self.outcome(.base, "/a/%2e%2E/b"), "/b")
        XCTAssertEqual(Self.outcome(.base, "/a/..b/c"), "/a/..b/c")
    }

    func test_escapesThatStayEscaped_keepTheirCase_andBytesChromiumEscapesAreEscaped() {
        XCTAssertEqual(Self.outcome(.base, "/a%2fb%3a%7E"), "/a%2fb%3a~")
        XCTAssertEqual(Self.outcome(.base, "/a\"b<c>{d}|^`"), "/a%22b%3Cc%3E%7Bd%7D%7C%5E%60")
        // A "%" that starts no escape stays; one that would start an escape once the
        // next escape is decoded is written %25 (Chromium's nested-escape rule).
        XCTAssertEqual(Self.outcome(.base, "/100%/x%zz"), "/100%/x%zz")
        XCTAssertEqual(Self.outcome(.base, "/%%30%30"), "/%2500")
    }
}
