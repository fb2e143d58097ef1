import MoonletCore
import MoonletTelemetry

/// What the proxy records natively about requests. Istio's request metrics of streams
/// are the istio-stats Lua filter's (plugins/istio-stats.lua, on_log); only a request
/// that never became a stream (its head did not parse, so no filter runs) is counted
/// here.
struct StreamTelemetry {
    let inbound: Bool

    init(role: ListenerRole) { inbound = role == .inbound }

    /// A request that never became a stream: counted with flag DPE and unknown peers
    /// (Istio's labels, every one "unknown" but the reporter, code, flags and protocol).
    func recordProtocolError(status: Int, responseBytes: Int, ctx: LoopContext) {
        var pairs: [(String, String)] = []
        for name in IstioLabels.http {
            switch name {
            case "reporter": pairs.append((name, inbound ? "destination" : "source"))
            case "response_code": pairs.append((name, String(status)))
            case "response_flags": pairs.append((name, "DPE"))
            case "request_protocol": pairs.append((name, "http"))
            case "grpc_response_status": pairs.append((name, ""))
            case "connection_security_policy": pairs.append((name, "unknown"))
            default: pairs.append((name, "unknown"))
            }
        }
        ctx.metrics.recordRequest(RequestLabels(pairs), durationMs: 0, requestBytes: 0, responseBytes: Int64(responseBytes))
    }
}
