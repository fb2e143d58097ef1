import MoonletRegex
import MoonletCore
#if canImport(Foundation)
import Foundation
#endif

/// Istio's StringMatch (exact / prefix / regex), compiled at load.
public struct StringMatch: @unchecked Sendable {
    public enum Kind: Sendable { case exact, prefix, regex }
    public var kind: Kind
    public var value: String
    /// Anchored (full-match, as Envoy's safe_regex) PCRE2 JIT pattern for `.regex`.
    public var regex: CompiledRegex?

    public init(kind: Kind, value: String, regex: CompiledRegex? = nil) {
        self.kind = kind; self.value = value; self.regex = regex
    }

    @inline(__always)
    public func matches(_ s: String, ignoreCase: Bool = false) -> Bool {
        switch kind {
        case .exact: return ignoreCase ? s.lowercased() == value.lowercased() : s == value
        case .prefix: return ignoreCase ? s.lowercased().hasPrefix(value.lowercased()) : s.hasPrefix(value)
        case .regex: return regex?.matches(s) ?? false
        }
    }

    /// Like `matches`, but a regex that PCRE2 gave up on (its match or depth limit) throws
    /// instead of reading as "no match": a route's decision must not fail open.
    @inline(__always)
    public func test(_ s: String, ignoreCase: Bool = false) throws(RegexMatchError) -> Bool {
        guard kind == .regex, let regex else { return matches(s, ignoreCase: ignoreCase) }
        var subject = s
        var failure: RegexMatchError?
        let found = subject.withUTF8 { p -> Bool in
            do throws(RegexMatchError) { return try regex.search(UnsafeRawBufferPointer(p), from: 0) != nil } catch { failure = error; return false }
        }
        if let failure { throw failure }
        return found
    }
}

/// One `match` entry of an HTTP route: every field present must match (AND).
public struct RouteMatch: @unchecked Sendable {
    public var uri: StringMatch?
    public var scheme: StringMatch?
    public var method: StringMatch?
    public var authority: StringMatch?
    /// Lowercased name; nil match = the header must be present (`{}`).
    public var headers: [(String, StringMatch?)] = []
    public var withoutHeaders: [(String, StringMatch?)] = []
    public var queryParams: [(String, StringMatch?)] = []
    public var ignoreUriCase = false
    public var port: Int?
    public var sourceLabels: [String: String] = [:]
    public var sourceNamespace: String?
    /// The gateways this match applies to (empty: the VirtualService's); a sidecar keeps
    /// the match only when they include `mesh` (RouteTable.httpRoutes).
    public var gateways: [String] = []
    public init() {}
}

/// Where a destination was written, for the errors checked once every resource is
/// read (its subset, or the destination itself).
struct FieldPlace: Sendable {
    var line = 0
    var column = 0
    var field = ""
}

/// A weighted destination of a route.
public struct RouteDestination: Sendable {
    public var host: String
    /// Canonical host (name.ns.svc.cluster.local for short names).
    public var fqdn: String
    public var subset: String
    public var port: Int?
    public var weight: Int
    var place = FieldPlace()
}

/// Header edits of a route (request or response side).
public struct HeaderOps: Sendable {
    public var sets: [(String, String)] = []
    public var adds: [(String, String)] = []
    public var removes: [String] = []
    public var isEmpty: Bool { sets.isEmpty && adds.isEmpty && removes.isEmpty }
    public init() {}
}

public struct Redirect: Sendable {
    public var uri: String?
    public var authority: String?
    public var scheme: String?
    public var port: Int?
    public var code: Int = 301
}

public struct Rewrite: @unchecked Sendable {
    public var uri: String?
    public var authority: String?
    /// uriRegexRewrite: match (anchored=false, Envoy replaces every match) and rewrite.
    public var regex: CompiledRegex?
    public var regexRewrite: String = ""
}

public struct Fault: Sendable {
    public var abortStatus: Int?
    public var abortPercent: Double = 100
    public var delayMs: Int?
    public var delayPercent: Double = 100
}



public struct Mirror: Sendable {
    public var host: String
    public var fqdn: String
    public var subset: String
    public var port: Int?
    public var percent: Double
    var place = FieldPlace()
}

/// corsPolicy of a route (Envoy's CORS filter semantics).
public struct CorsPolicy: @unchecked Sendable {
    public var allowOrigins: [StringMatch] = []
    public var allowMethods: String = ""
    public var allowHeaders: String = ""
    public var exposeHeaders: String = ""
    public var maxAgeSeconds: Int?
    public var allowCredentials = false

    public func allows(origin: String) -> Bool { allowOrigins.contains { $0.matches(origin) } }
}

/// One `http` route of a VirtualService, decoded and compiled.
public struct HTTPRouteRule: @unchecked Sendable {
    public var name: String = ""
    public var matches: [RouteMatch] = []
    public var destinations: [RouteDestination] = []
    /// Cumulative weights, for picking with one random number.
    public var cumulativeWeights: [Int] = []
    public var totalWeight: Int = 0
    public var redirect: Redirect?
    public var directResponse: (status: Int, body: String)?
    public var rewrite: Rewrite?
    public var timeoutMs: Int?
    /// nil: Istio's default policy applies.
    public var retries: RetrySpec?
    public var fault: Fault?
    public var mirrors: [Mirror] = []
    public var cors: CorsPolicy?
    public var requestHeaders = HeaderOps()
    public var responseHeaders = HeaderOps()
    public init() {}
}

/// The identity of one decoding of a resource (compared with ===).
final class DocumentToken: Sendable {}

