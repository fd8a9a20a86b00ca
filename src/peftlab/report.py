"""The files and terminal table of ``peftlab compare``, drawn from its report dictionary.

Everything here reads the report only (see :func:`peftlab.compare.run_compare` for its fields),
so the files can be redrawn from a saved ``report.json``::

    from peftlab.compare import load_report
    from peftlab.report import write_report
    write_report(out, load_report(out))
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

SCORE_PLOT = "score_vs_params.png"
MEMORY_PLOT = "memory_vs_step.png"
FUSION_PLOT = "fusion_attention.png"
MIB = 2**20


def write_report(out: Path, report: dict[str, Any], plots: bool = True) -> None:
    """``report.json``, ``report.md`` and (unless ``plots`` is false) the PNG plots in ``out``,
    each written atomically."""
    from peftlab.io import write_atomic
    from peftlab.train import json_bytes

    out = Path(out)
    write_atomic(out / "report.json", json_bytes(report))
    drawn = write_plots(out, report) if plots else []
    write_atomic(out / "report.md", markdown(report, drawn).encode())


# ---- formatting -------------------------------------------------------------------------------
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def size(n: float | None) -> str:
    """Bytes in binary units."""
    if not _finite(n):
        return "n/a"
    assert n is not None
    for unit, scale in (("GiB", 2**30), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def count(n: int | None) -> str:
    if not _finite(n):
        return "n/a"
    assert n is not None
    return f"{n / 1e6:.1f}M" if n >= 10_000_000 else f"{n:,}"


def points(x: float | None) -> str:
    """A score in [0, 1] as points (×100)."""
    return f"{100 * x:.1f}" if _finite(x) else "n/a"


def cell(stats: dict[str, Any] | None) -> str:
    """A score with its 95% interval where there is one, e.g. ``81.2 [79.0, 83.4]``."""
    if not stats or not _finite(stats.get("mean")):
        return "n/a"
    low, high = stats.get("ci95") or (None, None)
    if _finite(low) and _finite(high):
        return f"{100 * stats['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    return f"{100 * stats['mean']:.1f}"


def ranking_lines(report: dict[str, Any]) -> list[str]:
    """Per task: the methods by rank (ties where 95% intervals overlap), and what that means."""
    summary = report.get("summary", {})
    scores = summary.get("scores", {})
    lines = []
    for task, info in report.get("tasks", {}).items():
        cells = {m: s["tasks"][task] for m, s in scores.items() if task in s.get("tasks", {})}
        if not cells:
            continue
        order = sorted(cells, key=lambda m: (cells[m].get("rank", 99), -_mean(cells[m])))
        ranked = ", ".join(f"{cells[m].get('rank', '?')}. {m} {cell(cells[m])}" for m in order)
        line = f"- **{task}** ({info['metric']}): {ranked}."
        if not summary.get("significant_difference", {}).get(task, True) and len(cells) > 1:
            line += " No significant difference between the methods (every interval overlaps)."
        level = summary.get("constant", {}).get(task)
        above = summary.get("above_constant", {}).get(task, {})
        if level is not None and above and not any(above.values()):
            line += (f" Every method stayed at the constant-prediction level ({points(level)}): "
                     "none learned this task at this budget.")
        elif level is not None and above:
            stuck = [m for m, ok in above.items() if not ok]
            if stuck:
                line += f" At or below the constant prediction ({points(level)}): {', '.join(stuck)}."
        lines.append(line)
    return lines


def learning_rate_lines(report: dict[str, Any]) -> list[str]:
    """The chosen rates and each search's final rung (held-out score per candidate)."""
    searched = [r for r in report.get("runs", []) if r.get("lr_search")]
    if not searched:
        return []
    lines = ["", "## Learning rates", "",
             "Chosen per method, task and seed on a slice of the training data held out from "
             "training (never the validation split): rung 1 tried the default × 0.5, 1, 2, 4 briefly, "
             "rung 2 the better half for twice as long. Held-out scores of rung 2:", ""]
    for r in searched:
        s = r["lr_search"]
        if s.get("skipped"):
            lines.append(f"- {r['method']} · {r['task']} · seed {r['seed']}: **{s['lr']:g}**, not "
                         f"searched: {s['skipped']}")
            continue
        final = ", ".join(f"{t['lr']:g} → {points(t['score'])}" for t in s["trials"] if t["rung"] == 2)
        note = f"; {s['note']}" if s.get("note") else ""
        lines.append(f"- {r['method']} · {r['task']} · seed {r['seed']}: **{s['lr']:g}** ({final}; "
                     f"{s['metric']} on {s['held_out_examples']} held-out examples{note})")
    return lines


def _mean(stats: dict[str, Any]) -> float:
    return stats["mean"] if _finite(stats.get("mean")) else -math.inf


