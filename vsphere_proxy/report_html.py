"""A `Timeline` as one self-contained HTML file: inline CSS, SVG and JS, no network fetch, so that it opens
offline or as a ticket attachment.

The page: the summary (makespan, lower bound for simulations, bytes, dedup, stranded and failed VMs with their
reasons, fall-backs, VMs stranded then recovered), a legend, the timeline (one lane per proxy with as many rows as
its peak of concurrent streams, one bar per stream coloured by access mode, outlined by round, faded when it
failed), the datastore strip (active streams over time against the threshold and the cap), and the decisions
behind a bar: a tooltip on hover, the VM's whole decision log on click.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

from vsphere_proxy.timeline import MODES, Timeline, datastore_load, slots
from vsphere_proxy.units import human_size

COLOURS = {"san": "#1f77b4", "direct-nfs": "#17becf", "hotadd": "#2ca02c", "nbd": "#ff7f0e"}
LABEL_W, PLOT_W, ROW_H, LANE_MAX_H, LANE_GAP, DS_H = 170, 1400, 10, 240, 6, 44

CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 8px} h2{font-size:15px;margin:16px 0 6px}
table.summary td{padding:1px 10px 1px 0;vertical-align:top} .bad{color:#b00}
.legend span{display:inline-block;margin-right:14px} .sw{width:14px;height:10px;display:inline-block;
vertical-align:middle;margin-right:4px;border:1px solid #0003}
svg{display:block} .lane-bg{fill:#f4f4f4} .lane-label{font-size:12px} .axis{font-size:11px;fill:#555}
rect.bar{cursor:pointer;stroke:#fff;stroke-width:.6} rect.bar:hover{stroke:#000;stroke-width:1.5}
rect.bar.r2{stroke:#000;stroke-width:1} rect.bar.r3,rect.bar.r4,rect.bar.r5{stroke:#000;stroke-width:1;
stroke-dasharray:2 1} rect.bar.failed{fill-opacity:.35;stroke:#d62728;stroke-width:1.5}
rect.bar.aborted{fill-opacity:.25}
.ds-line{fill:none;stroke:#444;stroke-width:1} .thr{stroke:#e6a700;stroke-dasharray:4 2}
.cap{stroke:#d62728;stroke-dasharray:2 2}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:4px 6px;display:none;
max-width:520px;box-shadow:0 1px 4px #0003;font-size:12px}
#panel{border-top:1px solid #ccc;margin-top:10px;padding-top:6px} #panel li{margin:2px 0}
"""

