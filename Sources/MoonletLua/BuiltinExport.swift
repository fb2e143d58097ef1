#if canImport(Foundation)
import Foundation
#endif

/// `moonlet plugins export`: the builtin filters written out (kept apart from
/// BuiltinPlugins.swift, which scripts/gen-builtins writes from plugins/).
extension BuiltinPlugins {
    /// Names of the builtin filters, sorted.
    public static var names: [String] { all.map(\.name).sorted() }

    /// Why `export` wrote nothing: a file there differs from the builtin.
    public struct ExportConflict: Error, CustomStringConvertible {
        public var paths: [String]
        public var description: String {
            "refusing to overwrite \(paths.joined(separator: ", ")) (differs from the builtin; --force overwrites)"
        }
    }

    /// Writes every builtin as DIR/NAME.lua, creating DIR, and returns the paths. A file
    /// there with other content stops it before anything is written (ExportConflict),
    /// unless `force`.
    @discardableResult
    public static func export(to dir: String, force: Bool = false) throws -> [String] {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let files = all.sorted { $0.name < $1.name }.map { ((dir as NSString).appendingPathComponent($0.name + ".lua"), $0.source) }
        if !force {
            let conflicts = files.filter { file in
                guard let data = FileManager.default.contents(atPath: file.0) else { return false }
                return data != Data(file.1.utf8)
            }.map(\.0)
            if !conflicts.isEmpty { throw ExportConflict(paths: conflicts) }
        }
        for (path, text) in files { try Data(text.utf8).write(to: URL(fileURLWithPath: path), options: .atomic) }
        return files.map(\.0)
    }
}
