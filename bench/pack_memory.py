"""Pack 100 MB of text and record peak resident memory and tokens/s (issue: < 1 GB RSS).

Runs `posdistill pack` in a child process so its peak RSS is measured alone.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, write_result


def make_corpus(path: Path, nbytes: int) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    written = 0
    with open(path, "w") as f:
        while written < nbytes:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 400)))
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_corpus(d / "corpus.jsonl", 100_000_000)
        cfg = {"run": {"name": "bench", "out_dir": str(d / "run")}, "data": {"source": str(d / "corpus.jsonl")},
               "pack": {"window_len": 8192, "doc_len": [64, 1024]}}
        (d / "c.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "pack", str(d / "c.yaml")],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        wall = time.monotonic() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        meta = json.loads(next((d / "run" / "pack").iterdir()).joinpath("pack.json").read_text())
    stats = meta["stats"]
    write_result(
        "pack_memory", metric="pack_peak_rss", value=round(peak_kb / 1024, 1), goal=1024, direction="<=", unit="MiB",
        details={"corpus_bytes": 100_000_000, "tokens": stats["tokens_read"], "windows": stats["windows"],
                 "tokens_per_s": round(stats["tokens_read"] / stats["seconds"]), "wall_s": round(wall, 1),
                 "summary": out.stdout.strip().splitlines()[0]})


if __name__ == "__main__":
    main()
