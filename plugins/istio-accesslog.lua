-- Istio's access log: Telemetry `accessLogging` and the mesh config's accessLogFile.
--
-- Moonlet adds this filter (phase STATS) when an access log is on for the workload:
-- a Telemetry resource's accessLogging (mesh, namespace or workload scope, the most
-- specific wins) or the mesh config's accessLogFile. Its pluginConfig is built at
-- config load:
--   outputs  list of {path, text} (an Envoy format string) or {path, labels} (a list
--            of {key, format} pairs: one JSON object per line, keys in that order);
--            provider `envoy` is Istio's default (accessLogFile, else /dev/stdout,
--            with accessLogEncoding / accessLogFormat); envoyFileAccessLog extension
--            providers give their own path and format.
--   filter   nil (log every stream), false (`filter.expression: false`), or a list of
--            {attr = "code" | "method", op, value} that must all hold (the supported
--            CEL: `response.code >= 400 && request.method == "GET"`).
--   mode     CLIENT_AND_SERVER, CLIENT (outbound streams only) or SERVER (inbound only).
--
-- The decision (mode, filter) is here; formatting and the file are native
-- (moonlet.accesslog): the line is formatted with a format compiled once, buffered per
-- event loop and written by a thread of its own, so a slow disk never holds a request
-- (past the queue bound, lines are dropped and counted). With no mode or filter to
-- check, configure hands the writes to the proxy as a native on_log (accesslog.writer).
local f = {}
local accesslog = moonlet.accesslog
local write = accesslog.write

function f.configure(c)
  local conf = { outputs = {}, filter = c.filter, mode = c.mode or "CLIENT_AND_SERVER" }
  for i, o in ipairs(c.outputs or {}) do
    conf.outputs[i] = accesslog.open(o.path, o.labels or o.text)
  end
  conf.n = #conf.outputs
  if conf.mode == "CLIENT" then conf.only = "outbound" elseif conf.mode == "SERVER" then conf.only = "inbound" end
  -- Nothing to decide (every stream, no filter): on_log is only the writes, which the
  -- proxy then makes natively without entering Lua (builtin only; on_log is the same).
  if not conf.only and conf.filter == nil then conf.shortcuts = { on_log = accesslog.writer(conf.outputs) } end
  return conf
end

local function holds(v, op, want)
  if v == nil then return op == "!=" end
  if op == "==" then return v == want
  elseif op == "!=" then return v ~= want
  elseif op == ">=" then return v >= want
  elseif op == ">" then return v > want
  elseif op == "<=" then return v <= want
  elseif op == "<" then return v < want end
  return false
end

--- on_log: runs once per stream when it ends (local replies and errors included);
--- writes one line to every output when the mode and the filter expression let it.
function f.on_log(s, conf)
  if conf.only and s.listener ~= conf.only then return end
  local filter = conf.filter
  if filter == false then return end
  if filter then
    for i = 1, #filter do
      local c = filter[i]
      local v
      if c.attr == "code" then v = s.response.status or 0 else v = s.request.method end
      if not holds(v, c.op, c.value) then return end
    end
  end
  local outs = conf.outputs
  for i = 1, conf.n do write(s, outs[i]) end
end

return f
