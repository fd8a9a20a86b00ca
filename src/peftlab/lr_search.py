"""Choosing a method's learning rate on the user's data, without touching the validation split.

Default rates come from papers tuned for other models and budgets; on MiniLM-L6 with one epoch
of SST-2, LoRA scored 76.8 at its default 5e-4 and 81.3 at 2e-3, and full fine-tuning 66.7 at
2e-5 against 82.0 at 1e-4. So ``peftlab train --lr auto`` and ``peftlab compare`` (by default)
pick each method's rate by **successive halving** (Jamieson & Talwalkar 2016, arXiv 1502.07943):

1. Hold out a slice of the *training* data (10%, at most 500 examples, a fixed draw); the
   candidates train on the rest and are scored there. The validation split is never read.
2. Rung 1: the candidates ``prior × 2^k`` for k in -1..2 (the method's default rate is the prior;
   the grid leans upwards, since the priors come from longer runs) each train for
   ``budget / 8`` of the real run's steps.
3. Rung 2: the better half trains again from scratch for ``budget / 4`` of the steps; the best
   of rung 2 is chosen. Equal scores are told apart by the held-out loss (then by closeness
   to the prior). Together the rungs cost ``budget`` × the real run's training steps
   (``budget`` = 1 by default).

A budget too small to tell rates apart is not searched: when rung 1 would train fewer than
:data:`MIN_TRIAL_STEPS` steps per candidate, the default rate is kept and the result says why.
Nor does a search whose finalists all score at or below a constant prediction on the held-out
slice choose anything: none of them has begun to learn, so whichever "wins" wins by noise. The
default is kept and :attr:`LRSearch.note` says so. On GLUE-small (MiniLM-L6, 3 epochs of 2,000
examples) that was every method on CoLA, where 92 steps left every finalist at Matthews 0 (the
held-out loss, which used to break such ties, then picked full fine-tuning's smallest rate), and
three of seven on RTE.
Short trials are noisy but still informative: on the everyday preset (63 steps, so rungs of 7
and 14) the search raised SST-2 from the defaults' 71.3 / 70.5 / 72.2 / 58.9 to 77.5 / 77.5 /
77.3 / 75.8 for (IA)³ / Pfeiffer / Compacter++ / full fine-tuning, while LoRA's four rates
scored 58-60% on the held-out slice (noise) and it stayed at 57.0 either way.

Each candidate trains exactly as the real run does (:func:`peftlab.train.run_training`: same
head, warm-up and decay, compressed to its steps). A candidate whose loss diverges scores -inf.
Short runs favour large rates somewhat; rung 2's longer runs temper that.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
from pathlib import Path
from typing import Any

from peftlab.data import Split, TaskData
from peftlab.errors import DataError, NonFiniteLossError
from peftlab.metrics import LOWER_IS_BETTER
from peftlab.tasks import task_for

FACTORS = (0.5, 1.0, 2.0, 4.0)
HELD_OUT_FRACTION = 0.1
HELD_OUT_MAX = 500
#: Fewer training steps than this per rung-1 candidate cannot tell learning rates apart.
MIN_TRIAL_STEPS = 5


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate rate trained for ``steps`` in ``rung``; ``score`` and ``loss`` on the
    held-out slice."""

    lr: float
    rung: int
    steps: int
    score: float
    loss: float = math.inf

    def rank(self) -> tuple[float, float]:
        """Higher is better: the score, then (between equal scores) the lower held-out loss. Short
        trials often tie exactly, all at the constant prediction (CoLA's Matthews 0) or on a few
        examples of 200; the loss still tells the rates apart."""
        return (self.score, -self.loss if math.isfinite(self.loss) else -math.inf)


@dataclasses.dataclass(frozen=True)
class LRSearch:
    """The chosen rate, every trial, and what it was scored by."""

    lr: float
    metric: str
    held_out: int
    trials: tuple[Trial, ...]
    skipped: str | None = None  # why no search ran (the default rate was kept)
    note: str | None = None  # why the default was kept although trials ran

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "metric": self.metric, "held_out_examples": self.held_out,
                "trials": [dataclasses.asdict(t) for t in self.trials], "skipped": self.skipped,
                "note": self.note}


