"""Tasks: *what* is trained — a model factory, a dataset, a loss and eval metrics.

shoal owns the training loop (it must, to shard, pipeline, replicate and
recover it), so it takes the user's pieces declaratively, the torchtitan
way: ``model._target_`` (a factory given the dataset's facts it asks for),
``data._target_`` (a dataset from ``actors/datasets.py`` or the user's own),
and ``task.loss`` (a function ``(model, batch) -> (loss_sum, count)``).
Programs call the task, never a loss function directly.

Two tasks, chosen by the dataset's kind unless ``task.type`` says:

- ``lm``: next-token prediction on a ``TokenDataset``; a sample is
  ``model.seq_len`` tokens; metrics: loss and perplexity.
- ``classification``: class labels of an ``ArrayDataset``'s rows; metrics:
  loss and accuracy.

**Loss scale.** A step's gradient is that of the global batch's summed loss
divided by ``global_batch * units_per_sample`` (tokens per sample for
``lm``, 1 for ``classification``): a constant every rank knows, so ranks
with different shares of the batch still sum to the global-batch mean. A
user's loss that counts fewer units (masked tokens) gets the same scale;
the reported loss is always ``sum(loss_sum) / sum(count)``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from actors.datasets import DataFacts

# A loss: (model, batch) -> (summed loss as a 0-d tensor, units it sums over).
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


class TaskError(ValueError):
    """A task piece that does not fit (an unimportable loss, a loss that is not a scalar)."""


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over every position."""
    logits = model(batch["x"])
    y = batch["y"]
    flat = logits.float().reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, y.reshape(-1), reduction="sum")
    return loss, y.numel()


def classification_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each row's class logits."""
    logits = model(batch["x"])
    return F.cross_entropy(logits.float(), batch["y"], reduction="sum"), len(batch["y"])


def import_function(path: str, field: str) -> Callable[..., Any]:
    """``"package.module.name"`` imported from the working directory or an installed package."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise TaskError(f"{field}: {path!r} is not a dotted path such as mypkg.losses.focal")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"{field}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TaskError(f"{field}: module {module_name!r} has no function {attr!r}")
    return fn


@dataclass(frozen=True)
class Task:
    """One job's task: its type, loss, and the sizes the loss is scaled by."""

    type: str  # "lm" or "classification"
    loss_fn: LossFn
    loss_name: str  # for error messages: "task.loss" or the built-in's name
    seq_len: int | None  # lm: tokens per sample (the model's context)

    @property
    def units_per_sample(self) -> int:
        return self.seq_len if self.type == "lm" else 1

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The loss of ``batch``, checked to be a 0-d tensor and a count (else ``TaskError``)."""
        out = self.loss_fn(model, batch)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TaskError(
                f"{self.loss_name} must return (loss_sum, count), got {type(out).__name__}"
            )
        loss, count = out
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TaskError(
                f"{self.loss_name} must return a scalar (0-d tensor) summed loss, got {shape}"
            )
        return loss, int(count)

    def objective(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(objective, loss, count)``: what training minimises, and the loss it reports.

        The objective is the loss plus the model's auxiliary loss of this
        forward, if it has one (``model.auxiliary_loss()``, e.g. a mixture of
        experts' load-balancing loss, a mean over the batch), counted once per
        unit so that it scales as the summed loss does.
        """
        loss, count = self.loss(model, batch)
        aux = getattr(model, "auxiliary_loss", None)
        extra = aux() if callable(aux) else None
        return (loss if extra is None else loss + extra * count), loss, count

    def batch(self, data: Any, seed: int, step: int, global_batch: int, lo: int, hi: int):
        return data.batch(seed, step, global_batch, lo, hi, self.seq_len)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: list[tuple[dict[str, torch.Tensor], bool]]
    ) -> dict[str, float]:
        """Sums over one rank's rows of the held-out batches: loss, count and correct rows.

        Each item is ``(batch, counted)``. A rank with no rows of a batch runs
        the loss on a stand-in row (``counted`` False) and drops the result:
        under ZeRO-3 every forward gathers parameters with the other ranks,
        so every rank must run as many forwards.
        """
        loss_sum, count, correct, rows = 0.0, 0, 0, 0
        outputs: list[torch.Tensor] = []
        hook = model.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        try:
            for batch, counted in batches:
                outputs.clear()
                loss, n = self.loss(model, batch)
                if not counted:
                    continue
                loss_sum += float(loss)
                count += n
                rows += len(batch["y"])
                if self.type == "classification" and outputs:
                    correct += int((outputs[-1].argmax(-1) == batch["y"]).sum())
        finally:
            hook.remove()
        return {
            "task": self.type,
            "loss_sum": loss_sum,
            "count": count,
            "correct": correct,
            "rows": rows,
        }


