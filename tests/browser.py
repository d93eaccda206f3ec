"""Open an HTML file in a real headless Chromium, offline, and report what a reader would see.

A small Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (no driver, no extra Python
package, nothing downloaded): Chromium reads commands on its fd 3 and writes replies and events on its
fd 4, each message one JSON object ended by a NUL byte. :func:`check_page` starts the browser with
networking cut three ways (a proxy that points at a closed local port, a host resolver that resolves
nothing, and the DevTools offline emulation), loads the file, waits for its images, and returns the
screenshot, the state of every ``<img>``, the console errors and every URL the page tried to fetch.
Point it at any report: the demo's, ``write_report``'s, or a later ``tangentlens report``'s.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BrowserError", "PageCheck", "check_page", "find_chromium", "page_problems", "screenshot_stats"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Everything that could reach a network, switched off; what remains must work from the file alone.
_FLAGS = (
    "--headless",
    "--remote-debugging-pipe",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-domain-reliability",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--metrics-recording-only",
    "--password-store=basic",
    "--use-mock-keychain",
    "--hide-scrollbars",
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)

# Run in the page after load: every image's state and every attribute or stylesheet URL that leaves
# the file (http:, https:, protocol-relative //host).
_PROBE_JS = r"""
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const remote = /^\s*(https?:)?\/\//i;
  const refs = [];
  for (const el of document.querySelectorAll('[src],[href],[srcset],[poster],[data]')) {
    for (const a of ['src', 'href', 'srcset', 'poster', 'data']) {
      const v = el.getAttribute(a);
      if (v && remote.test(v)) refs.push(el.tagName.toLowerCase() + '@' + a + '=' + v);
    }
  }
  for (const el of document.querySelectorAll('[style]')) {
    const style = el.getAttribute('style');
    if (/url\(\s*['"]?(https?:)?\/\//i.test(style)) refs.push('style=' + style);
  }
  for (const s of document.querySelectorAll('style')) {
    if (/(url\(|@import)\s*['"]?(https?:)?\/\//i.test(s.textContent)) refs.push('<style> with a remote url');
  }
  return JSON.stringify({
    images: imgs.map(i => ({src: (i.getAttribute('src') || '').slice(0, 60), alt: i.alt,
                            complete: i.complete, naturalWidth: i.naturalWidth,
                            naturalHeight: i.naturalHeight})),
    refs: refs,
    title: document.title,
    text_length: document.body ? document.body.innerText.length : 0,
    width: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
  });
})()
"""


class BrowserError(RuntimeError):
    """The browser could not be started, answered an error, or did not answer in time."""


@dataclass
class PageCheck:
    """What :func:`check_page` saw.

    Attributes:
        screenshot: the full page as a PNG (clipped at ``max_height`` CSS pixels).
        images: one dict per ``<img>``: ``src`` (first 60 characters), ``alt``, ``complete``,
            ``naturalWidth``, ``naturalHeight``.
        console_errors: console ``error``/``assert`` calls, uncaught exceptions and browser log
            entries of level error (a failed load, a blocked request), as text.
        requests: every URL the page asked for, the document itself included.
        remote_refs: attributes and stylesheets that point at an ``http(s)://`` or ``//host`` URL.
        title: the document's title.
        text_length: characters of visible text.
        size: the document's scroll width and height in CSS pixels.
    """

    screenshot: bytes
    images: list[dict[str, Any]]
    console_errors: list[str]
    requests: list[str]
    remote_refs: list[str]
    title: str
    text_length: int
    size: tuple[int, int]
    events: list[str] = field(default_factory=list)

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        """The images that did not load (not complete, or zero natural width)."""
        return [i for i in self.images if not (i["complete"] and i["naturalWidth"] > 0)]

    @property
    def network_requests(self) -> list[str]:
        """Requests that would need a network: anything but ``file:``, ``data:``, ``blob:``, ``about:``."""
        local = ("file:", "data:", "blob:", "about:")
        return [u for u in self.requests if not u.lower().startswith(local)]


def find_chromium() -> str | None:
    """The Chromium executable: ``$TANGENTLENS_CHROMIUM`` if set, else the first usual name on PATH.

    ``None`` when there is none, or no ``bash`` to hand it the DevTools pipe.
    """
    if shutil.which("bash") is None:
        return None
    env = os.environ.get("TANGENTLENS_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot_stats(png: bytes) -> dict[str, float]:
    """Grey-level spread of a PNG: ``std`` (0-255 scale), ``ink`` (share of pixels off the commonest
    grey by more than 16) and ``distinct`` (number of distinct grey levels)."""
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    values, counts = np.unique(grey, return_counts=True)
    background = values[np.argmax(counts)]
    return {"std": float(grey.std()), "ink": float(np.mean(np.abs(grey - background) > 16)),
            "distinct": float(len(values)), "height": float(grey.shape[0]), "width": float(grey.shape[1])}


def page_problems(check: PageCheck, *, min_images: int = 0) -> list[str]:
    """Everything a reader of a self-contained, offline report would notice, in words; ``[]`` is a pass.

    Checks: the screenshot is not blank (grey-level std > 8 and > 1% of pixels off the background);
    every ``<img>`` loaded (``complete`` and ``naturalWidth > 0``), and at least ``min_images`` exist;
    no console error, uncaught exception or failed load; no request and no reference that needs a
    network (``http(s)://`` or ``//host``); the page has a title and visible text.
    """
    problems = []
    stats = screenshot_stats(check.screenshot)
    if stats["std"] <= 8.0 or stats["ink"] <= 0.01:
        problems.append(f"the screenshot looks blank: {stats}")
    if len(check.images) < min_images:
        problems.append(f"{len(check.images)} images, expected at least {min_images}")
    problems.extend(f"image did not load: {i}" for i in check.broken_images)
    problems.extend(f"console: {e}" for e in check.console_errors)
    problems.extend(f"needs the network: {u}" for u in check.network_requests)
    problems.extend(f"remote reference: {r}" for r in check.remote_refs)
    if not check.title or check.text_length < 20:
        problems.append(f"no title or hardly any text (title {check.title!r}, {check.text_length} chars)")
    return problems


class _Pipe:
    """One Chromium over ``--remote-debugging-pipe``: send commands, collect events."""

    def __init__(self, executable: str, profile: Path, timeout: float) -> None:
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._next = 0
        self._buf = b""
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the child's ends move above fd 9, clear of the 3 and 4 they are redirected to
        for low in (to_browser_r, from_browser_w):
            high = fcntl.fcntl(low, fcntl.F_DUPFD, 10)
            os.close(low)
            if low == to_browser_r:
                to_browser_r = high
            else:
                from_browser_w = high
        flags = [*_FLAGS, f"--user-data-dir={profile}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        # bash (dash takes one-digit fds only) moves our pipe ends onto fds 3 and 4, where Chromium wants them
        script = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            ["bash", "-c", script, "bash", executable, *flags, "about:blank"],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._stderr,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"Chromium did not answer within {self.timeout:.0f} s.")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed its DevTools pipe; its stderr ends:\n{self.stderr()}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict:
        """Run one DevTools command and return its ``result``; events that arrive meanwhile are kept."""
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, session: str | None = None) -> dict[str, Any]:
        """Wait for the next event ``method`` (of ``session``), keeping the others."""
        seen = next((e for e in self.events if e["method"] == method and e.get("sessionId") == session), None)
        deadline = time.monotonic() + self.timeout
        while seen is None:
            event = self._read_message(deadline)
            if "method" in event:
                self.events.append(event)
                if event["method"] == method and event.get("sessionId") == session:
                    seen = event
        return seen

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close")
                except (BrowserError, OSError):
                    pass
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._stderr.close()


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description", d.get("text", ""))))
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
        elif e["method"] == "Network.loadingFailed":
            out.append(f"load failed: {p.get('errorText')} (request {p.get('requestId')})")
    return out


def check_page(
    html_file: str | Path,
    *,
    executable: str | None = None,
    width: int = 1280,
    max_height: int = 12000,
    timeout: float = 30.0,
) -> PageCheck:
    """Load ``html_file`` in headless Chromium with no network and look at it.

    Args:
        html_file: the page, opened as a ``file://`` URL.
        executable: the browser; :func:`find_chromium` by default.
        width: viewport width in CSS pixels (scale factor 1).
        max_height: the screenshot covers the whole page down to this many CSS pixels.
        timeout: seconds any single step may take.

    Returns:
        A :class:`PageCheck`.

    Raises:
        BrowserError: if no browser is found, it fails to start, or a step times out.
    """
    executable = executable or find_chromium()
    if executable is None:
        raise BrowserError("no Chromium found; install Debian's `chromium` or set TANGENTLENS_CHROMIUM.")
    url = Path(html_file).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="tl-chromium-") as profile:
        pipe = _Pipe(executable, Path(profile), timeout)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                pipe.send(f"{domain}.enable", session=s)
            pipe.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0,
                      "downloadThroughput": -1, "uploadThroughput": -1}, session=s)
            pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900,
                      "deviceScaleFactor": 1, "mobile": False}, session=s)
            pipe.events.clear()
            nav = pipe.send("Page.navigate", {"url": url}, session=s)
            if nav.get("errorText"):
                raise BrowserError(f"navigating to {url} failed: {nav['errorText']}")
            pipe.wait_for("Page.loadEventFired", session=s)
            probe = pipe.send("Runtime.evaluate", {"expression": _PROBE_JS, "awaitPromise": True,
                              "returnByValue": True}, session=s)
            if "exceptionDetails" in probe:
                raise BrowserError(f"the page probe failed: {probe['exceptionDetails']}")
            info = json.loads(probe["result"]["value"])
            height = max(1, min(int(info["height"]), max_height))
            shot = pipe.send("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            }, session=s)
            events = [e for e in pipe.events if e.get("sessionId") in (s, None)]
        finally:
            pipe.close()
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return PageCheck(
        screenshot=base64.b64decode(shot["data"]),
        images=info["images"],
        console_errors=_console_errors(events),
        requests=[re.sub(r"^(data:[^,]{0,40}),.*", r"\1,...", u) for u in requests],
        remote_refs=info["refs"],
        title=info["title"],
        text_length=int(info["text_length"]),
        size=(int(info["width"]), int(info["height"])),
        events=sorted({e["method"] for e in events}),
    )
