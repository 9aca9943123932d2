"""The window picture's data and page without a browser: concurrency, rows that never overlap, VMs stranded then
recovered, and a page that fetches nothing and cannot be broken out of by a name or a reason."""

from __future__ import annotations

import json
import re

from vsphere_proxy.report_html import render
from vsphere_proxy.timeline import Bar, Lane, Note, Timeline, concurrency, datastore_load, peak, recovered_vms, slots


def bar(vm: str, proxy: str, start: float, end: float, *, attempt: int = 1, outcome: str = "read",
        datastore: str = "ds1", mode: str = "san") -> Bar:
    return Bar(vm, 0, proxy, mode, datastore, attempt, attempt, start, end, outcome, 100)


def test_concurrency_counts_ends_before_starts_at_a_tie() -> None:
    spans = [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (5.0, 6.0)]
    assert concurrency(spans) == [(0.0, 1), (1.0, 2), (2.0, 2), (3.0, 1), (4.0, 0), (5.0, 1), (6.0, 0)]
    assert peak(iter(spans)) == 2  # a generator is read once, and still counted right


def test_rows_of_a_lane_never_overlap_and_are_as_many_as_its_peak() -> None:
    bars = [bar("a", "p1", 0, 4), bar("b", "p1", 1, 2), bar("c", "p1", 2, 5), bar("d", "p1", 3, 6),
            bar("e", "p2", 0, 1)]
    rows = slots(bars)
    assert max(r for r, b in zip(rows, bars, strict=True) if b.proxy == "p1") + 1 == peak(
        (b.start, b.end) for b in bars if b.proxy == "p1") == 3
    for i, x in enumerate(bars):
        for j, y in enumerate(bars):
            if i < j and x.proxy == y.proxy and rows[i] == rows[j]:
                assert x.end <= y.start or y.end <= x.start


def test_recovered_vms_failed_once_then_read_in_a_later_attempt() -> None:
    bars = [bar("a", "p1", 0, 1, outcome="failed"), bar("a", "p2", 2, 3, attempt=2),
            bar("b", "p1", 0, 1, outcome="failed"), bar("c", "p1", 0, 1)]
    assert recovered_vms(bars) == ("a",)
    assert datastore_load(bars)["ds1"][0] == (0, 3)


def test_the_page_fetches_nothing_and_escapes_names_and_reasons() -> None:
    evil = "</script><img src=http://x/y.png>"
    t = Timeline("window", "job", (Lane("p1", 4),), (bar(evil, "p1", 0, 1), bar("b", "p1", 0.5, 2, mode="nbd")), 1, 4,
                 {"status": "complete", "makespan_s": 2.0, "stranded": {evil: evil}}, (Note(1, "assign", evil, "p1",
                                                                                             evil),))
    page = render(t)
    assert "<img" not in page
    block = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert block is not None
    markup = page.replace(block.group(1), "")
    assert not re.search(r"""<[^>]*\s(src|href)=["']?(https?:)?//""", markup)  # no tag fetches anything
    assert markup.count('<rect class="bar ') == 2 and markup.count('class="lane"') == 1
    data = json.loads(block.group(1))
    assert data["bars"][0][0] == evil and data["byvm"][evil] == [0]
