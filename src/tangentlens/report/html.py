"""A self-contained HTML report (and a plain-text table) from plain Python values.

Nothing here knows about models or tensors: rows are mappings of column name to value, images are PNG files,
meta is a (possibly nested) mapping. The PNGs are embedded as base64 data URIs, so ``index.html`` can be
moved or mailed alone; the PNG files stay next to it as well.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tangentlens.errors import InputError

__all__ = ["format_value", "text_table", "write_report"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 640px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; font-size: 0.9em; }
dt { font-weight: 600; } dd { margin: 0; font-family: monospace; }
.note { font-size: 0.85em; color: #555; }
.verdict { background: #eef6ee; border-left: 4px solid #3a8a3a; padding: 0.6em 1em; }
dl.legend { font-size: 0.85em; color: #333; margin-top: 0.6em; }
dl.legend dd { font-family: inherit; }
"""


def format_value(value: Any, digits: int = 4) -> str:
    """Render one table cell: floats with ``digits`` significant digits, p-values in scientific form.

    Args:
        value: any value; ``None`` and NaN render as an en dash.
        digits: significant digits of floats.

    Returns:
        The text of the cell.
    """
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0.0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        if abs(v) >= 10**digits:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(value)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    return cols


def text_table(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """A fixed-width text table of ``rows`` (columns in first-seen order), for a terminal.

    Args:
        rows: one mapping per row, column name -> value.
        digits: significant digits of floats.

    Returns:
        The table with a header line and a rule, no trailing newline; "" for no rows.
    """
    if not rows:
        return ""
    cols = _columns(rows)
    cells = [[format_value(r.get(c), digits) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    text_cols = {i for i, c in enumerate(cols) if all(isinstance(r.get(c), str) for r in rows)}

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i in text_cols else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    out = [line(cols), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _html_table(
    rows: Sequence[Mapping[str, Any]], digits: int, columns: Mapping[str, str] | None = None
) -> str:
    """An HTML table; with ``columns`` each header gets a tooltip and a legend follows the table."""
    cols = _columns(rows)
    columns = columns or {}
    head = "".join(
        f'<th title="{html.escape(columns[c])}">{html.escape(c)}</th>' if c in columns
        else f"<th>{html.escape(c)}</th>"
        for c in cols
    )
    body = []
    for r in rows:
        tds = []
        for c in cols:
            v = r.get(c)
            cls = ' class="text"' if isinstance(v, str) else ""
            tds.append(f"<td{cls}>{html.escape(format_value(v, digits))}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    table = f'<table class="results">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(
        body
    ) + "\n</tbody>\n</table>"
    described = [c for c in cols if c in columns]
    if described:
        table += '\n<dl class="legend">' + "".join(
            f"<dt>{html.escape(c)}</dt><dd>{html.escape(columns[c])}</dd>" for c in described
        ) + "</dl>"
    return table


def _html_meta(meta: Mapping[str, Any]) -> str:
    items = []
    for key, value in meta.items():
        if isinstance(value, Mapping):
            inner = _html_meta(value)
            items.append(f"<dt>{html.escape(str(key))}</dt><dd>{inner}</dd>")
        else:
            text = format_value(value) if isinstance(value, numbers.Real) else str(value)
            items.append(f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(text)}</dd>")
    return "<dl>" + "".join(items) + "</dl>"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays, scalars
        value = value.tolist()
        if isinstance(value, list):
            return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        return v if math.isfinite(v) else None
    return str(value)


def write_report(
    out_dir: str | Path,
    table_rows: Sequence[Mapping[str, Any]],
    images: Sequence[tuple[str | Path, str]] | Mapping[str, str | Path],
    meta: Mapping[str, Any],
    *,
    title: str = "tangentlens report",
    intro: str = "",
    notes: Sequence[str] = (),
    digits: int = 4,
    verdict: str = "",
    columns: Mapping[str, str] | None = None,
    tables: Sequence[tuple[str, Sequence[Mapping[str, Any]], Mapping[str, str]]] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``index.html`` (self-contained) and ``results.json`` into ``out_dir``.

    Every table can label its columns: a mapping column -> plain-English description (with units)
    becomes a tooltip on the header cell and a legend under the table.

    Args:
        out_dir: report folder; created if missing.
        table_rows: the results table, one mapping (column -> value) per row; columns appear in first-seen
            order. Written as an HTML table and into ``results.json``.
        images: PNG files to show, either ``[(path, caption), ...]`` or ``{caption: path}``. Each is embedded
            as a base64 data URI, so the HTML stands alone.
        meta: configuration, seed, timings, versions...; nested mappings render as nested lists.
        title: page title.
        intro: a paragraph of plain text shown under the title.
        notes: extra plain-text paragraphs shown under the table.
        digits: significant digits of floats in the table.
        verdict: a plain-English conclusion shown, highlighted, above the table (and written to
            ``results.json`` as ``"verdict"``).
        columns: descriptions of the faithfulness table's columns (``{column: description}``).
        tables: further tables, each ``(heading, rows, column descriptions)``, shown after the
            first one and written to ``results.json`` under ``"tables"`` as ``{heading: rows}``.
        extra: further JSON-serializable entries for ``results.json`` (numpy scalars and NaN
            are converted as in the rows: NaN becomes ``null``).

    Returns:
        The path of ``index.html``. Cost: reading the images once.

    Raises:
        InputError: if an image file does not exist, or ``extra`` reuses a key the report
            writes itself.
    """
    reserved = {"rows", "meta", "images", "verdict", "columns", "tables"}
    clash = sorted(reserved & set(extra or {}))
    if clash:
        raise InputError(f"extra must not use the report's own keys {clash}; rename them.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs: list[tuple[Path, str]]
    if isinstance(images, Mapping):
        pairs = [(Path(p), str(c)) for c, p in images.items()]
    else:
        pairs = [(Path(p), str(c)) for p, c in images]
    figures = []
    for path, caption in pairs:
        if not path.is_file():
            raise InputError(f"report image {path} does not exist; write it before the report.")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)} <span class=\"note\">({html.escape(path.name)})"
            "</span></figcaption></figure>"
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    if verdict:
        parts.append(f'<p class="verdict">{html.escape(verdict)}</p>')
    parts.append("<h2>Faithfulness</h2>")
    parts.append(_html_table(table_rows, digits, columns) if table_rows else "<p>(no rows)</p>")
    parts.extend(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    for heading, rows, cols in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(_html_table(rows, digits, cols) if rows else "<p>(no rows)</p>")
    if figures:
        parts.append("<h2>Figures</h2>")
        parts.extend(figures)
    parts.append("<h2>Configuration</h2>")
    parts.append(_html_meta(meta))
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts) + "\n", encoding="utf-8")
    payload: dict[str, Any] = {"rows": _jsonable(list(table_rows)), "meta": _jsonable(meta),
                               "images": [p.name for p, _ in pairs]}
    if verdict:
        payload["verdict"] = verdict
    if columns:
        payload["columns"] = dict(columns)
    if tables:
        payload["tables"] = {h: _jsonable(list(r)) for h, r, _ in tables}
    payload.update(_jsonable(dict(extra or {})))
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return index