JS = """
const D=JSON.parse(document.getElementById('data').textContent);
const tip=document.getElementById('tip'),panel=document.getElementById('panel');
function hms(s){s=Math.round(s);return Math.floor(s/3600)+':'+String(Math.floor(s/60)%60).padStart(2,'0')+':'
+String(s%60).padStart(2,'0')}
function esc(t){return String(t).replace(/[&<>]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]))}
function barText(i){const b=D.bars[i];return '<b>'+esc(b[0])+'</b> disk '+b[1]+' on '+esc(b[2])+' ('+b[3]+
', '+esc(b[4])+')<br>round '+b[5]+', attempt '+b[6]+': '+b[9]+', '+hms(b[7])+' - '+hms(b[8])}
function assignReason(vm,attempt){const ns=(D.byvm[vm]||[]).map(k=>D.notes[k]).filter(n=>n[1]=='assign');
const n=ns[attempt-1]||ns[ns.length-1];return n?esc(n[4]):''}
document.querySelectorAll('rect.bar').forEach(r=>{const i=+r.dataset.i;
r.addEventListener('mousemove',e=>{tip.innerHTML=barText(i)+'<br>'+assignReason(D.bars[i][0],D.bars[i][6]);
tip.style.display='block';tip.style.left=(e.clientX+12)+'px';tip.style.top=(e.clientY+12)+'px'});
r.addEventListener('mouseleave',()=>{tip.style.display='none'});
r.addEventListener('click',()=>{const vm=D.bars[i][0];const ns=(D.byvm[vm]||[]).map(k=>D.notes[k]);
panel.innerHTML='<h2>Decisions about '+esc(vm)+'</h2><p>'+barText(i)+'</p><ol>'+ns.map(n=>'<li>round '+n[0]+
' <b>'+esc(n[1])+'</b>'+(n[3]?' on '+esc(n[3]):'')+': '+esc(n[4])+'</li>').join('')+'</ol>'})});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _tick_step(span: float) -> float:
    raw = span / 10 if span > 0 else 1.0
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
                 86400):
        if step >= raw:
            return float(step)
    return 86400.0 * math.ceil(raw / 86400)


def _summary(t: Timeline) -> str:
    s = t.summary
    rows: list[tuple[str, str]] = []
    for key, label in (("status", "status"), ("makespan_s", "makespan"), ("lower_bound_s", "lower bound"),
                       ("ratio_to_lower_bound", "makespan / lower bound"), ("vms", "VMs"), ("done", "backed up"),
                       ("rounds", "rounds"), ("bytes_read", "read"), ("bytes_written", "stored"),
                       ("dedup_ratio", "dedup (read / stored)"), ("threshold_raises", "threshold raises")):
        if s.get(key) is None:
            continue
        value = s[key]
        if key in ("makespan_s", "lower_bound_s"):
            value = f"{_hms(value)} ({value:,.1f} s)"
        elif key.startswith("bytes"):
            value = human_size(int(value))
        rows.append((label, str(value)))
    if s.get("baselines"):
        rows.append(("baselines", ", ".join(f"{k} {_hms(v)}" for k, v in s["baselines"].items())))
    rows.append(("streams", f"{len(t.bars)} in {len(t.lanes)} lanes; threshold {t.threshold}, cap {t.datastore_cap}"))
    out = ['<table class="summary" id="summary">']
    out += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows]
    out.append("</table>")
    for key, title in (("failed", "Failed / not backed up"), ("stranded", "Stranded at least once"),
                       ("fell_back", "Fell back to a lower tier")):
        items = s.get(key) or {}
        if items:
            cls = ' class="bad"' if key == "failed" else ""
            out.append(f'<h2>{title} ({len(items)})</h2><ul id="{key}"{cls}>')
            out += [f"<li><b>{_e(vm)}</b>: {_e(why)}</li>" for vm, why in list(items.items())[:500]]
            if len(items) > 500:
                out.append(f"<li>... and {len(items) - 500} more</li>")
            out.append("</ul>")
    if t.recovered:
        out.append(f'<h2>Stranded, then backed up in a later round ({len(t.recovered)})</h2>'
                   f'<p id="recovered">{_e(", ".join(t.recovered[:500]))}</p>')
    return "\n".join(out)


def _legend() -> str:
    modes = "".join(f'<span><i class="sw" style="background:{COLOURS[m]}"></i>{m}</span>' for m in MODES)
    return (f'<div class="legend">{modes}<span><i class="sw" style="background:#ccc;border:1px solid #000"></i>'
            'outlined: round 2, dashed: round 3+</span><span><i class="sw" style="background:#ccc;opacity:.4;'
            'border:1.5px solid #d62728"></i>failed attempt</span><span>hover a bar for its reason, click for '
            'its VM\'s decisions</span></div>')


def render(t: Timeline) -> str:
    span = t.makespan or 1.0

    def x(sec: float) -> float:
        return LABEL_W + PLOT_W * sec / span

    rows = slots(t.bars)
    by_lane: dict[str, list[int]] = {lane.proxy: [] for lane in t.lanes}
    for i, b in enumerate(t.bars):
        by_lane.setdefault(b.proxy, []).append(i)
    parts: list[str] = []
    y = 24
    for lane in t.lanes:
        n = 1 + max((rows[i] for i in by_lane[lane.proxy]), default=0)  # slots use as many rows as the lane's peak
        row_h = min(float(ROW_H), LANE_MAX_H / n)
        height = n * row_h
        parts.append(f'<g class="lane" data-proxy="{_e(lane.proxy)}" data-limit="{lane.limit}" '
                     f'data-rows="{n}"><rect class="lane-bg" x="{LABEL_W}" y="{y}" width="{PLOT_W}" '
                     f'height="{height:.1f}"/><text class="lane-label" x="4" y="{y + min(height, 14) - 2:.1f}">'
                     f'{_e(lane.proxy)} (max {lane.limit})</text>')
        for i in by_lane[lane.proxy]:
            b = t.bars[i]
            bx, bw = x(b.start), max(1.0, x(b.end) - x(b.start))
            by = y + rows[i] * row_h
            cls = f"bar mode-{b.mode} r{min(b.round, 5)} {b.outcome}"
            parts.append(f'<rect class="{cls}" data-i="{i}" x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" '
                         f'height="{max(1.0, row_h - 1):.1f}" fill="{COLOURS.get(b.mode, "#999")}"/>')
        parts.append("</g>")
        y += height + LANE_GAP
    step = _tick_step(span)
    ticks = []
    k = 0
    while k * step <= span + 1e-9:
        tx = x(k * step)
        ticks.append(f'<line x1="{tx:.1f}" y1="16" x2="{tx:.1f}" y2="{y:.1f}" stroke="#0001"/>'
                     f'<text class="axis" x="{tx:.1f}" y="12" text-anchor="middle">'
                     f'{_hms(k * step) if step >= 1 else f"{k * step:.1f} s"}</text>')
        k += 1
    timeline = (f'<svg id="timeline" width="{LABEL_W + PLOT_W + 20}" height="{y + 4:.0f}" '
                f'xmlns="http://www.w3.org/2000/svg">{"".join(ticks)}{"".join(parts)}</svg>')

    loads = datastore_load(t.bars)
    ds_parts: list[str] = []
    dy = 4
    for ds, steps in loads.items():
        top = max([t.datastore_cap, t.threshold, *(n for _, n in steps)])
        scale = (DS_H - 8) / max(1, top)
        base = dy + DS_H - 4
        points = [f"{LABEL_W:.1f},{base:.1f}"]
        level = 0
        for when, n in steps:
            points.append(f"{x(when):.1f},{base - level * scale:.1f}")
            points.append(f"{x(when):.1f},{base - n * scale:.1f}")
            level = n
        points.append(f"{x(span):.1f},{base - level * scale:.1f}")
        peak_n = max((n for _, n in steps), default=0)
        ds_parts.append(
            f'<g class="ds" data-datastore="{_e(ds)}" data-peak="{peak_n}">'
            f'<text class="lane-label" x="4" y="{dy + 14}">{_e(ds)} (peak {peak_n})</text>'
            f'<line class="thr" x1="{LABEL_W}" x2="{LABEL_W + PLOT_W}" y1="{base - t.threshold * scale:.1f}" '
            f'y2="{base - t.threshold * scale:.1f}"/>'
            f'<line class="cap" x1="{LABEL_W}" x2="{LABEL_W + PLOT_W}" y1="{base - t.datastore_cap * scale:.1f}" '
            f'y2="{base - t.datastore_cap * scale:.1f}"/>'
            f'<polyline class="ds-line" points="{" ".join(points)}"/></g>')
        dy += DS_H
    strip = (f'<svg id="datastores" width="{LABEL_W + PLOT_W + 20}" height="{dy + 4}" '
             f'xmlns="http://www.w3.org/2000/svg">{"".join(ds_parts)}</svg>')

    data = {"bars": [[b.vm, b.disk, b.proxy, b.mode, b.datastore, b.round, b.attempt, round(b.start, 3),
                      round(b.end, 3), b.outcome, b.bytes] for b in t.bars],
            "notes": [[n.round, n.verdict, n.vm, n.proxy, n.reason] for n in t.notes],
            "byvm": t.notes_by_vm()}
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # no tag can start in the data
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_e(t.title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{_e(t.title)}</h1>", _summary(t), "<h2>Streams by proxy</h2>",
        _legend(), timeline,
        "<h2>Datastore load (active streams; yellow: threshold, red: cap)</h2>", strip,
        '<div id="tip"></div><div id="panel"><p>Click a bar to see the decisions about its VM.</p></div>',
        f'<script type="application/json" id="data">{payload}</script>', f"<script>{JS}</script>",
        "</body></html>",
    ])


def write(t: Timeline, path: Any) -> int:
    """Write the page atomically (temporary file, then rename); its size in bytes."""
    out = Path(path)
    text = render(t).encode("utf-8")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(text)
    os.replace(tmp, out)
    return len(text)
