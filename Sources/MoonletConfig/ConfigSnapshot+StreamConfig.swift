import MoonletCore

/// A stream keeps the snapshot it started with as its `config` (MoonletCore's
/// StreamConfig); `LuaAPI.snapshot(of:)` turns it back into a ConfigSnapshot.
extension ConfigSnapshot: StreamConfig {}
