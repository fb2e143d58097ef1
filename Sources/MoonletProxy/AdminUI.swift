/// The admin page (`GET /ui` on the admin port): one static HTML document with its CSS
/// and JS inline (no external assets, nothing fetched but this admin API). Its script
/// reads /plugins, /experiments, /clusters?format=json and /config_dump every few
/// seconds and renders plugins, experiments (arms, live rates, latencies, verdicts and
/// an SVG chart of each arm's error rate over time), clusters and routes. Every value
/// from the API is inserted as text (never as HTML): plugin names, errors and config
/// come from users.
enum AdminUI {
    static let refreshSeconds = 3

    static let html = """
    <!doctype html>
    <html lang="en">
    <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>Moonlet admin</title>
    <style>
    body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f5f6f8; }
    header { background: #1d2330; color: #fff; padding: 10px 20px; display: flex; gap: 16px; align-items: baseline; }
    header h1 { font-size: 18px; margin: 0; }
    header .status { font-size: 12px; opacity: .8; }
    main { padding: 12px 20px; display: grid; gap: 16px; }
    section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 10px 14px; }
    h2 { font-size: 15px; margin: 4px 0 8px; }
    table { border-collapse: collapse; width: 100%; }
    th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eef0f4; font-variant-numeric: tabular-nums; }
    th { font-weight: 600; font-size: 12px; color: #5a6374; }
    .verdict-better { color: #137333; font-weight: 600; }
    .verdict-worse { color: #b3261e; font-weight: 600; }
    .verdict-inconclusive { color: #6b7280; }
    .err { color: #b3261e; }
    .muted { color: #6b7280; }
    .experiment { margin-bottom: 14px; }
    svg.chart { background: #fafbfc; border: 1px solid #eef0f4; }
    .legend span { margin-right: 12px; font-size: 12px; }
    </style>
    </head>
    <body>
    <header><h1>Moonlet</h1><span class="status" id="status">loading…</span></header>
    <main>
    <section><h2>Experiments</h2><div id="experiments" class="muted">none</div></section>
    <section><h2>Plugins</h2><div id="plugins" class="muted">none</div></section>
    <section><h2>Clusters</h2><div id="clusters" class="muted">none</div></section>
    <section><h2>Routes</h2><div id="routes" class="muted">none</div></section>
    </main>
    <script>
    "use strict";
    const REFRESH_MS = \(refreshSeconds * 1000);
    const COLORS = ["#1a73e8", "#e8710a", "#188038", "#a142f4", "#d01884", "#12b5cb"];
    const history = {};   // plugin -> arm -> [error rate]
    function el(tag, attrs, ...kids) {
      const e = document.createElement(tag);
      for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
      for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
      return e;
    }
    function table(headers, rows) {
      const t = el("table", {}, el("tr", {}, ...headers.map(h => el("th", {}, h))));
      for (const r of rows) t.append(el("tr", r.attrs || {}, ...r.cells.map(c => c instanceof Node ? el("td", {}, c) : el("td", {}, c))));
      return t;
    }
    function pct(x) { return (100 * (x || 0)).toFixed(2) + "%"; }
    function ms(x) { return (x || 0).toFixed(2) + " ms"; }
    function fill(id, node) { const d = document.getElementById(id); d.replaceChildren(node); d.classList.remove("muted"); }
    async function getJSON(path) { const r = await fetch(path, { cache: "no-store" }); if (!r.ok) throw new Error(path + ": " + r.status); return r.json(); }
    function verdict(v) { return el("span", { class: "verdict-" + v, "data-verdict": v }, v); }
    function chart(plugin, arms) {
      const W = 360, H = 90, NS = "http://www.w3.org/2000/svg";
      const svg = document.createElementNS(NS, "svg");
      svg.setAttribute("class", "chart"); svg.setAttribute("width", W); svg.setAttribute("height", H);
      svg.setAttribute("data-chart", plugin);
      const series = arms.map(a => (history[plugin] || {})[a.name] || []);
      const max = Math.max(0.01, ...series.flat());
      series.forEach((s, i) => {
        if (s.length < 1) return;
        const pts = s.map((y, k) => ((s.length === 1 ? W / 2 : k * (W - 10) / (s.length - 1)) + 5).toFixed(1) + "," + (H - 5 - y / max * (H - 10)).toFixed(1));
        const line = document.createElementNS(NS, s.length === 1 ? "circle" : "polyline");
        if (s.length === 1) { const [x, y] = pts[0].split(","); line.setAttribute("cx", x); line.setAttribute("cy", y); line.setAttribute("r", 3); line.setAttribute("fill", COLORS[i % COLORS.length]); }
        else { line.setAttribute("points", pts.join(" ")); line.setAttribute("fill", "none"); line.setAttribute("stroke", COLORS[i % COLORS.length]); line.setAttribute("stroke-width", 2); }
        svg.append(line);
      });
      const legend = el("div", { class: "legend" }, ...arms.map((a, i) => el("span", { style: "color:" + COLORS[i % COLORS.length] }, "■ " + a.name + " error rate (max " + pct(max) + ")")));
      return el("div", {}, svg, legend);
    }
    function renderExperiments(data) {
      const list = data.experiments || [];
      if (!list.length) { document.getElementById("experiments").textContent = "no experiments (LuaPlugin spec.variants or spec.shadow)"; return; }
      const box = el("div", {});
      for (const e of list) {
        const h = history[e.plugin] = history[e.plugin] || {};
        for (const a of e.variants) { (h[a.name] = h[a.name] || []).push(a.error_rate || 0); if (h[a.name].length > 60) h[a.name].shift(); }
        const rows = e.variants.map(a => ({ attrs: { "data-arm": a.name }, cells: [
          a.name, a.role, String(a.weight) + (a.weight !== a.configured_weight ? " (configured " + a.configured_weight + ")" : ""),
          String(a.requests), pct(a.error_rate), String(a.local_replies), String(a.lua_errors),
          ms(a.latency_ms.p50), ms(a.latency_ms.p99),
          a.verdicts ? verdict(a.verdicts.error_rate) : "—", a.verdicts ? verdict(a.verdicts.latency) : "—",
          a.rolled_back ? el("span", { class: "err" }, "rolled back: " + a.rolled_back) : "" ] }));
        const part = el("div", { class: "experiment", "data-plugin": e.plugin },
          el("h3", {}, e.plugin + " ", el("span", { class: "muted" }, "sticky by " + e.sticky_by)),
          table(["variant", "role", "weight", "requests", "error rate", "local replies", "Lua errors", "p50", "p99", "error-rate verdict", "latency verdict", ""], rows));
        if (e.shadow) {
          const d = e.shadow.divergences;
          part.append(el("p", { "data-shadow": e.plugin }, "shadow: " + e.shadow.runs + " runs, " + e.shadow.compared + " compared, divergences: respond " + d.respond + ", request header " + d.request_header + ", route " + d.route));
        }
        if (e.guardrail) part.append(el("p", { class: "muted" }, "guardrail: " + e.guardrail.metric + " +" + e.guardrail.maxIncrease + " after " + e.guardrail.minRequests + " requests → " + e.guardrail.action + (e.guardrail.tripped ? " (tripped)" : "")));
        part.append(chart(e.plugin, e.variants));
        box.append(part);
      }
      fill("experiments", box);
    }
    function renderPlugins(data) {
      const rows = (data.plugins || []).map(p => ({ attrs: { "data-plugin-row": p.name }, cells: [
        p.name, p.version, p.loaded_at, String(p.executions), String(p.errors), (p.seconds || 0).toFixed(4) + " s",
        p.last_error ? el("span", { class: "err" }, p.last_error) : "" ] }));
      fill("plugins", table(["plugin", "version", "loaded", "executions", "errors", "Lua CPU", "last error"], rows));
      if (data.last_reload_error) document.getElementById("plugins").prepend(el("p", { class: "err" }, "last reload failed: " + data.last_reload_error));
    }
    function renderClusters(data) {
      const rows = (data.clusters || []).map(c => ({ cells: [c.name, c.lb_policy, String(c.endpoints.length),
        c.endpoints.map(e => e.address + (e.ejected ? " (ejected)" : "")).join(", "), String(c.cx_active), String(c.overflow)] }));
      fill("clusters", rows.length ? table(["cluster", "lb", "endpoints", "addresses", "connections", "overflows"], rows) : document.createTextNode("no clusters"));
    }
    function renderRoutes(dump) {
      const rows = [];
      for (const r of dump.istio || []) {
        if (r.kind !== "VirtualService") continue;
        const hosts = (r.spec.hosts || []).join(", ");
        (r.spec.http || []).forEach((h, i) => {
          const dest = (h.route || []).map(d => (d.destination || {}).host + ((d.destination || {}).subset ? "/" + d.destination.subset : "") + (d.weight != null ? " " + d.weight + "%" : "")).join(", ");
          rows.push({ cells: [r.namespace + "/" + r.name, hosts, h.name || "#" + i, JSON.stringify(h.match || []), dest] });
        });
      }
      fill("routes", rows.length ? table(["VirtualService", "hosts", "route", "match", "destinations"], rows) : document.createTextNode("no routes"));
    }
    async function refresh() {
      const parts = [["/experiments", renderExperiments], ["/plugins", renderPlugins], ["/clusters?format=json", renderClusters], ["/config_dump", renderRoutes]];
      const errors = [];
      await Promise.all(parts.map(async ([path, render]) => { try { render(await getJSON(path)); } catch (e) { errors.push(String(e)); } }));
      document.getElementById("status").textContent = (errors.length ? "errors: " + errors.join("; ") + " · " : "") + "updated " + new Date().toLocaleTimeString() + " · every " + (REFRESH_MS / 1000) + " s";
      document.body.setAttribute("data-rendered", "1");
    }
    refresh();
    setInterval(refresh, REFRESH_MS);
    </script>
    </body>
    </html>
    """
}
