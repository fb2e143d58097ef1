#if canImport(Foundation)
import Foundation
#endif
import MoonletCore

/// `moonlet filter new NAME`: a filter to start from (NAME.lua), its test cases
/// (NAME.cases.yaml, passing as written) and its LuaPlugin resource (NAME.yaml).
public enum FilterSkeleton {
    public struct Refused: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    /// A LuaPlugin name is a Kubernetes object name (DNS-1123 label): lowercase letters,
    /// digits and '-', starting and ending with a letter or digit, at most 63 characters.
    public static func isValidName(_ name: String) -> Bool { DNSLabel.isValid(name) }

    /// The three files, by file name.
    public static func files(name: String) -> [(file: String, text: String)] {
        let counter = name.replacingOccurrences(of: "-", with: "_") + "_denied_total"
        let lua = """
        -- \(name): a Moonlet Lua filter. The API is in docs/lua-api.md.
        --
        --   moonlet filter test \(name).lua \(name).cases.yaml     # run the cases, no proxy needed
        --   cp \(name).lua \(name).yaml CONFIG_DIR/                 # deploy: the proxy reloads it
        --   (or use this directory as CONFIG_DIR: files named *.cases.yaml are skipped)
        --
        -- A filter is a module: a table of phase functions. Each gets the stream `s` and
        -- `conf` (what configure returned, or the LuaPlugin's pluginConfig). Every call
        -- runs under the plugin's budgets (instructions, time, memory): keep it short.
        local f = {}

        -- A counter (exported on /stats/prometheus); made once, counted with :inc().
        local denied = moonlet.metrics.counter("\(counter)")

        -- Runs once per load (and on every hot reload), not per request: do the work
        -- that depends only on the configuration here.
        function f.configure(cfg)
          return {
            header = cfg.header or "x-\(name)",
            deny_path = cfg.deny_path,         -- nil: nothing is denied
          }
        end

        -- Runs once the request head is parsed, before anything goes upstream.
        -- Edit s.request.headers / s.request.path, answer locally with s:respond(status,
        -- body, headers) (nothing goes upstream then), or return moonlet.STOP_AND_BUFFER
        -- to get the whole body in on_request_body.
        function f.on_request(s, conf)
          if conf.deny_path and s.request.path == conf.deny_path then
            denied:inc()
            moonlet.log.info("\(name): denied " .. s.request.method .. " " .. s.request.path)
            return s:respond(403, "denied\\n")
          end
          s.request.headers:set(conf.header, "1")
        end

        -- Runs once the response head is known: the upstream's, or a local reply
        -- (s:respond above) — so headers set here are on both.
        function f.on_response(s, conf)
          s.response.headers:set(conf.header, "1")
        end

        return f

        """
        let cases = """
        # Cases for \(name).lua: moonlet filter test \(name).lua \(name).cases.yaml
        # Each case runs the filter's phases in the proxy's order against a simulated upstream.
        pluginConfig: {header: x-\(name), deny_path: /admin}
        cases:
        - name: marks the request and the response
          request: {method: GET, path: /hello, headers: {x-user: alice}}
          upstream: {status: 200, headers: {content-type: text/plain}, body: hello}
          expect:
            status: 200
            body: hello
            upstream_path: /hello
            upstream_request_headers: {x-\(name): "1", x-user: alice}
            response_headers: {x-\(name): "1", content-type: text/plain}
        - name: denies the admin path without going upstream
          request: {method: GET, path: /admin}
          expect:
            status: 403
            body: "denied\\n"
            response_headers: {x-\(name): "1"}   # on_response runs on local replies too
            logs: ["\(name): denied GET /admin"]
            metrics: {\(counter): 1}

        """
        let yaml = """
        # The LuaPlugin resource that deploys \(name).lua (docs/configuration.md).
        apiVersion: moonlet.io/v1alpha1
        kind: LuaPlugin
        metadata:
          name: \(name)
        spec:
          url: file://\(name).lua            # relative to this file's directory
          phase: UNSPECIFIED_PHASE           # AUTHN, AUTHZ, UNSPECIFIED_PHASE or STATS
          failStrategy: FAIL_CLOSE           # a Lua error answers 500 (FAIL_OPEN: continue)
          pluginConfig: {header: x-\(name), deny_path: /admin}

        """
        return [("\(name).lua", lua), ("\(name).cases.yaml", cases), ("\(name).yaml", yaml)]
    }

    /// Writes the files into `dir` (created if missing) and returns their paths. An
    /// existing file is never overwritten unless `force`.
    public static func write(name: String, dir: String, force: Bool = false) throws -> [String] {
        guard isValidName(name) else {
            throw Refused(description: "\(name): a filter name is a LuaPlugin name: lowercase letters, digits and '-', at most 63 characters")
        }
        let fm = FileManager.default
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let files = files(name: name).map { ((dir as NSString).appendingPathComponent($0.file), $0.text) }
        if !force, let existing = files.first(where: { fm.fileExists(atPath: $0.0) }) {
            throw Refused(description: "\(existing.0): already exists (--force overwrites)")
        }
        for (path, text) in files { try text.write(toFile: path, atomically: true, encoding: .utf8) }
        return files.map(\.0)
    }
}
