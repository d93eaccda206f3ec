"""The HTML report opened in a real headless Chromium with no network (issue 15).

A reader sees a non-blank page, every image loaded, no console error, and nothing fetched from a
network. Chromium is driven over the DevTools pipe by ``tests/browser.py`` (no driver, nothing
downloaded). Without a ``chromium`` on PATH (or ``$TANGENTLENS_CHROMIUM``) the browser tests skip, or
fail when ``$TANGENTLENS_REQUIRE_BROWSER`` is set, as ``.ci/run`` does after installing Debian's
``chromium``. Point :func:`check_page` and :func:`page_problems` at any report file to check it the
same way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from .browser import check_page, find_chromium, page_problems, screenshot_stats


@pytest.fixture
def chromium() -> str:
    """The browser's executable; skips (or fails, under $TANGENTLENS_REQUIRE_BROWSER) without one."""
    path = find_chromium()
    if path is None:
        reason = ("no headless browser: install Debian's `chromium` (apt-get install chromium) or set "
                  "TANGENTLENS_CHROMIUM to a Chromium/Chrome executable")
        if os.environ.get("TANGENTLENS_REQUIRE_BROWSER"):
            pytest.fail(reason + " (TANGENTLENS_REQUIRE_BROWSER is set: this run must check the report)")
        pytest.skip(reason)
    return path


def _keep(tmp_path, check, name: str):
    """Write the screenshot next to the report (and into $TANGENTLENS_SCREENSHOTS if set) for a look."""
    path = tmp_path / name
    path.write_bytes(check.screenshot)
    folder = os.environ.get("TANGENTLENS_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(check.screenshot)
    return path


def test_demo_report_renders_offline(tmp_path, chromium) -> None:
    from tangentlens.demo import KERNELS, SURROGATES, DemoConfig, run_demo

    # a small real demo run: two kernels, both figures, a narrow gallery (top_k=2) of two rows
    kernels = [k for k in KERNELS if k.name in ("trNTK", "CK")]
    cfg = DemoConfig(out=tmp_path / "report", seed=2, n_train=80, n_test=30, epochs=3, gallery_rows=2,
                     top_k=2, progress=False)
    res = run_demo(cfg, kernels=kernels, surrogates=SURROGATES, stdout=io.StringIO())

    check = check_page(res.index, executable=chromium)
    shot = _keep(tmp_path, check, "demo-report.png")
    assert page_problems(check, min_images=len(res.images)) == [], f"screenshot: {shot}"
    assert check.title.startswith("tangentlens demo")
    # the figures are embedded, so the page fetched only itself and its data: URIs
    assert [u for u in check.requests if u.startswith("file:")] == [res.index.resolve().as_uri()]
    assert all(i["src"].startswith("data:image/png;base64,") for i in check.images)
    # the images are shown at their natural size, not squeezed to nothing
    assert all(i["naturalWidth"] >= 300 and i["naturalHeight"] >= 200 for i in check.images)
    width, height = check.size
    assert width <= 1280 and height > 1500  # no horizontal overflow; tables, figures, configuration


def test_the_check_catches_a_broken_page(tmp_path, chromium) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>broken</title></head><body>"
        "<h1>A page with every fault the report check looks for</h1>"
        "<img alt='corrupt' src='data:image/png;base64,AAAA'>"
        "<img alt='remote' src='https://example.invalid/figure.png'>"
        "<img alt='missing' src='missing.png'>"
        "<script>console.error('boom'); null.x;</script>"
        "</body></html>",
        encoding="utf-8",
    )
    check = check_page(page, executable=chromium)
    problems = page_problems(check, min_images=4)
    text = "\n".join(problems)
    assert len(check.broken_images) == 3, check.images
    assert "3 images, expected at least 4" in text
    assert any("boom" in e for e in check.console_errors)
    assert any(e.startswith("exception: TypeError") for e in check.console_errors)
    assert check.network_requests == ["https://example.invalid/figure.png"]
    assert any("example.invalid" in r for r in check.remote_refs)
    assert "needs the network" in text and "image did not load" in text


def test_blank_screenshots_are_caught() -> None:
    from PIL import Image

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    white = np.full((200, 300), 255)
    assert screenshot_stats(png(white))["std"] == 0.0
    text = white.copy()
    text[20:180:8, 20:280] = 0  # lines of "ink"
    stats = screenshot_stats(png(text))
    assert stats["std"] > 8 and stats["ink"] > 0.01
