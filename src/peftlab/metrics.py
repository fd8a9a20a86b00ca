"""Task metrics computed locally: classification ones from the confusion matrix with numpy (equal
to scikit-learn's, which is not imported: that alone took over a second of a short
``peftlab train``), correlations with scipy, entity spans with seqeval, generated text with
``rouge-score`` and ``sacrebleu`` (the ``seq2seq`` extra).

The ``evaluate`` package is deliberately not used: it downloads metric code from the Hub at run
time and fails offline. Metric names follow GLUE: accuracy, F1 (of class 1 for binary tasks,
macro-averaged otherwise), Matthews correlation, Pearson and Spearman correlation. Tags (token
classification) are judged by entity-level precision, recall and F1 through ``seqeval``, as
CoNLL's conlleval does, plus the accuracy per word (:func:`tag_metrics`); generated text by
ROUGE-1, ROUGE-2, ROUGE-L and BLEU (:func:`text_metrics`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from peftlab.errors import UsageError


def classification_metrics(labels: np.ndarray, predictions: np.ndarray,
                           num_classes: int | None = None) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation of predicted class ids against true ones, as
    scikit-learn's ``accuracy_score``, ``f1_score`` (``zero_division=0``) and
    ``matthews_corrcoef`` give them. ``num_classes`` (default: inferred from the ids) decides
    binary (F1 of class 1) versus macro F1 (over the classes present)."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    k = int(max(labels.max(initial=0), predictions.max(initial=0))) + 1
    k = max(k, num_classes or 0)
    return {m: score("classification", m, predictions, labels, k) for m in ("accuracy", "f1", "matthews")}


def regression_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation and mean squared error. A constant prediction has no
    correlation; it is reported as NaN rather than as a made-up number."""
    from scipy.stats import pearsonr, spearmanr

    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
    mse = float(np.mean((labels - predictions) ** 2))
    if len(labels) < 2 or np.std(labels) == 0 or np.std(predictions) == 0:
        return {"pearson": math.nan, "spearman": math.nan, "mse": mse}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "pearson": float(pearsonr(labels, predictions)[0]),
            "spearman": float(spearmanr(labels, predictions)[0]),
            "mse": mse,
        }


#: A tag of an entity scheme (IOB1, IOB2, IOBES): a prefix, a dash and the entity type ("B-PER").
_ENTITY_TAG = re.compile(r"[BIES]-\S.*")


def entity_tags(names: Sequence[str]) -> bool:
    """Whether tags ``names`` mark entity spans: each is ``O`` or a ``B-``, ``I-``, ``E-`` or
    ``S-`` prefix with a type, and at least one is not ``O``. Other tag sets (part-of-speech tags,
    ``B_PER``, lower-case prefixes) hold no entities that seqeval could read; they are judged word
    by word."""
    return any(n != "O" for n in names) and all(n == "O" or _ENTITY_TAG.fullmatch(n) for n in names)


def require_seqeval() -> None:
    """Entity metrics need the ``seqeval`` package; say how to install it (before any file is written)."""
    try:
        import seqeval.metrics  # noqa: F401
    except ImportError:
        raise UsageError("entity metrics of token classification need the seqeval package: "
                         "pip install 'peftlab[token-classification]' (or pip install seqeval)") from None


def tag_metrics(true: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]],
                entities: bool) -> dict[str, float]:
    """Metrics of predicted tags against true ones, one list of tags per sentence.

    ``accuracy``: the share of words tagged right. With ``entities`` (see :func:`entity_tags`),
    ``precision``, ``recall`` and ``f1`` are seqeval's entity-level scores, micro-averaged over the
    entity types, in its default mode, which reads spans as CoNLL's conlleval does (an ``I-X``
    after ``O`` or another type starts an entity, so IOB1 and IOB2 both work). Without entities
    each word is its own unit, so micro precision, recall and F1 all equal the accuracy: ``f1`` is
    the accuracy then (and precision and recall are not repeated). No words: every metric is NaN."""
    words = sum(len(t) for t in true)
    if any(len(t) != len(p) for t, p in zip(true, predicted)) or len(true) != len(predicted):
        raise ValueError("every sentence needs as many predicted tags as true ones")
    if words == 0:
        keys = ("accuracy", "precision", "recall", "f1") if entities else ("accuracy", "f1")
        return dict.fromkeys(keys, math.nan)
    accuracy = sum(a == b for t, p in zip(true, predicted) for a, b in zip(t, p)) / words
    if not entities:
        return {"accuracy": accuracy, "f1": accuracy}
    require_seqeval()
    from seqeval.metrics import f1_score, precision_score, recall_score

    true, predicted = [list(t) for t in true], [list(p) for p in predicted]
    return {
        "accuracy": accuracy,
        # zero_division=0: no predicted (or no true) entities scores 0 instead of warning.
        "precision": float(precision_score(true, predicted, zero_division=0)),
        "recall": float(recall_score(true, predicted, zero_division=0)),
        "f1": float(f1_score(true, predicted, zero_division=0)),
    }
