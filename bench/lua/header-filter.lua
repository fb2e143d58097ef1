-- Bench filter: one request header and one response header (the same work the
-- HAProxy and nginx peers do in Lua).
local f = {}
function f.on_request(s, conf) s.request.headers:set("x-seen-by", "moonlet") end
function f.on_response(s, conf) s.response.headers:set("x-variant", "a") end
return f
