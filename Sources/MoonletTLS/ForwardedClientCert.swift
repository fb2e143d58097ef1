import NIOSSL
import X509
import Crypto

/// The X-Forwarded-Client-Cert element that Envoy appends on Istio's inbound listener
/// (`forward_client_cert_details: APPEND_FORWARD` with Subject, URI and DNS set): it tells
/// the app which verified mTLS peer sent the request.
public enum ForwardedClientCert {
    /// `By=<own SPIFFE id>;Hash=<sha256 of the peer certificate's DER, hex>;Subject="<its
    /// subject>";URI=<its URI SAN>`, then `;DNS=<name>` per DNS SAN, in Envoy's order.
    public static func element(peer: NIOSSLCertificate, by own: String) -> String {
        var out = "By=" + own
        if let der = try? peer.toDERBytes() {
            out += ";Hash=" + SHA256.hash(data: der).map { byte in
                let h = String(byte, radix: 16)
                return byte < 16 ? "0" + h : h
            }.joined()
            let subject = (try? Certificate(derEncoded: der)).map { String(describing: $0.subject) } ?? ""
            out += ";Subject=\"" + subject.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
        }
        var uri: String?
        var dns = ""
        for san in peer._subjectAlternativeNames() where san.nameType == .uri || san.nameType == .dnsName {
            let value = san.contents.withUnsafeBufferPointer { String(decoding: $0, as: UTF8.self) }
            // Envoy sets the first URI SAN, and every DNS SAN.
            if san.nameType == .uri { if uri == nil { uri = value } } else { dns += ";DNS=" + value }
        }
        if let uri { out += ";URI=" + uri }
        out += dns
        return out
    }
}
