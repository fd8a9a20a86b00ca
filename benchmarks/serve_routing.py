"""The cost of mixing adapters in one forward, in-process (no HTTP): ``Pool.run`` on batches of
one-text requests, each naming a random one of ``benchmarks/serve.py``'s nine adapters, against
the same batches all for one LoRA, interleaved.

"mixed" routes as peftlab does now: each adapted layer runs its frozen projection once for the
whole batch (each row's (IA)³ input vector applied to its rows) and the small pieces group by
group. "mixed, product per group" is the previous way, one projection per group of rows, kept
here as the baseline it replaced.

    python benchmarks/serve_routing.py --threads 2 --batches 40
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from serve import KINDS, minilm, save_adapters, texts

from peftlab.layer import AdaptedLayer
from peftlab.serve import Job, Pool, ServeOptions


def product_per_group(self: AdaptedLayer, x: torch.Tensor, plan) -> torch.Tensor:
    outs = [self._run(x if ix is None else x.index_select(0, ix), *active) for ix, active in plan.groups]
    if plan.rows is None:
        return outs[0]
    return torch.cat(outs).index_select(0, torch.cat([ix for ix, _ in plan.groups]).argsort())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40, help="per setting (the first 5 are warm-up)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        names = save_adapters(minilm(), Path(tmp))
        pool = Pool.open(ServeOptions(adapters=tuple((n, str(Path(tmp) / n)) for n in names), model=minilm(),
                                      task="classification", max_length=64))
    pool_texts = texts(400)
    shared = AdaptedLayer._routed
    rng = random.Random(0)
    settings = {"one LoRA": (f"{KINDS[0]}-1", shared), "mixed": (None, shared),
                "mixed, product per group": (None, product_per_group)}
    times: dict[str, list[float]] = {k: [] for k in settings}
    with torch.inference_mode():
        for _ in range(args.batches):
            for label, (adapter, routed) in settings.items():
                AdaptedLayer._routed = routed  # type: ignore[method-assign]
                jobs = [Job(adapter or rng.choice(names), [(rng.choice(pool_texts), None)])
                        for _ in range(args.batch)]
                started = time.perf_counter()
                pool.run(jobs)
                times[label].append(time.perf_counter() - started)
    AdaptedLayer._routed = shared  # type: ignore[method-assign]
    median = {k: statistics.median(v[5:]) * 1e3 for k, v in times.items()}
    for label, ms in median.items():
        ratio = ms / median["one LoRA"]
        print(f"{label:26s} {ms:7.1f} ms per batch of {args.batch}  ({ratio:.2f}x one LoRA)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
