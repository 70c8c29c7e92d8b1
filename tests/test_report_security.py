"""The report against a tampered results.jsonl, cli.json or scores metadata.

Markup in any string field must show as text, and a payload in a numeric field must be refused
by ``check_results`` with the line and field path. The browser test loads a report built from
payloads in every field in headless Debian Chromium (skipped, with the reason, when it or
playwright is missing) and checks that nothing ran.
"""

from __future__ import annotations

import copy
import itertools
import re
import shutil
from pathlib import Path

import pytest
import torch

from headwater.report import check_results, heatmap, layer_chart, render_report
from test_report import CHROMIUM, CHROMIUM_ARGS, _browser, _synthetic, parse

PAYLOADS = [
    '<img src=x onerror="window.__pwned=1">',
    '"><script>window.__pwned=1</script>',
    "'><svg onload=window.__pwned=1>",
    "javascript:window.__pwned=1",
    '<a href="javascript:window.__pwned=1">click</a>',
    "</style><script>window.__pwned=1</script>",
    "</title><script>window.__pwned=1</script>",
    "--><script>window.__pwned=1</script><!--",
    '<iframe srcdoc="<script>parent.__pwned=1</script>"></iframe>',
    "<style>body{background:url(javascript:window.__pwned=1)}</style>",
    '" style="background:url(x)" onmouseover="window.__pwned=1',
]


def _tampered() -> tuple[list[dict], torch.Tensor, dict, dict, dict]:
    """Rows, scores, settings, meta and analysis with a payload in every string field."""
    pay = itertools.cycle(PAYLOADS)
    results, values = _synthetic(3, n_train=12, k=2)
    layers = [next(pay), next(pay)]  # layer names reach dict keys, chart labels and titles
    for r in results:
        r["prompt"], r["completion"] = next(pay), next(pay)
        r["id"], r["note"] = next(pay), {next(pay): [next(pay)]}  # extra query fields pass through
        for e in r["top"] + r["bottom"]:
            e["text"], e["tokens"], e["source"] = next(pay), [next(pay), next(pay)], next(pay)
            e["per_layer"] = {layers[0]: e["score"] / 2, layers[1]: e["score"] / 2}
        for side in ("top", "bottom"):
            r[f"per_layer_{side}"] = {n: sum(e["per_layer"][n] for e in r[side]) for n in layers}
    del results[0]["recall_k"]  # the summary's recall@k then falls back to meta's top_k
    keys = [
        "model",
        "tokenizer",
        "data",
        "data_sha256",
        "strategy",
        "fisher",
        "max_length",
        "created",
        "headwater",
        "data_fingerprint",
        "n_train",
    ]
    settings = {k: next(pay) for k in keys} | {"layers": layers, next(pay): next(pay)}
    meta = {k: next(pay) for k in keys + ["title", "queries_file", "query_rank", "top_k", "damping_arg"]}
    meta |= {"layers": layers, "damping": {layers[0]: next(pay), layers[1]: 0.5}, "per_token": next(pay)}
    fit = {
        "alpha": next(pay),
        "xmin": next(pay),
        "ks": next(pay),
        "n_tail": next(pay),
        "n_positive": 3,
        "tail": [[next(pay), 0.5], [1.0, next(pay)], [2.0, 0.25]],
    }
    analysis = {
        "sparsity": {
            "median_alpha": next(pay),
            "mean_top1pct_share": next(pay),
            "per_query": [{"power_law": fit, "top1pct_share": next(pay)}] * 3,
        },
        "layers": {"mean": [next(pay), 0.5, 2.0], "definition": next(pay)},
        "tokens": {"n_flagged": next(pay), "n_examined": next(pay)},
        "cross_query": {
            "k": next(pay),
            "mean_jaccard": next(pay),
            "shared": [{"index": next(pay), "queries": 3}, {"index": 1, "queries": next(pay)}],
        },
    }
    return results, values, settings, meta, analysis


def test_string_payloads_show_as_text() -> None:
    results, values, settings, meta, analysis = _tampered()
    html = render_report(results, values, settings, meta, analysis, source="results.jsonl")
    p = parse(html)  # every tag closes in order: no payload broke out of an element or attribute
    assert not {t for t, _ in p.tags} & {"script", "img", "iframe", "object", "embed"}
    assert sum(1 for t, _ in p.tags if t == "style") == 1, "only the report's own stylesheet"
    for tag, attrs in p.tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)
        assert attrs.get("href") is None or re.fullmatch(r"#[a-z0-9]+", attrs["href"]), attrs
        style = attrs.get("style")
        assert style is None or re.fullmatch(r"background:#[0-9a-f]{6};color:(#fff|inherit)", style), style
        for k in ("data-v", "x", "y", "width", "height", "offset"):
            assert attrs.get(k) is None or re.fullmatch(r"[-+0-9.e]+|-", attrs[k]), (tag, k, attrs[k])
    text = "".join(p.text)
    for payload in PAYLOADS:
        assert payload in text, f"{payload!r} was dropped, not shown as text"
        assert not re.search("[<>\"']", payload) or payload not in html, f"{payload!r} reached the HTML unescaped"


def test_chart_and_heatmap_pieces_refuse_non_numbers() -> None:
    """The pieces are public: a string where a number belongs shows as text, never as markup or a colour."""
    bad = PAYLOADS[0]
    out = heatmap(["a", bad], [bad, 1.0], vmax=1.0)
    assert "<img" not in out and "background:#ffffff" in out  # a non-number is uncoloured
    chart = layer_chart([bad, "b"], {bad: bad, "b": 1.0}, {"b": -1.0}, k=2)  # type: ignore[dict-item]
    assert "<img" not in chart and "&lt;img" in chart
    parse(out)
    parse(chart)