public struct VirtualServiceSpec: Sendable {
    /// Which decoding this is (a document decoded again gets a new one): how a table
    /// built from it tells that it did not change since the last (RouteTable.build).
    var token = DocumentToken()
    public var name: String
    public var namespace: String
    public var hosts: [String]
    public var gateways: [String]
    public var http: [HTTPRouteRule]
    public var file: String
    public var line: Int
    /// `spec.tcp`: routes for opaque TCP connections (L4Routes.swift).
    public var tcp: [L4RouteRule] = []
    /// `spec.tls`: routes for TLS passed through, by SNI (L4Routes.swift).
    public var tls: [L4RouteRule] = []
    /// `spec.exportTo` (ExportTo.visible): the namespaces whose sidecars see it.
    public var exportTo: [String] = []
}

public struct Subset: Sendable {
    public var name: String
    public var labels: [String: String]
    public var trafficPolicy: ConfigValue?
}

public struct DestinationRuleSpec: Sendable {
    /// Which decoding this is (a document decoded again gets a new one): how a table
    /// built from it tells that it did not change since the last (RouteTable.build).
    var token = DocumentToken()
    public var name: String
    public var namespace: String
    public var host: String
    public var fqdn: String
    public var subsets: [Subset]
    public var trafficPolicy: ConfigValue?
    public var file: String
    public var line: Int
    /// `spec.exportTo` (ExportTo.visible): the namespaces whose sidecars see it.
    public var exportTo: [String] = []
}

/// A workload endpoint: a WorkloadEntry or a ServiceEntry endpoint.
public struct Endpoint: Sendable, Equatable {
    public var address: String
    /// Port by service port name.
    public var ports: [String: Int]
    public var labels: [String: String]
    public var serviceAccount: String
    public var weight: Int
    public init(address: String, ports: [String: Int] = [:], labels: [String: String] = [:], serviceAccount: String = "", weight: Int = 1) {
        self.address = address; self.ports = ports; self.labels = labels; self.serviceAccount = serviceAccount; self.weight = weight
    }
}

public struct ServicePort: Sendable {
    public var number: Int
    public var name: String
    public var protocolName: String
    public var targetPort: Int?
    public init(number: Int, name: String, protocolName: String, targetPort: Int?) {
        self.number = number; self.name = name; self.protocolName = protocolName; self.targetPort = targetPort
    }
}

public struct ServiceEntrySpec: Sendable {
    /// Which decoding this is (a document decoded again gets a new one): how a table
    /// built from it tells that it did not change since the last (RouteTable.build).
    var token = DocumentToken()
    public var name: String
    public var namespace: String
    public var hosts: [String]
    /// `addresses`: the service's virtual IPs (or CIDR blocks) an intercepted client
    /// connects to; the proxy finds the service by them (the connection's original
    /// destination, or a Host that is one of them).
    public var addresses: [String] = []
    public var ports: [ServicePort]
    public var resolution: String
    public var endpoints: [Endpoint]
    public var workloadSelector: [String: String]?
    public var file: String
    public var line: Int
    /// `spec.exportTo` (ExportTo.visible): the namespaces whose sidecars see it.
    public var exportTo: [String] = []
    public init(name: String, namespace: String, hosts: [String], addresses: [String] = [], ports: [ServicePort], resolution: String, endpoints: [Endpoint],
                workloadSelector: [String: String]?, file: String, line: Int) {
        self.name = name; self.namespace = namespace; self.hosts = hosts; self.addresses = addresses; self.ports = ports; self.resolution = resolution
        self.endpoints = endpoints; self.workloadSelector = workloadSelector; self.file = file; self.line = line
    }
}

public struct WorkloadEntrySpec: Sendable {
    /// Which decoding this is (a document decoded again gets a new one): how a table
    /// built from it tells that it did not change since the last (RouteTable.build).
    var token = DocumentToken()
    public var name: String
    public var namespace: String
    public var endpoint: Endpoint
}

/// The canonical form of a host as Istio resolves it: short names are qualified with
/// the namespace of the resource that names them.
public enum HostName {
    public static let clusterDomain = "svc.cluster.local"

    public static func canonical(_ host: String, namespace: String) -> String {
        let h = host.lowercased()
        if h.hasByte("*") { return h }
        if !h.hasByte(".") { return "\(h).\(namespace.isEmpty ? "default" : namespace).\(clusterDomain)" }
        return h
    }

    /// Every form a client may use for a canonical host (short name only in `localNamespace`).
    public static func aliases(_ fqdn: String, localNamespace: String) -> [String] {
        guard fqdn.hasSuffix("." + clusterDomain) else { return [fqdn] }
        let parts = fqdn.split(separator: ".")
        guard parts.count >= 2 else { return [fqdn] }
        let name = String(parts[0]), ns = String(parts[1])
        var out = [fqdn, "\(name).\(ns).svc", "\(name).\(ns)"]
        if ns == localNamespace { out.append(name) }
        return out
    }

    /// Host header value without port, lowercased.
    public static func normalize(_ authority: String) -> String {
        // Already lowercase, without port or brackets (the common Host): as it is.
        if authority.utf8.allSatisfy({ $0 < 128 && $0 != UInt8(ascii: ":") && $0 != UInt8(ascii: "[") && ($0 &- 65) >= 26 }) { return authority }
        var a = Substring(authority)
        if a.hasPrefix("[") { if let e = a.firstIndex(of: "]") { a = a[a.startIndex...e] } }
        else if let c = a.lastIndex(of: ":"), a.firstIndex(of: ":") == c { a = a[..<c] }
        // (Two colons or more without brackets: a bare IPv6 address, no port.)
        return a.lowercased()
    }
}

extension String {
    /// Whether the UTF-8 text holds the ASCII character `c` (a byte scan: `contains` with a
    /// string goes through Foundation's search, which showed in a large mesh's load).
    @inline(__always)
    func hasByte(_ c: Unicode.Scalar) -> Bool { utf8.contains(UInt8(ascii: c)) }
}
