// MARK: - Reading `moonlet.metrics` series by name (the offline filter harness)

extension UserMetricRegistry {
    /// The kind of the family `name`, nil when no series of that name was made.
    public func kind(of name: String) -> Kind? {
        lock.withLock { families[name]?.kind }
    }

    /// Every series of the family `name`: its labels (rendered, RequestLabels form:
    /// sorted by name) and its handle (index into a snapshot's `userValues` /
    /// `userHistograms`, a gauge's cell).
    public func seriesList(name: String) -> [(labels: String, series: Series)] {
        lock.withLock { entries.filter { $0.name == name }.map { ($0.labels, $0.series) } }
    }

    /// Names of every family, sorted.
    public var familyNames: [String] {
        lock.withLock { families.keys.sorted() }
    }
}
