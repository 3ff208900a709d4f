"""Figure: rank images against single frames on the line, from committed line_kit results.

Draws, for each image source the line can score (frame 1 only, key frames 1/8/16, the two
rank images, key frames + rank images), the strip-level TPR per defect type and the strip
TNR, for one threshold calibration. The numbers are read from the results files that
`benchmarks/line_kit.py` wrote (see benchmarks/README.md, "Rank images against single
frames"); nothing is recomputed here.

    .venv/bin/python benchmarks/line_sources_figure.py \
        --out benchmarks/results/line_sources.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SOURCES = {  # label -> results file
    "frame 1 only": "line_kit_padim_frame1.json",
    "key frames 1, 8, 16": "line_kit_padim.json",
    "rank min + max": "line_kit_padim_rank.json",
    "key frames + rank": "line_kit_padim_keys_rank.json",
}
# Static defects first, then the ones that move in the liquid or live on its surface.
TYPES = ["scratch", "engraving_scratch", "black_spot", "stuck_particle", "particle",
         "floating_particle", "foam"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metric", default="accuracy", help="threshold calibration to show")
    ap.add_argument("--out", type=Path, default=RESULTS / "line_sources.png")
    a = ap.parse_args()
    rows = {}
    for label, name in SOURCES.items():
        result = json.loads((RESULTS / name).read_text())["by_calibration_metric"][a.metric]
        by_type = result["strip_tpr_by_defect_type"]
        rows[label] = [by_type[t]["tpr"] for t in TYPES] + [result["strip"]["tnr"]]
    columns = [t.replace("_", "\n") for t in TYPES] + ["good strips\n(TNR)"]
    x = np.arange(len(columns))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=120)
    for i, (label, values) in enumerate(rows.items()):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=label)
    ax.axvline(3.5, color="0.6", lw=0.8, ls="--")
    ax.text(1.5, 1.04, "static defects", ha="center", fontsize=9, color="0.3")
    ax.text(5.0, 1.04, "moving / on the surface", ha="center", fontsize=9, color="0.3")
    ax.set_xticks(x, columns, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("strip TPR per defect type (last group: TNR)")
    ax.set_title(f"PaDiM per region, 40 + 40 strips x 10 runs, thresholds: {a.metric} "
                 f"(positive = defective)", fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.2))
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out)
    print(json.dumps({"out": str(a.out), "metric": a.metric,
                      "rows": {k: dict(zip([*TYPES, "tnr"], map(float, v), strict=True))
                               for k, v in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
