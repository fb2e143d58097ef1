import MoonletCore

extension ProxyServer {
    /// Called before `start()` when configuration comes from pilot: /healthz/ready answers
    /// 503 until the first pushed version is applied (as Istio's sidecar is not ready before
    /// its first configuration), so Kubernetes sends no traffic to a sidecar that knows no
    /// routes yet. The listeners serve meanwhile, with the `--config` files if any.
    public func expectPushedConfig() { awaitingFirstPush = true }

    /// Applies a configuration pushed by pilot (`moonlet run --pilot`), written in
    /// `directory`: it replaces the previously pushed one beside the `--config` paths, and
    /// the whole set goes through the same load-and-swap as a file change. On failure the
    /// last good snapshot keeps serving, and the previous pushed directory stays the one a
    /// later reload (SIGHUP, a `--config` change) reads.
    ///
    /// This is the one adapter between the pilot client and the reload path: when
    /// MoonletConfig's incremental "apply a new set of resources" lands, rewire it here.
    public func applyPushedConfig(directory: String, reason: String) -> Result<Int, ReloadError> {
        let previous = lock.withLock { () -> [String] in
            let p = pushedConfigPaths
            pushedConfigPaths = [directory]
            return p
        }
        let result = reload(reason: reason)
        switch result {
        case .success: awaitingFirstPush = false
        case .failure: lock.withLock { if pushedConfigPaths == [directory] { pushedConfigPaths = previous } }
        }
        return result
    }
}
