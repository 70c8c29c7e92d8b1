"""The influence report: one self-contained HTML file (inline CSS and SVG, no scripts, no fetches).

    headwater report runs/a        # rebuilds runs/a/report.html from results.jsonl + scores

Layout: a summary (run settings, then one row per query) followed by one section per query
with the prompt and completion, a per-layer bar chart, the score distribution on log-log
axes, and the top-k most positive and most negative training sequences as token heatmaps.

Token colours use one symmetric diverging scale per query (red raises the completion's
probability, blue lowers it), so sequences of the same query compare at a glance; the exact
value of each token shows on hover. Charts are drawn here as SVG so the file opens offline.

results.jsonl, cli.json and the scores' metadata are files a user (or anyone who hands over a
run directory) can edit, so nothing read from them reaches the HTML unchecked: ``check_results``
validates the rows' schema first, every string is escaped, and every number goes through
``_num``/``_real``, which format only finite real numbers (anything else shows as escaped text,
or as 0 in a coordinate or colour).
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

__all__ = ["render_report", "check_results", "color", "POSITIVE", "NEGATIVE"]

POSITIVE = (202, 0, 32)  # red: upweighting this raises the completion's log-probability
NEGATIVE = (5, 113, 176)  # blue: lowers it
WHITE = (255, 255, 255)

CSS = """
:root { --pos: rgb(202,0,32); --neg: rgb(5,113,176); --ink: #1d2330; --muted: #5d6677; --line: #dde1e8; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 0 0 10px; }
h3 { font-size: 15px; margin: 18px 0 8px; color: var(--muted); font-weight: 600; }
.sub { color: var(--muted); margin: 0 0 20px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 20px;
          margin: 0 0 22px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); white-space: nowrap; }
