"""``peftlab recommend``: which method to use, ranked from costs measured on the user's model.

:func:`profile` measures every method quickly on the model (:mod:`peftlab.measure`: parameters,
file size, training memory, step time, inference latency and merge ability; no training).
:func:`rank` turns the measurements and the user's constraints into a ranking. It is a small
pure function, so every rule below can be tested on its own.

Hard constraints make a method *unfit* (it is still listed, below every fit one, with why):

* ``memory_budget``: its measured training memory exceeds the budget;
* ``storage_per_task``: its file per task exceeds the limit;
* ``latency_critical``: it adds inference latency it cannot merge away (full fine-tuning is a
  plain model and fits);
* ``compose``: only AdapterFusion combines several tasks' adapters; without ``compose`` a fusion
  has nothing to fuse and is unfit.

Fit methods are ordered by a score in validation points, higher is better::

    score = quality
            − 3   · slower(inference latency as served / the base model's)
            − 0.5 · log2(training memory / the least measured)   (0.5 points per doubling)
            − 0.5 · slower(train step time / the fastest measured)
            − 1   · tasks · file per task / base model bytes     (1 point per model-sized copy)

    slower(ratio) = max(0, log2(ratio / 2.25))

Timings are noisy: a busy machine moves each by ±20%, which moves a ratio of two of them by up
to 1.5× either way. A method truly 1.5× slower can therefore be measured at up to 2.25×, so
only a measured ratio beyond 2.25× costs points. Memory (autograd accounting), parameters and
file sizes are exact and count fully; their parts of the score are its *exact part*.

Near-equal scores are ties. A score's *range* is the score with every timing ratio moved 2.25×
either way (the noise of this measurement and of the next one): a method goes below another for
its score only when its whole range lies below the other's, and otherwise the higher exact part
goes first. So a ranking does not turn on timings within noise: on a profile of MiniLM-L6 at
batch 8 × 64, ordering by score alone kept the ranking in 61 of 300 random ±20% perturbations of
the step times and latencies, this rule in all 300 (tested on those measurements). Every
comparative word in a reason ("lowest training memory", "smallest file") is computed from the
measurements, never assumed from the method.

``quality`` is a prior in points relative to full fine-tuning (:func:`quality_prior`), read from
the papers (each method's registry entry, :mod:`peftlab.methods`), or measured scores when the caller has them
(``peftlab recommend --data D --train-minutes M`` trains each method briefly). The priors encode
the seed's rules: LoRA is the general-purpose choice (near full fine-tuning and mergeable);
(IA)³ loses some quality, and Compacter less; AdapterFusion adds the gain of composing tasks
(+1.3 points on average in its paper) on top of its Pfeiffer members. Costs are never priors:
which method needs the least memory or the smallest file is measured on the model (on
MiniLM-L6, (IA)³ needs *more* training memory than LoRA: it saves the FFN's hidden input for
its gradient).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from peftlab.errors import UsageError
from peftlab.measure import FULL, FUSION, FUSION_MEMBER_METHOD, Measurement
from peftlab.methods import preset

#: AdapterFusion over single-task adapters, BERT-base, 16 tasks: 76.05 -> 77.33 (arXiv 2005.00247).
FUSION_GAIN = 1.28
LATENCY_WEIGHT = 3.0
MEMORY_WEIGHT = 0.5
STEP_WEIGHT = 0.5
STORAGE_WEIGHT = 1.0

#: Measured timing ratios up to this are treated as noise: ±20% on each of two timings moves
#: their ratio by 1.5× either way, so a true 1.5× can read as 1.5² = 2.25×.
TIMING_TIE = 2.25
#: Exact measurements (memory, sizes) within this share of the best still count as "the lowest".
EXACT_TIE = 0.02

#: What full fine-tuning and fusion are; each method's own words are in its registry entry.
ABOUT = {
    FUSION: "AdapterFusion: combines several tasks' adapters",
    FULL: "the quality reference; a full model copy per task",
}
EXPLANATION = ("score: expected validation points relative to full fine-tuning (quality prior "
               "from the papers, or measured scores with --data/--train-minutes), minus penalties "
               "for inference latency and train-step time measured beyond 2.25x (closer timings "
               "can be noise), for training memory (0.5 per doubling) and for storage (1 per "
               "model-sized copy over all tasks); higher is better. Scores that timing noise could "
               "swap (each timing ratio moved 2.25x either way) are ties, ordered by their exact "
               "part (quality, memory, storage). --json lists each part and each score's range.")


@dataclasses.dataclass(frozen=True)
class Constraints:
    """What the user needs; sizes in bytes (see :func:`parse_size`)."""

    memory_budget: int | None = None
    tasks: int = 1
    compose: bool = False
    latency_critical: bool = False
    storage_per_task: int | None = None


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """One method's place: ``fit`` (meets every constraint), ``score`` in points, ``reason``;
    ``parts`` of the score, and its range under timing noise (low, high)."""

    method: str
    fit: bool
    score: float
    reason: str
    parts: dict[str, float]
    score_range: tuple[float, float] = (math.nan, math.nan)

    @property
    def exact(self) -> float:
        """The part of the score no timing enters: quality, memory and storage."""
        return self.score - self.parts["latency"] - self.parts["step"]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int, flag: str = "size") -> int:
    """``"4GB"`` (4·10⁹), ``"4GiB"`` (4·2³⁰), ``"1.5MB"``, ``"512"`` (bytes) as bytes."""
    if isinstance(text, int):
        return text
    hit = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = hit.group(2).lower() if hit else ""
    if hit is None or unit not in _UNITS:
        raise UsageError(f"{flag} {text!r}: write a size such as 4GB, 512MB or 1.5GiB")
    value = float(hit.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UsageError(f"{flag} must be positive, got {text!r}")
    return int(value)


def _size(n: float) -> str:
    """Decimal units, as users write budgets (``--memory-budget 4GB``)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _quality(measurements: Mapping[str, Measurement], scores: Mapping[str, float] | None,
             constraints: Constraints) -> dict[str, float]:
    """Priors, replaced by measured scores (0..1) where given: the measured ones are shifted so
    that their mean equals the mean of their priors, which keeps both on one scale."""
    q = {m: quality_prior(m) for m in measurements if m != FUSION}
    if FUSION in measurements:
        q[FUSION] = quality_prior(FUSION_MEMBER_METHOD) + (FUSION_GAIN if constraints.compose else 0.0)
    measured = {m: 100.0 * s for m, s in (scores or {}).items()
                if m in q and m != FUSION and math.isfinite(s)}
    if len(measured) >= 2:
        shift = sum(q[m] for m in measured) / len(measured) - sum(measured.values()) / len(measured)
        q.update({m: v + shift for m, v in measured.items()})
    return q


