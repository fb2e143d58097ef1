import XCTest
import NIOSSL
import X509
import Crypto
import SwiftASN1
@testable import MoonletTLS

/// The X-Forwarded-Client-Cert element, as Envoy writes it on Istio's inbound listener.
final class ForwardedClientCertTests: XCTestCase {
    func test_element_hasByHashSubjectTheFirstURIAndEveryDNSName_inEnvoysOrder() throws {
        let key = P256.Signing.PrivateKey()
        let name = try DistinguishedName {
            OrganizationName("acme")
            CommonName("client")
        }
        let now = Date()
        let cert = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: now.addingTimeInterval(3600),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                SubjectAlternativeNames([.dnsName("a.example"), .uniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/frontend"),
                                         .uniformResourceIdentifier("spiffe://other/ns/x/sa/y"), .dnsName("b.example")])
            },
            issuerPrivateKey: .init(key))
        var serializer = DER.Serializer()
        try serializer.serialize(cert)
        let der = serializer.serializedBytes
        let hash = SHA256.hash(data: der).map { String(format: "%02x", $0) }.joined()
        let element = ForwardedClientCert.element(peer: try NIOSSLCertificate(bytes: der, format: .der), by: "spiffe://cluster.local/ns/production/sa/orders")
        // Subject in RFC 2253 order (most specific first), as Envoy prints it.
        XCTAssertEqual(element, "By=spiffe://cluster.local/ns/production/sa/orders;Hash=\(hash);Subject=\"CN=client,O=acme\";"
                       + "URI=spiffe://cluster.local/ns/default/sa/frontend;DNS=a.example;DNS=b.example")
    }
}
