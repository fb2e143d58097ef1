import MoonletCore
import MoonletConfig
import MoonletTelemetry
import NIOCore
#if canImport(Foundation)
import Foundation
#endif

// MARK: - Callouts in offline cases (`calls:` / `expect.calls`)
//
// `moonlet filter test` serves a filter's `moonlet.http.call` (and Envoy `httpCall`)
// from the case's `calls:` stubs instead of the network: the harness installs
// `StubHTTPClient` as the VM's `LuaHTTPClient` (the proxy installs its own client of
// the event loop; the Lua side is the same code). A phase that calls pauses as in the
// proxy (`FilterAction.pause`); the harness completes the call and resumes the chain
// (`ProxyStream.resumeFilters`) before it goes on, so the phases run in the proxy's
// order.

/// One `calls:` stub of a case: which call it answers and what it answers with.
public struct StubCall: Sendable {
    /// A URL (`http://auth/check`), a service host or an Istio cluster name, as the filter
    /// passes it. A URL with a path also matches on that path (unless `path` is given).
    public var target: String
    /// nil: any method.
    public var method: String?
    /// nil: any path (or the URL's path).
    public var path: String?
    /// The response (nil when `error` is set).
    public var response: LuaHTTPResponse?
    /// The `err` the call returns (`nil, err`), e.g. "timeout".
    public var error: String?
    public var line: Int
    public init(target: String, line: Int) { self.target = target; self.line = line }
}

/// One `expect.calls` entry: a subset of what the filter sent (nil fields unchecked).
public struct ExpectedCall: Sendable {
    public var target: String?
    public var method: String?
    public var path: String?
    /// Subset of the request headers (nil value: absent).
    public var headers: [ExpectedHeader]?
    public var body: String?
    public init() {}
}

/// The `LuaHTTPClient` of the offline harness: answers each call from the case's stubs,
/// in order (the first unused stub that matches), and records what was sent.
/// Completions run when the harness drains them (`runNext`), never inside `start`.
final class StubHTTPClient: LuaHTTPClient {
    final class Handle: LuaHTTPCancellable {
        var cancelled = false
        func cancel() { cancelled = true }
    }

    var stubs: [StubCall]
    var used: [Bool]
    /// What the filter sent, in order.
    var sent: [LuaHTTPRequest] = []
    /// Calls no stub answered (for the case's failure message).
    var unstubbed: [String] = []
    var queue: [() -> Void] = []

    init(stubs: [StubCall]) {
        self.stubs = stubs
        used = [Bool](repeating: false, count: stubs.count)
    }

    func start(_ request: LuaHTTPRequest, stream: ProxyStream,
               done: @escaping (Result<LuaHTTPResponse, LuaHTTPError>) -> Void) -> LuaHTTPCancellable {
        sent.append(request)
        let h = Handle()
        let result: Result<LuaHTTPResponse, LuaHTTPError>
        if let i = stubs.indices.first(where: { !used[$0] && Self.matches(stubs[$0], request) }) {
            used[i] = true
            if let r = stubs[i].response { result = .success(r) } else { result = .failure(LuaHTTPError(stubs[i].error ?? "error")) }
        } else {
            let what = Self.describe(request)
            unstubbed.append(what)
            result = .failure(LuaHTTPError("no stub in the case's calls: for \(what)"))
        }
        queue.append { if !h.cancelled { done(result) } }
        return h
    }

    /// Runs the oldest pending completion; false when none is left.
    func runNext() -> Bool {
        guard !queue.isEmpty else { return false }
        queue.removeFirst()()
        return true
    }

    /// "GET http://auth/check" / "POST outbound|80||auth.default.svc.cluster.local /check".
    static func describe(_ r: LuaHTTPRequest) -> String {
        let (_, urlPath) = split(r.target)
        if let p = r.path, p != urlPath { return "\(r.method) \(r.target) path \(p)" }
        return "\(r.method) \(r.target)"
    }

