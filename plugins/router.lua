-- Istio traffic management for the outbound listener: VirtualService routes
-- (matches, weights, redirect, directResponse, rewrite, headers, timeout, fault)
-- over DestinationRule subsets and ServiceEntry/WorkloadEntry endpoints.
--
-- The matching itself is native (moonlet.router.route: routes indexed by host,
-- regexes compiled once, weights pre-summed); this filter is where a user can
-- wrap it: run code before or after routing, or replace routing for some hosts.
-- Moonlet adds it to the chain when the configuration has Istio traffic
-- resources (phase unset, lowest priority: user filters run before routing).
local router = {}
local route = moonlet.router.route   -- looked up once, not per request

function router.on_request(s, conf)
  -- A filter that ran before set the cluster (s.route.cluster): its route stands.
  if s.route.cluster ~= "" then return end
  -- Writes s.route (cluster, subset, endpoint, timeout) and applies the route's
  -- request edits, or answers locally: 404 NR, 503 UH, redirect, direct
  -- response, fault abort (FI). Returns "respond" when it answered.
  return route(s)
end

return router