def ratio(x: float | None) -> str:
    return f"{x:.2f}×" if _finite(x) else "—"


def _scores(report: dict[str, Any], method: str) -> dict[str, Any]:
    return report.get("summary", {}).get("scores", {}).get(method, {})


def _average(report: dict[str, Any], method: str, partial: bool = False) -> float | None:
    """The method's average over all tasks; with ``partial``, over the tasks it has."""
    s = _scores(report, method)
    if s.get("average") is not None or not partial:
        return s.get("average")
    means = [c["mean"] for c in s.get("tasks", {}).values() if _finite(c.get("mean"))]
    return sum(means) / len(means) if means else None


def _methods(report: dict[str, Any]) -> list[str]:
    have = set(report.get("measurements", {})) | set(report.get("summary", {}).get("scores", {}))
    return [m for m in report.get("methods", []) if m in have]


# ---- the seed's comparison table, measured ------------------------------------------------------
def seed_table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows of (method, trainable parameters, memory efficiency, modularity, multi-task learning,
    performance trade-offs), each cell made of measured numbers."""
    meas = report.get("measurements", {})
    n_tasks = len(report.get("tasks", {}))
    full = meas.get("full")
    full_avg = _average(report, "full")
    gain = report.get("summary", {}).get("fusion_gain_mean")
    rows = []
    for method in _methods(report):
        m = meas.get(method)
        avg = _average(report, method)
        if m is None:
            rows.append([method, "n/a", "n/a", "n/a", "n/a", f"score {points(avg)}"])
            continue
        params = (f"all {count(m['trainable_parameters'])} (100%)" if method == "full" else
                  f"{count(m['trainable_parameters'])} ({m['percent_of_base']:.3g}% of base)")
        memory = (f"{size(m['train_memory_bytes'])} at the train peak, "
                  f"+{size(m['memory_increase_bytes'])} over inference")
        if full is not None and method != "full":
            memory += f" ({m['train_memory_bytes'] / full['train_memory_bytes']:.2f}× full FT)"
        if method == "full":
            modular = f"a full model copy per task ({size(m['file_bytes'])})"
        elif method == "fusion":
            modular = (f"{size(m['file_bytes'])} per target task, over {m['members']} shared "
                       "member adapters; not mergeable")
        else:
            modular = f"{size(m['file_bytes'])} per task; " + (
                "mergeable (no inference cost)" if m["mergeable"] else "not mergeable (stays attached)")
        if method == "fusion":
            multi = (f"{100 * gain:+.1f} points over single-task Pfeiffer (mean of "
                     f"{len(report['summary']['fusion_gain'])} tasks)" if _finite(gain)
                     else "no fusion result yet")
        elif method == "full":
            multi = f"{n_tasks} task(s): {n_tasks} model copies, {size(n_tasks * m['file_bytes'])}"
        else:
            multi = (f"{n_tasks} task(s): {size(n_tasks * m['file_bytes'])} of adapters on one shared "
                     "base; can be fusion members")
        perf = f"score {points(avg)}"
        if full_avg is not None and avg is not None and method != "full":
            perf += f" ({100 * (avg - full_avg):+.1f} vs full FT)"
        perf += f"; step {m['step_seconds'] * 1e3:.0f} ms; inference {ratio(m['latency_ratio'])}"
        if m.get("merged_latency_ratio") is not None:
            perf += f" ({ratio(m['merged_latency_ratio'])} merged)"
        rows.append([method, params, memory, modular, multi, perf])
    return rows


def numeric_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The full numeric table: header and rows."""
    tasks = list(report.get("tasks", {}))
    header = ["method", "trainable params", "% of base", "file per task", "train memory",
              "over inference", "step ms", "examples/s", "inference ×", "merged ×",
              *[f"{t} ({report['tasks'][t]['metric']})" for t in tasks], "average"]
    rows = []
    for method in _methods(report):
        m = report.get("measurements", {}).get(method, {})
        s = _scores(report, method).get("tasks", {})
        rows.append([
            method, count(m.get("trainable_parameters")),
            f"{m['percent_of_base']:.3g}" if m else "n/a", size(m.get("file_bytes")),
            size(m.get("train_memory_bytes")), size(m.get("memory_increase_bytes")),
            f"{m['step_seconds'] * 1e3:.0f}" if m else "n/a",
            f"{m['examples_per_second']:.1f}" if m else "n/a",
            ratio(m.get("latency_ratio")), ratio(m.get("merged_latency_ratio")),
            *[cell(s.get(t)) for t in tasks], points(_average(report, method))])
    return header, rows


def _gain_text(paired: dict[str, Any] | None) -> str:
    """``[+0.5, +3.1]: significant`` for a fusion's paired gain interval."""
    if not paired or not all(_finite(v) for v in paired["ci95"]):
        return "n/a"
    low, high = (100 * v for v in paired["ci95"])
    verdict = "significant" if paired["significant"] else "no significant difference"
    return f"[{low:+.1f}, {high:+.1f}]: {verdict}"