table.settings th { width: 190px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.query-text { font-size: 16px; padding: 10px 12px; background: #f3f5f8; border-radius: 6px; margin-bottom: 14px;
              white-space: pre-wrap; }
.query-text .completion { background: #fde2d4; border-bottom: 2px solid var(--pos); }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 0; } figcaption { color: var(--muted); font-size: 12px; margin-top: 2px; max-width: 460px; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
.legend { display: flex; align-items: center; gap: 10px; margin: 14px 0 4px; color: var(--muted); font-size: 12px; }
.legend svg, .legend .mono { flex: none; }
ol.seqs { list-style: none; padding: 0; margin: 0; }
li.seq { padding: 8px 0 10px; border-bottom: 1px solid var(--line); }
.seq-meta { display: flex; gap: 12px; align-items: baseline; margin-bottom: 4px; font-size: 12.5px;
            color: var(--muted); }
.seq-meta .score { font-weight: 600; color: var(--ink); font-variant-numeric: tabular-nums; }
.badge { font-size: 11px; padding: 1px 6px; border-radius: 9px; background: #e3f4e6; color: #1f6b2e;
         border: 1px solid #a9d8b2; }
.heatmap { white-space: pre-wrap; word-break: break-word; font-size: 13px; line-height: 1.75;
           font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.tok { position: relative; border-radius: 2px; padding: 1px 0; cursor: default; }
.tok:hover { outline: 1.5px solid var(--ink); z-index: 2; }
.tok:hover::after { content: attr(data-v); position: absolute; left: 0; top: -1.9em; white-space: nowrap;
                    background: var(--ink); color: #fff; font-size: 11px; padding: 1px 5px; border-radius: 3px;
                    z-index: 3; }
a { color: #2457a6; text-decoration: none; } a:hover { text-decoration: underline; }
.pos { color: var(--pos); } .neg { color: var(--neg); }
.empty, .cut { color: var(--muted); font-style: italic; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _is_real(v: Any) -> bool:
    """A finite real number and not a bool (JSON's true is an int to Python, not a score)."""
    if type(v) is float:  # the common case, without the slower ABC check
        return math.isfinite(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v: Any, default: float = 0.0) -> float:
    """``v`` as a float when it is a finite real number, else ``default``: what may reach a coordinate or colour."""
    return float(v) if _is_real(v) else default


def _num_text(v: Any, spec: str = "", none: str = "-") -> str:
    """``format(v, spec)`` for a finite real number; None shows as ``none`` and anything else as its text
    (unescaped: for strings that are escaped as a whole later)."""
    if v is None:
        return none
    if _is_real(v):
        try:
            return format(v, spec)
        except (ValueError, TypeError):  # e.g. "d" given a float
            return format(float(v), "g")
    return str(v)


def _num(v: Any, spec: str = "", none: str = "-") -> str:
    """A number ready for HTML (text or attribute value): see ``_num_text``; the result is escaped."""
    return _e(_num_text(v, spec, none))


def color(value: float, vmax: float) -> tuple[int, int, int]:
    """Diverging colour: white at 0, full red at +vmax, full blue at -vmax.

    Intensity grows with sqrt(|value| / vmax): token influence is heavy-tailed, and on a
    linear ramp everything but the hottest token of the top sequence would look white.
    """
    if not _is_real(value) or not _is_real(vmax) or vmax <= 0:
        return WHITE
    t = math.sqrt(min(1.0, abs(value) / vmax))
    end = POSITIVE if value > 0 else NEGATIVE
    return tuple(round(w + (c - w) * t) for w, c in zip(WHITE, end))  # type: ignore[return-value]


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _fmt(v: float | None) -> str:
    return _num(v, "+.3g")


def _str_list(v: Any) -> list[str]:
    """A list of names from settings or metadata; anything but a list (a string would become its letters) is none."""
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else []


def _real_dict(v: Any) -> dict[str, float]:
    """A {name: number} mapping with every value a finite float (others 0): chart input from an edited file."""
    return {str(k): _real(x) for k, x in v.items()} if isinstance(v, dict) else {}


# ---------------------------------------------------------------------------------------
# SVG charts
# ---------------------------------------------------------------------------------------


def _short_layer(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("transformer", "model", "layers", "h", "mlp")]
    return ".".join(parts[-2:]) if parts else name


def layer_chart(names: list[str], top: dict[str, float], bottom: dict[str, float], k: int) -> str:
    """Grouped bars per layer, first to last: summed influence of the top-k and bottom-k sequences."""
    w, h, left, right, top_pad, bottom_pad = 460, 230, 56, 10, 14, 58
    names, top, bottom = [str(x) for x in names], _real_dict(top), _real_dict(bottom)
    k_text = _num(k)
    n = max(1, len(names))
    vals = [top.get(x, 0.0) for x in names] + [bottom.get(x, 0.0) for x in names] + [0.0]
    lo, hi = min(vals), max(vals)
    if hi == lo:
        hi = lo + 1.0
    ph = h - top_pad - bottom_pad
    y = lambda v: top_pad + (hi - v) / (hi - lo) * ph  # noqa: E731
    slot = (w - left - right) / n
    bw = max(1.0, min(18.0, slot * 0.38))
    out = [
        f'<svg class="chart layer-chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="per-layer influence">'
    ]
    for v in _nice_ticks(lo, hi):
        yy = y(v)
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eceff3"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{_e(_tick(v))}</text>')
    y0 = y(0.0)
    label_every = max(1, math.ceil(n / 16))
    for i, name in enumerate(names):
        cx = left + slot * (i + 0.5)
        for j, (v, cls, fill) in enumerate(
            ((top.get(name, 0.0), "bar-top", _hex(POSITIVE)), (bottom.get(name, 0.0), "bar-bottom", _hex(NEGATIVE)))
        ):
            x = cx - bw + j * bw
            y1, y2 = sorted((y(v), y0))
            out.append(
                f'<rect class="bar {cls}" x="{x:.1f}" y="{y1:.1f}" width="{bw:.1f}" height="{max(0.5, y2 - y1):.1f}" '
                f'fill="{fill}"><title>{_e(name)} ({"top" if j == 0 else "bottom"} {k_text}): {v:+.4g}</title></rect>'
            )
        if i % label_every == 0:
            out.append(
                f'<text x="{cx:.1f}" y="{h - bottom_pad + 12}" text-anchor="end" '
                f'transform="rotate(-35 {cx:.1f} {h - bottom_pad + 12})">{_e(_short_layer(name))}</text>'
            )
    out.append(f'<line x1="{left}" x2="{w - right}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#8a93a3"/>')
    out.append("</svg>")
    return "".join(out)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / n)) if span > 0 else 1.0
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    ticks, v = [], start
    while v <= hi + 1e-12 * span:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def _tick(v: float) -> str:
    return f"{v:.3g}"


def _log_sample(n: int, max_points: int = 240) -> list[int]:
    """Ranks 1..n spaced evenly in log space (all of them when n is small)."""
    if n <= max_points:
        return list(range(1, n + 1))
    pts = {max(1, min(n, round(10 ** (math.log10(n) * i / (max_points - 1))))) for i in range(max_points)}
    return sorted(pts)


def distribution_chart(values: Sequence[float]) -> str:
    """|score| against its rank on log-log axes, positive and negative scores separately.

    Influence over a training set is heavy-tailed (Grosse et al. 2023 find a power law), so a
    straight-ish line here means a few sequences carry most of the influence.
    """
    w, h, left, right, top_pad, bottom_pad = 460, 230, 56, 14, 14, 40
    finite = [float(v) for v in values if _is_real(v)]
    pos = sorted((v for v in finite if v > 0), reverse=True)
    neg = sorted((-v for v in finite if v < 0), reverse=True)
    out = [
        f'<svg class="chart dist-chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="score distribution, log-log">'
    ]
    if not pos and not neg:
        out.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle">all scores are zero</text></svg>')
        return "".join(out)
    ys = pos + neg
    lx0, lx1 = 0.0, math.log10(max(len(pos), len(neg), 2))
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    if ly1 == ly0:
        ly1 += 1
    pw, ph = w - left - right, h - top_pad - bottom_pad
    fx = lambda r: left + (math.log10(r) - lx0) / (lx1 - lx0) * pw  # noqa: E731
    fy = lambda v: top_pad + (ly1 - math.log10(v)) / (ly1 - ly0) * ph  # noqa: E731
    step_y = max(1, math.ceil((ly1 - ly0) / 6))
    for d in range(int(ly0), int(ly1) + 1, step_y):
        yy = fy(10.0**d)
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eceff3"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">1e{d}</text>')
    for d in range(0, int(math.floor(lx1)) + 1):
        xx = fx(10**d)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top_pad}" y2="{h - bottom_pad}" stroke="#eceff3"/>')
        out.append(f'<text x="{xx:.1f}" y="{h - bottom_pad + 14}" text-anchor="middle">{10**d:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle">rank</text>')
    out.append(
        f'<text x="12" y="{top_pad + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {top_pad + ph / 2})">'
        "|score|</text>"
    )
    both = ((pos, "series-pos", POSITIVE, "positive"), (neg, "series-neg", NEGATIVE, "negative"))
    for series, cls, rgb, label in both:
        if not series:
            continue
        pts = " ".join(f"{fx(r):.1f},{fy(series[r - 1]):.1f}" for r in _log_sample(len(series)))
        out.append(
            f'<polyline class="series {cls}" fill="none" stroke="{_hex(rgb)}" stroke-width="1.8" points="{pts}">'
            f"<title>{label} scores: {len(series)}</title></polyline>"
        )
    lx = w - right - 110
    out.append(f'<rect x="{lx}" y="{top_pad + 2}" width="10" height="10" fill="{_hex(POSITIVE)}"/>')
    out.append(f'<text x="{lx + 14}" y="{top_pad + 11}">positive ({len(pos)})</text>')
    out.append(f'<rect x="{lx}" y="{top_pad + 18}" width="10" height="10" fill="{_hex(NEGATIVE)}"/>')
    out.append(f'<text x="{lx + 14}" y="{top_pad + 27}">negative ({len(neg)})</text>')
    out.append("</svg>")
    return "".join(out)


def tail_chart(fit: dict | None) -> str:
    """The positive-influence tail, P(X >= x) against x on log-log axes, with the fitted power law.

    ``fit`` is one query's ``analysis.sparsity.per_query[q]["power_law"]``; the line is
    (n_tail / n_positive) (x / xmin)^(1 - alpha) for x >= xmin, as the paper plots it.
    """
    w, h, left, right, top_pad, bottom_pad = 460, 230, 56, 14, 14, 40
    out = [
        f'<svg class="chart tail-chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="power-law tail of positive influence">'
    ]
    fit = fit if isinstance(fit, dict) else {}
    tail = fit.get("tail") if isinstance(fit.get("tail"), (list, tuple)) else []
    pairs = [t for t in tail if isinstance(t, (list, tuple)) and len(t) == 2]
    pts = [(float(x), float(p)) for x, p in pairs if _is_real(x) and _is_real(p) and x > 0 and p > 0]
    if not pts or not _is_real(fit.get("alpha")):
        out.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle">too few positive scores to fit a tail</text>')
        return "".join(out) + "</svg>"
    xs, ps = [x for x, _ in pts], [p for _, p in pts]
    lx0, lx1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    ly0, ly1 = math.floor(math.log10(min(ps))), 0
    lx1, ly0 = (lx1 + 1 if lx1 == lx0 else lx1), (ly0 - 1 if ly0 == ly1 else ly0)
    pw, ph = w - left - right, h - top_pad - bottom_pad
    fx = lambda v: left + (math.log10(v) - lx0) / (lx1 - lx0) * pw  # noqa: E731
    fy = lambda v: top_pad + (ly1 - math.log10(v)) / (ly1 - ly0) * ph  # noqa: E731
    for d in range(int(ly0), int(ly1) + 1):
        out.append(
            f'<line x1="{left}" x2="{w - right}" y1="{fy(10.0**d):.1f}" y2="{fy(10.0**d):.1f}" stroke="#eceff3"/>'
        )
        out.append(f'<text x="{left - 6}" y="{fy(10.0**d) + 4:.1f}" text-anchor="end">1e{d}</text>')
    for d in range(int(lx0), int(lx1) + 1):
        out.append(f'<text x="{fx(10.0**d):.1f}" y="{h - bottom_pad + 14}" text-anchor="middle">1e{d}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle">positive score x</text>')
    out.append(
        f'<text x="12" y="{top_pad + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {top_pad + ph / 2})">'
        "P(X &gt;= x)</text>"
    )
    dots = "".join(f'<circle cx="{fx(x):.1f}" cy="{fy(p):.1f}" r="1.8"/>' for x, p in pts)
    out.append(f'<g class="series tail-points" fill="{_hex(POSITIVE)}">{dots}</g>')
    alpha, xmin = _real(fit.get("alpha")), _real(fit.get("xmin"))
    scale = _real(fit.get("n_tail")) / max(_real(fit.get("n_positive")), 1.0)
    x_hi = max(xs)
    if xmin > 0 and x_hi > xmin and scale > 0:
        line = [(x, scale * (x / xmin) ** (1 - alpha)) for x in (xmin * (x_hi / xmin) ** (i / 20) for i in range(21))]
        coords = " ".join(f"{fx(x):.1f},{fy(max(p, 10.0**ly0)):.1f}" for x, p in line)
        title = f"<title>power law, alpha = {alpha:.2f}</title>"
        out.append(
            f'<polyline class="series fit-line" fill="none" stroke="#333" stroke-dasharray="4 3" '
            f'stroke-width="1.5" points="{coords}">{title}</polyline>'
        )
    return "".join(out) + "</svg>"


def analysis_summary(analysis: dict | None, n_queries: int) -> str:
    """The cross-query part of ``headwater.analysis.analyze``: sparsity, layer blocks, token
    structure and sequences that sit in many queries' top-k."""
    if not analysis:
        return ""
    sp, layers, tokens, cq = (_dict(analysis.get(k)) for k in ("sparsity", "layers", "tokens", "cross_query"))
    rows = []  # (label, value) as plain text, escaped below
    if sp:
        alpha = sp.get("median_alpha")
        rows.append(
            (
                "Power-law tail (median exponent over queries)",
                "-" if alpha is None else f"alpha = {_num_text(alpha, '.2f')}",
            )
        )
        rows.append(
            ("Share of positive influence in the top 1% of sequences", _num_text(sp.get("mean_top1pct_share"), ".1%"))
        )
    if tokens:
        flagged, examined = _num_text(tokens.get("n_flagged", 0)), _num_text(tokens.get("n_examined", 0))
        rows.append(
            ("Sequences whose influence sits on few tokens (||a||2/||a||1 > 2/3)", f"{flagged} of {examined} examined")
        )
    if cq:
        # mean_jaccard is None for a single query: there is no pair of queries to overlap
        rows.append(
            (
                f"Mean overlap of top-{_num_text(cq.get('k'))} sets between queries (Jaccard)",
                _num_text(cq.get("mean_jaccard"), ".3f", none="- (needs two or more queries)"),
            )
        )
        listed = cq.get("shared") if isinstance(cq.get("shared"), list) else []
        shared = [e for e in listed if isinstance(e, dict) and _real(e.get("queries")) > 1][:8]
        if shared:
            listing = (f"#{_num_text(e.get('index'))} ({_num_text(e.get('queries'))}/{n_queries})" for e in shared)
            rows.append(("Sequences in several queries' top-k", ", ".join(listing)))
    parts = ['<section id="analysis"><h3>Analysis</h3><table class="settings analysis">']
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows]
    parts.append("</table>")
    mean = layers.get("mean") if isinstance(layers.get("mean"), list) else None
    if mean:
        mean = [min(1.0, max(0.0, _real(f))) for f in mean]  # shares of influence, drawn as bar heights
        bw, bh, h = 460, 120, 150
        step = bw / len(mean)
        bars = "".join(
            f'<rect x="{i * step + 2:.1f}" y="{10 + bh * (1 - f):.1f}" width="{step - 4:.1f}" height="{bh * f:.1f}" '
            f'fill="{_hex(POSITIVE)}"><title>block {i + 1}: {f:.1%}</title></rect>'
            f'<text x="{i * step + step / 2:.1f}" y="{h - 6}" text-anchor="middle">{i + 1}</text>'
            for i, f in enumerate(mean)
        )
        parts.append(
            f'<figure><svg class="chart block-chart" width="{bw}" height="{h}" viewBox="0 0 {bw} {h}" '
            f'role="img" aria-label="influence by depth block">{bars}</svg><figcaption>Share of influence by '
            f"depth block, first to last, averaged over queries ({_e(layers.get('definition', ''))})."
            "</figcaption></figure>"
        )
    parts.append("</section>")
    return "".join(parts)


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def legend(vmax: float, gid: str = "lg") -> str:
    """The heatmap's colour scale, -vmax .. +vmax, as an SVG gradient bar with labels."""
    vmax, gid = _real(vmax), _e(gid)
    stops = "".join(
        f'<stop offset="{i / 10:.1f}" stop-color="{_hex(color(vmax * (i - 5) / 5, vmax))}"/>' for i in range(11)
    )
    return (
        '<div class="legend"><span>per-token influence</span>'
        f'<span class="neg mono">{_fmt(-vmax)}</span>'
        f'<svg class="legend-bar" width="220" height="14" viewBox="0 0 220 14"><defs><linearGradient id="{gid}">'
        f"{stops}</linearGradient></defs>"
        f'<rect width="220" height="14" rx="3" fill="url(#{gid})" stroke="#c8cdd6"/></svg>'
        f'<span class="pos mono">{_fmt(vmax)}</span>'
        "<span>square-root scale; red raises the completion's probability, blue lowers it; a token is "
        "coloured by the influence of the position that predicts it (hover for the value)</span></div>"
    )


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


MAX_TOKENS = 400  # per shown sequence: long documents get a window, not a 10 MB page


def _window(scores: list[float], limit: int) -> tuple[int, int]:
    """[lo, hi) of at most ``limit`` tokens, centred on the largest |influence|."""
    n = len(scores)
    if n <= limit:
        return 0, n
    peak = max(range(n), key=lambda i: abs(scores[i]))
    lo = min(max(0, peak - limit // 2), n - limit)
    return lo, lo + limit


def heatmap(tokens: list[str], scores: list[float], vmax: float, max_tokens: int = MAX_TOKENS) -> str:
    """Tokens as coloured spans; the value shows on hover (CSS tooltip and title)."""
    scores = [_real(v) for v in scores]  # a non-number (edited file) is uncoloured, never markup
    lo, hi = _window(scores, max_tokens)
    spans = []
    if lo > 0:
        spans.append(f'<span class="cut">[{lo} tokens before] </span>')
    for piece, v in zip(tokens[lo:hi], scores[lo:hi]):
        rgb = color(v, vmax)
        ink = "#fff" if vmax > 0 and abs(v) / vmax > 0.4 else "inherit"  # dark background past ~sqrt(0.4)
        label = _num(v, "+.3g")
        spans.append(
            f'<span class="tok" style="background:{_hex(rgb)};color:{ink}" data-v="{label}" '
            f'title="{_e(repr(piece))}: {label}">{_e(piece)}</span>'
        )
    if hi < len(tokens):
        spans.append(f'<span class="cut"> [{len(tokens) - hi} tokens after]</span>')
    return f'<div class="heatmap">{"".join(spans)}</div>'


def _sequence(entry: dict, vmax: float, relevant: set[int]) -> str:
    badge = '<span class="badge">states the fact</span>' if entry.get("index") in relevant else ""
    return (
        f'<li class="seq"><div class="seq-meta"><span class="score">{_fmt(entry.get("score"))}</span>'
        f"<span>training #{_num(entry.get('index'))}</span>{badge}</div>"
        f"{heatmap(entry.get('tokens') or [], entry.get('token_scores') or [], vmax)}</li>"
    )


class LayerGroups:
    """How a MoE model's per-layer sums are shown: one bar per MoE block, and a per-expert view.

    ``kinds`` is the fit's ``layer_kinds`` (``headwater.layers.describe_layers``: ``expert`` is an
    expert layer's index, ``block`` the fused experts module that holds it). A model with hundreds
    of expert layers (layers x experts x projections) would get an unreadable chart of one bar
    per layer; summed per block the chart keeps the model's depth profile, and summed per expert
    (over blocks and projections) it shows which experts carry the influence. Without experts
    the layers are shown as they are.
    """

    def __init__(self, layers: list[str], kinds: Any):
        kinds = kinds if isinstance(kinds, dict) else {}
        self.block_of: dict[str, str] = {}
        self.expert_of: dict[str, int] = {}
        for name in layers:
            k = kinds.get(name)
            e = k.get("expert") if isinstance(k, dict) else None
            if isinstance(e, int) and not isinstance(e, bool):
                self.expert_of[name] = e
                self.block_of[name] = str(k.get("block") or name)
        self.names = list(dict.fromkeys(self.block_of.get(n, n) for n in layers))  # model order
        self.experts = sorted(set(self.expert_of.values()))

    @property
    def has_experts(self) -> bool:
        return bool(self.expert_of)

    def by_block(self, per_layer: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, v in per_layer.items():
            key = self.block_of.get(name, name)
            out[key] = out.get(key, 0.0) + v
        return out

    def by_expert(self, per_layer: dict[str, float]) -> dict[str, float]:
        out = {f"expert {e}": 0.0 for e in self.experts}
        for name, v in per_layer.items():
            if name in self.expert_of:
                out[f"expert {self.expert_of[name]}"] += v
        return out


def _layers_text(layers: list[str], kinds: Any) -> str:
    """The tracked layers in one line: all of them when few, else the first and last few; a MoE
    model's expert layers are counted per block (hundreds of names would bury the summary)."""
    groups = LayerGroups(layers, kinds)
    head = f"{len(layers)}"
    if groups.has_experts:
        n_blocks = len({groups.block_of[n] for n in groups.expert_of})
        head += f" ({len(groups.expert_of)} expert layers: {len(groups.experts)} experts in {n_blocks} MoE blocks)"
        layers = groups.names
    shown = layers if len(layers) <= 12 else layers[:6] + [f"... {len(layers) - 9} more ..."] + layers[-3:]
    return f"{head}: " + ", ".join(shown)


def _tracked_text(layers: list[str], kinds: Any, coverage: Any) -> str:
    """Layers by kind (attention, mlp, expert, adapter, ...) and the share of parameters covered,
    as the fit recorded them (cli.json); "not recorded" for a workdir written without them."""
    kinds = kinds if isinstance(kinds, dict) else {}
    counts: dict[str, int] = {}
    for name in layers:
        k = kinds.get(name)
        kind = str(k.get("kind")) if isinstance(k, dict) and k.get("kind") else "?"
        counts[kind] = counts.get(kind, 0) + 1
    text = ", ".join(f"{n} {kind}" for kind, n in counts.items()) if set(counts) - {"?"} else "kinds not recorded"
    cov = coverage if isinstance(coverage, dict) else {}
    if _is_real(cov.get("share")) and _is_real(cov.get("attributable_share")):
        text += (
            f"; {_real(cov['share']):.1%} of all parameters, {_real(cov['attributable_share']):.1%} of the "
            "weight matrices attribution should cover (embeddings and vectors excluded)"
        )
    untracked = [u for u in cov.get("untracked") or [] if isinstance(u, dict)]
    if untracked:
        names = ", ".join(f"{u.get('name')} ({u.get('reason')})" for u in untracked[:5])
        text += f"; not tracked: {names}" + (f" and {len(untracked) - 5} more" if len(untracked) > 5 else "")
    return text


def _layer_figures(r: dict, names: list[str], groups: LayerGroups | None, k: int) -> str:
    top, bottom = _real_dict(_dict(r.get("per_layer_top"))), _real_dict(_dict(r.get("per_layer_bottom")))
    if groups is None or not groups.has_experts:
        return (
            layer_chart(names, top, bottom, k)
            + f"<figcaption>Per-layer influence, first to last layer: the summed score of the top {k} "
            f"(red) and bottom {k} (blue) sequences by layer.</figcaption>"
        )
    blocks = layer_chart(groups.names, groups.by_block(top), groups.by_block(bottom), k)
    experts = layer_chart([f"expert {e}" for e in groups.experts], groups.by_expert(top), groups.by_expert(bottom), k)
    return (
        f"{blocks}<figcaption>Per-layer influence, first to last layer, each MoE block's experts summed "
        f"into one bar: the summed score of the top {k} (red) and bottom {k} (blue) sequences.</figcaption>"
        f"</figure><figure>{experts}<figcaption>Per expert: its projections summed over every MoE "
        f"block, for the same top {k} and bottom {k} sequences.</figcaption>"
    )


def _query_section(
    r: dict, values: Sequence[float], layers: list[str], sparsity: dict | None = None, groups: LayerGroups | None = None
) -> str:
    q = _num(r["query"])  # an id and a label: validated by check_results, formatted anyway
    shown = (r.get("top") or []) + (r.get("bottom") or [])
    vmax = max((abs(_real(v)) for e in shown for v in (e.get("token_scores") or [])), default=0.0)
    relevant = set(r.get("relevant") or [])
    k = len(r.get("top") or [])
    stats = _dict(r.get("stats"))
    recall = ""
    if r.get("recall") is not None:
        recall_k = r.get("recall_k") if r.get("recall_k") is not None else k
        recall = f" &middot; recall@{_num(recall_k)} = {_num(r['recall'], '.2f')}"
    names = layers or list(_dict(r.get("per_layer_top")))
    parts = [
        f'<section class="query" id="q{q}"><h2>Query {_num(r["query"] + 1)}</h2>',
        f'<div class="query-text"><span class="prompt">{_e(r["prompt"])}</span>'
        f'<span class="completion">{_e(r["completion"])}</span></div>',
        f'<p class="sub">{_num(stats.get("positive"), none="?")} of {_num(stats.get("n"), none="?")} '
        "training sequences raise the "
        f"completion's probability{recall}</p>",
        '<div class="charts"><figure>',
        _layer_figures(r, names, groups, k),
        "</figure><figure>",
        distribution_chart(values),
        "<figcaption>Score distribution over the training set: |score| by rank, log-log.</figcaption>",
        "</figure>",
        _tail_figure(sparsity),
        "</div>",
        legend(vmax, f"lg{q}"),
        f"<h3>Most positive: top {k}</h3><ol class='seqs top'>",
        "".join(_sequence(e, vmax, relevant) for e in r.get("top") or []) or "<li class='empty'>none</li>",
        f"</ol><h3>Most negative: bottom {len(r.get('bottom') or [])}</h3><ol class='seqs bottom'>",
        "".join(_sequence(e, vmax, relevant) for e in r.get("bottom") or []) or "<li class='empty'>none</li>",
        '</ol><p><a href="#summary">back to the summary</a></p></section>',
    ]
    return "".join(parts)


def _tail_figure(sparsity: dict | None) -> str:
    if not isinstance(sparsity, dict):
        return ""
    fit = _dict(sparsity.get("power_law"))
    if fit.get("alpha") is not None:
        ks = f", KS = {_num_text(fit['ks'], '.3f')}" if fit.get("ks") is not None else ""
        caption = (
            f"Tail of positive influence with its power-law fit: alpha = {_num_text(fit['alpha'], '.2f')}, "
            f"xmin = {_num_text(fit.get('xmin'), '.3g')}{ks}; the top 1% of sequences hold "
            f"{_num_text(sparsity.get('top1pct_share') or 0, '.1%')} of the positive influence."
        )
    else:
        caption = "Too few positive scores for a power-law fit."
    return f"<figure>{tail_chart(fit)}<figcaption>{_e(caption)}</figcaption></figure>"


def calibration_text(cal: dict) -> str:
    """A damping calibration in one line: the chosen scale, the local LDS at each scale tried, its cost.

    ``cal`` comes from calibration.json (``headwater calibrate``, via ``inspect`` or run.json): a value
    that is not a finite number shows as its text, which the report escapes with its row.
    """
    curve = ", ".join(
        f"{_num_text(c.get('scale'), 'g')}: {_num_text(c.get('local_lds'), '.3f')}"
        for c in cal.get("curve") or []
        if isinstance(c, dict)
    )
    return (
        f"{_num_text(cal.get('scale'), 'g', none='?')} x mean eigenvalue per layer; local LDS by scale: "
        f"{curve or '-'}; cost {_num_text(cal.get('cost_fits'), '.1f', none='?')} fits, "
        f"{_num_text(cal.get('seconds'), '.0f', none='?')} s"
    )


def _settings_rows(settings: dict, meta: dict) -> list[tuple[str, str]]:
    damping = meta.get("damping") or {}
    vals = [float(v) for v in damping.values() if _is_real(v)] if isinstance(damping, dict) else []
    if meta.get("damping_arg") == "calibrate":
        damp = f"calibrated on this model (headwater calibrate): {calibration_text(_dict(meta.get('calibration')))}"
    elif meta.get("damping_arg") is not None:
        damp = f"{_num_text(meta['damping_arg'], 'g')} (absolute, every layer)"
    elif vals:
        damp = f"0.1 x mean eigenvalue per layer: {min(vals):.3g} .. {max(vals):.3g}"
    else:
        damp = "0.1 x mean eigenvalue per layer"
    layers = _str_list(meta.get("layers")) or _str_list(settings.get("layers"))
    rows = [
        ("Model", settings.get("model", "?")),
        ("Tokenizer", settings.get("tokenizer", "?")),
        (
            "Training data",
            f"{meta.get('data') or settings.get('data')} ({meta.get('n_train', settings.get('n_train'))}"
            f" sequences, fingerprint {meta.get('data_fingerprint', settings.get('data_fingerprint'))})",
        ),
        ("Fitted on", f"{settings.get('data')} (sha256 {settings.get('data_sha256')})"),
        ("Max length", settings.get("max_length")),
        ("Strategy", f"{settings.get('strategy')} (fisher: {settings.get('fisher')})"),
        ("Layers", _layers_text(layers, settings.get("layer_kinds"))),
        ("Tracked", _tracked_text(layers, settings.get("layer_kinds"), settings.get("coverage"))),
        ("Damping", damp),
        ("Query rank", meta.get("query_rank") or "full (exact)"),
        ("Top-k", meta.get("top_k")),
        ("Per-token scores", "saved for every sequence" if meta.get("per_token") else "for the shown sequences"),
        ("Queries file", meta.get("queries_file", "?")),
        (
            "headwater",
            f"{meta.get('headwater', settings.get('headwater'))}; fitted {settings.get('created')}, "
            f"scored {meta.get('created')}",
        ),
    ]
    return [(k, str(v)) for k, v in rows]


def render_report(
    results: list[dict],
    values: Any,
    settings: dict,
    meta: dict,
    analysis: dict | None = None,
    *,
    source: str = "results",
) -> str:
    """The whole report as one HTML string. ``values`` is the [Q, N] score matrix; ``analysis``
    is ``headwater.analysis.analyze`` of the same scores (shown when given).

    The rows are checked first (``check_results``, with ``source`` naming them in errors, e.g.
    the results.jsonl path), since a report built from a damaged or hostile file must fail,
    not run that file's markup in the reader's browser.
    """
    n_rows, n_train = _shape(values)
    results = check_results(results, n_train, source)
    if n_rows < len(results):
        raise ValueError(
            f"{source}: {len(results)} result rows but the score matrix has {n_rows}; rerun `headwater score`"
        )
    settings, meta = _dict(settings), _dict(meta)
    rows = [[float(x) for x in _tolist(values[q])] for q in range(len(results))]
    layers = _str_list(meta.get("layers")) or _str_list(settings.get("layers"))
    groups = LayerGroups(layers, settings.get("layer_kinds"))
    title = meta.get("title") or "headwater report"
    recalls = [float(r["recall"]) for r in results if r.get("recall") is not None]
    recall_line = ""
    if recalls:
        k = results[0].get("recall_k")
        k = meta.get("top_k") if k is None else k
        recall_line = (
            f"<p><b>recall@{_num(k, none='k')} = {sum(recalls) / len(recalls):.3f}</b> (mean over {len(recalls)} "
            "queries of the share of known relevant sequences in the top k)</p>"
        )
    settings_html = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in _settings_rows(settings, meta))
    q_rows = []
    for r in results:
        best = (r.get("top") or [{}])[0]
        text = best.get("text") or ""
        text = text if len(text) <= 90 else text[:87] + "..."
        rec = _num(r.get("recall"), ".2f")
        q_rows.append(
            f'<tr><td class="num"><a href="#q{_num(r["query"])}">{_num(r["query"] + 1)}</a></td><td>{_e(r["prompt"])}'
            f'<b>{_e(r["completion"])}</b></td><td class="num">{_fmt(best.get("score"))}</td>'
            f'<td>{_e(text)}</td><td class="num">{rec}</td></tr>'
        )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sparsity = _dict(_dict(analysis).get("sparsity")).get("per_query")
    sparsity = sparsity if isinstance(sparsity, list) else []
    per_query = [sparsity[i] if i < len(sparsity) else None for i in range(len(results))]
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">Influence of training sequences on {len(results)} queries &middot; generated {generated}. '
        "A positive score means upweighting that training sequence raises the log-probability of the "
        "query's completion.</p>",
        '<section id="summary"><h2>Summary</h2>',
        recall_line,
        f'<table class="settings">{settings_html}</table>',
        '<h3>Queries</h3><table class="queries"><thead><tr><th class="num">#</th><th>prompt + completion</th>'
        '<th class="num">top score</th><th>most influential training sequence</th><th class="num">recall</th>'
        f"</tr></thead><tbody>{''.join(q_rows)}</tbody></table>",
        analysis_summary(_dict(analysis), len(results)),
        "</section>",
        "".join(_query_section(r, rows[i], layers, per_query[i], groups) for i, r in enumerate(results)),
        "</main></body></html>",
    ]
    return "\n".join(body)


def _shape(values: Any) -> tuple[int, int | None]:
    """(Q, N) of the score matrix, whether a tensor, an array or nested lists."""
    shape = getattr(values, "shape", None)
    if shape is not None:
        if len(shape) != 2:
            raise ValueError(f"values must be a [queries, training sequences] score matrix, got shape {tuple(shape)}")
        return int(shape[0]), int(shape[1])
    n_rows = len(values)
    return n_rows, (len(values[0]) if n_rows else None)


def _tolist(row: Any) -> list:
    return row.tolist() if hasattr(row, "tolist") else list(row)


# ---------------------------------------------------------------------------------------
# Schema of results.jsonl
# ---------------------------------------------------------------------------------------


_FIX = "rerun `headwater score`"
_MISSING = object()


def check_results(results: list, n_train: int | None = None, source: str = "results") -> list[dict]:
    """The rows of results.jsonl, checked field by field before any of them reaches the report.

    The file is plain JSON that anyone holding the run directory can edit: unchecked, a string
    where the report expects a number would be written into the HTML and run in the reader's
    browser. Raises ValueError with ``source``, the line (row i is line i + 1), the field path and
    the value. ``n_train`` bounds the training indices when given. Unknown fields are allowed
    (queries carry their own through); the report escapes whatever it shows.
    """
    if n_train is not None and (not _is_int(n_train) or n_train < 0):
        raise ValueError(f"n_train must be a non-negative integer or None, got {n_train!r}")
    if not isinstance(results, list):
        raise ValueError(
            f"{source}: must be a list of result rows (one JSON object per line), got {type(results).__name__}; {_FIX}"
        )
    for i, row in enumerate(results):
        problem = next(_row_problems(row, n_train), None)
        if problem is not None:
            raise ValueError(f"{source}, line {i + 1}: {problem}; {_FIX}")
    return results


def _got(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _bad(path: str, want: str, v: Any) -> str:
    if v is _MISSING:
        return f"{path} is missing (must be {want})"
    return f"{path} must be {want}, got {_got(v)}"


def _in_range(v: Any, n: int | None) -> bool:
    return _is_int(v) and v >= 0 and (n is None or v < n)


def _row_problems(row: Any, n_train: int | None) -> Iterator[str]:
    """What is wrong with one row, first problem first (the caller reports only the first)."""
    if not isinstance(row, dict):
        yield f"must be a JSON object (one query's result), got {_got(row)}"
        return
    index = f"an integer in [0, {n_train})" if n_train is not None else "a non-negative integer"
    q = row.get("query", _MISSING)
    if not _is_int(q) or q < 0:
        yield _bad("query", "a non-negative integer", q)
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key, _MISSING), str):
            yield _bad(key, "a string", row.get(key, _MISSING))
    rel = row.get("relevant")
    if rel is not None and not isinstance(rel, list):
        yield _bad("relevant", f"a list of training indices, each {index}", rel)
    for j, i in enumerate(rel if isinstance(rel, list) else []):
        if not _in_range(i, n_train):
            yield _bad(f"relevant[{j}]", index, i)
    if row.get("recall") is not None and not _is_real(row["recall"]):
        yield _bad("recall", "a finite number or null", row["recall"])
    if row.get("recall_k") is not None and not _in_range(row["recall_k"], None):
        yield _bad("recall_k", "a non-negative integer", row["recall_k"])
    for side in ("top", "bottom"):
        entries = row.get(side)
        if entries is not None and not isinstance(entries, list):
            yield _bad(side, "a list of training sequences", entries)
        for j, entry in enumerate(entries if isinstance(entries, list) else []):
            yield from _entry_problems(f"{side}[{j}]", entry, n_train, index)
    for key in ("per_layer_top", "per_layer_bottom"):
        yield from _layer_problems(key, row.get(key))
    stats = row.get("stats")
    if stats is not None and not isinstance(stats, dict):
        yield _bad("stats", "an object (n, positive, mean, std, max, min)", stats)
    stats = stats if isinstance(stats, dict) else {}
    for key in ("n", "positive"):
        if stats.get(key) is not None and not _in_range(stats[key], None):
            yield _bad(f"stats.{key}", "a non-negative integer", stats[key])
    for key in ("mean", "std", "max", "min"):
        if stats.get(key) is not None and not _is_real(stats[key]):
            yield _bad(f"stats.{key}", "a finite number", stats[key])
    n, pos = stats.get("n"), stats.get("positive")
    if _is_int(n) and _is_int(pos) and pos > n:
        yield f"stats.positive must be at most stats.n ({n}), got {pos}"


def _entry_problems(path: str, e: Any, n_train: int | None, index: str) -> Iterator[str]:
    """One shown training sequence: ``{index, score, text?, tokens?, token_scores?, per_layer?}``."""
    if not isinstance(e, dict):
        yield _bad(path, "an object with index and score", e)
        return
    if not _in_range(e.get("index", _MISSING), n_train):
        yield _bad(f"{path}.index", index, e.get("index", _MISSING))
    if not _is_real(e.get("score", _MISSING)):
        yield _bad(f"{path}.score", "a finite number", e.get("score", _MISSING))
    if e.get("text") is not None and not isinstance(e["text"], str):
        yield _bad(f"{path}.text", "a string", e["text"])
    tokens, scores = e.get("tokens"), e.get("token_scores")
    for key, value, want, ok in (
        ("tokens", tokens, "a string", lambda x: isinstance(x, str)),
        ("token_scores", scores, "a finite number", _is_real),
    ):
        if value is not None and not isinstance(value, list):
            yield _bad(f"{path}.{key}", f"a list (each {want})", value)
        for j, x in enumerate(value if isinstance(value, list) else []):
            if not ok(x):
                yield _bad(f"{path}.{key}[{j}]", want, x)
    n_tok = len(tokens) if isinstance(tokens, list) else 0
    n_sc = len(scores) if isinstance(scores, list) else 0
    if n_tok != n_sc:
        yield f"{path}.tokens and {path}.token_scores must have the same length, got {n_tok} and {n_sc}"
    yield from _layer_problems(f"{path}.per_layer", e.get("per_layer"))


def _layer_problems(path: str, d: Any) -> Iterator[str]:
    if d is None:
        return
    if not isinstance(d, dict):
        yield _bad(path, "an object of {layer name: number}", d)
        return
    for name, v in d.items():
        if not isinstance(name, str):
            yield _bad(f"{path} key", "a layer name (string)", name)
        elif not _is_real(v):
            yield _bad(f"{path}[{name!r}]", "a finite number", v)
