"""100 runs that fill a datastore (issue 13: "zero acknowledged writes lost, every paused VM resumes after
space is freed"), at the storage level (tests/storage/fill_runs.py; the block device that pauses a real VM
comes later). tests/storage/test_datastore.py runs 9.

    python benchmarks/fill_datastore_qcow2.py [--runs 100]

Results go to benchmarks/results/fill_datastore_qcow2.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "storage"))

from fill_runs import fill_run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "fill_datastore_qcow2.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fill_datastore_"))
    start = time.monotonic()
    try:
        runs = []
        for seed in range(args.runs):
            runs.append(fill_run(folder, seed))
            shutil.rmtree(folder / f"lun{seed}")
    finally:
        shutil.rmtree(folder)
    bad = [r for r in runs if r.lost or r.unclean or r.resumed != r.vms or r.refused != r.vms]
    results = {
        "host": platform.node(), "load_average": os.getloadavg(), "runs": len(runs),
        "seconds": time.monotonic() - start,
        "vms_paused": sum(r.refused for r in runs), "vms_resumed": sum(r.resumed for r in runs),
        "paused_again_before_more_space": sum(r.paused_again for r in runs),
        "acknowledged_writes": sum(r.acknowledged for r in runs),
        "blocks_lost": sum(r.lost for r in runs), "overlays_not_clean": sum(r.unclean for r in runs),
        "freed_by": dict(collections.Counter(r.freed_by for r in runs)),
        "failures": [dataclasses.asdict(r) for r in bad],
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{len(runs)} runs: {results['vms_paused']} VMs paused, {results['vms_resumed']} resumed "
          f"({results['paused_again_before_more_space']} paused again until more was freed); "
          f"{results['acknowledged_writes']} acknowledged writes, {results['blocks_lost']} blocks lost, "
          f"{results['overlays_not_clean']} overlays not clean; {len(bad)} failures")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