def rank(measurements: Mapping[str, Measurement], constraints: Constraints,
         scores: Mapping[str, float] | None = None) -> list[Recommendation]:
    """Methods best first: those meeting every constraint, then the others, each by score with
    near-equal scores tied (see the module docstring). ``scores``: measured validation scores
    (0..1) by method, replacing the quality priors."""
    if constraints.tasks < 1:
        raise UsageError(f"--tasks must be at least 1, got {constraints.tasks}")
    if not measurements:
        return []
    quality = _quality(measurements, scores, constraints)
    least_memory = min(m.train_memory_bytes for m in measurements.values())
    fastest = min(m.step_seconds for m in measurements.values())
    tasks = max(constraints.tasks, 2) if constraints.compose else constraints.tasks
    out = []
    for name, m in measurements.items():
        # A fusion per task also needs its members' files (one member adapter per task).
        member = measurements.get(FUSION_MEMBER_METHOD)
        files = m.file_bytes + (member.file_bytes if name == FUSION and member is not None else 0)
        served = 1.0 if name == FULL else m.deploy_latency_ratio
        step_ratio = m.step_seconds / fastest
        timing = _timing(served, step_ratio)
        parts = {
            "quality": quality[name],
            "latency": timing["latency"],
            "memory": -MEMORY_WEIGHT * math.log2(m.train_memory_bytes / least_memory),
            "step": timing["step"],
            "storage": -STORAGE_WEIGHT * tasks * files / m.base_bytes,
        }
        exact = parts["quality"] + parts["memory"] + parts["storage"]
        # The score with every timing ratio moved by the noise twice over, against and for it.
        low = exact + sum(_timing(served * TIMING_TIE, step_ratio * TIMING_TIE).values())
        high = exact + sum(_timing(served / TIMING_TIE, step_ratio / TIMING_TIE).values())
        unfit = _unfit(name, m, files, constraints)
        facts = _facts(m, files, (scores or {}).get(name))
        what = ", ".join([about(name), *_standouts(name, measurements)])
        reason = ("; ".join(unfit) + " — " if unfit else "") + f"{what} — {facts}"
        out.append(Recommendation(name, not unfit, sum(parts.values()), reason, parts, (low, high)))
    return _order([r for r in out if r.fit]) + _order([r for r in out if not r.fit])


