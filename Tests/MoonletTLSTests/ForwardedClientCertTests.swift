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

    func cert(_ subject: DistinguishedName, _ sans: [GeneralName]) throws -> NIOSSLCertificate {
        let key = P256.Signing.PrivateKey()
        let now = Date()
        let cert = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: .init(key.publicKey),
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: now.addingTimeInterval(3600),
            issuer: subject, subject: subject, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions { SubjectAlternativeNames(sans) },
            issuerPrivateKey: .init(key))
        var serializer = DER.Serializer()
        try serializer.serialize(cert)
        return try NIOSSLCertificate(bytes: serializer.serializedBytes, format: .der)
    }

    /// A DNS or URI SAN holding `;` `,` `=` or `"` is quoted and escaped as Envoy does, so
    /// it cannot start another key or element; a subject's `"` is escaped.
    func test_sanValuesWithSeparatorsOrQuotes_areQuotedAndEscaped_soTheyCannotForgeKeysOrElements() throws {
        let peer = try cert(try DistinguishedName { CommonName("a\"b") },
                            [.uniformResourceIdentifier("spiffe://x/ns/a/sa/b;By=spiffe://forged"), .dnsName("a.example,By=x;URI=\"y\"")])
        let element = try XCTUnwrap(ForwardedClientCert.element(peer: peer, by: "spiffe://own"))
        XCTAssertTrue(element.hasSuffix(";URI=\"spiffe://x/ns/a/sa/b;By=spiffe://forged\";DNS=\"a.example,By=x;URI=\\\"y\\\"\""), element)
        XCTAssertTrue(element.contains(";Subject=\"CN=a\\\\\\\"b\";"), element)
    }

    /// A certificate with CR, LF or another control byte in a SAN or its subject gets no
    /// element: it could otherwise add header lines to the app's request.
    func test_aPeerCertificateWithAControlByteInASANOrItsSubject_getsNoElement() throws {
        XCTAssertNil(ForwardedClientCert.element(peer: try cert(try DistinguishedName { CommonName("client") },
                                                                [.dnsName("a.example\r\nx-injected: 1")]), by: "spiffe://own"))
        XCTAssertNil(ForwardedClientCert.element(peer: try cert(try DistinguishedName { CommonName("client") },
                                                                [.uniformResourceIdentifier("spiffe://x/\u{1}")]), by: "spiffe://own"))
        XCTAssertNil(ForwardedClientCert.element(peer: try cert(try DistinguishedName { CommonName("c\nx-injected: 1") },
                                                                [.dnsName("a.example")]), by: "spiffe://own"))
        XCTAssertNotNil(ForwardedClientCert.element(peer: try cert(try DistinguishedName { CommonName("client") },
                                                                   [.dnsName("a.example")]), by: "spiffe://own"))
    }
}
