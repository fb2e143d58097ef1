import MoonletTelemetry

// MARK: - `expect.metrics` of offline cases
//
// A key names a metric as /stats/prometheus shows it: `name` (a counter or gauge,
// summed over its label sets), `name{label="v",...}` (one series: every label given),
// `name_count` / `name_sum` of a histogram (optionally with labels), a counter of the
// older form `moonlet.metrics.counter(name, n)` (by `name` or `moonlet_lua_name`), a
// process counter by its full name, or one of the plugin's own counters
// (moonlet_lua_executions_total, _errors_total, _aborted_total).

extension FilterHarness {
    /// The value of the metric `key` at the end of a case, or why there is none (a name
    /// the filter never registered, a histogram named without _count/_sum, bad labels).
    static func metricValue(_ key: String, _ s: MetricsSnapshot, plugin: String, registry: UserMetricRegistry) -> Result<Double, MetricLookupError> {
        let p = s.plugins[plugin] ?? PluginStats()
        switch key {
        case "moonlet_lua_executions_total": return .success(Double(p.calls))
        case "moonlet_lua_errors_total": return .success(Double(p.errors))
        case "moonlet_lua_aborted_total": return .success(Double(p.aborted))
        default: break
        }
        var name = Substring(key)
        var labels: String?
        if let brace = key.firstIndex(of: "{") {
            guard key.hasSuffix("}") else { return .failure(MetricLookupError("\(key): labels must be written name{label=\"value\",...}")) }
            name = key[..<brace]
            guard let pairs = parseLabels(key[key.index(after: brace)..<key.index(before: key.endIndex)]) else {
                return .failure(MetricLookupError("\(key): labels must be written name{label=\"value\",...}"))
            }
            labels = RequestLabels(pairs).text
        }
        let n = String(name)
        if labels == nil, let v = s.counters["moonlet_lua_" + n] ?? s.counters[n] { return .success(Double(v)) }
        var family = n
        var part = ""
        if registry.kind(of: n) == nil {
            for suffix in ["_count", "_sum"] where n.hasSuffix(suffix) {
                let base = String(n.dropLast(suffix.count))
                if registry.kind(of: base) == .histogram { family = base; part = suffix }
            }
        }
        guard let kind = registry.kind(of: family) else {
            let known = registry.familyNames
            return .failure(MetricLookupError("no metric \(n): the filter never registered or counted it" + (known.isEmpty ? "" : " (its metrics: \(known.joined(separator: ", ")))")))
        }
        if kind == .histogram && part.isEmpty {
            return .failure(MetricLookupError("\(n) is a histogram: expect \(n)_count or \(n)_sum"))
        }
        var list = registry.seriesList(name: family)
        if let labels {
            list = list.filter { $0.labels == labels }
            if list.isEmpty {
                let have = registry.seriesList(name: family).map { $0.labels.isEmpty ? family : "\(family){\($0.labels)}" }
                return .failure(MetricLookupError("no series \(key) (series of \(family): \(have.joined(separator: ", ")))"))
            }
        }
        var total = 0.0
        for (_, series) in list {
            switch kind {
            case .counter: total += s.userValues[series.index] ?? 0
            case .gauge: total += series.gauge?.value ?? 0
            case .histogram:
                let h = s.userHistograms[series.index]
                total += part == "_sum" ? (h?.sum ?? 0) : Double(h?.count ?? 0)
            }
        }
        return .success(total)
    }

    /// `a="x",b="y"` (Prometheus label syntax, \" \\ \n escapes); nil when malformed.
    static func parseLabels(_ text: Substring) -> [(String, String)]? {
        var out: [(String, String)] = []
        var i = text.startIndex
        func skipSpace() { while i < text.endIndex && text[i] == " " { i = text.index(after: i) } }
        skipSpace()
        while i < text.endIndex {
            let start = i
            while i < text.endIndex, text[i].isLetter || text[i].isNumber || text[i] == "_" { i = text.index(after: i) }
            let name = String(text[start..<i])
            skipSpace()
            guard !name.isEmpty, i < text.endIndex, text[i] == "=" else { return nil }
            i = text.index(after: i); skipSpace()
            guard i < text.endIndex, text[i] == "\"" else { return nil }
            i = text.index(after: i)
            var value = ""
            var closed = false
            while i < text.endIndex {
                let c = text[i]
                i = text.index(after: i)
                if c == "\"" { closed = true; break }
                if c == "\\", i < text.endIndex {
                    let e = text[i]; i = text.index(after: i)
                    value.append(e == "n" ? "\n" : e)
                } else { value.append(c) }
            }
            guard closed else { return nil }
            out.append((name, value))
            skipSpace()
            if i < text.endIndex {
                guard text[i] == "," else { return nil }
                i = text.index(after: i); skipSpace()
            }
        }
        return out
    }

    /// "3", "0.5": a value as a case wrote it.
    static func metricText(_ v: Double) -> String {
        v == v.rounded() && abs(v) < 1e15 ? String(Int64(v)) : String(v)
    }
}

/// Why an `expect.metrics` key has no value.
struct MetricLookupError: Error {
    var message: String
    init(_ m: String) { message = m }
}