# Chinese characters and Japanese kana: scripts written without spaces between words.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_ROUGE_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class RougeWords:
    """The words ROUGE compares: rouge-score's own tokenizer (lower case, runs of letters and
    digits, Porter stems of words over three letters), except that letters and digits of every
    script count, and each Chinese character or kana is a word. rouge-score keeps ``a-z0-9``
    only, so a reference in Russian or Chinese has no words at all and scores 0 whatever was
    generated, and "café" loses its "é". On ASCII text the words are rouge-score's exactly."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = _ROUGE_TOKEN.findall(text.lower())
        # English stemming is kept to ASCII words: its suffix rules mean nothing in other languages.
        return [self.stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


def require_text_metrics() -> None:
    """Raise :class:`UsageError` unless the packages of :func:`text_metrics` are installed (checked
    before a run writes anything)."""
    import importlib.util

    missing = [package for module, package in (("rouge_score", "rouge-score"), ("sacrebleu", "sacrebleu"))
               if importlib.util.find_spec(module) is None]
    if missing:
        from peftlab.errors import UsageError

        raise UsageError(f"ROUGE and BLEU need {' and '.join(missing)}: pip install 'peftlab[seq2seq]'")


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (rouge-score, in [0, 1], averaged over examples,
    words from :class:`RougeWords`) and corpus BLEU (sacreBLEU, on its 0-100 scale) of generated
    texts against one reference each. BLEU tokenizes with sacreBLEU's default ``13a``, or with
    its ``zh`` tokenizer when the references hold Chinese characters (13a would see each
    unspaced Chinese sentence as one word), as sacreBLEU itself does for Chinese targets."""
    require_text_metrics()
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {"rouge1": math.nan, "rouge2": math.nan, "rougeL": math.nan, "bleu": math.nan}
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), tokenizer=RougeWords())
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references):
        for kind, value in scorer.score(reference, prediction).items():
            totals[kind] += value.fmeasure
    out = {kind: total / len(references) for kind, total in totals.items()}
    han = any(_HAN.search(r) for r in references)
    out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)],
                                              tokenize="zh" if han else "13a").score)
    return out


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); infinite instead of overflowing."""
    return math.exp(loss) if loss < 700 else math.inf


def score(task: str, metric: str, predictions: np.ndarray, labels: np.ndarray,
          num_classes: int = 2) -> float:
    """One metric of predicted class ids (classification, ``num_classes`` deciding binary versus
    macro F1 as in :func:`classification_metrics`) or of scores (regression). Classification
    metrics come from the confusion matrix directly: the bootstrap calls this thousands of times."""
    if task != "classification":
        return _correlation(metric, predictions, labels)
    k = num_classes
    cm = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k).astype(np.float64)
    n, correct = cm.sum(), np.trace(cm)
    if metric == "accuracy":
        return float(correct / n)
    truth, predicted = cm.sum(1), cm.sum(0)
    if metric == "matthews":
        cov = correct * n - truth @ predicted
        var = (n * n - predicted @ predicted) * (n * n - truth @ truth)
        return float(cov / math.sqrt(var)) if var > 0 else 0.0
    tp = np.diag(cm)
    denominator = truth + predicted  # 2·tp + fp + fn per class
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
    if k <= 2:
        return float(f1[1])
    return float(f1[denominator > 0].mean())  # macro over the classes present, as scikit-learn


def _correlation(metric: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson or Spearman correlation (NaN for a constant input), as in :func:`regression_metrics`."""
    from scipy.stats import rankdata

    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if metric == "spearman":
        x, y = rankdata(x), rankdata(y)
    elif metric != "pearson":
        raise ValueError(f"no interval for regression metric {metric!r}")
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


#: Metrics where a lower value is better (the others: higher is better).
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mse"})


def same_labels(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two runs' saved labels are the same examples in the same order (float labels, as
    saved through float32, equal to 1e-6)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0.0, atol=1e-6))


#: The task whose predictions and labels are per word (rows padded with -100).
TAGS = "token-classification"


