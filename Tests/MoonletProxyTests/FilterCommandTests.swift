import XCTest

/// `moonlet filter new` and `moonlet filter test` as users run them (exit codes, output).
extension CommandTests {
    func test_filterNew_writesASkeletonThatFilterTestPasses_andFilterTestExits1NamingAFailingCase() throws {
        let d = try tmpdir()
        defer { try? FileManager.default.removeItem(atPath: d) }
        let (rc, out) = try run(["filter", "new", "hello", "--dir", d])
        XCTAssertEqual(rc, 0, out)
        XCTAssertTrue(out.contains(d + "/hello.cases.yaml"), out)
        let (rc2, out2) = try run(["filter", "test", d + "/hello.lua", d + "/hello.cases.yaml", "--plugin-config", d + "/hello.yaml"])
        XCTAssertEqual(rc2, 0, out2)
        XCTAssertTrue(out2.contains("2 passed, 0 failed"), out2)
        let (rc3, out3) = try run(["filter", "new", "hello", "--dir", d])
        XCTAssertEqual(rc3, 2, out3)
        XCTAssertTrue(out3.contains("already exists"), out3)
        try """
        cases:
        - name: expects a teapot
          request: {path: /}
          expect: {status: 418}
        """.write(toFile: d + "/fail.yaml", atomically: true, encoding: .utf8)
        let (rc4, out4) = try run(["filter", "test", d + "/hello.lua", d + "/fail.yaml"])
        XCTAssertEqual(rc4, 1, out4)
        XCTAssertTrue(out4.contains("expects a teapot"), out4)
        XCTAssertTrue(out4.contains("status:\n    expected: 418\n    got:      200"), out4)
        XCTAssertTrue(out4.contains("0 passed, 1 failed"), out4)
        let (rc5, out5) = try run(["filter", "test", d + "/hello.lua", d + "/missing.yaml"])
        XCTAssertEqual(rc5, 2, out5)
        XCTAssertTrue(out5.contains("missing.yaml: cannot read file"), out5)
    }
}
