import ArgumentParser
import MoonletLua
#if canImport(Foundation)
import Foundation
#endif

/// `moonlet filter`: write and test a Lua filter without a proxy (docs/tutorial-filters.md).
struct FilterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "filter",
        abstract: "Write and test Lua filters offline.",
        subcommands: [Test.self, New.self])

    /// `moonlet filter test FILTER.lua CASES.yaml`: runs the cases in the proxy's sandbox,
    /// API and budgets, with no sockets. Exit 0: all passed; 1: a case failed; 2: a file
    /// is unreadable or invalid (file:line), or the filter does not load.
    struct Test: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run a filter against the cases of a CASES.yaml (exit 1 when a case fails, 2 on bad input).")
        @Argument(help: "The filter (a Lua module)") var filter: String
        @Argument(help: "The cases (YAML: pluginConfig, cases[].name/request/upstream/expect)") var cases: String
        @Option(help: "A LuaPlugin resource (its pluginConfig, name, phase, failStrategy and limits) or a YAML mapping used as pluginConfig; replaces the cases file's pluginConfig")
        var pluginConfig: String?

        func run() throws {
            let out = FilterTestCommand.run(filter: filter, cases: cases, pluginConfig: pluginConfig)
            if out.exitCode == 2 { FileHandle.standardError.write(out.output.data(using: .utf8)!) } else { print(out.output, terminator: "") }
            if out.exitCode != 0 { throw ExitCode(out.exitCode) }
        }
    }

    /// `moonlet filter new NAME`: NAME.lua, NAME.cases.yaml (passing) and NAME.yaml (LuaPlugin).
    struct New: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a filter skeleton NAME.lua, its cases NAME.cases.yaml and its LuaPlugin NAME.yaml.")
        @Argument(help: "Filter name (a LuaPlugin name: lowercase letters, digits, '-')") var name: String
        @Option(help: "Directory to write to (created if missing; default: the current one)") var dir: String = "."
        @Flag(help: "Overwrite existing files") var force = false

        func run() throws {
            do {
                for p in try FilterSkeleton.write(name: name, dir: dir, force: force) { print(p) }
            } catch let e as FilterSkeleton.Refused {
                FileHandle.standardError.write((e.description + "\n").data(using: .utf8)!)
                throw ExitCode(2)
            }
        }
    }
}
