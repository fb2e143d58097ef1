#!/usr/bin/env python3
"""bench/chart.py RESULTS.md OUT.svg: one SVG with a panel per table of a bench result.

Throughput tables (a "vs haproxy" column): bars of each peer's req/s relative to
HAProxy (1.0 = HAProxy). Open-loop tables: bars of each peer's p99 in ms. Only the
standard library is used."""
import sys, html

def tables(md):
    title, header, rows, out = None, None, [], []
    for line in md.splitlines():
        if line.startswith("## "):
            if title and header: out.append((title, header, rows))
            title, header, rows = line[3:].strip(), None, []
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None: header = cells
            else: rows.append(cells)
    if title and header: out.append((title, header, rows))
    return out

def num(s):
    try: return float(s)
    except ValueError: return None

def panel(title, header, rows):
    if "vs haproxy" in header: col, unit = header.index("vs haproxy"), "req/s vs HAProxy"
    elif "p99 ms" in header: col, unit = header.index("p99 ms"), "p99 latency, ms"
    else: return None
    bars = [(r[0], num(r[col])) for r in rows if len(r) > col and num(r[col]) is not None]
    return (title, unit, bars) if bars else None

def main():
    md = open(sys.argv[1]).read()
    panels = [p for p in (panel(*t) for t in tables(md)) if p]
    W, bar_h, gap, left = 900, 18, 4, 220
    y, parts = 40, []
    parts.append(f'<text x="10" y="24" font-size="16" font-weight="bold">{html.escape(md.splitlines()[0].lstrip("# "))}</text>')
    for title, unit, bars in panels:
        parts.append(f'<text x="10" y="{y + 14}" font-size="13" font-weight="bold">{html.escape(title)} ({unit})</text>')
        y += 24
        top = max(v for _, v in bars) or 1
        for name, v in bars:
            w = (W - left - 80) * v / top
            color = "#d9822b" if name.startswith("moonlet") or name.startswith("2x moonlet") else "#5b7fa6"
            parts.append(f'<text x="{left - 6}" y="{y + 13}" font-size="12" text-anchor="end">{html.escape(name)}</text>')
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
            parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 13}" font-size="12">{v:g}</text>')
            y += bar_h + gap
        if unit.startswith("req/s"):
            x1 = left + (W - left - 80) / top
            parts.append(f'<line x1="{x1:.1f}" y1="{y - len(bars) * (bar_h + gap)}" x2="{x1:.1f}" y2="{y}" stroke="#333" stroke-dasharray="4 3"/>')
        y += 16
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{y + 10}" font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n"
    open(sys.argv[2], "w").write(svg)

main()
