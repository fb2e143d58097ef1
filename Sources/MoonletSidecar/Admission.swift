import MoonletCore
import Foundation
import Yams

/// JSON text of a YAML node: mappings become objects (key order kept), sequences arrays,
/// scalars what YAML 1.1's core resolution makes of them (string, integer, float, bool, null).
public func jsonText(_ node: Node) -> String {
    switch node {
    case .mapping(let m):
        return "{" + m.map { JSON.quote($0.key.string ?? $0.key.scalar?.string ?? "") + ":" + jsonText($0.value) }.joined(separator: ",") + "}"
    case .sequence(let s):
        return "[" + s.map(jsonText).joined(separator: ",") + "]"
    case .scalar(let sc):
        switch Tag.Name(rawValue: node.tag.rawValue) {
        case .null: return "null"
        case .bool: return node.bool == true ? "true" : "false"
        case .int: if let i = node.int { return String(i) }
        case .float: if let d = node.float, d.isFinite { return d == d.rounded() && abs(d) < 1e15 ? String(Int(d)) : String(d) }
        default: break
        }
        return JSON.quote(sc.string)
    case .alias:
        return "null"
    }
}


/// A mutating admission webhook's decision for one AdmissionReview (admission.k8s.io/v1):
/// pods are injected as `moonlet inject` injects them, with the change as a JSONPatch.
public struct AdmissionReviewer: Sendable {
    /// The injector applied to each pod.
    public let injector: SidecarInjector

    /// A reviewer that injects with `injector`.
    public init(injector: SidecarInjector) { self.injector = injector }

    /// An error in the request itself (the server answers 400).
    public struct BadReview: Error, CustomStringConvertible {
        /// What is wrong with the request.
        public let description: String
    }

    /// The AdmissionReview response (JSON) for a request body (JSON).
    public func review(_ body: String) throws -> String {
        guard let root = try? Yams.compose(yaml: body), root.mapping != nil else { throw BadReview(description: "body is not a JSON object") }
        guard let request = root[key: "request"], request.mapping != nil else { throw BadReview(description: "AdmissionReview without request") }
        let uid = request[key: "uid"]?.string ?? ""
        let apiVersion = root[key: "apiVersion"]?.string ?? "admission.k8s.io/v1"
        var response = "{\"uid\":\(JSON.quote(uid)),\"allowed\":true"
        if request[path: ["kind", "kind"]]?.string == "Pod", let pod = request[key: "object"], pod.mapping != nil,
           request[key: "operation"]?.string ?? "CREATE" == "CREATE" {
            let patch = try self.patch(pod: pod)
            if !patch.isEmpty {
                response += ",\"patchType\":\"JSONPatch\",\"patch\":\(JSON.quote(Data(patch.utf8).base64EncodedString()))"
            }
        }
        response += "}"
        return "{\"apiVersion\":\(JSON.quote(apiVersion)),\"kind\":\"AdmissionReview\",\"response\":\(response)}"
    }

    /// The JSONPatch (RFC 6902) that injects a pod, or "" when the pod is left alone.
    /// Each changed field under `metadata` and `spec` is written whole with `add`
    /// (which replaces an existing member).
    public func patch(pod original: Node) throws -> String {
        var pod = original
        guard case .injected = try injector.injectPod(&pod, workloadName: SidecarInjector.workloadName(ofPod: original)) else { return "" }
        var ops: [String] = []
        for section in ["metadata", "spec"] {
            guard let after = pod[key: section]?.mapping else { continue }
            let before = original[key: section]?.mapping
            if before == nil {
                ops.append("{\"op\":\"add\",\"path\":\"/\(section)\",\"value\":\(jsonText(.mapping(after)))}")
                continue
            }
            for (k, v) in after {
                let key = k.string ?? ""
                if let old = before?[key], jsonText(old) == jsonText(v) { continue }
                let escaped = key.replacingOccurrences(of: "~", with: "~0").replacingOccurrences(of: "/", with: "~1")
                ops.append("{\"op\":\"add\",\"path\":\"/\(section)/\(escaped)\",\"value\":\(jsonText(v))}")
            }
        }
        return "[" + ops.joined(separator: ",") + "]"
    }
}
