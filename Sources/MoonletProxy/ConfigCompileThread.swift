#if canImport(Glibc)
import Glibc
#endif
#if canImport(Foundation)
import Foundation
#endif

/// The thread configuration is compiled on (start, file watcher, admin, SIGHUP, pilot
/// push): one thread, at a lower CPU priority than the event loops (nice +10 on Linux),
/// so a reload of a large mesh yields the cores to the traffic instead of competing with
/// it. `run` hands it a job and waits for the result; jobs run one at a time, in order.
final class ConfigCompileThread: @unchecked Sendable {
    /// The nice value the thread runs at (the event loops keep the process's).
    static let niceness: Int32 = 10
    private let cond = NSCondition()
    private var jobs: [() -> Void] = []
    private var started = false
    private var thread: Thread?

    /// Runs `body` on the compile thread and returns its result (called from any other thread).
    func run<T>(_ body: @escaping () -> T) -> T {
        if Thread.current === thread { return body() }
        let box = ResultBox<T>()
        cond.lock()
        if !started { start() }
        jobs.append { box.value = body(); box.done.signal() }
        cond.signal()
        cond.unlock()
        box.done.wait()
        return box.value!
    }

    /// Called with `cond` held.
    private func start() {
        started = true
        let t = Thread { [self] in
            #if os(Linux)
            // Linux: the nice value is per thread (PRIO_PROCESS with who 0: the caller).
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, Self.niceness)
            #endif
            while true {
                cond.lock()
                while jobs.isEmpty { cond.wait() }
                let job = jobs.removeFirst()
                cond.unlock()
                job()
            }
        }
        t.name = "moonlet.config-compile"
        t.stackSize = 8 << 20
        thread = t
        t.start()
    }
}

/// The result of a job, handed from the compile thread to the caller.
private final class ResultBox<T>: @unchecked Sendable {
    var value: T?
    let done = DispatchSemaphore(value: 0)
}
