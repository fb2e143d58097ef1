/// Kubernetes object names.
public enum DNSLabel {
    /// A DNS-1123 label (RFC 1123, as Kubernetes checks namespace, port and Service names):
    /// 1 to 63 characters, lowercase letters, digits and '-', starting and ending with a
    /// letter or digit.
    public static func isValid(_ s: String) -> Bool {
        var s = s
        return s.withUTF8 { b in
            guard !b.isEmpty, b.count <= 63 else { return false }
            func alnum(_ c: UInt8) -> Bool { (c >= 97 && c <= 122) || (c >= 48 && c <= 57) }
            return alnum(b.first!) && alnum(b.last!) && b.allSatisfy { alnum($0) || $0 == 45 }
        }
    }
}
