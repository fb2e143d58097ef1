-- Istio's tracing: B3 / W3C trace propagation, x-request-id, and one span per sidecar
-- per request (CLIENT on the outbound listener, SERVER on the inbound one, the server
-- span a child of the client's).
--
-- Moonlet adds this filter (phase STATS) when tracing is on for the workload: a
-- Telemetry resource's `tracing` section, or the mesh config's enableTracing /
-- defaultConfig.tracing. Its pluginConfig is built at config load: `sampling`
-- (percent of new traces: Telemetry randomSamplingPercentage, else
-- defaultConfig.tracing.sampling, else 1), `collectors` ({address, format = zipkin |
-- otlp}), `report` (false with disableSpanReporting), `mode` (CLIENT_AND_SERVER, CLIENT,
-- SERVER: which side reports spans; both sides propagate), the identity tags (service
-- `<app>.<namespace>`, istio.canonical_service, istio.namespace, istio.mesh_id,
-- node_id) and `custom_tags` ({tag, kind = literal | header | environment, value,
-- default}).
--
-- Ids, clocks, headers and export are native (moonlet.trace). A caller's sampling
-- decision (x-b3-sampled, x-b3-flags, b3, traceparent flags) is kept; otherwise the
-- sampling rate decides for a new trace. An unsampled request costs the header
-- propagation only: no span is kept, and the filter has no on_log (a recorded span is
-- ended natively when the stream ends).
local f = {}
local trace = moonlet.trace
local start = trace.start

function f.configure(c)
  local conf = { mode = c.mode or "CLIENT_AND_SERVER" }
  conf.tracer = trace.tracer(c)
  -- The side that does not report still propagates: a tracer with reporting off.
  if conf.mode ~= "CLIENT_AND_SERVER" then
    local quiet = {}
    for k, v in pairs(c) do quiet[k] = v end
    quiet.report = false
    conf.quiet = trace.tracer(quiet)
    conf.reporting = conf.mode == "CLIENT" and "outbound" or "inbound"
  else
    -- One tracer for both sides: on_request is only trace.start, which the proxy then
    -- calls natively without entering Lua (builtin only; on_request is the same).
    conf.shortcuts = { on_request = trace.starter(conf.tracer) }
  end
  return conf
end

--- on_request: continues or starts the trace, writes the headers the next hop reads.
--- There is no on_log: a span trace.start recorded (sampled streams only) is ended and
--- queued for export natively when the stream ends, so an unsampled stream costs no Lua
--- call at its end.
function f.on_request(s, conf)
  local t = conf.tracer
  if conf.reporting and s.listener ~= conf.reporting then t = conf.quiet end
  start(s, t)
end

return f
