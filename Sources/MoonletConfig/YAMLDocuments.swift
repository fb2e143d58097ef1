import Yams

extension YAMLReader {
    /// The documents of `text` as positioned nodes (read as `documents` reads them); a
    /// YAML syntax error is thrown as `ConfigErrors` naming `file:line:col`.
    public static func positionedDocuments(_ text: String, file: String) throws -> [PositionedNode] {
        do {
            return try documents(text).map { PositionedNode(node: $0, file: file) }
        } catch let e as YamlError {
            throw ConfigErrors([ConfigLoader.yamlError(e, file: file)])
        }
    }
}
