import Yams

/// Reads YAML documents as go-yaml (and so kubectl and Istio) reads them, where
/// libyaml is stricter.
///
/// The one difference met in Istio's own material: inside a flow collection libyaml
/// refuses a plain scalar with a ':' followed by `,`, `[`, `]`, `{`, `}` or `?`
/// ("found unexpected ':'"), so `addresses: [1.2.3.4, 2001:db8::]` does not parse,
/// while go-yaml takes the ':' as part of the scalar (`2001:db8::`). Each such ':' is
/// replaced by a stand-in character that libyaml accepts, at the place libyaml names,
/// and put back into the scalars once parsed. The stand-in is one character, so every
/// line and column (libyaml counts characters) stays where it was in the file.
public enum YAMLReader {
    /// A private-use character: never meaningful in configuration.
    static let standIn: Character = "\u{E000}"
    /// How many colons one file may need replaced (each costs a parse of the file).
    static let maxReplacements = 1000

    /// All documents of `text`; YAML errors are thrown as libyaml reports them.
    public static func documents(_ text: String) throws -> [Node] {
        var text = text
        var replaced = 0
        let mayReplace = !containsStandIn(text)
        while true {
            do {
                let parser = try Self.parser(text)
                var docs: [Node] = []
                while let n = try parser.nextRoot() { docs.append(n) }
                return replaced == 0 ? docs : docs.map(restore)
            } catch let e as YamlError {
                guard mayReplace, replaced < maxReplacements,
                      case .scanner(let context?, let problem, let mark, _) = e,
                      context.text == "while scanning a plain scalar", problem == "found unexpected ':'",
                      let fixed = replacingColon(in: text, line: mark.line, column: mark.column) else { throw e }
                text = fixed
                replaced += 1
            }
        }
    }

    /// Whether `text` holds the stand-in, by its UTF-8 bytes (EE 80 80): a scan by
    /// Character cost 5% of a large mesh's load.
    static func containsStandIn(_ text: String) -> Bool {
        var text = text
        return text.withUTF8 { b in
            var i = 0
            let n = b.count
            while i + 2 < n {
                if b[i] == 0xEE && b[i + 1] == 0x80 && b[i + 2] == 0x80 { return true }
                i += 1
            }
            return false
        }
    }

    /// A parser of `text` as `documents` makes it. The encoding is given: Yams' default
    /// reads the process environment (YAMS_DEFAULT_ENCODING) at every parser, which was
    /// 16% of a large mesh's load.
    static func parser(_ text: String) throws -> Parser { try Parser(yaml: text, resolver: .basic, encoding: .utf8) }

    /// `text` with the ':' at 1-based `line` and `column` (in characters, lines broken
    /// as libyaml breaks them) replaced by the stand-in; nil when no ':' is there.
    static func replacingColon(in text: String, line: Int, column: Int) -> String? {
        var scalars = Array(text.unicodeScalars)
        var l = 1, c = 1, i = 0
        while i < scalars.count && (l < line || (l == line && c < column)) {
            let u = scalars[i]
            if u == "\r" && i + 1 < scalars.count && scalars[i + 1] == "\n" { i += 1 }
            if u == "\r" || u == "\n" || u == "\u{85}" || u == "\u{2028}" || u == "\u{2029}" { l += 1; c = 1 } else { c += 1 }
            i += 1
        }
        guard l == line, c == column, i < scalars.count, scalars[i] == ":" else { return nil }
        scalars[i] = standIn.unicodeScalars.first!
        var out = String.UnicodeScalarView()
        out.append(contentsOf: scalars)
        return String(out)
    }

    /// `node` with every stand-in turned back into ':'.
    static func restore(_ node: Node) -> Node {
        switch node {
        case .scalar(var s):
            guard s.string.contains(standIn) else { return node }
            let tag = s.tag
            s.string = String(s.string.map { $0 == standIn ? ":" : $0 })
            s.tag = tag
            return .scalar(s)
        case .mapping(let m):
            return .mapping(Node.Mapping(m.map { (restore($0.key), restore($0.value)) }, m.tag, m.style, m.mark))
        case .sequence(let q):
            return .sequence(Node.Sequence(q.map(restore), q.tag, q.style, q.mark))
        case .alias:
            return node
        }
    }
}
