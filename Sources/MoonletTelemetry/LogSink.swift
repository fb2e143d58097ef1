import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
#if canImport(Foundation)
import Foundation
#endif

/// An access log file written off the event loops: loops hand it whole batches of lines
/// (see `LogBuffer`), a thread of its own writes them. The queue is bounded, so a slow or
/// stuck disk never stalls a request: past `maxQueuedBytes` a batch is dropped and its
/// lines are counted in `droppedLines`. `reopen()` (SIGUSR1, after logrotate moved the
/// file) makes the writer open the path again before its next write.
public final class LogSink: @unchecked Sendable {
    public let path: String
    public let maxQueuedBytes: Int
    let cond = ConditionLock(value: 0)   // 0: nothing to do, 1: work or stop
    var queue: [[UInt8]] = []
    var queuedBytes = 0
    /// Written batches' buffers, emptied, for the loops' next batches: a loop's line
    /// buffer is allocated once, not once per batch (a fresh 128 KB one is mapped and
    /// faulted in page by page, then unmapped again by the writer). At most `maxSpares`.
    var spares: [[UInt8]] = []
    static let maxSpares = 8
    var dropped: UInt64 = 0
    var written: UInt64 = 0
    var reopenRequested = false
    var stopping = false
    var fd: Int32 = -1
    /// The last open or write error (for the log and /stats), nil when writing works.
    public private(set) var lastError: String?
    var thread: Thread?

    /// Opens `path` (created with mode 0644, appended to; "/dev/stdout" and
    /// "/dev/stderr" write to the process's own streams) and starts the writer.
    /// Throws when the file cannot be opened, naming it.
    public init(path: String, maxQueuedBytes: Int = 8 << 20) throws {
        self.path = path
        self.maxQueuedBytes = max(64 << 10, maxQueuedBytes)
        fd = try Self.open(path)
        // The writer holds the sink until `close()` stops it (a sink dropped without
        // closing keeps writing what it was given rather than reading freed memory).
        let t = Thread { self.run() }
        t.name = "moonlet-log-writer"
        t.qualityOfService = .utility
        thread = t
        t.start()
    }

    static func open(_ path: String) throws -> Int32 {
        switch path {
        case "/dev/stdout": return dup(1)
        case "/dev/stderr": return dup(2)
        default:
            let fd = Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw LogSinkError(message: "access log \(path): cannot open: \(String(cString: strerror(errno)))") }
            return fd
        }
    }

    /// Queues one batch of whole lines; false (and the lines counted as dropped) when the
    /// queue is full. Called from event loops: it holds the lock only for an append.
    @discardableResult
    public func submit(_ bytes: [UInt8], lines: Int) -> Bool {
        var spare: [UInt8]? = nil
        return submit(bytes, lines: lines, spare: &spare)
    }

    /// The same, taking an emptied buffer of a written batch into `spare` (if there is
    /// one) under the same lock: the loop's next batch is written into it.
    @discardableResult
    public func submit(_ bytes: [UInt8], lines: Int, spare: inout [UInt8]?) -> Bool {
        cond.lock()
        spare = spares.popLast()
        guard !stopping, queuedBytes + bytes.count <= maxQueuedBytes else {
            dropped &+= UInt64(lines)
            cond.unlock()
            return false
        }
        queue.append(bytes)
        queuedBytes += bytes.count
        written &+= UInt64(lines)
        cond.unlock(withValue: 1)
        return true
    }

    /// Lines dropped because the queue was full (or the sink closed).
    public var droppedLines: UInt64 { cond.lock(); defer { cond.unlock() }; return dropped }
    /// Lines accepted for writing.
    public var acceptedLines: UInt64 { cond.lock(); defer { cond.unlock() }; return written }

    /// Asks the writer to open the path again (log rotation).
    public func reopen() {
        cond.lock()
        reopenRequested = true
        cond.unlock(withValue: 1)
    }

    /// Writes what is queued, then stops the writer and closes the file. Waits at most
    /// `timeoutSeconds` for it: a writer stuck in write(2) (a full pipe nobody reads, a
    /// hung network disk) is left behind rather than holding the caller (a proxy stopping).
    public func close(timeoutSeconds: Double = 2) {
        cond.lock()
        stopping = true
        cond.unlock(withValue: 1)
        var waited = 0.0
        while thread != nil && !(thread?.isFinished ?? true) && waited < timeoutSeconds { usleep(1000); waited += 0.001 }
    }

    func run() {
        while true {
            cond.lock(whenValue: 1)
            var batch = queue
            queue.removeAll(keepingCapacity: true)
            queuedBytes = 0
            let reopenNow = reopenRequested
            reopenRequested = false
            let stop = stopping
            cond.unlock(withValue: 0)
            if reopenNow {
                do {
                    let nfd = try Self.open(path)
                    if fd >= 0 { Glibc.close(fd) }
                    fd = nfd
                    lastError = nil
                } catch { lastError = "\(error)" }
            }
            for chunk in batch { write(chunk) }
            // The buffers go back emptied (each uniquely held once popped: its storage kept).
            var emptied: [[UInt8]] = []
            while emptied.count < Self.maxSpares, var chunk = batch.popLast() {
                chunk.removeAll(keepingCapacity: true)
                emptied.append(chunk)
            }
            if !emptied.isEmpty {
                cond.lock()
                while spares.count < Self.maxSpares, let c = emptied.popLast() { spares.append(c) }
                cond.unlock()
            }
            if stop {
                if fd >= 0 { Glibc.close(fd); fd = -1 }
                return
            }
        }
    }

    func write(_ chunk: [UInt8]) {
        guard fd >= 0 else { return }
        chunk.withUnsafeBytes { raw in
            var off = 0
            while off < raw.count {
                let n = Glibc.write(fd, raw.baseAddress!.advanced(by: off), raw.count - off)
                if n < 0 {
                    if errno == EINTR { continue }
                    lastError = "access log \(path): write failed: \(String(cString: strerror(errno)))"
                    return
                }
                off += n
            }
        }
    }
}

