import CPCRE2
#if canImport(Glibc)
import Glibc
#endif

/// A regex that failed to compile, with PCRE2's message and the offset it points at.
public struct RegexError: Error, CustomStringConvertible, Sendable {
    public var pattern: String
    public var message: String
    public var offset: Int
    public var description: String { "bad regex \"\(pattern)\" at offset \(offset): \(message)" }
}

/// A match that PCRE2 gave up on (match, depth or heap limit) or that failed for
/// another reason: neither a match nor a no-match. Callers that decide access must
/// treat it as a failure, never as "no match".
public struct RegexMatchError: Error, CustomStringConvertible, Sendable {
    /// `code` of a `replacing` whose result would pass its `maxBytes`.
    public static let outputLimit: Int32 = .min
    public var pattern: String
    /// PCRE2's error code (PCRE2_ERROR_MATCHLIMIT, ..._DEPTHLIMIT, ..._HEAPLIMIT, ...).
    public var code: Int32
    public var description: String {
        switch code {
        case PCRE2_ERROR_MATCHLIMIT: return "regex \"\(pattern)\": match limit (\(CompiledRegex.matchLimit) backtracking steps) exceeded"
        case PCRE2_ERROR_DEPTHLIMIT: return "regex \"\(pattern)\": depth limit exceeded"
        case PCRE2_ERROR_HEAPLIMIT: return "regex \"\(pattern)\": heap limit exceeded"
        case Self.outputLimit: return "regex \"\(pattern)\": replacement result too large"
        default: return "regex \"\(pattern)\": match failed (PCRE2 error \(code))"
        }
    }
}

/// A PCRE2 pattern compiled once (with JIT where the platform has it) and matched
/// many times. Match data and the match context (with the match limit) are per
/// thread, so a compiled pattern is shared by every event loop without locks.
public final class CompiledRegex: @unchecked Sendable {
    public let pattern: String
    let code: OpaquePointer
    public let isJIT: Bool
    public let captureCount: Int

    /// Compiles `pattern`. `anchored` makes it match the whole subject (as Istio's
    /// `regex` match, RE2 full-match semantics).
    public init(_ pattern: String, anchored: Bool = false, caseless: Bool = false) throws {
        self.pattern = pattern
        let src = anchored ? "^(?:\(pattern))$" : pattern
        var err: Int32 = 0
        var off: Int = 0
        var opts: UInt32 = PCRE2_UTF | PCRE2_NO_UTF_CHECK
        opts &= ~PCRE2_NO_UTF_CHECK
        if caseless { opts |= PCRE2_CASELESS }
        let c = src.withCString { p in
            pcre2_compile_8(UnsafeRawPointer(p).assumingMemoryBound(to: UInt8.self), src.utf8.count, opts, &err, &off, nil)
        }
        guard let c else {
            var buf = [UInt8](repeating: 0, count: 256)
            let n = pcre2_get_error_message_8(err, &buf, 256)
            let msg = n > 0 ? String(decoding: buf[0..<Int(n)], as: UTF8.self) : "error \(err)"
            throw RegexError(pattern: pattern, message: msg, offset: anchored ? max(0, off - 4) : off)
        }
        code = c
        isJIT = pcre2_jit_compile_8(c, UInt32(PCRE2_JIT_COMPLETE)) == 0
        var cap: UInt32 = 0
        pcre2_pattern_info_8(c, UInt32(PCRE2_INFO_CAPTURECOUNT), &cap)
        captureCount = Int(cap)
    }

    deinit { pcre2_code_free_8(code) }

    /// Backtracking limit per match: a pathological pattern/subject pair fails instead
    /// of spinning the event loop.
    public static let matchLimit: UInt32 = 100_000

    /// Whether the pattern matches somewhere in `subject`.
    public func matches(_ subject: String) -> Bool {
        firstMatch(subject, from: 0) != nil
    }

    /// Byte ranges of the whole match and each capture group (nil for unset groups).
    public func firstMatch(_ subject: String, from start: Int = 0) -> [Range<Int>?]? {
        var s = subject
        return s.withUTF8 { p in firstMatch(UnsafeRawBufferPointer(p), from: start) }
    }

    /// A match that hits a limit counts as no match here; code that must not fail open
    /// (a deny rule, Lua's `moonlet.regex`) uses `search`, which throws instead.
    public func firstMatch(_ subject: UnsafeRawBufferPointer, from start: Int) -> [Range<Int>?]? {
        (try? search(subject, from: start)) ?? nil
    }