def _md_table(header: list[str], rows: list[list[str]], numeric: bool = True) -> list[str]:
    def esc(x: str) -> str:
        return x.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |",
             "|" + "|".join("---" if i == 0 or not numeric else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return lines


def markdown(report: dict[str, Any], plots: list[str] | None = None) -> str:
    """``report.md``: the seed's table with measured cells, the numeric table, fusion, how."""
    lines = _header_lines(report)
    lines += ["", "## The comparison table, measured", ""]
    lines += _md_table(["Method", "Trainable parameters", "Memory efficiency", "Modularity",
                        "Multi-task learning", "Performance trade-offs"], seed_table_rows(report),
                       numeric=False)
    lines += ["", "Scores are validation points (×100), mean over tasks of the per-task mean over seeds.",
              "", "## Ranking per task", "",
              "Each score is the mean over seeds with its 95% bootstrap interval [low, high] (validation "
              "examples resampled, and seeds too when there are several). Methods share a rank where "
              "their intervals overlap: a rank is one plus the number of methods whose interval lies "
              "wholly above.", ""]
    lines += ranking_lines(report)
    lines += ["", "## All numbers", ""]
    lines += _md_table(*numeric_rows(report))
    lines += _cost_lines(report)
    lines += _fusion_lines(report)
    lines += learning_rate_lines(report)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if report.get("skipped"):
        lines += ["", "## Not run", ""]
        lines += [f"- {k['method']}" + (f" on {k['task']}, seed {k['seed']}" if k.get("task") else "")
                  + f": {k['reason']}" for k in report["skipped"]]
    return "\n".join(lines) + "\n"


def _header_lines(report: dict[str, Any]) -> list[str]:
    """Title, model, tasks, budget, learning rates, machine and the command."""
    s = report["settings"]
    machine = report.get("machine", {})
    v = report.get("versions", {})
    return [
        "# peftlab compare",
        "",
        f"Model `{report['model']}`; tasks: " + ", ".join(
            f"{t} ({d['train_examples']:,} train / {d['eval_examples']:,} validation, {d['metric']})"
            for t, d in report["tasks"].items()) + ".",
        f"{s['epochs']:g} epoch(s)" + "".join(f" ({t}: {e:g})" for t, e in s.get("task_epochs", {}).items())
        + f", batch {s['batch_size']}, max length {s['max_length']}, seeds "
        f"{', '.join(map(str, s['seeds']))}; learning rates {_rates_text(report)}. Wall time "
        f"{report.get('wall_seconds', 0) / 60:.1f} min on "
        f"{machine.get('cuda') or machine.get('processor')} ({machine.get('torch_threads')} torch threads); "
        f"torch {v.get('torch')}, transformers {v.get('transformers')}, peftlab {v.get('peftlab')}.",
        "",
        "Command:",
        "",
        "```",
        report["command"],
        "```",
    ]


def _rates_text(report: dict[str, Any]) -> str:
    s = report["settings"]
    lrs = dict(s.get("learning_rates", {}))
    if "fusion" in report["methods"]:
        lrs["fusion"] = s.get("fusion_lr")
    rates = ", ".join(f"{m} {lr:g}" if isinstance(lr, float) else f"{m} {lr}" for m, lr in lrs.items())
    rates = rates or "the methods' defaults"
    if "auto" in lrs.values():
        rates += (" (auto: chosen per task and seed by successive halving on 10% of the training "
                  "data held out; see 'Learning rates')")
    return rates


def _cost_lines(report: dict[str, Any]) -> list[str]:
    """How memory, step time and inference were measured (nothing when they were not)."""
    first = next(iter(report.get("measurements", {}).values()), None)
    if first is None:
        return []
    return ["", f"Costs measured once, on {report['settings'].get('measured_on')} with a batch of "
            f"{first['batch_size']} × {first['length']} tokens: memory by {first['memory_source']} "
            "(weights + tensors saved for backward + gradients and AdamW moments of the trained "
            "tensors; on CUDA the allocator's peak), step time the median of full AdamW steps, inference the "
            "median no-grad forward over the base model's, timed in alternation. Trainable "
            "parameters exclude the task head, which every method trains along (it is saved "
            "with the adapter); the file size excludes it too."]


def _fusion_lines(report: dict[str, Any]) -> list[str]:
    """Fusion against single-task Pfeiffer per task, with the paired intervals."""
    gains = report.get("summary", {}).get("fusion_gain", {})
    if not (report.get("fusion") or gains):
        return []
    tasks = report["tasks"]
    pf = _scores(report, "pfeiffer").get("tasks", {})
    fu = _scores(report, "fusion").get("tasks", {})
    lines = ["", "## Multi-task: AdapterFusion over the tasks' adapters", "",
             f"Stage 1: a Pfeiffer adapter per task. Stage 2: for each target task, a fusion of all "
             f"{len(tasks)} tasks' stage-1 adapters, trained with the head on the target task "
             f"(lr {report['settings']['fusion_lr']:g}).", ""]
    paired = report.get("summary", {}).get("fusion_gain_ci95", {})
    lines += _md_table(["task", "single-task Pfeiffer", "Fusion", "Δ points", "Δ 95% interval (paired)"],
                       [[t, cell(pf.get(t)), cell(fu.get(t)),
                         f"{100 * gains[t]:+.1f}" if _finite(gains.get(t)) else "n/a",
                         _gain_text(paired.get(t))] for t in tasks])
    return lines + ["", "The interval resamples the validation examples (and seeds) the two share, the same "
                    "draws for both, so it measures the difference itself; where it excludes 0 the "
                    "difference is significant, otherwise there is no significant difference."]


# ---- terminal -----------------------------------------------------------------------------------
def terminal_table(report: dict[str, Any]) -> Any:
    """The main numbers as a rich Table (the files hold them all)."""
    from rich.table import Table

    header, rows = numeric_rows(report)
    keep = [i for i, h in enumerate(header) if h not in ("% of base", "over inference", "examples/s")]
    table = Table(title=f"peftlab compare: {report['model']}")
    for i in keep:
        table.add_column(header[i], justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[r[i] for i in keep])
    return table


# ---- plots ------------------------------------------------------------------------------------
def _png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    from peftlab.io import write_atomic

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_plots(out: Path, report: dict[str, Any]) -> list[str]:
    """The plots there is data for; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = report.get("measurements", {})
    written = []
    points_ = [(m, meas[m]["trainable_parameters"], _average(report, m, partial=True))
               for m in _methods(report) if m in meas and _average(report, m, partial=True) is not None]
    if points_:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for m, n, avg in points_:
            ax.scatter(n, 100 * avg)
            ax.annotate(m, (n, 100 * avg), textcoords="offset points", xytext=(5, 4), fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale; head excluded)")
        ax.set_ylabel("validation score, mean over tasks done (×100)")
        ax.set_title("score vs trainable parameters")
        ax.grid(alpha=0.3)
        _png(fig, out / SCORE_PLOT)
        written.append(SCORE_PLOT)
    if meas:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for m, d in meas.items():
            x, y = d["step_seconds"] * 1e3, d["train_memory_bytes"] / MIB
            ax.scatter(x, y)
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
        first = next(iter(meas.values()))
        ax.set_xlabel(f"train step, ms (batch {first['batch_size']} × {first['length']})")
        ax.set_ylabel(f"training memory, MiB ({first['memory_source']})")
        ax.set_title("training memory vs step time")
        ax.grid(alpha=0.3)
        _png(fig, out / MEMORY_PLOT)
        written.append(MEMORY_PLOT)
    fusion = report.get("fusion", {})
    if fusion:
        targets = list(fusion)
        fig, axes = plt.subplots(1, len(targets), figsize=(3.0 + 1.0 * sum(
            len(next(iter(fusion[t].values()))["members"]) for t in targets), 4.0), squeeze=False,
            layout="constrained")
        image = None
        for ax, target in zip(axes[0], targets):
            runs = list(fusion[target].values())
            weights = [[sum(r["weights"][i][j] for r in runs) / len(runs)
                        for j in range(len(runs[0]["members"]))] for i in range(len(runs[0]["modules"]))]
            image = ax.imshow(weights, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, row in enumerate(weights):
                for j, w in enumerate(row):
                    ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if w < 0.6 else "black")
            ax.set_xticks(range(len(runs[0]["members"])), runs[0]["members"], rotation=45, ha="right")
            ax.set_yticks(range(len(weights)), [_layer_label(m) for m in runs[0]["modules"]]
                          if ax is axes[0][0] else [])
            ax.set_title(f"target {target}")
            ax.set_xlabel("member adapter")
        axes[0][0].set_ylabel("module")
        if image is not None:
            fig.colorbar(image, ax=axes[0].tolist(), label="mean attention")
        fig.suptitle("fusion attention per member (validation mean)", fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        from peftlab.io import write_atomic

        write_atomic(out / FUSION_PLOT, buf.getvalue())
        written.append(FUSION_PLOT)
    return written


def _layer_label(module: str) -> str:
    """``bert.encoder.layer.3.output.dense`` -> ``layer 3``; other names shortened."""
    hit = re.search(r"\.(\d+)\.", module)
    return f"layer {hit.group(1)}" if hit else module.rsplit(".", 2)[-2] if "." in module else module