public struct LogSinkError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var description: String { message }
}

/// One event loop's pending access log lines: appended per request on the loop (no lock),
/// handed to the sink as one batch when 128 KB have gathered (at most a quarter of the
/// sink's queue) or `flush()` is called (the owner calls it from a timer, e.g. every
/// 100 ms, and at shutdown). Large batches mean few wake-ups of the writer and few
/// write(2) calls; the buffers are reused (`LogSink.spares`).
public final class LogBuffer {
    public let sink: LogSink
    var bytes: [UInt8] = []
    var lines = 0
    public let flushBytes: Int
    public init(sink: LogSink, flushBytes: Int = 128 << 10) {
        self.sink = sink
        self.flushBytes = min(flushBytes, sink.maxQueuedBytes / 4)
        bytes.reserveCapacity(self.flushBytes + 1024)
    }

    /// Appends one line (a newline is added).
    @inline(__always)
    public func append(_ line: String) {
        bytes.append(contentsOf: line.utf8)
        bytes.append(10)
        lines += 1
        if bytes.count >= flushBytes { flush() }
    }

    /// Appends one formatted line, adding the newline only when it does not end with one
    /// (Istio's formats end with "\n"; a custom one may not, and Istio adds it).
    @inline(__always)
    public func appendLine(_ line: String) {
        var l = line
        l.withUTF8 { bytes.append(contentsOf: $0) }
        if bytes.last != 10 { bytes.append(10) }
        lines += 1
        if bytes.count >= flushBytes { flush() }
    }

    /// Appends one line that `write` puts straight into the buffer (a newline is added
    /// when it does not end with one). The per-request path: no String per line.
    @inline(__always)
    public func appendLine(_ write: (inout [UInt8]) -> Void) {
        write(&bytes)
        if bytes.last != 10 { bytes.append(10) }
        lines += 1
        if bytes.count >= flushBytes { flush() }
    }

    /// Hands the pending lines to the sink.
    public func flush() {
        guard lines > 0 else { return }
        // The array itself goes to the writer (no copy); the loop goes on in the emptied
        // buffer of a batch written earlier, or a new one.
        let batch = bytes
        bytes = []
        var spare: [UInt8]? = nil
        sink.submit(batch, lines: lines, spare: &spare)
        bytes = spare ?? []
        bytes.reserveCapacity(flushBytes + 1024)
        lines = 0
    }
}