def _timing(served: float, step_ratio: float) -> dict[str, float]:
    """The timing parts of a score: inference latency as served over the base model's, train
    step over the fastest measured."""
    return {"latency": -LATENCY_WEIGHT * _slower(served), "step": -STEP_WEIGHT * _slower(step_ratio)}


def _order(recs: list[Recommendation]) -> list[Recommendation]:
    """Best first: each time, of the methods left, the one with the highest exact part among
    those that no other surely beats (whose score range lies wholly below another's). A method
    surely beaten always follows the one beating it; near-equal scores, whose ranges overlap,
    are ordered by what no timing noise can change."""
    left = sorted(recs, key=lambda r: (-r.exact, r.method))
    out = []
    while left:
        # A strict partial order (ranges wholly below others) always leaves one unbeaten.
        best = next(r for r in left if not any(o.score_range[0] > r.score_range[1] for o in left))
        out.append(best)
        left.remove(best)
    return out


def quality_prior(method: str) -> float:
    """Expected validation points relative to full fine-tuning before any measurement: the
    method's registry entry, which cites its sources (0 for full fine-tuning itself)."""
    return 0.0 if method == FULL else preset(method)[1].quality


def about(method: str) -> str:
    """What a method is, in a few words (its registry entry's)."""
    return ABOUT[method] if method in ABOUT else preset(method)[1].about


def _slower(ratio: float) -> float:
    """How much slower than the reference a timing ratio is, beyond what noise can explain."""
    return max(0.0, math.log2(ratio / TIMING_TIE))


def _standouts(name: str, measurements: Mapping[str, Measurement]) -> list[str]:
    """The comparisons that the measurements support for ``name``: where it is the lowest of all
    measured methods (exact quantities, within 2%) or faster than every other by more than the
    timing noise."""
    m = measurements[name]
    others = [o for n, o in measurements.items() if n != name]
    if not others:
        return []
    out = []
    for label, value in (("lowest training memory", lambda x: x.train_memory_bytes),
                         ("smallest file per task", lambda x: x.file_bytes),
                         ("fewest trainable parameters", lambda x: x.trainable_parameters)):
        if value(m) <= min(value(o) for o in others) * (1 + EXACT_TIE):
            out.append(label)
    if all(o.step_seconds > m.step_seconds * TIMING_TIE for o in others):
        out.append("fastest train step")
    return out


def _unfit(name: str, m: Measurement, files: int, c: Constraints) -> list[str]:
    """Why ``name`` misses the hard constraints (empty when it meets them all)."""
    why = []
    if c.memory_budget is not None and m.train_memory_bytes > c.memory_budget:
        why.append(f"needs {_size(m.train_memory_bytes)} to train, over the {_size(c.memory_budget)} budget")
    if c.storage_per_task is not None and files > c.storage_per_task:
        why.append(f"{_size(files)} per task, over the {_size(c.storage_per_task)} limit")
    if c.latency_critical and name != FULL and not m.mergeable:
        why.append(f"adds {m.latency_ratio:.2f}× inference time and cannot merge it away")
    if name == FUSION and not c.compose:
        why.append("nothing to compose (fusion needs --compose and several tasks)")
    if c.compose and name != FUSION:
        why.append("cannot combine several tasks' adapters on its own (a possible fusion member)")
    return why


def _facts(m: Measurement, files: int, score: float | None) -> str:
    merged = f" ({m.merged_latency_ratio:.2f}× merged)" if m.merged_latency_ratio is not None else ""
    measured = f", validation score {100 * score:.1f} (measured)" if score is not None and math.isfinite(
        score) else ""
    return (f"{m.trainable_parameters:,} params ({m.percent_of_base:.3g}%), {_size(files)}/task, "
            f"train memory {_size(m.train_memory_bytes)}, step {m.step_seconds * 1e3:.0f} ms, "
            f"inference {m.latency_ratio:.2f}×{merged}{measured}")


