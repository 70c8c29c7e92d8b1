"""The HTML report: colour scale, charts and heatmaps, self-containedness, and a real browser.

The browser test renders the reduced demo's report in headless Debian Chromium through
playwright and skips (with the reason) when either is missing; scripts/test.sh installs both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from headwater.analysis import analyze
from headwater.report import NEGATIVE, POSITIVE, color, distribution_chart, heatmap, layer_chart, render_report
from headwater.scoring import Scores

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
VOID = {"meta", "br", "img", "input", "link", "hr", "stop", "rect", "line", "polyline", "path", "circle"}


class _Tags(HTMLParser):
    """Collects tags, attributes and text; checks that every non-void tag closes in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001, ANN201
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # noqa: ANN001, ANN201
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):  # noqa: ANN001, ANN201
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):  # noqa: ANN001, ANN201
        self.text.append(data)


def parse(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------


def test_color_scale_is_diverging_and_clamped() -> None:
    assert color(0.0, 2.0) == (255, 255, 255)
    assert color(2.0, 2.0) == POSITIVE and color(5.0, 2.0) == POSITIVE
    assert color(-2.0, 2.0) == NEGATIVE
    quarter = color(-0.5, 2.0)  # square-root ramp: a quarter of vmax is half-way to full colour
    assert all(abs(m - (255 + c) / 2) <= 0.5 for m, c in zip(quarter, NEGATIVE))
    assert sum(color(1.0, 2.0)) > sum(color(2.0, 2.0)) and sum(color(1.0, 2.0)) < sum(color(0.5, 2.0))
    assert color(1.0, 0.0) == (255, 255, 255)  # an all-zero heatmap stays white


def test_heatmap_spans_carry_text_colour_and_value() -> None:
    tokens, scores = ["The", " <b>cat", " sat", "."], [0.0, 3.0, -1.5, 0.25]
    p = parse(heatmap(tokens, scores, vmax=3.0))
    spans = [a for t, a in p.tags if t == "span"]
    assert len(spans) == 4
    assert "".join(p.text) == "".join(tokens)  # escaped markup shows as text
    for a, v in zip(spans, scores):
        assert a["data-v"] == f"{v:+.3g}"
        assert _rgb(re.search(r"background:(#[0-9a-f]{6})", a["style"]).group(1)) == color(v, 3.0)


def test_long_sequences_show_a_window_around_the_peak() -> None:
    tokens = [f" t{i}" for i in range(1000)]
    scores = [0.0] * 1000
    scores[900] = -5.0
    p = parse(heatmap(tokens, scores, vmax=5.0, max_tokens=100))
    shown = [a["data-v"] for t, a in p.tags if t == "span" and a.get("class") == "tok"]
    assert len(shown) == 100 and "-5" in shown
    text = "".join(p.text)
    assert text.startswith("[850 tokens before]") and text.endswith("[50 tokens after]") and " t900" in text


def test_distribution_chart_is_log_log_rank_plot() -> None:
    # |score| = 1/rank: a straight line on log-log axes, with equal steps per decade
    values = [1.0 / r for r in range(1, 201)] + [-0.5 / r for r in range(1, 51)]
    p = parse(distribution_chart(values))
    lines = {a["class"]: a["points"] for t, a in p.tags if t == "polyline"}
    assert set(lines) == {"series series-pos", "series series-neg"}
    xy = [tuple(map(float, pt.split(","))) for pt in lines["series series-pos"].split()]
    assert len(xy) == 200
    (x1, y1), (x10, y10), (x100, y100) = xy[0], xy[9], xy[99]
    assert x10 - x1 == pytest.approx(x100 - x10, abs=0.15) and x10 > x1
    assert y10 - y1 == pytest.approx(y100 - y10, abs=0.15) and y10 > y1

    # a large heavy-tailed sample is thinned to log-spaced ranks, still monotone
    gen = torch.Generator().manual_seed(0)
    big = (torch.rand(5000, generator=gen) ** -2 * torch.sign(torch.randn(5000, generator=gen))).tolist()
    for points in (a["points"] for t, a in parse(distribution_chart(big)).tags if t == "polyline"):
        xs, ys = zip(*(tuple(map(float, pt.split(","))) for pt in points.split()))
        assert 50 <= len(xs) <= 240
        assert all(b > a for a, b in zip(xs, xs[1:])), "ranks increase left to right"
        assert all(b >= a for a, b in zip(ys, ys[1:])), "|score| decreases, so y grows downwards"
    assert "all scores are zero" in distribution_chart([0.0, 0.0])


def test_layer_chart_bar_heights_follow_values() -> None:
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"]
    top = {names[0]: 1.0, names[1]: 2.0, names[2]: 4.0}
    bottom = {names[0]: -1.0, names[1]: -0.5, names[2]: 0.0}
    p = parse(layer_chart(names, top, bottom, k=5))
    bars = [a for t, a in p.tags if t == "rect" and "bar" in a.get("class", "")]
    assert len(bars) == 2 * len(names)
    tops = [float(a["height"]) for a in bars if "bar-top" in a["class"]]
    assert tops[1] / tops[0] == pytest.approx(2.0, rel=0.02) and tops[2] / tops[0] == pytest.approx(4.0, rel=0.02)
    xs = [float(a["x"]) for a in bars if "bar-top" in a["class"]]
    assert xs == sorted(xs), "first layer on the left"


def _fake_results() -> tuple[list[dict], torch.Tensor]:
    values = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 1.0, 0.0]])
    results = []

    def entry(q: int, i: int) -> dict:
        v = values[q, i].item()
        return {
            "index": i,
            "score": v,
            "text": f"doc {i} <script>alert(1)</script>",
            "tokens": [f"doc {i} ", "<script>alert(1)</script>"],
            "token_scores": [0.0, v],
            "per_layer": {"a": v / 2, "b": v / 2},
        }

    for q in range(2):
        order = values[q].argsort(descending=True).tolist()
        results.append(
            {
                "query": q,
                "prompt": "Is <this> escaped &",
                "completion": " yes",
                "relevant": [0],
                "top": [entry(q, i) for i in order[:2]],
                "bottom": [entry(q, i) for i in order[::-1][:2]],
                "per_layer_top": {"a": 1.0, "b": 1.0},
                "per_layer_bottom": {"a": -0.5, "b": -0.5},
                "stats": {"n": 3, "positive": 2},
                "recall": 1.0,
                "recall_k": 2,
            }
        )
    return results, values


