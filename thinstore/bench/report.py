"""``bench --report FILE``: the run as a picture to paste into a ticket.

Drawn with matplotlib, the plotting library of the scientific Python stack:
well kept, packaged everywhere (pip and Debian), and able to write SVG and PNG
with no display and no browser (its ``Agg``/``svg`` backends).  It is an
optional extra (``pip install 'thinstore[report]'``): the text and JSON output
need nothing but the standard library and numpy.

The figure has the latency histogram (share of requests per log-spaced bin,
read and write apart), throughput over time, and with ``--compare`` every
server side by side (the median round of each, and a bar of median IOPS per
server with each round as a dot).  ``.html`` wraps the SVG and a summary table
into one self-contained page; ``.svg`` and ``.png`` are the figure alone.
"""

from __future__ import annotations

import html
import io
import os

from thinstore.errors import UsageError

FORMATS = (".html", ".htm", ".svg", ".png")
COLORS = {"thinstore": "#1f77b4", "qemu-nbd": "#d62728", "nbdkit": "#2ca02c"}


def check_report_path(path: str) -> None:
    """Before a run: the format is known and matplotlib is importable (UsageError if not)."""
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise UsageError(f"--report {path}: use a .html, .svg or .png file name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--report needs matplotlib: pip install 'thinstore[report]' "
                         "(or drop --report: the text output needs none)") from None


def write_report(result: dict, path: str) -> None:
    """Draw ``result`` (thinstore.bench.results shape, with ``compare`` if any) to ``path``."""
    import matplotlib

    check_report_path(path)
    ext = os.path.splitext(path)[1].lower()
    # text as text in SVG: a smaller, searchable file (and no global setting changed)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig = figure(result)
        if ext == ".png":
            fig.savefig(path, format="png", dpi=100)
            return
        svg = io.StringIO()
        fig.savefig(svg, format="svg")
    text = svg.getvalue()
    if ext == ".svg":
        with open(path, "w") as f:
            f.write(text)
        return
    with open(path, "w") as f:
        f.write(page(result, text[text.index("<svg"):]))


def runs_by_server(result: dict) -> dict:
    """{server: representative run}: the median round of each with --compare."""
    compare = result.get("compare")
    if not compare:
        return {"thinstore": result}
    from thinstore.bench.compare import median_run
    return {name: median_run(compare["servers"][name]) for name in _order(compare["servers"])}


def _order(servers) -> list[str]:
    """thinstore first, then the peers by name (a JSON round trip sorts the keys)."""
    return sorted(servers, key=lambda name: (name != "thinstore", name))


def figure(result: dict):
    from matplotlib.figure import Figure     # no pyplot: no GUI backend, no global state

    runs = runs_by_server(result)
    compare = result.get("compare")
    fig = Figure(figsize=(11, 7.5 if compare else 4.2), layout="constrained")
    grid = fig.add_gridspec(2 if compare else 1, 2)
    _histograms(fig.add_subplot(grid[0, 0]), runs)
    _timeline(fig.add_subplot(grid[0, 1]), runs)
    if compare:
        _bars(fig.add_subplot(grid[1, :]), compare)
    fig.suptitle(title(result), fontsize=11)
    return fig


def title(result: dict) -> str:
    from thinstore.bench.workload import Workload

    w = Workload(**result["workload"])
    return (f"thinstore bench {result['device']}: {w.describe()} "
            f"(via {result['via']}, {result['engine']})")


def _histograms(ax, runs: dict) -> None:
    import numpy as np

    lo, hi = _occupied(runs)
    for name, run in runs.items():
        edges = np.asarray(run["histogram"]["edges_us"])
        for kind, style in (("read", "-"), ("write", "--")):
            counts = np.asarray(run["histogram"][kind], dtype=float)
            if not counts.sum():
                continue
            ax.stairs(100 * counts[lo:hi] / counts.sum(), edges[lo:hi + 1], linestyle=style,
                      color=COLORS.get(name), label=f"{name} {kind}")
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs, log scale)")
    ax.set_ylabel("% of requests")
    ax.set_title("latency histogram", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _occupied(runs: dict) -> tuple[int, int]:
    """The bins from the first to the last any run filled, two more on each side."""
    import numpy as np

    total = sum(np.asarray(run["histogram"][kind]) for run in runs.values()
                for kind in ("read", "write"))
    filled = np.nonzero(total)[0]
    if not len(filled):
        return 0, len(total)
    return max(0, filled[0] - 2), min(len(total), filled[-1] + 3)


def _timeline(ax, runs: dict) -> None:
    for name, run in runs.items():
        tl = run["timeline"]
        ax.plot(tl["t_s"], tl["iops"], color=COLORS.get(name), label=name, linewidth=1.2)
    ax.set_xlabel("seconds")
    ax.set_ylabel("IOPS")
    ax.set_ylim(bottom=0)
    ax.set_title("throughput over time", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _bars(ax, compare: dict) -> None:
    names = _order(compare["servers"])
    medians = [compare["median_iops"][n] for n in names]
    ax.bar(names, medians, color=[COLORS.get(n, "#888888") for n in names], alpha=0.7)
    for i, name in enumerate(names):
        rounds = [r["total"]["iops"] for r in compare["servers"][name]]
        ax.plot([i] * len(rounds), rounds, "k.", markersize=6)
        ratio = compare["ratios"].get(name)
        label = f"median {medians[i]:.0f} IOPS" + (f"\nthinstore/{name} = {ratio:.2f}x"
                                                   if ratio else "")
        ax.text(i, medians[i] / 2, label, ha="center", va="center", fontsize=9)
    ax.set_ylabel("IOPS (bar: median; dots: rounds)")
    ax.set_title(f"side by side: {compare['rounds']} interleaved round(s)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def page(result: dict, svg: str) -> str:
    """A self-contained HTML page: title, summary table, the figure as inline SVG."""
    rows = []
    for name, run in runs_by_server(result).items():
        for kind in ("read", "write"):
            side = run[kind]
            if not side["ops"]:
                continue
            lat = side["latency_us"]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                name, kind, side["ops"], f"{side['iops']:.0f}",
                f"{side['bytes_per_s'] / 2**20:.1f}", *(_fmt(lat[k]) for k in
                                                        ("mean", "p50", "p99", "p99.9")))) + "</tr>")
    counters = ", ".join(f"{k} +{v}" for k, v in result.get("counters", {}).items() if v)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title(result))}</title>
<style>body{{font-family:sans-serif;margin:1.5em;background:#fff;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;
text-align:right}}svg{{max-width:100%;height:auto}}</style></head><body>
<h2>{html.escape(title(result))}</h2>
<table><tr><th>server</th><th>direction</th><th>ops</th><th>IOPS</th><th>MiB/s</th>
<th>mean µs</th><th>p50 µs</th><th>p99 µs</th><th>p99.9 µs</th></tr>
{''.join(rows)}</table>
<p>pool counters during the run: {html.escape(counters or 'no change')}</p>
{svg}
</body></html>
"""


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.0f}"
