/// `exportTo` of VirtualService, DestinationRule and ServiceEntry: which namespaces'
/// sidecars see a resource, as Istio applies it when it builds a proxy's configuration.
public enum ExportTo {
    /// Whether a resource of `namespace` with `exportTo` is seen by a sidecar of `local`:
    /// empty (the mesh default, every namespace) or `*`: everywhere; `.`: its own
    /// namespace; a name: that namespace; `~`: nowhere.
    public static func visible(_ exportTo: [String], from namespace: String, to local: String) -> Bool {
        if exportTo.isEmpty { return true }
        for e in exportTo {
            switch e {
            case "*": return true
            case ".": if namespace == local { return true }
            case "~": return false
            default: if e == local { return true }
            }
        }
        return false
    }
}
