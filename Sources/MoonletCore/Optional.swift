extension Optional {
    /// The value, or `e` thrown when there is none.
    public func orThrow(_ e: @autoclosure () -> Error) throws -> Wrapped {
        guard let v = self else { throw e() }
        return v
    }
}