    /// A URL's scheme and authority (lowercased) and its path (nil: none); any other
    /// target as it is (lowercased), no path.
    static func split(_ target: String) -> (dest: String, path: String?) {
        let lower = target.lowercased()
        for scheme in ["http://", "https://"] where lower.hasPrefix(scheme) {
            let rest = target.dropFirst(scheme.count)
            if let slash = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) {
                return (scheme + rest[..<slash].lowercased(), String(rest[slash...]))
            }
            return (scheme + rest.lowercased(), nil)
        }
        return (lower, nil)
    }

    /// The path a request is sent with: its `path`, else its URL's, else "/".
    static func effectivePath(_ r: LuaHTTPRequest) -> String {
        r.path ?? split(r.target).path ?? "/"
    }

    static func matches(_ s: StubCall, _ r: LuaHTTPRequest) -> Bool {
        let st = split(s.target), rt = split(r.target)
        guard st.dest == rt.dest else { return false }
        if let m = s.method, m.uppercased() != r.method.uppercased() { return false }
        if let p = s.path ?? st.path, p != effectivePath(r) { return false }
        return true
    }
}

/// Drives a paused chain (`FilterAction.pause`) offline: completes the stub calls until
/// the paused phase ends, and goes on with the chain as the proxy's executor does.
final class HarnessResumer: FilterResumer {
    let chain: FilterChain
    var result: FilterAction?
    init(chain: FilterChain) { self.chain = chain }
    func filtersResumed(_ s: ProxyStream, _ action: FilterAction) {
        result = s.filterPause.inResponse ? chain.resumeResponse(s, after: action) : chain.resumeRequest(s, after: action)
    }

    /// The action the request (or response head) phase ends with once every call it
    /// waits for completed.
    /// nil when the phase still waits and no completion is left (cannot happen with the
    /// stub client, which answers every call).
    func drive(_ s: ProxyStream, _ first: FilterAction, client: StubHTTPClient) -> FilterAction? {
        var a = first
        while a == .pause {
            s.resumer = self
            result = nil
            while result == nil, client.runNext() {}
            guard let r = result else { s.resumer = nil; return nil }
            a = r
        }
        s.resumer = nil
        return a
    }
}

extension CaseParser {
    /// `calls:` of a case: a list of stubs.
    mutating func calls(_ n: PositionedNode, _ field: String) -> [StubCall]? {
        if n.value == .null { return [] }
        guard let list = n.sequence else { err(n, field, "must be a list of {target, method, path, response | error}"); return nil }
        var out: [StubCall] = []
        for (i, e) in list.enumerated() {
            let f = "\(field)[\(i)]"
            guard let m = fields(e, f, ["target", "method", "path", "response", "error"]) else { continue }
            var c = StubCall(target: "", line: e.line)
            for x in m {
                let g = f + "." + x.key
                switch x.key {
                case "target": if let v = string(x.value, g) { if v.isEmpty { err(x.value, g, "must not be empty") } else { c.target = v } }
                case "method": c.method = string(x.value, g)
                case "path":
                    if let v = string(x.value, g) { if v.hasPrefix("/") { c.path = v } else { err(x.value, g, "must start with /") } }
                case "error": c.error = string(x.value, g)
                default: c.response = stubResponse(x.value, g)
                }
            }
            if e.child("target") == nil { err(e, f + ".target", "missing") }
            if e.child("response") == nil && e.child("error") == nil { err(e, f, "needs response: {status, headers, body} or error: \"...\"") }
            if e.child("response") != nil && e.child("error") != nil { err(e, f, "response and error are exclusive") }
            out.append(c)
        }
        return out
    }