    /// Like `firstMatch`, but a match PCRE2 gave up on (the match limit, the depth limit)
    /// throws `RegexMatchError` instead of reading as "no match".
    public func search(_ subject: UnsafeRawBufferPointer, from start: Int) throws(RegexMatchError) -> [Range<Int>?]? {
        let t = PerThread.current
        let base = subject.baseAddress?.assumingMemoryBound(to: UInt8.self) ?? PerThread.empty
        let rc = pcre2_match_8(code, base, subject.count, start, 0, t.matchData, t.context)
        if rc == PCRE2_ERROR_NOMATCH { return nil }
        if rc < 0 { throw RegexMatchError(pattern: pattern, code: rc) }
        let ov = pcre2_get_ovector_pointer_8(t.matchData)!
        let pairs = rc == 0 ? Int(pcre2_get_ovector_count_8(t.matchData)) : Int(rc)
        var out: [Range<Int>?] = []
        out.reserveCapacity(captureCount + 1)
        for i in 0...captureCount {
            if i >= pairs { out.append(nil); continue }
            let a = ov[2 * i], b = ov[2 * i + 1]
            if a == ml_pcre2_unset() { out.append(nil) } else { out.append(Int(a)..<Int(b)) }
        }
        return out
    }

    /// Replaces matches with `replacement`, where `\1`..`\9` (and `$1`) name groups.
    /// A match that hits a limit leaves the subject unchanged.
    public func replace(in subject: String, with replacement: String, global: Bool = true) -> String {
        (try? replacing(in: subject, with: replacement, global: global)) ?? subject
    }

    /// Like `replace`, but a match that hits a limit, or a result longer than
    /// `maxBytes`, throws `RegexMatchError`.
    public func replacing(in subject: String, with replacement: String, global: Bool = true, maxBytes: Int = .max) throws(RegexMatchError) -> String {
        let bytes = Array(subject.utf8)
        var out: [UInt8] = []
        var pos = 0
        let repl = Array(replacement.utf8)
        let literal = !repl.contains { $0 == 92 || $0 == 36 }   // no \1 or $1: copied whole
        while pos <= bytes.count {
            var found: [Range<Int>?]?
            var failure: RegexMatchError?
            bytes.withUnsafeBytes { b in
                do throws(RegexMatchError) { found = try search(b, from: pos) } catch { failure = error }
            }
            if let failure { throw failure }
            guard let m = found, let whole = m[0] else { break }
            out.append(contentsOf: bytes[pos..<whole.lowerBound])
            var k = literal ? repl.count : 0
            if literal { out.append(contentsOf: repl) }
            while k < repl.count {
                let c = repl[k]
                if (c == 92 || c == 36) && k + 1 < repl.count, repl[k + 1] >= 48 && repl[k + 1] <= 57 {
                    let g = Int(repl[k + 1] - 48)
                    if g < m.count, let r = m[g] { out.append(contentsOf: bytes[r]) }
                    k += 2
                    continue
                }
                out.append(c); k += 1
            }
            if out.count > maxBytes { throw RegexMatchError(pattern: pattern, code: RegexMatchError.outputLimit) }
            if whole.isEmpty {
                if whole.lowerBound < bytes.count { out.append(bytes[whole.lowerBound]) }
                pos = whole.upperBound + 1
            } else {
                pos = whole.upperBound
            }
            if !global { break }
        }
        if pos < bytes.count { out.append(contentsOf: bytes[pos...]) }
        if out.count > maxBytes { throw RegexMatchError(pattern: pattern, code: RegexMatchError.outputLimit) }
        return String(decoding: out, as: UTF8.self)
    }
}

/// Per-thread match data and match context.
final class PerThread {
    let matchData: OpaquePointer
    let context: OpaquePointer
    static var empty: UnsafePointer<UInt8> = {
        let p = UnsafeMutablePointer<UInt8>.allocate(capacity: 1); p.pointee = 0; return UnsafePointer(p)
    }()

    init() {
        matchData = pcre2_match_data_create_8(64, nil)
        context = pcre2_match_context_create_8(nil)
        pcre2_set_match_limit_8(context, CompiledRegex.matchLimit)
        pcre2_set_depth_limit_8(context, 10_000)
    }

    static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in
            Unmanaged<PerThread>.fromOpaque(p!).release()
        }
        return k
    }()

    static var current: PerThread {
        if let p = pthread_getspecific(key) { return Unmanaged<PerThread>.fromOpaque(p).takeUnretainedValue() }
        let t = PerThread()
        pthread_setspecific(key, Unmanaged.passRetained(t).toOpaque())
        return t
    }
}

/// Compile-once cache keyed by pattern, for patterns that arrive at run time (Lua's
/// `moonlet.regex`). Per thread, bounded.
public enum RegexCache {
    final class Box { var map: [String: CompiledRegex] = [:] }
    static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in Unmanaged<Box>.fromOpaque(p!).release() }
        return k
    }()
    public static let maxEntries = 1024

    public static func get(_ pattern: String) throws -> CompiledRegex {
        let box: Box
        if let p = pthread_getspecific(key) { box = Unmanaged<Box>.fromOpaque(p).takeUnretainedValue() }
        else { box = Box(); pthread_setspecific(key, Unmanaged.passRetained(box).toOpaque()) }
        if let r = box.map[pattern] { return r }
        let r = try CompiledRegex(pattern)
        if box.map.count >= maxEntries { box.map.removeAll(keepingCapacity: true) }
        box.map[pattern] = r
        return r
    }
}
