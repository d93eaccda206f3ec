"""The report writer and its figures, on synthetic arrays (no models)."""

from __future__ import annotations

import json
import math
from html import escape
from types import SimpleNamespace

import numpy as np
import pytest

from tangentlens.errors import InputError
from tangentlens.report import format_value, gallery, gallery_points, scatter, text_table, write_report

ROWS = [
    {"kernel": "trNTK", "target": "labels", "tau": 0.81234, "TAD (pp)": -0.5, "p": 1.2e-17, "n": 600},
    {"kernel": "CK", "target": "distilled", "tau": 0.5, "TAD (pp)": 0.0, "p": float("nan"), "n": 600},
]


def _png_ok(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_value() -> None:
    assert format_value(None) == "–"
    assert format_value(float("nan")) == "–"
    assert format_value(3) == "3"
    assert format_value(np.int64(7)) == "7"
    assert format_value(True) == "yes"
    assert format_value(0.81234) == "0.8123"
    assert format_value(np.float32(0.5)) == "0.5"
    assert format_value(1.2e-17) == "1.20e-17"
    assert format_value(0.0) == "0"
    assert format_value(123456.7) == "123457"
    assert format_value(float("inf")) == "inf"
    assert format_value("x") == "x"


def test_text_table_layout() -> None:
    text = text_table(ROWS)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["kernel", "target", "tau", "TAD", "(pp)", "p", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "0.8123" in lines[2] and "1.20e-17" in lines[2]
    assert "–" in lines[3]
    assert text_table([]) == ""


def test_scatter_and_gallery_write_pngs(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random(50)
    y = np.clip(x + 0.1 * rng.standard_normal(50), 0, 1)
    p1 = scatter(tmp_path / "sub" / "s.png", x, y, correct=x > 0.2, annotation="tau = 0.9",
                 title="t")
    p2 = scatter(tmp_path / "s2.png", x, y, series=[("a", x, y), ("b", x, 1 - y)])
    assert _png_ok(p1) and _png_ok(p2)

    imgs = rng.random((3, 8, 8))
    props = rng.random((3, 2, 1, 8, 8))  # a channel axis of 1 is accepted
    opps = rng.random((3, 2, 8, 8))
    opps[1, 1] = np.nan  # an empty (padded) cell
    ov = -rng.random((3, 2))
    ov[1, 1] = np.nan
    p3 = gallery(
        tmp_path / "g.png", imgs, props, rng.random((3, 2)), opps, ov,
        query_titles=["q0", "q1", "q2"],
        proponent_titles=[["a", "b"]] * 3,
        opponent_titles=[["c", "d"]] * 3,
        title="gallery",
    )
    assert _png_ok(p3)


def test_plots_reject_bad_shapes(tmp_path) -> None:
    with pytest.raises(InputError):
        scatter(tmp_path / "s.png", [0.1, 0.2], [0.1])
    with pytest.raises(InputError):
        scatter(tmp_path / "s.png", [], [])
    with pytest.raises(InputError):
        scatter(tmp_path / "s.png", [0.1, 0.2], [0.1, 0.3], correct=[True])
    imgs = np.zeros((2, 8, 8))
    with pytest.raises(InputError, match="rows disagree"):
        gallery(tmp_path / "g.png", imgs, np.zeros((3, 1, 8, 8)), np.zeros((3, 1)),
                np.zeros((2, 1, 8, 8)), np.zeros((2, 1)))
    with pytest.raises(InputError, match="score shapes"):
        gallery(tmp_path / "g.png", imgs, np.zeros((2, 1, 8, 8)), np.zeros((2, 2)),
                np.zeros((2, 1, 8, 8)), np.zeros((2, 1)))
    with pytest.raises(InputError, match="axes"):
        gallery(tmp_path / "g.png", np.zeros((2, 8)), np.zeros((2, 1, 8, 8)), np.zeros((2, 1)),
                np.zeros((2, 1, 8, 8)), np.zeros((2, 1)))


def test_write_report_is_self_contained(tmp_path) -> None:
    png = scatter(tmp_path / "scatter.png", [0.1, 0.9], [0.2, 0.8])
    meta = {"seed": 3, "timings (s)": {"total": 1.25}, "tangentlens": "0.1.0", "path": tmp_path}
    index = write_report(tmp_path / "rep", ROWS, [(png, "a <scatter> plot")], meta,
                         title="T & co", intro="hello", notes=["note one"])
    assert index == tmp_path / "rep" / "index.html"
    html = index.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    # the table: header cells and values
    for cell in ("<th>kernel</th>", "<th>tau</th>", "<td>0.8123</td>", "<td>1.20e-17</td>",
                 '<td class="text">trNTK</td>', '<td class="text">distilled</td>'):
        assert cell in html
    assert html.count("<tr>") == 1 + len(ROWS)
    # escaped text, embedded image, meta
    assert "T &amp; co" in html and "a &lt;scatter&gt; plot" in html
    assert "data:image/png;base64," in html and 'src="scatter.png"' not in html
    assert "<dt>seed</dt><dd>3</dd>" in html and "1.25" in html and "note one" in html
    payload = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert payload["rows"][0]["tau"] == pytest.approx(0.81234)
    assert payload["rows"][1]["p"] is None  # NaN -> null, valid JSON
    assert payload["meta"]["timings (s)"]["total"] == 1.25
    assert payload["images"] == ["scatter.png"]
    # a mapping of images works too, and no rows gives a placeholder
    index2 = write_report(tmp_path / "rep2", [], {"cap": png}, {})
    assert "(no rows)" in index2.read_text()


def test_write_report_missing_image(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        write_report(tmp_path, ROWS, [(tmp_path / "nope.png", "x")], {})


def test_format_handles_extremes() -> None:
    assert format_value(-0.00001) == "-1.00e-05"
    assert format_value(-math.inf) == "-inf"


# ------------------------------------------------------------------ verdict, column legends, extras


def test_write_report_verdict_legends_tables_and_extra(tmp_path) -> None:
    columns = {"kernel": "the kernel", "target": "what it was fitted to", "tau": "Kendall <tau>",
               "TAD (pp)": "accuracy differential, percentage points", "p": "p-value", "n": "points"}
    expl_rows = [{"test digit": 3, "agree": False, "top-k + (%)": 12.5}]
    expl_cols = {"test digit": "row", "agree": "same class?", "top-k + (%)": "share, percent"}
    index = write_report(
        tmp_path, ROWS, [], {}, verdict="trNTK wins: tau = 0.81 & more",
        columns=columns, tables=[("Explanations", expl_rows, expl_cols)],
        extra={"explanations": {"points": [{"coverage": np.float64(0.25), "agrees": np.bool_(True),
                                            "idx": np.arange(3), "nan": float("nan")}]}},
    )
    html = index.read_text(encoding="utf-8")
    assert '<p class="verdict">trNTK wins: tau = 0.81 &amp; more</p>' in html
    assert html.index("verdict") < html.index("<h2>Faithfulness</h2>")
    # every column of both tables is labelled: a tooltip on its header and a legend entry
    for cols in (columns, expl_cols):
        for name, text in cols.items():
            assert f'<th title="{escape(text)}">{escape(name)}</th>' in html
            assert f"<dt>{escape(name)}</dt><dd>{escape(text)}</dd>" in html
    assert "<h2>Explanations</h2>" in html and html.count('<table class="results">') == 2
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["verdict"].startswith("trNTK wins")
    assert payload["columns"] == columns
    assert payload["tables"]["Explanations"] == expl_rows
    point = payload["explanations"]["points"][0]
    assert point == {"coverage": 0.25, "agrees": True, "idx": [0, 1, 2], "nan": None}
    with pytest.raises(InputError, match="rows"):
        write_report(tmp_path, ROWS, [], {}, extra={"rows": []})


def test_gallery_query_colors(tmp_path) -> None:
    imgs = np.zeros((2, 8, 8))
    cells = np.zeros((2, 1, 8, 8))
    p = gallery(tmp_path / "g.png", imgs, cells, np.ones((2, 1)), cells, -np.ones((2, 1)),
                query_titles=["net 1 / sur 8 ✗ disagree", "net 3 / sur 3 ✓"],
                query_colors=["tab:red", "black"])
    assert _png_ok(p)
    with pytest.raises(InputError, match="query_colors"):
        gallery(tmp_path / "g.png", imgs, cells, np.ones((2, 1)), cells, -np.ones((2, 1)),
                query_colors=["red"])


# ------------------------------------------------------------------ the demo's report


class _FakeExplanation:
    """What the verdict reads of an explanation: k, the points' coverages, the disagreements, the size."""

    def __init__(self, coverages, disagreements, n):
        self.k, self.disagreements, self.n = 3, disagreements, n
        self.points = [SimpleNamespace(coverage_pos=c, coverage_neg=c / 2) for c in coverages]

    def __iter__(self):
        return iter(self.points)

    def __len__(self) -> int:
        return self.n


def test_verdict_in_words() -> None:
    from tangentlens.demo import SURROGATES, verdict_in_words

    rows = [
        {"kernel": "trNTK", "target": "labels", "tau": 0.70, "TAD (pp)": -0.5},
        {"kernel": "trNTK", "target": "distilled", "tau": 0.95, "TAD (pp)": 0.0},
        {"kernel": "CK", "target": "labels", "tau": 0.40, "TAD (pp)": 1.0},
    ]
    expl = _FakeExplanation((0.1, 0.2, 0.3), [7], 100)
    text = verdict_in_words(rows, SURROGATES, 1e-4, expl, [2, 7])
    assert text.startswith("The trNTK kGLM distilled from the network's softmax probabilities")
    assert "tracks the network most closely: Kendall τ = 0.95" in text
    assert "the same way 97.5% of the time" in text
    assert "exactly as accurate" in text
    assert "most faithful is the trNTK kGLM (labels), τ = 0.70 (85.0% of pairs)" in text
    assert "least faithful is CK / labels (τ = 0.40)" in text
    assert "median 20% of the positive contributions" in text and "10% of the negative" in text
    assert "different classes on 1 of 100 test digits; the gallery shows 1 of them (test digit 7" in text
    # a surrogate on the true labels wins: no "among surrogates fitted only on the true labels" sentence
    rows[0]["tau"] = 0.99
    text = verdict_in_words(rows, SURROGATES, 1e-4, _FakeExplanation((0.1,), [], 50), [2])
    assert text.startswith("The trNTK kGLM fitted on the true labels (L2 alpha = 0.0001)")
    assert "Among surrogates" not in text and text.endswith("on 0 of 50 test digits.")


def _small_demo(tmp_path, **overrides):
    import io

    from tangentlens.demo import KERNELS, SURROGATES, DemoConfig, run_demo

    kernels = [k for k in KERNELS if k.name in ("trNTK", "CK")]
    cfg = dict(n_train=150, n_test=60, epochs=4, gallery_rows=3, top_k=2, progress=False)
    cfg.update(overrides)
    out = io.StringIO()
    res = run_demo(DemoConfig(out=tmp_path / "r", seed=2, **cfg), kernels=kernels,
                   surrogates=SURROGATES, stdout=out)
    return res, out.getvalue()


@pytest.mark.slow
def test_demo_report_verdict_labels_and_explanations(tmp_path) -> None:
    from tangentlens.demo import EXPLANATION_COLUMNS, FAITHFULNESS_COLUMNS

    res, text = _small_demo(tmp_path)
    best = max(res.rows, key=lambda r: r["tau"])
    assert "verdict: " in text and res.verdict in text
    assert f"Kendall τ = {best['tau']:.2f}" in res.verdict
    assert f"{50 * (1 + best['tau']):.1f}% of the time" in res.verdict
    html = res.index.read_text(encoding="utf-8")
    assert '<p class="verdict">' in html
    # every column of both tables has a description
    assert set(res.rows[0]) <= set(FAITHFULNESS_COLUMNS)
    for name in [*res.rows[0], *EXPLANATION_COLUMNS]:
        assert f"<dt>{escape(name)}</dt>" in html
    payload = json.loads((res.index.parent / "results.json").read_text())
    assert payload["most_faithful"] == {"kernel": best["kernel"], "target": best["target"],
                                        "tau": pytest.approx(best["tau"])}
    assert len(payload["faithfulness"]) == len(res.rows)
    assert all("gamma_reason" in f and "n_saturated" in f for f in payload["faithfulness"])
    ex = payload["explanations"]
    assert ex["surrogate"] == {"kernel": best["kernel"], "target": best["target"]}
    assert ex["target"] == "network" and ex["k"] == 2 and len(ex["points"]) == 60
    for p in ex["points"]:
        assert p["target_source"] == "network" and p["target_label"] == p["network_label"]
        assert p["agrees"] == (p["network_label"] == p["predicted_label"])
        assert p["true_label"] in range(10) and p["classes"] == []
        t = p["target"]
        assert 0 <= t["coverage_pos"] <= 1 and 0 <= t["coverage_neg"] <= 1
        assert 1 <= len(t["proponents"]) <= 2 and {"index", "label", "contribution", "kernel"} <= set(
            t["proponents"][0])
        assert t["positive_total"] + t["negative_total"] == pytest.approx(
            t["logit"] - t["intercept"], abs=1e-9)
    assert ex["disagreements"] == [p["test_index"] for p in ex["points"] if not p["agrees"]]
    assert len(ex["gallery"]) == 3
    # the explanation the demo returns is the network's class by the most faithful surrogate
    assert res.explanation[0].target_source == "network"
    table = payload["tables"]
    (rows,) = table.values()
    assert [r["test digit"] for r in rows] == ex["gallery"]


def test_gallery_shows_colour_images_in_colour(tmp_path) -> None:
    rng = np.random.default_rng(0)
    red = np.zeros((2, 8, 8, 3))
    red[..., 0] = 2.0  # standardized inputs: scaled to [0, 1] per image for display
    red[..., 1:] = -1.0
    cells = rng.standard_normal((2, 2, 3, 8, 8))  # channel-first colour cells
    p = gallery(tmp_path / "rgb.png", red, cells, np.ones((2, 2)), cells, -np.ones((2, 2)))
    import matplotlib.image as mpimg

    png = mpimg.imread(str(p))[..., :3]
    saturated = (png[..., 0] > 0.9) & (png[..., 1] < 0.1) & (png[..., 2] < 0.1)
    assert saturated.sum() > 100  # the red queries are drawn red, not as grey luminance
    with pytest.raises(InputError, match="all grey or all colour"):
        gallery(tmp_path / "g.png", red, np.zeros((2, 1, 8, 8)), np.ones((2, 1)), np.zeros((2, 1, 8, 8)),
                np.ones((2, 1)))
    assert gallery_points(np.array([0, 1, 2, 3]), np.array([1, 1, 2, 3]), 3) == [0, 1, 2]
