/// A configuration problem with the place it came from:
/// `file:line:col: Kind namespace/name: field.path: message` (Galley's style).
public struct ConfigError: Error, CustomStringConvertible, Sendable, Equatable {
    public var file: String
    public var line: Int
    public var column: Int
    /// "Kind namespace/name", empty when the document could not be identified.
    public var resource: String
    public var field: String
    public var message: String

    public init(file: String, line: Int, column: Int, resource: String = "", field: String = "", message: String) {
        self.file = file; self.line = line; self.column = column
        self.resource = resource; self.field = field; self.message = message
    }

    public var description: String {
        var s = "\(file):\(line):\(column): "
        if !resource.isEmpty { s += resource + ": " }
        if !field.isEmpty { s += field + ": " }
        return s + message
    }
}

/// All the errors of one rejected load.
public struct ConfigErrors: Error, CustomStringConvertible, Sendable {
    public var errors: [ConfigError]
    public init(_ errors: [ConfigError]) { self.errors = errors }
    public var description: String { errors.map(\.description).joined(separator: "\n") }
}