def test_report_is_self_contained_and_escaped() -> None:
    results, values = _fake_results()
    html = render_report(results, values, {"model": "m", "strategy": "ekfac"}, {"layers": ["a", "b"], "top_k": 2})
    p = parse(html)
    tags = [t for t, _ in p.tags]
    assert "script" not in tags and "link" not in tags and "img" not in tags and "iframe" not in tags
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "@import" not in html and "url(http" not in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert sum(1 for t, a in p.tags if t == "section" and a.get("class") == "query") == 2
    assert sum(1 for t, a in p.tags if t == "li" and a.get("class") == "seq") == 8
    assert "recall@2 = 1.000" in html


# ---------------------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------------------


def _browser():  # noqa: ANN202
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip(f"Debian chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    return sync_api.sync_playwright


def test_report_renders_in_headless_chromium(demo_run, tmp_path: Path) -> None:  # noqa: ANN001
    sync_playwright = _browser()
    out, _ = demo_run
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    n_layers = len(json.loads((out / "cli.json").read_text())["layers"])
    console, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"), args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: console.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(tmp_path / "summary.png"))

            assert page.locator("#summary table.queries tbody tr").count() == len(results)
            assert page.locator("section.query").count() == len(results)
            q = page.locator("#q0")
            q.scroll_into_view_if_needed()
            shown = results[0]["top"] + results[0]["bottom"]

            # heatmaps: one per shown sequence, every token rendered, coloured as the scale says
            maps = q.locator(".heatmap")
            assert maps.count() == len(shown)
            toks = q.locator(".heatmap .tok")
            assert toks.count() == sum(len(e["tokens"]) for e in shown)
            first = maps.nth(0).bounding_box()
            assert first is not None and first["width"] > 100 and first["height"] > 8
            assert maps.nth(0).inner_text() == shown[0]["text"]
            vmax = max(abs(v) for e in shown for v in e["token_scores"])
            hot = max(range(len(shown[0]["token_scores"])), key=lambda i: shown[0]["token_scores"][i])
            rgb = maps.nth(0).locator(".tok").nth(hot).evaluate("el => getComputedStyle(el).backgroundColor")
            assert rgb == "rgb({}, {}, {})".format(*color(shown[0]["token_scores"][hot], vmax))
            # hover shows the value
            maps.nth(0).locator(".tok").nth(hot).hover()
            after = maps.nth(0).locator(".tok").nth(hot).evaluate("el => getComputedStyle(el, '::after').content")
            assert after == '"{:+.3g}"'.format(shown[0]["token_scores"][hot])
            legend = q.locator(".legend svg.legend-bar").bounding_box()
            assert legend is not None and legend["width"] >= 200

            # per-layer chart: two bars per layer, drawn with non-zero size
            bars = q.locator("svg.layer-chart rect.bar")
            assert bars.count() == 2 * n_layers
            heights = [bars.nth(i).bounding_box()["height"] for i in range(bars.count())]
            assert max(heights) > 20 and min(heights) > 0
            # log-log distribution: at least one non-empty polyline spanning the plot
            line = q.locator("svg.dist-chart polyline").first
            assert len(line.get_attribute("points").split()) > 10
            box = line.bounding_box()
            assert box is not None and box["width"] > 200 and box["height"] > 50

            # the power-law tail of positive influence, with its fitted line
            tail = q.locator("svg.tail-chart")
            assert tail.locator("circle").count() > 5
            fit_line = tail.locator("polyline.fit-line")
            assert fit_line.count() == 1 and fit_line.bounding_box()["width"] > 20
            # the analysis summary: numbers and the depth-block chart
            analysis = page.locator("#analysis")
            assert "alpha =" in analysis.inner_text() and "top 1%" in analysis.inner_text()
            blocks = analysis.locator("svg.block-chart rect")
            heights = [blocks.nth(i).bounding_box()["height"] for i in range(blocks.count())]
            assert heights and max(heights) > 5

            q.screenshot(path=str(tmp_path / "query.png"))
            shutil.copy(tmp_path / "query.png", "/tmp/hw_query.png") if os.environ.get("HW_KEEP_SHOTS") else None
        finally:
            browser.close()
    assert console == [], console
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    for name in ("summary.png", "query.png"):  # a blank page compresses to a few kB
        assert (tmp_path / name).stat().st_size > 30_000, name


# ---------------------------------------------------------------------------------------
# Any number of queries
# ---------------------------------------------------------------------------------------


def _synthetic(n_queries: int, n_train: int = 40, k: int = 3, seed: int = 0) -> tuple[list[dict], torch.Tensor]:
    """Rows shaped like ``headwater score``'s results.jsonl, small enough for 1,000 queries."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n_queries, n_train, generator=gen)
    layers = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]

    def entry(q: int, i: int) -> dict:
        v = float(values[q, i])
        return {
            "index": i,
            "score": v,
            "text": f"doc {i}",
            "tokens": [f"doc{i}", " end"],
            "token_scores": [v, -v / 2],
            "per_layer": {layers[0]: v / 3, layers[1]: 2 * v / 3},
        }

    results = []
    for q in range(n_queries):
        order = values[q].argsort(descending=True).tolist()
        top, bottom = [entry(q, i) for i in order[:k]], [entry(q, i) for i in order[::-1][:k]]
        row = values[q]
        results.append(
            {
                "query": q,
                "prompt": f"query {q} is",
                "completion": " this",
                "relevant": [order[0]],
                "top": top,
                "bottom": bottom,
                "per_layer_top": {n: sum(e["per_layer"][n] for e in top) for n in layers},
                "per_layer_bottom": {n: sum(e["per_layer"][n] for e in bottom) for n in layers},
                "stats": {
                    "n": n_train,
                    "positive": int((row > 0).sum()),
                    "mean": float(row.mean()),
                    "std": float(row.std()),
                    "max": float(row.max()),
                    "min": float(row.min()),
                },
                "recall": 1.0,
                "recall_k": k,
            }
        )
    return results, values


@pytest.mark.parametrize("n_queries", [1, 2, 1000])
def test_report_renders_any_number_of_queries(n_queries: int) -> None:
    results, values = _synthetic(n_queries)
    analysis = analyze(Scores(values), top_k=3)
    settings, meta = {"model": "m", "strategy": "ekfac"}, {"layers": list(results[0]["per_layer_top"]), "top_k": 3}
    t0 = time.perf_counter()
    html = render_report(results, values, settings, meta, analysis)
    seconds = time.perf_counter() - t0
    p = parse(html)
    assert sum(1 for t, a in p.tags if t == "section" and a.get("class") == "query") == n_queries
    assert html.count('<tr><td class="num"><a href="#q') == n_queries
    text = "".join(p.text)
    if n_queries == 1:  # one query has no pair to overlap: a dash, not a crash
        assert analysis["cross_query"]["mean_jaccard"] is None
        assert "(Jaccard)- (needs two or more queries)" in text
    else:
        assert f"(Jaccard){analysis['cross_query']['mean_jaccard']:.3f}" in text
    assert seconds < 3.0, f"{n_queries} queries took {seconds:.2f}s to render"
    assert len(html) < 20_000 * n_queries + 50_000, "the report grows linearly with the queries (no Q x Q table)"