# ---- profiling the user's model ----------------------------------------------------------------
def profile(model: str, methods: tuple[str, ...] | None = None, data: str | None = None,
            batch_size: int = 8, max_length: int = 64, members: int = 2, steps: int = 3,
            on_done: Any = None) -> dict[str, Measurement]:
    """Measure each method on ``model`` (a local folder or Hub id) at ``batch_size × max_length``:
    on real examples from ``data`` (a task folder) when given, else on random tokens. Methods
    that cannot be attached to this model are left out."""
    from peftlab.compare import all_methods
    from peftlab.data import load_task
    from peftlab.measure import data_batch, measure_methods, synthetic_batch
    from peftlab.tasks import task_for
    from peftlab.train import load_model

    if methods is None:
        methods = all_methods()
    if batch_size < 1 or max_length < 2:
        raise UsageError(f"--batch-size must be >= 1 and --max-length >= 2, got {batch_size}, {max_length}")
    task = load_task(data, splits=("train",), max_samples={"train": 4 * batch_size}) if data else None
    if task is not None and task_for(task.task).labelled not in ("class", "value"):
        raise UsageError(f"recommend profiles classification, regression or token-classification heads; "
                         f"--data is {task.task} data")
    model_, tokenizer, heads = load_model(model, task.task if task else "classification",
                                          task.num_labels if task else 2)
    limit = getattr(model_.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise UsageError(f"--max-length {max_length} is longer than the model's {limit} positions")
    # Methods whose sizes do not fit this model (e.g. tiny widths) are left out of the ranking.
    methods = tuple(m for m in methods
                    if _fits(model_, FUSION_MEMBER_METHOD if m == FUSION else m, max_length))
    if task is not None:
        batch = data_batch(task["train"], task.task, tokenizer, batch_size, max_length)
    else:
        batch = synthetic_batch(model_.config.vocab_size, batch_size, max_length)
    return measure_methods(model_, methods, batch, heads, members=members, steps=steps, on_done=on_done)


def _fits(model: Any, method: str, max_length: int | None = None) -> bool:
    """Whether ``method``'s preset can be attached to ``model`` (e.g. Compacter needs widths
    divisible by its PHM dimension); tried on the model and removed again. Virtual tokens (prompt,
    prefix tuning) must fit the model's positions beside ``max_length`` real ones."""
    from peftlab.adapter_set import attach, detach
    from peftlab.errors import PeftlabError
    from peftlab.train import method_config

    config = method_config(method)
    if config is None:
        return True
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    virtual = getattr(config, "num_virtual_tokens", 0)
    if isinstance(limit, int) and max_length is not None and max_length + virtual > limit:
        return False
    fresh = "_peftlab_adapters" not in model.__dict__
    adapters = attach(model)
    try:
        adapters.add("fit-probe", config)
    except PeftlabError:
        return False
    else:
        adapters.remove("fit-probe")
        return True
    finally:
        if fresh:
            detach(model)


def recommend(model: str, constraints: Constraints, data: str | None = None, train_minutes: float = 0.0,
              batch_size: int = 8, max_length: int = 64, work_dir: Any = None,
              on_done: Any = None) -> tuple[list[Recommendation], dict[str, Measurement], dict[str, float]]:
    """Profile, optionally train briefly, and rank. With ``data`` and ``train_minutes``, each
    method is trained for one epoch on at most 512 examples of ``data`` (one seed, by
    ``peftlab compare`` into ``work_dir``, within the time budget) and the scores replace the
    quality priors; the costs then come from that run's measurements. Returns the ranking, the
    measurements and the measured scores."""
    import tempfile
    from pathlib import Path

    from peftlab.train import method_names

    members = max(constraints.tasks, 2)
    singles = tuple(method_names())
    scores: dict[str, float] = {}
    if data is not None and train_minutes > 0:
        from peftlab.compare import CompareOptions, run_compare

        with tempfile.TemporaryDirectory(prefix="peftlab-recommend-") as tmp:
            report = run_compare(CompareOptions(
                model=model, data=(data,), out=Path(work_dir or tmp) / "compare", methods=singles,
                epochs=1.0, batch_size=batch_size, max_length=max_length, max_train_samples=512,
                max_eval_samples=512, time_budget=train_minutes, measure_steps=2, lr_search=False,
                quiet=True))
        measurements = {m: Measurement.from_dict(d) for m, d in report["measurements"].items()}
        task = next(iter(report["tasks"]))
        scores = {m: s["tasks"][task]["mean"] for m, s in report["summary"]["scores"].items()
                  if task in s["tasks"]}
        if constraints.compose:
            measurements.update(profile(model, (FUSION,), data, batch_size, max_length, members))
    else:
        methods = singles + ((FUSION,) if constraints.compose else ())
        measurements = profile(model, methods, data, batch_size, max_length, members, on_done=on_done)
    return rank(measurements, constraints, scores), measurements, scores
