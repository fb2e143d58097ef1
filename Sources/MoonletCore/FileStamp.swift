#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A file's modification time and size from one stat(2), for the watchers that poll
/// files (configuration, certificates, Pilot's directory) to notice a change. Cheaper
/// than FileManager's attributes, which also look the owner up in the user and group
/// databases on every call (two file reads per file per poll).
public enum FileStamp {
    /// "path:mtime-seconds.nanoseconds:size", or "path:missing" when stat fails.
    public static func stamp(_ path: String) -> String {
        var st = stat()
        guard stat(path, &st) == 0 else { return "\(path):missing" }
        #if canImport(Darwin)
        let t = st.st_mtimespec
        #else
        let t = st.st_mtim
        #endif
        return "\(path):\(t.tv_sec).\(t.tv_nsec):\(st.st_size)"
    }

    /// The stamps of `paths`, joined: a fingerprint that changes when any file does.
    public static func fingerprint(_ paths: [String]) -> String {
        paths.map(stamp).joined(separator: "|")
    }
}