def held_out_split(data: TaskData, seed: int = 0) -> TaskData:
    """``data``'s training split cut in two: ``train`` (the rest) and ``validation`` (the held-out
    slice). The original validation split is not part of the result."""
    rows = data["train"].rows
    n = min(HELD_OUT_MAX, max(1, round(HELD_OUT_FRACTION * len(rows))))
    if len(rows) - n < 1:
        raise DataError(
            f"{data['train'].path}: {len(rows)} training examples are too few to hold some out for "
            "choosing the learning rate; give a rate (--lr) instead")
    held = set(random.Random(seed).sample(range(len(rows)), n))
    if hasattr(rows, "take"):  # the split's own kind of rows (Arrow-backed), with what it carries
        keep = rows.take([i for i in range(len(rows)) if i not in held])
        out = rows.take(sorted(held))
    else:
        keep = [r for i, r in enumerate(rows) if i not in held]
        out = [r for i, r in enumerate(rows) if i in held]
    path = data["train"].path
    splits = {"train": Split("train", path, keep), "validation": Split("held-out", path, out)}
    return dataclasses.replace(data, splits=splits)


def candidates(prior: float) -> tuple[float, ...]:
    return tuple(prior * f for f in FACTORS)


def search_lr(opts: Any, data: TaskData, prior: float, metric: str | None = None,
              budget: float = 1.0) -> LRSearch:
    """Successive halving over :func:`candidates` of ``prior`` for the run ``opts`` (a
    :class:`peftlab.train.TrainOptions`) on ``data``; see the module docstring."""
    metric = metric or task_for(data.task).primary
    steps_per_epoch = math.ceil(len(data["train"]) / opts.batch_size)
    total = opts.max_steps or max(1, math.ceil(steps_per_epoch * opts.epochs))
    rung1 = math.floor(budget * total / (2 * len(FACTORS)))
    if rung1 < MIN_TRIAL_STEPS:
        return LRSearch(prior, metric, 0, (), f"the run's {total} steps give each candidate {rung1} "
                        f"(< {MIN_TRIAL_STEPS}), too few to tell rates apart: the default is kept")
    split = held_out_split(data)
    trials = [_trial(opts, split, lr, 1, rung1, metric) for lr in candidates(prior)]
    best = sorted(trials, key=Trial.rank, reverse=True)[: len(trials) // 2]
    trials += [_trial(opts, split, t.lr, 2, 2 * rung1, metric) for t in sorted(best, key=lambda t: t.lr)]
    final = [t for t in trials if t.rung == 2]
    held_out = len(split["validation"])
    floor = _constant_score(split, metric)
    if floor is not None and all(t.score <= floor for t in final):
        return LRSearch(prior, metric, held_out, tuple(trials), note=(
            f"no finalist scored above a constant prediction ({metric} {floor:.3g}) on the held-out "
            f"slice after {2 * rung1} steps, so none had begun to learn: the default is kept"))
    chosen = max(final, key=lambda t: (*t.rank(), -abs(math.log(t.lr / prior))))
    return LRSearch(chosen.lr, metric, held_out, tuple(trials))


def _constant_score(split: TaskData, metric: str) -> float | None:
    """The held-out score of the best constant prediction, as trials score it (``None`` where
    there is none: generated text, a loss)."""
    from peftlab.train import constant_floor

    return constant_floor(split, split["validation"], metric)


def _trial(opts: Any, data: TaskData, lr: float, rung: int, steps: int, metric: str) -> Trial:
    from peftlab.train import run_training

    with tempfile.TemporaryDirectory(prefix="peftlab-lr-") as tmp:
        trial_opts = dataclasses.replace(
            opts, lr=lr, lr_search=False, max_steps=steps, max_minutes=None, patience=None,
            out=Path(tmp) / "run", checkpoints=False, resume=False, eval_every=None, quiet=True)
        try:
            result = run_training(trial_opts, data=data)
        except NonFiniteLossError:
            return Trial(lr, rung, steps, -math.inf)
    value = result["eval"].get(metric, math.nan)
    if metric in LOWER_IS_BETTER:  # ranked by its negative
        value = -value
    loss = result["eval"].get("loss", math.inf)
    return Trial(lr, rung, steps, value if math.isfinite(value) else -math.inf,
                 loss if math.isfinite(loss) else math.inf)