# ---------------------------------------------------------------------------------------
# Schema of results.jsonl
# ---------------------------------------------------------------------------------------


L0, L1 = "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"  # _synthetic's layers
BAD = [  # (row, key path, value, line in the message, field path in the message)
    (1, ("stats", "positive"), "<script>window.__pwned=1</script>", 2, "stats.positive"),
    (0, ("top", 0, "index"), '<img src=x onerror="window.__pwned=1">', 1, "top[0].index"),
    (2, ("recall_k",), "<b>", 3, "recall_k"),
    (0, ("top", 1, "score"), "1e3<script>", 1, "top[1].score"),
    (0, ("bottom", 0, "token_scores", 1), "<b>", 1, "bottom[0].token_scores[1]"),
    (1, ("top", 0, "tokens", 0), 7, 2, "top[0].tokens[0]"),
    (1, ("top", 0, "text"), ["<b>"], 2, "top[0].text"),
    (1, ("per_layer_top", L0), "<svg>", 2, f"per_layer_top[{L0!r}]"),
    (0, ("bottom", 1, "per_layer", L1), float("nan"), 1, f"bottom[1].per_layer[{L1!r}]"),
    (0, ("relevant",), ["<b>"], 1, "relevant[0]"),
    (0, ("relevant",), [40], 1, "relevant[0]"),
    (0, ("relevant",), "0", 1, "relevant"),
    (2, ("query",), "<b>", 3, "query"),
    (2, ("query",), True, 3, "query"),
    (0, ("top", 0, "index"), True, 1, "top[0].index"),
    (0, ("top", 0, "index"), 40, 1, "top[0].index"),
    (0, ("top", 0, "index"), -1, 1, "top[0].index"),
    (1, ("recall",), float("inf"), 2, "recall"),
    (1, ("prompt",), 5, 2, "prompt"),
    (1, ("stats", "n"), 1.5, 2, "stats.n"),
    (1, ("stats", "positive"), 41, 2, "stats.positive"),
    (0, ("top", 0, "tokens"), ["a"], 1, "top[0].tokens"),
    (0, ("top",), {"<b>": 1}, 1, "top"),
    (0, ("top", 1), "<b>", 1, "top[1]"),
    (0, ("stats",), "<b>", 1, "stats"),
    (0, ("per_layer_bottom",), ["<b>"], 1, "per_layer_bottom"),
]


@pytest.mark.parametrize(("row", "keys", "value", "line", "field"), BAD, ids=[f"{b[4]}={b[2]!r}" for b in BAD])
def test_check_results_refuses_payloads_in_typed_fields(
    row: int, keys: tuple, value: object, line: int, field: str
) -> None:
    results, values = _synthetic(3, n_train=40, k=2)
    obj = results[row]
    for key in keys[:-1]:
        obj = obj[key]
    obj[keys[-1]] = value
    with pytest.raises(ValueError) as err:
        check_results(results, n_train=40, source="results.jsonl")
    msg = str(err.value)
    assert msg.startswith(f"results.jsonl, line {line}: {field}"), msg
    assert "\n" not in msg and msg.endswith("rerun `headwater score`"), msg
    with pytest.raises(ValueError, match=f"^runs/a/results.jsonl, line {line}: "):  # render_report checks first
        render_report(results, values, {}, {}, source="runs/a/results.jsonl")


def test_check_results_accepts_score_rows_and_extra_fields() -> None:
    results, _ = _synthetic(2, n_train=40)
    results[0] |= {"id": "<b>x</b>", "meta": {"nested": [1, None]}, "recall": None}
    results[1]["top"][0]["source"] = "wiki"
    del results[1]["stats"], results[1]["bottom"][0]["tokens"], results[1]["bottom"][0]["token_scores"]
    assert check_results(copy.deepcopy(results), n_train=40) == results
    assert check_results(results) == results  # without n_train, indices need only be non-negative
    with pytest.raises(ValueError, match=r"^results: must be a list"):
        check_results({"query": 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^results, line 2: must be a JSON object"):
        check_results([results[0], "<b>"])
    with pytest.raises(ValueError, match=r"^results, line 1: completion is missing"):
        check_results([{"query": 0, "prompt": "p"}])


# ---------------------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------------------


def test_payloads_do_not_run_in_headless_chromium(tmp_path: Path) -> None:
    sync_playwright = _browser()
    results, values, settings, meta, analysis = _tampered()
    report = tmp_path / "report.html"
    report.write_text(render_report(results, values, settings, meta, analysis), encoding="utf-8")
    url = report.resolve().as_uri()
    requests, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"), args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="load")
            for box in page.locator(".tok, section.query a").all()[:40]:  # hover handlers would fire here
                box.hover(force=True, timeout=2000)
            page.wait_for_timeout(300)
            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert page.evaluate("document.querySelectorAll('script, iframe, img, object, embed').length") == 0
            handlers = page.evaluate(
                "[...document.querySelectorAll('*')].flatMap(el => [...el.attributes]"
                ".filter(a => a.name.startsWith('on')).map(a => el.tagName + ' ' + a.name))"
            )
            assert handlers == []
            hrefs = page.evaluate("[...document.querySelectorAll('[href]')].map(el => el.getAttribute('href'))")
            assert hrefs and all(h.startswith("#") for h in hrefs), hrefs
            assert page.evaluate("document.styleSheets.length") == 1
            shown = page.inner_text("body")
            assert PAYLOADS[0] in shown and PAYLOADS[1] in shown, "markup shows as text"
        finally:
            browser.close()
    assert errors == [], errors
    assert set(requests) == {url}, requests
