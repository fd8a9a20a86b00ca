"""What a trained path holds (``--adapter PATH``): a run directory, an adapter directory or a
fully fine-tuned model folder, read once for the CLI, ``peftlab serve`` and the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftlab.errors import UsageError


class Trained:
    """What ``--adapter PATH`` points at: a run directory, an adapter directory, or a fully
    fine-tuned model folder; with the run's record when there is one."""

    def __init__(self, path: Path) -> None:
        from peftlab.io import CONFIG_FILE
        from peftlab.train import ADAPTER_DIR, MODEL_DIR, RUN_FILE

        path = Path(path)
        self.adapter: Path | None = None
        self.full_model: Path | None = None
        self.run: dict[str, Any] = {}
        run_dir = None
        if (path / RUN_FILE).is_file():
            run_dir = path
            if (path / ADAPTER_DIR / CONFIG_FILE).is_file():
                self.adapter = path / ADAPTER_DIR
            elif (path / MODEL_DIR / "config.json").is_file():
                self.full_model = path / MODEL_DIR
            else:
                raise UsageError(f"{path} is a run that has not finished (no {ADAPTER_DIR}/ or "
                                 f"{MODEL_DIR}/); finish it with peftlab train --resume")
        elif (path / CONFIG_FILE).is_file():
            self.adapter = path
            run_dir = path.parent if (path.parent / RUN_FILE).is_file() else None
        elif (path / "config.json").is_file():
            self.full_model = path
            run_dir = path.parent if (path.parent / RUN_FILE).is_file() else None
        elif not path.exists():
            raise UsageError(f"{path} does not exist; pass a run directory or an adapter directory")
        else:
            raise UsageError(f"{path} is not an adapter directory (no {CONFIG_FILE}) nor a run "
                             "directory; pass what peftlab train wrote")
        if run_dir is not None:
            try:
                self.run = json.loads((run_dir / RUN_FILE).read_text())
            except (OSError, ValueError):
                self.run = {}
        self.run_dir = run_dir
        self.config: dict[str, Any] = {}
        if self.adapter is not None:
            from peftlab.io import read_config

            self.config = read_config(self.adapter)

    def base_model(self, given: str | None) -> str:
        if self.full_model is not None:
            return str(self.full_model)
        model = given or self.run.get("args", {}).get("model")
        if not model:
            raise UsageError("pass --model: the base model the adapter was trained on (no run.json "
                             "next to the adapter records it)")
        return str(model)

    def attach_to(self, model: Any, name: str | None = None) -> str:
        """Load the adapter into ``model`` (as ``name``, default: its own) after checking it was
        trained on this base model; returns the adapter's name (activated)."""
        from peftlab import attach
        from peftlab.io import fingerprint

        adapters = attach(model)
        assert self.adapter is not None
        name = adapters.load(self.adapter, name)
        adapters.activate(name)
        recorded = self.config.get("base_model", {})
        current = fingerprint(model, adapters)
        if isinstance(recorded, dict) and recorded.get("shape_sha256") not in (None, current["shape_sha256"]):
            raise UsageError(
                f"{self.adapter} was trained on a different base model (parameter shapes differ: "
                f"{recorded.get('parameters')} vs {current['parameters']} base parameters); pass "
                "the --model it was trained on")
        return name

    def pooling(self) -> str:
        """How the trained head reads the backbone: recorded in the adapter (``cls`` for adapters
        from before pooling was recorded); a full model folder declares its own."""
        if self.adapter is None:
            return "auto"
        head = self.config.get("head")
        return str(head.get("pooling", "cls")) if isinstance(head, dict) else "cls"

    def labels(self) -> list[str] | None:
        """The class names of a classification head, in id order: recorded in the adapter, the
        run, or a full model's config.json; ``None`` where none are recorded (older adapters)."""
        from peftlab.heads import check_label_names

        if self.adapter is not None and "id2label" in self.config:
            return check_label_names(self.config["id2label"], str(self.adapter))
        if isinstance(self.run.get("labels"), list):
            return [str(n) for n in self.run["labels"]]
        if self.full_model is not None and not self.run:
            config = json.loads((self.full_model / "config.json").read_text())
            if config.get("problem_type") != "regression" and isinstance(config.get("id2label"), dict):
                return check_label_names(config["id2label"], str(self.full_model / "config.json"))
        return None

    def load(self, model: str | None, task: str, num_labels: int,
             labels: tuple[str, ...] | list[str] | None) -> tuple[Any, Any, str]:
        """The trained model, ready to run: the base model with the adapter attached (or the
        fully fine-tuned model), its tokenizer, and the base model's id."""
        from peftlab.train import load_model

        model_id = self.base_model(model)
        net, tokenizer, _ = load_model(model_id, task, num_labels, self.pooling(), labels)
        self.restore_template(tokenizer)
        if self.adapter is not None:
            self.attach_to(net)
        return net, tokenizer, model_id

    def restore_template(self, tokenizer: Any) -> None:
        """Give ``tokenizer`` the chat template that the run rendered its rows with."""
        if self.run.get("chat_template"):
            tokenizer.chat_template = self.run["chat_template"]

    def task_and_labels(self, data_task: str) -> tuple[str, int | None]:
        """The task and head size recorded by the run, else by a full model's config.json (so
        that a head is never silently re-initialised), else left to the data."""
        if self.run.get("task"):
            task = self.run["task"]
            return task, self.run.get("num_labels") or None  # 0: a task without classes
        if self.full_model is not None:
            config = json.loads((self.full_model / "config.json").read_text())
            known = saved_task(config)
            if known is not None and known.labelled not in ("class", "value"):
                return known.name, None  # a language model's config may still hold an id2label
            if config.get("problem_type") == "regression":
                return "regression", 1
            labels = config.get("id2label")
            if isinstance(labels, dict) and data_task != "causal-lm":
                named = known.name if known is not None and known.labelled == "class" else "classification"
                return (data_task if data_task != "auto" else named), len(labels)
        return data_task, None


def saved_task(config: dict[str, Any]) -> Any:
    """The task of a saved full model, from its architecture (``BertForTokenClassification``);
    ``None`` when no task knows it."""
    from peftlab.tasks import REGISTRY

    names = [str(a) for a in config.get("architectures") or []]
    return next((t for t in REGISTRY.values() if any(a.endswith(t.architectures) for a in names)), None)


def predict_task(trained: Trained, asked: str) -> tuple[str, int | None]:
    """The task of the trained model: what its run recorded, else what a full model's config
    says (its architecture and problem type)."""
    if asked != "auto":
        return trained.task_and_labels(asked)
    task, num_labels = trained.task_and_labels("auto")
    if task != "auto":
        return task, num_labels
    if trained.full_model is not None:
        config = json.loads((trained.full_model / "config.json").read_text())
        found = saved_task(config)
        if found is not None and found.labelled in ("class", "value"):
            regression = config.get("problem_type") == "regression"
            return ("regression", 1) if regression else (found.name, len(config.get("id2label") or {}) or 2)
        if found is not None:
            return found.name, None
        names = [str(a) for a in config.get("architectures") or []]
        raise UsageError(f"{trained.full_model} is a {names or 'model'} whose task peftlab does not know; "
                         "pass --task")
    raise UsageError(f"{trained.adapter} has no run.json saying its task; pass --task")