    /// A stub's response: status (200 by default), headers (a value or a list of
    /// values per name: a repeated header), body.
    mutating func stubResponse(_ n: PositionedNode, _ field: String) -> LuaHTTPResponse? {
        if n.value == .null { return LuaHTTPResponse(status: 200, headers: [], body: []) }
        guard let m = fields(n, field, ["status", "headers", "body"]) else { return nil }
        var r = LuaHTTPResponse(status: 200, headers: [], body: [])
        for e in m {
            let f = field + "." + e.key
            switch e.key {
            case "status": if let v = int(e.value, f, range: 100...599) { r.status = v }
            case "headers":
                if e.value.value == .null { continue }
                guard let hm = e.value.mapping else { err(e.value, f, "must be a mapping of header names to values"); continue }
                for h in hm {
                    let hf = "\(f).\(h.key)"
                    guard HeaderValidation.isToken(h.key) else { err(nil, hf, "not a valid header name", line: h.keyLine, col: h.keyColumn); continue }
                    if let seq = h.value.sequence {
                        for (j, v) in seq.enumerated() { if let s = string(v, "\(hf)[\(j)]") { r.headers.append((h.key.lowercased(), s)) } }
                    } else if let s = string(h.value, hf) {
                        r.headers.append((h.key.lowercased(), s))
                    }
                }
            default: if let b = body(e.value, f) { r.body = Array(b.utf8) }
            }
        }
        return r
    }

    /// `expect.calls`: what the filter sent, in order.
    mutating func expectedCalls(_ n: PositionedNode, _ field: String) -> [ExpectedCall]? {
        if n.value == .null { return [] }
        guard let list = n.sequence else { err(n, field, "must be a list of {target, method, path, headers, body}"); return nil }
        var out: [ExpectedCall] = []
        for (i, e) in list.enumerated() {
            let f = "\(field)[\(i)]"
            guard let m = fields(e, f, ["target", "method", "path", "headers", "body"]) else { continue }
            var c = ExpectedCall()
            for x in m {
                let g = f + "." + x.key
                switch x.key {
                case "target": c.target = string(x.value, g)
                case "method": c.method = string(x.value, g)
                case "path": c.path = string(x.value, g)
                case "headers": c.headers = headers(x.value, g, nullable: true)
                default: c.body = body(x.value, g)
                }
            }
            out.append(c)
        }
        return out
    }
}

extension FilterHarness {
    /// Compares the calls the filter sent with `expect.calls` (same count, in order;
    /// each entry a subset), and reports calls no stub answered.
    func compareCalls(_ want: [ExpectedCall]?, _ client: StubHTTPClient, _ failures: inout [FilterTestFailure]) {
        for what in client.unstubbed {
            failures.append(FilterTestFailure(field: "calls", expected: "a stub in calls: for \(what)", got: "the filter called \(what), and no unused stub matches it"))
        }
        guard let want else { return }
        let sent = client.sent
        if want.count != sent.count {
            let got = sent.isEmpty ? "none" : sent.map { StubHTTPClient.describe($0) }.joined(separator: "; ")
            failures.append(FilterTestFailure(field: "expect.calls", expected: "\(want.count) call(s)", got: "\(sent.count): \(got)"))
        }
        for (i, w) in want.enumerated() where i < sent.count {
            let r = sent[i]
            let f = "calls[\(i)]"
            if let t = w.target, t != r.target { failures.append(FilterTestFailure(field: f + ".target", expected: Self.quote(t), got: Self.quote(r.target))) }
            if let m = w.method, m.uppercased() != r.method { failures.append(FilterTestFailure(field: f + ".method", expected: Self.quote(m), got: Self.quote(r.method))) }
            let path = StubHTTPClient.effectivePath(r)
            if let p = w.path, p != path { failures.append(FilterTestFailure(field: f + ".path", expected: Self.quote(p), got: Self.quote(path))) }
            if let b = w.body {
                let got = String(decoding: r.body, as: UTF8.self)
                if b != got { failures.append(FilterTestFailure(field: f + ".body", expected: Self.quote(b), got: Self.quote(got))) }
            }
            for (n, v) in w.headers ?? [] {
                let got = r.headers.filter { $0.name == n }.map(\.value)
                let gotText = got.isEmpty ? "absent" : got.map { Self.quote($0) }.joined(separator: ", ")
                if let v {
                    if got.joined(separator: ", ") != v { failures.append(FilterTestFailure(field: "\(f).headers.\(n)", expected: Self.quote(v), got: gotText)) }
                } else if !got.isEmpty {
                    failures.append(FilterTestFailure(field: "\(f).headers.\(n)", expected: "absent", got: gotText))
                }
            }
        }
    }
}
