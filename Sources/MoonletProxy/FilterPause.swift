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
    /// The upstream's response ended with a connection that can be reused (response pause).
    var reusable = false
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
        if s.filterPause.inResponse { responseFiltersResumed(s, action); return }
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

// MARK: Paused response head (moonlet.http.call in on_response)
//
// A response filter may pause on an upstream's response head. Nothing is sent to the
// client meanwhile; the upstream's reading stops (autoRead off) and what it had already
// read of the body is held (bounded by maxBufferedBodyBytes: 502 beyond). When the
// filter's phase ends, the remaining response filters run, the head goes out (or the
// local reply a filter made), and the held body and end follow.

extension DownstreamHandler {
    /// A response filter paused on the upstream's head (its pause point is on the stream).
    func pauseResponseFilters(_ s: ProxyStream) {
        s.resumer = self
        responsePauseState = FilterPauseState()
        // HTTP/1.1: autoRead off; an HTTP/2 stream: no more window given back.
        upstream?.setReading(false)
        ctx.metrics.count("moonlet_filter_paused_total")
    }

    /// An upstream body chunk that arrived while the response filters wait.
    func holdResponseWhilePaused(_ chunk: ByteBuffer) {
        guard let p = responsePauseState, let s = stream else { return }
        if p.heldBytes + chunk.readableBytes > limits.maxBufferedBodyBytes {
            responsePauseState = nil
            if let u = upstream { u.abandon(); upstream = nil }
            s.respond(502, body: "upstream response body larger than \(limits.maxBufferedBodyBytes) bytes while a filter waited\n", headers: [("content-type", "text/plain")])
            sendLocalReply()
            return
        }
        p.held.append(chunk)
        p.heldBytes += chunk.readableBytes
    }

    /// The paused response filter's phase ended with `action`: the rest of the response
    /// head phase, then the head (or a local reply), the held body and its end.
    func responseFiltersResumed(_ s: ProxyStream, _ action: FilterAction) {
        switch exec.resumeResponseHead(s, after: action) {
        case .paused:
            return                                  // a later filter paused in turn
        case .localReply:
            s.resumer = nil
            responsePauseState = nil
            if let u = upstream { u.abandon(); upstream = nil }
            sendLocalReply()
            return
        case .send:
            s.resumer = nil
            let head = s.response.take()!
            sendHead(head)
            s.response = consume head
        case .buffer:
            // A filter asked for the whole body: the held chunks and the rest are
            // buffered (upstreamResponseBody), nothing is sent until the end.
            s.resumer = nil
            responseState = .buffering
        }
        guard let held = responsePauseState else { return }
        responsePauseState = nil
        if let u = upstream {
            u.setReading(!upstreamPaused)
            if !upstreamPaused && u.multiplexed { u.channel?.read() }
        }
        for c in held.held {
            guard stream === s, !closed else { return }
            upstreamResponseBody(c)
        }
        if held.ended, stream === s, !closed { upstreamResponseEnd(reusable: held.reusable) }
    }
}
