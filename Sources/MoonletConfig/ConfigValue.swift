import MoonletCore
import Yams

/// A YAML value with the place it came from, so every later error can name
/// `file:line:column`.
public indirect enum ConfigValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([ConfigValue])
    /// Keys in document order.
    case map([(String, ConfigValue)])

    public static func == (a: ConfigValue, b: ConfigValue) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.int(x), .int(y)): return x == y
        case let (.double(x), .double(y)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x == y
        case let (.map(x), .map(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    public subscript(key: String) -> ConfigValue? {
        if case .map(let kv) = self { return kv.first { $0.0 == key }?.1 }
        return nil
    }

    public var stringValue: String? {
        switch self {
        case .string(let s): return s
        case .int(let i): return String(i)
        case .double(let d): return String(d)
        case .bool(let b): return String(b)
        default: return nil
        }
    }

    /// JSON text (for /config_dump).
    public var json: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int(let i): return String(i)
        case .double(let d): return d.isFinite ? String(d) : "null"
        case .string(let s): return JSON.quote(s)
        case .array(let a): return "[" + a.map(\.json).joined(separator: ",") + "]"
        case .map(let kv): return "{" + kv.map { JSON.quote($0.0) + ":" + $0.1.json }.joined(separator: ",") + "}"
        }
    }
}



#if canImport(Foundation)
import Foundation
#endif

/// A YAML node with its position, walked by the decoders.
public struct PositionedNode {
    public let node: Node
    public let file: String
    /// Lines of the file before the text this node was parsed from (a document parsed
    /// alone: see ConfigLoader's per-document cache), added to every line reported.
    public let lineOffset: Int
    public var line: Int { (node.mark?.line ?? 0) + lineOffset }
    public var column: Int { node.mark?.column ?? 0 }

    public init(node: Node, file: String, lineOffset: Int = 0) {
        self.node = node; self.file = file; self.lineOffset = lineOffset
    }

    public var mapping: [(key: String, keyLine: Int, keyColumn: Int, value: PositionedNode)]? {
        guard case .mapping(let m) = node else { return nil }
        return m.map { (k, v) in (k.string ?? "", (k.mark?.line ?? 0) + lineOffset, k.mark?.column ?? 0, PositionedNode(node: v, file: file, lineOffset: lineOffset)) }
    }
    public var sequence: [PositionedNode]? {
        guard case .sequence(let s) = node else { return nil }
        return s.map { PositionedNode(node: $0, file: file, lineOffset: lineOffset) }
    }
    public var scalarString: String? {
        guard case .scalar(let s) = node else { return nil }
        return s.string
    }
    /// The value of `key` in a mapping (the first one), nil when absent or not a mapping.
    /// Scans the mapping in place: building `mapping` for one key cost more than the
    /// decoding it served at mesh scale. By index: iterating a Yams mapping (`for in`)
    /// copies all its pairs into a new array first.
    public func child(_ key: String) -> PositionedNode? {
        guard case .mapping(let m) = node else { return nil }
        var i = m.startIndex
        while i < m.endIndex {
            if case .scalar(let s) = m[i].key, s.string == key { return PositionedNode(node: m[i].value, file: file, lineOffset: lineOffset) }
            i = m.index(after: i)
        }
        return nil
    }

    /// Converts to a plain value, resolving YAML 1.2 core-schema scalars.
    public var value: ConfigValue {
        switch node {
        case .scalar(let s):
            if s.style != .plain { return .string(s.string) }
            let t = s.string
            switch t {
            case "", "~", "null", "Null", "NULL": return .null
            case "true", "True", "TRUE": return .bool(true)
            case "false", "False", "FALSE": return .bool(false)
            default:
                if let i = Int(t) { return .int(i) }
                if let d = Double(t), t.contains(".") || t.contains("e") || t.contains("E") { return .double(d) }
                return .string(t)
            }
        case .mapping(let m):
            return .map(m.map { ($0.key.string ?? "", PositionedNode(node: $0.value, file: file).value) })
        case .sequence(let s):
            return .array(s.map { PositionedNode(node: $0, file: file).value })
        case .alias:
            return .null
        }
    }
}
