"""HTML and figure helpers of the report's sections: escaping, numbers, tables, notes and
matplotlib figures embedded as base64 PNG (no pyplot: no global state, no GUI backend)."""

from __future__ import annotations

import base64
import html
import io


def esc(x) -> str:
    return html.escape(str(x))


def num(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1:
        x = int(x)
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 10 else f"{x:,.1f}"
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else esc(x)


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{num(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure(ncols: int = 1, width: float = 6.0, height: float = 3.4):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width * ncols, height), dpi=100)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def img(fig, alt: str) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    src = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{src}">'