def tag_counts(predictions: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Per sentence, the sums that :func:`tag_metrics` are ratios of: words, words tagged right
    and, for entity tags, entities found right, predicted and true. Entities never cross a
    sentence (seqeval reads them sentence by sentence), so a resample of sentences scores as the
    sum of its rows (:func:`tag_score`) without running seqeval again. ``predictions``: tag ids
    per token; where longer than ``labels`` (prompt tuning's virtual tokens come first) they are
    read from their end."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    predictions = predictions[:, predictions.shape[1] - labels.shape[1]:]
    entities = entity_tags(names)
    if entities:
        require_seqeval()
        from seqeval.metrics.sequence_labeling import get_entities
    rows = []
    for guessed_ids, true_ids in zip(predictions, labels):
        keep = true_ids != -100
        true = [names[t] for t in true_ids[keep]]
        guessed = [names[g] for g in guessed_ids[keep]]
        row = [len(true), sum(t == g for t, g in zip(true, guessed))]
        if entities:
            spans, found = set(get_entities(true)), set(get_entities(guessed))
            row += [len(spans & found), len(found), len(spans)]
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 5 if entities else 2)


def tag_score(metric: str, counts: np.ndarray) -> float:
    """``metric`` (accuracy, or seqeval's micro precision, recall and F1) of sentences'
    :func:`tag_counts`; without entity tags F1 is the accuracy, as in :func:`tag_metrics`."""
    total = counts.sum(0)
    if metric == "accuracy" or (metric == "f1" and len(total) == 2):
        return float(total[1] / total[0]) if total[0] else math.nan
    if len(total) == 2:
        raise ValueError(f"{metric} needs entity tags (B-X, I-X, O)")
    right, guessed, true = total[2:]
    if metric == "precision":
        return float(right / guessed) if guessed else 0.0
    if metric == "recall":
        return float(right / true) if true else 0.0
    return float(2 * right / (guessed + true)) if guessed + true else 0.0


def _scorer(task: str, metric: str, predictions: np.ndarray, labels: np.ndarray, num_classes: int | None,
            names: Sequence[str] | None) -> tuple[int, Callable[[np.ndarray], float]]:
    """The number of examples of one run, and its score on the examples at given indices."""
    if task == TAGS:
        if names is None:
            raise ValueError("intervals of tag metrics need the tag names")
        counts = tag_counts(predictions, labels, names)
        return len(counts), lambda idx: tag_score(metric, counts[idx])
    return len(labels), lambda idx: score(task, metric, predictions[idx], labels[idx], num_classes or 2)


def bootstrap_ci(task: str, metric: str, runs: list[tuple[np.ndarray, np.ndarray]],
                 num_classes: int | None = None, resamples: int = 1000, seed: int = 0,
                 against: list[tuple[np.ndarray, np.ndarray]] | None = None,
                 names: Sequence[str] | None = None) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean score over ``runs`` (one ``(predictions,
    labels)`` pair per seed). With one seed the validation examples are resampled; with several,
    the seeds are resampled and then the examples of each drawn seed (a two-level bootstrap), so
    the interval holds both the seed-to-seed and the finite-validation-set variation. A resample
    whose metric is undefined (a constant prediction has no correlation) is left out.

    ``against``: another method's runs on the same examples, paired with ``runs`` by position
    (seed). The interval is then of the difference ``runs − against``, each resample drawing the
    same seeds and examples for both: a paired bootstrap, which sees a consistent gain that two
    overlapping intervals would hide. The difference is significant where it excludes 0.

    Token classification resamples sentences, and needs the tag ``names``."""
    if not runs:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    runs = [(np.asarray(p), np.asarray(y)) for p, y in runs]
    others = [(np.asarray(p), np.asarray(y)) for p, y in against] if against is not None else None
    if others is not None and (len(others) != len(runs) or any(
            not same_labels(y, z) for (_, y), (_, z) in zip(runs, others))):
        raise ValueError("a paired interval needs runs on the same examples, with equal labels, in pairs")
    if task == "classification" and num_classes is None:
        num_classes = max(2, *(int(max(p.max(initial=0), y.max(initial=0))) + 1
                               for p, y in runs + (others or [])))
    scorers = [_scorer(task, metric, p, y, num_classes, names) for p, y in runs]
    baselines = [_scorer(task, metric, p, y, num_classes, names)[1] for p, y in others or ()]
    means = []
    for _ in range(resamples):
        drawn = rng.integers(len(runs), size=len(runs)) if len(runs) > 1 else range(len(runs))
        values = []
        for i in drawn:
            n, scored = scorers[i]
            idx = rng.integers(n, size=n)
            values.append(scored(idx) - (baselines[i](idx) if baselines else 0.0))
        if all(math.isfinite(v) for v in values):
            means.append(float(np.mean(values)))
    if not means:
        return (math.nan, math.nan)
    low, high = np.percentile(means, [2.5, 97.5])
    return (float(low), float(high))


def constant_score(task: str, metric: str, labels: np.ndarray, num_classes: int = 2,
                   names: Sequence[str] | None = None) -> float:
    """The best score a constant prediction reaches on ``labels``: the level a method that learned
    nothing sits at (the majority class's accuracy; 0 for correlations, which a constant has none
    of; for tags, one tag for every word, which needs the tag ``names``)."""
    labels = np.asarray(labels)
    if task == TAGS:
        if names is None:
            raise ValueError("the constant level of tag metrics needs the tag names")
        return max(tag_score(metric, tag_counts(np.full_like(labels, c), labels, names))
                   for c in range(len(names)))
    if task != "classification":
        return 0.0
    return max(score(task, metric, np.full_like(labels, c), labels, num_classes) for c in range(num_classes))


def ranks_with_ties(intervals: dict[str, tuple[float, float]]) -> dict[str, int]:
    """Rank (1 = best; higher scores are better) of each entry from its 95% interval: one plus
    the number of entries whose interval lies wholly above this one's. Entries whose intervals
    overlap share ranks, so a rank never claims a difference that the data do not show."""
    def above(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return math.isfinite(a[0]) and math.isfinite(b[1]) and a[0] > b[1]

    return {k: 1 + sum(above(other, iv) for o, other in intervals.items() if o != k)
            for k, iv in intervals.items()}