def eval_metrics(sums: list[dict[str, Any]]) -> dict[str, float]:
    """Eval metrics from every rank's ``Task.evaluate`` sums: ``eval_loss``, and ``accuracy``
    (classification) or ``perplexity`` (lm)."""
    count = sum(s["count"] for s in sums)
    if count == 0:
        return {}
    loss = sum(s["loss_sum"] for s in sums) / count
    if sums[0]["task"] == "classification":
        rows = sum(s["rows"] for s in sums)
        return {"eval_loss": loss, "accuracy": sum(s["correct"] for s in sums) / rows}
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def task_type_for(requested: str, data: Any) -> str:
    """The task a dataset implies (``auto``), or the one asked for if the dataset fits it."""
    kind = getattr(data, "kind", None)
    implied = {"tokens": "lm", "labelled": "classification"}.get(kind)
    if requested == "auto":
        if implied is None:
            raise TaskError(
                f"task.type: cannot tell the task from a dataset of type {type(data).__name__} "
                "(give it kind='tokens' or 'labelled', or return a TokenDataset/ArrayDataset)"
            )
        return implied
    if implied is not None and implied != requested:
        raise TaskError(f"task.type: {requested!r} does not fit a dataset of kind {kind!r}")
    return requested


def make_task(task_cfg: Any, data: Any, seq_len: int | None) -> Task:
    """The job's task from its ``task`` config and its dataset."""
    kind = task_type_for(str(task_cfg.type), data)
    if kind == "lm" and seq_len is None:
        raise TaskError("model.seq_len: the lm task needs the model's context length")
    if task_cfg.loss:
        fn, name = import_function(str(task_cfg.loss), "task.loss"), "task.loss"
    else:
        fn = lm_loss if kind == "lm" else classification_loss
        name = f"the built-in {kind} loss"
    return Task(kind, fn, name, seq_len if kind == "lm" else None)


def build_model(model_cfg: Any, facts: DataFacts) -> nn.Module:
    """The model named by ``model_cfg._target_``, given the dataset facts its factory takes.

    A fact goes to the factory only if its signature names it (or takes
    ``**kwargs``) and the config does not set it: ``GPT(vocab_size=...)``
    gets the vocabulary, ``MLP(in_features=..., num_classes=...)`` the
    input size and classes.
    """
    from hydra.utils import get_method, instantiate

    cfg = _as_dict(model_cfg)
    factory = get_method(cfg["_target_"])
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass nothing
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {
        k: v for k, v in facts.model_kwargs().items() if k not in cfg and (takes_any or k in params)
    }
    return instantiate(cfg, **extra)


def build_dataset(data_cfg: Any, run_dir: str | None = None) -> Any:
    """The dataset returned by ``data_cfg._target_`` (given ``run_dir`` if it takes one)."""
    from hydra.utils import get_method, instantiate

    cfg = _as_dict(data_cfg)
    try:
        params = inspect.signature(get_method(cfg["_target_"])).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {"run_dir": run_dir} if "run_dir" in params and "run_dir" not in cfg else {}
    return instantiate(cfg, **extra)


def _as_dict(node: Any) -> dict[str, Any]:
    import dataclasses

    from omegaconf import OmegaConf

    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)
