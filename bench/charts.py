"""Ratio tables as SVG charts beside bench/RESULTS.md.

Each bench script that prints a Troupe / peer ratio table also calls `draw`, which saves
the table as bench/charts/<name>.json and draws bench/charts/<name>.svg with
`troupe plot-ratios` (Rust, plotters: nothing beyond the standard library is needed here).
"""
import json
import pathlib
import subprocess

CHARTS = pathlib.Path(__file__).resolve().parent / "charts"


def draw(troupe, name, title, rows):
    """rows: [(label, ratio)] in table order. Prints where the chart went."""
    CHARTS.mkdir(exist_ok=True)
    table = CHARTS / f"{name}.json"
    table.write_text(json.dumps({"title": title, "rows": [{"label": l, "ratio": r} for l, r in rows]}, indent=1))
    svg = CHARTS / f"{name}.svg"
    out = subprocess.run([troupe, "plot-ratios", "--input", str(table), "--out", str(svg)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(f"chart {name} not drawn: {out.stderr.strip()}")
    else:
        print(f"chart: {svg}")
