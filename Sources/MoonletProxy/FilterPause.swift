import NIOCore
import MoonletCore

// MARK: - Paused streams
//
// A request filter may pause the stream (FilterAction.pause: a Lua phase waiting in
// moonlet.http.call). The chain stops at that filter and nothing goes upstream; the
// request body that arrives meanwhile is held here (reading paused, bounded by
// maxBufferedBodyBytes: 413 beyond). When the filter's phase ends it calls
// `ProxyStream.resumeFilters`, which lands in `filtersResumed`: the chain goes on after
// the paused filter, then the stream goes on as if the phase had ended at once, and the
// held body is fed to it. If the stream ends first (client gone, request timeout) the
// pause state goes with it (finishStream) and the filter's host cancels its work
// (MoonletLua: LuaVM.endStream). A stream that never pauses pays one nil check per
// request body chunk.

/// The request body held while a filter has the stream paused.
final class FilterPauseState {
    var held: [ByteBuffer] = []
    var heldBytes = 0
    var ended = false
}

extension DownstreamHandler: FilterResumer {
    /// A filter paused the stream (its pause point is on the stream).
    func pauseFilters(_ s: ProxyStream) {
        s.resumer = self
        if filterPauseState == nil { filterPauseState = FilterPauseState() }
        if requestState.isArriving { setReading(false) }
        ctx.metrics.count("moonlet_filter_paused_total")
    }

    /// A body chunk arrived while paused: held (counted when it is replayed).
    func holdWhilePaused(_ chunk: ByteBuffer) {
        guard let p = filterPauseState else { return }
        if p.heldBytes + chunk.readableBytes > limits.maxBufferedBodyBytes {
            // The filter is still waiting: its work is given up when the stream ends.
            filterPauseState = nil
            localReplyAndClose(413, "request body larger than \(limits.maxBufferedBodyBytes) bytes")
            return
        }
        p.held.append(chunk)
        p.heldBytes += chunk.readableBytes
    }

    /// The request body ended while paused.
    func holdEndWhilePaused() {
        filterPauseState?.ended = true
    }

    /// The paused filter's phase ended with `action` (FilterResumer): the chain goes on.
    func filtersResumed(_ s: ProxyStream, _ action: FilterAction) {
        guard stream === s, !closed else { return }
        let inBody = s.filterPause.inBody
        let next = exec.resumeRequest(s, after: action)
        if next == .pause { return }                 // a later filter paused in turn
        s.resumer = nil
        let held = filterPauseState
        filterPauseState = nil
        if inBody {
            // The buffered body's phase (the request is complete): reply or go upstream.
            if next == .respond { sendLocalReply() } else { requestFiltersDone(s, .continue) }
            return
        }
        requestFiltersDone(s, next)
        guard let held, stream === s, !closed else { return }
        if requestState.isArriving { setReading(true) }
        for c in held.held {
            guard stream === s, !closed else { return }
            requestBodyChunk(c)
        }
        if held.ended, stream === s, !closed { requestBodyEnd() }
    }
}
