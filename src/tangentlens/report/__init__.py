"""Report writing: a self-contained HTML page, a text table and PNG figures, from plain arrays.

Nothing in this package knows about models or tensors; the demo (:mod:`tangentlens.demo`) computes the
numbers and hands them over as plain Python values and numpy arrays.
"""

from tangentlens.report.html import format_value, text_table, write_report
from tangentlens.report.plots import gallery, gallery_points, scatter

__all__ = ["format_value", "gallery", "gallery_points", "scatter", "text_table", "write_report"]
