"""Cost of the dataset content hash every report records (anomalyqc.data.fingerprint).

Hashes the images (data_sha256) and the masks and ROIs (annotations_sha256) of each split of
a dataset, three times, and records the time of each pass (the first may include reading
from disk; the later ones are from the page cache, as in `evaluate`, which has just read the
same files), the file count and the bytes hashed.

    .venv/bin/python benchmarks/data_hash.py [--data ../shared/data/mvtec_ad/bottle]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from anomalyqc.data import records_for
from anomalyqc.data.fingerprint import annotations_sha256, data_sha256
from anomalyqc.provenance import provenance

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path,
                    default=HERE.parent.parent / "shared" / "data" / "mvtec_ad" / "bottle")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    started = provenance()
    results = {}
    for split in ("train", "test"):
        recs = records_for(args.data, split)
        files = [p for r in recs for p in (r.path, r.mask_path, r.roi_path) if p is not None]
        seconds = []
        for _ in range(args.passes):
            t = time.perf_counter()
            data_sha256(recs, args.data)
            annotations_sha256(recs, args.data)
            seconds.append(round(time.perf_counter() - t, 4))
        results[split] = {"images": len(recs), "files": len(files),
                          "megabytes": round(sum(os.path.getsize(p) for p in files) / 1e6, 1),
                          "seconds_per_pass": seconds}
        print(split, results[split])
    out = HERE / "results" / "data_hash.json"
    out.write_text(json.dumps({"provenance": started, "data": str(args.data),
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
