import NIOSSL
import X509
import Crypto

/// The X-Forwarded-Client-Cert element that Envoy appends on Istio's inbound listener
/// (`forward_client_cert_details: APPEND_FORWARD` with Subject, URI and DNS set): it tells
/// the app which verified mTLS peer sent the request.
public enum ForwardedClientCert {
    /// `By=<own SPIFFE id>;Hash=<sha256 of the peer certificate's DER, hex>;Subject="<its
    /// subject>";URI=<its URI SAN>`, then `;DNS=<name>` per DNS SAN, in Envoy's order.
    /// Values are quoted and escaped as Envoy does; an element that would still hold a
    /// control byte (other than HTAB) or DEL, which could split the header, is nil: the
    /// request goes on without one.
    public static func element(peer: NIOSSLCertificate, by own: String) -> String? {
        var out = "By=" + own
        if let der = try? peer.toDERBytes() {
            out += ";Hash=" + SHA256.hash(data: der).map { byte in
                let h = String(byte, radix: 16)
                return byte < 16 ? "0" + h : h
            }.joined()
            let subject = (try? Certificate(derEncoded: der)).map { String(describing: $0.subject) } ?? ""
            out += ";Subject=\"" + escaped(subject) + "\""
        }
        var uri: String?
        var dns = ""
        for san in peer._subjectAlternativeNames() where san.nameType == .uri || san.nameType == .dnsName {
            let value = san.contents.withUnsafeBufferPointer { String(decoding: $0, as: UTF8.self) }
            // Envoy sets the first URI SAN, and every DNS SAN.
            if san.nameType == .uri { if uri == nil { uri = value } } else { dns += ";DNS=" + quotedIfNeeded(value) }
        }
        if let uri { out += ";URI=" + quotedIfNeeded(uri) }
        out += dns
        for c in out.utf8 where (c < 32 && c != 9) || c == 127 { return nil }
        return out
    }

    /// Envoy's XFCC escaping: inside a quoted value, `"` and `\` are backslash-escaped.
    static func escaped(_ v: String) -> String {
        guard v.utf8.contains(where: { $0 == UInt8(ascii: "\"") || $0 == UInt8(ascii: "\\") }) else { return v }
        return v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
    }

    /// A URI or DNS value is quoted (and escaped) when it holds `,` `;` `=` or `"`, so it
    /// cannot end its key or element and start another.
    static func quotedIfNeeded(_ v: String) -> String {
        let special = v.utf8.contains { c in
            c == UInt8(ascii: ",") || c == UInt8(ascii: ";") || c == UInt8(ascii: "=") || c == UInt8(ascii: "\"") || c == UInt8(ascii: "\\")
        }
        return special ? "\"" + escaped(v) + "\"" : v
    }
}
