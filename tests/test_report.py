"""The report writer and its figures, on synthetic arrays (no models)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tangentlens.errors import InputError
from tangentlens.report import format_value, gallery, scatter, text_table, write_report

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
