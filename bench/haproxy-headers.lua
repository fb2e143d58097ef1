-- The same work as bench/lua/header-filter.lua: one request header, one response header.
core.register_action("moonlet_req", { "http-req" }, function(txn)
  txn.http:req_set_header("x-seen-by", "haproxy")
end)
core.register_action("moonlet_res", { "http-res" }, function(txn)
  txn.http:res_set_header("x-variant", "a")
end)
