"""``JobSpec``: a composed, typed and validated job configuration.

``JobSpec.from_overrides(["strategy=ddp", "train.steps=50"])`` composes
``configs/job.yaml`` with the overrides through Hydra, converts the result to
the dataclasses of ``orchestrator/schema.py`` and checks every value. Any
problem raises ``ConfigError`` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from orchestrator.programs import CONFIGS
from orchestrator.schema import (
    BALANCE,
    LR_SCHEDULES,
    OFFLOAD_OPTIMIZER,
    OFFLOAD_PARAMS,
    OFFLOAD_STRATEGIES,
    OPTIMIZERS,
    PRECISIONS,
    REPLICATION_MODES,
    STRATEGIES,
    TASK_TYPES,
    ClusterConfig,
    JobConfig,
    params_leave_worker,
    register_schemas,
)


class ConfigError(ValueError):
    """A job configuration that cannot run; the message names the field."""


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class JobSpec:
    """A job, ready to submit. ``config`` is the typed configuration tree."""

    config: JobConfig
    job_id: str
    # What it was composed from: how `submit(spec, address=...)` sends it to a cluster.
    overrides: list[str] = dataclasses.field(default_factory=list)

    # -- construction -------------------------------------------------------

    @classmethod
    def from_overrides(
        cls, overrides: list[str] | None = None, job_id: str | None = None
    ) -> JobSpec:
        """Compose ``configs/job.yaml`` with Hydra-style ``overrides`` and validate the result."""
        cfg = compose(list(overrides or []))
        spec = cls(config=cfg, job_id=job_id or new_job_id(), overrides=list(overrides or []))
        spec._resolve_paths()
        validate(spec.config)
        return spec

    def _resolve_paths(self) -> None:
        c = self.config
        c.run_dir = str(Path(c.run_dir or f"runs/{self.job_id}").expanduser().resolve())
        if c.checkpoint.uri is None:
            c.checkpoint.uri = f"file://{c.run_dir}/checkpoints"

    # -- convenient access --------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @property
    def seq_len(self) -> int | None:
        """Tokens per sample of a language model: the model's ``seq_len`` (None: it has none)."""
        value = _field(self.config.model, "seq_len")
        return None if value is None else int(value)

    def __getattr__(self, name: str) -> Any:
        # spec.train.steps reads as spec.config.train.steps.
        if name.startswith("_") or name in ("config", "job_id", "overrides"):
            raise AttributeError(name)
        return getattr(self.config, name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


def compose(overrides: list[str]) -> JobConfig:
    """Hydra composition of ``configs/`` plus overrides, as schema dataclasses."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    try:
        with initialize_config_module(config_module="configs", version_base=None):
            cfg = hydra_compose(config_name="job", overrides=overrides)
        _fit_replaced_targets(cfg, overrides)
        _reject_unknown_keys(cfg)
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain_hydra_error(e)) from None


def _reject_unknown_keys(node: Any, path: str = "") -> None:
    """A key that the schema of its node lacks (added with ``+key=...``) is an error.

    ``OmegaConf.to_object`` would drop it silently, and the user would train
    without the setting they asked for. Nodes without a schema (a user's own
    model or dataset config) take any key: their ``_target_`` receives them.
    """
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    fields = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    for key in node.keys():
        name = f"{path}{key}"
        if fields is not None and key not in fields:
            raise ConfigError(
                f"{name}: unknown field (allowed here: {', '.join(sorted(fields))}); "
                "`shoal config` prints every field"
            )
        _reject_unknown_keys(node._get_node(key), f"{name}.")


def _fit_replaced_targets(cfg: Any, overrides: list[str]) -> None:
    """A ``model``/``data`` whose ``_target_`` was replaced keeps only the fields it takes.

    ``model._target_=mypkg.nets.Net`` on the default ``gpt_tiny`` would
    otherwise hand ``Net`` the GPT's ``n_layer``, ``n_head``, ...: the option's
    fields that the new target's signature does not name are dropped. Fields
    set on the command line (``model.width=32``) are always kept, so a target
    that does not take them fails naming them; a target taking ``**kwargs``
    keeps everything.
    """
    import inspect

    from omegaconf import open_dict

    for group in ("model", "data"):
        node = cfg[group]
        schema = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(schema):
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(schema)}
        target = node.get("_target_")
        if not target or target == defaults.get("_target_"):
            continue
        try:
            module_name, _, attr = str(target).rpartition(".")
            params = inspect.signature(
                getattr(importlib.import_module(module_name), attr)
            ).parameters
        except Exception:  # noqa: BLE001 - _validate_targets names an unimportable target
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        prefix = f"{group}."
        given = {
            o.split("=", 1)[0].lstrip("+~")[len(prefix) :]
            for o in overrides
            if o.lstrip("+~").startswith(prefix)
        }
        kept = {k: node[k] for k in node if k == "_target_" or k in params or k in given}
        with open_dict(cfg):
            cfg[group] = OmegaConf.create(kept)


def _explain_hydra_error(e: Exception) -> str:
    # Hydra's own message ("Error merging override train.steps=abc") drops the
    # reason, which OmegaConf gives in the cause ("could not be converted to Integer").
    cause = e.__cause__ or e.__context__
    msg = str(e).strip()
    if cause is not None and str(cause).strip() and str(cause).strip() not in msg:
        reason = str(cause).strip().splitlines()[0]
        msg = f"{msg}: {reason}"
    # Hydra lists its search path and the schema nodes among the options;
    # neither is something a user can choose.
    msg = msg.split("Config search path:")[0].strip()
    msg = "\n".join(
        line for line in msg.splitlines() if not line.strip().endswith("_schema")
    ).replace("\n\n", "\n")
    # Nor is Hydra's "To append ... use +key=..." hint: shoal rejects added keys.
    msg = re.sub(r"To append to your config use \S+: ", "", msg)
    if "MISSING" in type(e).__name__ or "Missing mandatory value" in msg:
        return f"{msg}\n(this field has no default: set it, e.g. data.path=/path/to/text.txt)"
    if "not in" in msg and "Key" in msg:
        return f"{msg}\n(unknown field: check the spelling; `shoal run --help` lists every field)"
    return msg


def _check(cond: bool, field_name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: must be {allowed}, got {value!r}")


def validate(c: JobConfig) -> None:
    """Check values and their relations; raise ``ConfigError`` naming the first bad field."""
    _check_finite(dataclasses.asdict(c))
    _check(
        c.strategy.name in STRATEGIES,
        "strategy.name",
        f"one of {list(STRATEGIES)}",
        c.strategy.name,
    )
    _check(c.strategy.bucket_mb > 0, "strategy.bucket_mb", "> 0", c.strategy.bucket_mb)
    _validate_shard_weights(c.strategy.shard_weights, c.cluster.workers)
    _validate_cluster(c.cluster)
    # How many ways the global batch is split: by worker, unless the program says.
    ways, ways_name = c.cluster.max_workers, "cluster.max_workers"
    if c.strategy.name in CONFIGS:  # the program's own fields
        program_config = importlib.import_module(CONFIGS[c.strategy.name])
        program_config.check(c)
        ways, ways_name = program_config.batch_ways(c)

    t = c.train
    _check(t.steps >= 1, "train.steps", ">= 1", t.steps)
    _check(t.global_batch >= 1, "train.global_batch", ">= 1", t.global_batch)
    _check(
        t.global_batch >= ways,
        "train.global_batch",
        f">= {ways_name} ({ways}) so that every worker gets a sample",
        t.global_batch,
    )
    _check(t.micro_batches >= 1, "train.micro_batches", ">= 1", t.micro_batches)
    _check(
        t.global_batch >= ways * t.micro_batches,
        "train.micro_batches",
        f"at most train.global_batch / {ways_name} (every micro-batch needs a sample)",
        t.micro_batches,
    )
    _check(t.optimizer in OPTIMIZERS, "train.optimizer", f"one of {list(OPTIMIZERS)}", t.optimizer)
    _check(t.precision in PRECISIONS, "train.precision", f"one of {list(PRECISIONS)}", t.precision)
    _check(t.lr > 0, "train.lr", "> 0", t.lr)
    _check(
        t.lr_schedule in LR_SCHEDULES,
        "train.lr_schedule",
        f"one of {list(LR_SCHEDULES)}",
        t.lr_schedule,
    )
    _check(t.warmup_steps >= 0, "train.warmup_steps", ">= 0", t.warmup_steps)
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "between 0 and 1", t.min_lr_ratio)
    _check(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _check(0 <= t.beta1 < 1, "train.beta1", "in [0, 1)", t.beta1)
    _check(0 <= t.beta2 < 1, "train.beta2", "in [0, 1)", t.beta2)
    _check(0 <= t.momentum < 1, "train.momentum", "in [0, 1)", t.momentum)
    _check(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 disables clipping)", t.grad_clip)
    _check(t.balance in BALANCE, "train.balance", f"one of {list(BALANCE)}", t.balance)
    _check(t.balance_every >= 1, "train.balance_every", ">= 1", t.balance_every)
    _check(t.log_every >= 1, "train.log_every", ">= 1", t.log_every)
    _check(t.sample_tokens >= 0, "train.sample_tokens", ">= 0", t.sample_tokens)
    _check(t.eval_every >= 0, "train.eval_every", ">= 0 (0: never)", t.eval_every)
    _check(t.eval_batches >= 1, "train.eval_batches", ">= 1", t.eval_batches)
    _check(c.task.type in TASK_TYPES, "task.type", f"one of {list(TASK_TYPES)}", c.task.type)

    e = c.elastic
    _check(e.replicate_every >= 1, "elastic.replicate_every", ">= 1", e.replicate_every)
    _check(
        e.replication in REPLICATION_MODES,
        "elastic.replication",
        f"one of {list(REPLICATION_MODES)}",
        e.replication,
    )
    _check(e.step_timeout_s > 0, "elastic.step_timeout_s", "> 0", e.step_timeout_s)
    _check(e.wait_timeout_s > 0, "elastic.wait_timeout_s", "> 0", e.wait_timeout_s)
    _check(e.max_failures >= 0, "elastic.max_failures", ">= 0", e.max_failures)
    _check(e.spares >= 0, "elastic.spares", ">= 0", e.spares)

    _validate_gateway(c)
    _validate_offload(c)

    ck = c.checkpoint
    _check(ck.every >= 0, "checkpoint.every", ">= 0 (0: only at the end)", ck.every)
    _check(ck.keep >= 1, "checkpoint.keep", ">= 1", ck.keep)
    _check(
        ck.uri is not None and ck.uri.split("://")[0] in ("file", "s3") and "://" in ck.uri,
        "checkpoint.uri",
        "a file:// or s3:// URI",
        ck.uri,
    )
    _check(
        c.resume is None or c.resume == "latest" or "://" in c.resume,
        "resume",
        "null, 'latest' or a checkpoint URI (file://... or s3://.../step-N)",
        c.resume,
    )
    _validate_targets(c)


def _validate_gateway(c: JobConfig) -> None:
    g = c.gateway
    if not g.enabled:
        return
    # A program that takes volunteers says what they do for it (its config's VOLUNTEERS).
    takes = {
        name: getattr(importlib.import_module(module), "VOLUNTEERS", None)
        for name, module in CONFIGS.items()
    }
    takes = {name: what for name, what in takes.items() if what}
    _check(
        c.strategy.name in takes,
        "gateway.enabled",
        "used with a strategy that takes volunteers: "
        + "; ".join(f"strategy={name} (volunteers {what})" for name, what in takes.items()),
        c.strategy.name,
    )
    _check(0 <= g.port <= 65535, "gateway.port", "a TCP port (0: any free one)", g.port)
    given = [x is not None for x in (g.cert, g.key, g.ca)]
    _check(
        all(given) or not any(given),
        "gateway.cert / gateway.key / gateway.ca",
        "all three paths or none (none: a CA made for this run)",
        [g.cert, g.key, g.ca],
    )
    for name in ("heartbeat_timeout_s", "work_deadline_s", "spot_check_rtol"):
        _check(getattr(g, name) > 0, f"gateway.{name}", "> 0", getattr(g, name))
    _check(0 <= g.spot_check_min <= 1, "gateway.spot_check_min", "in [0, 1]", g.spot_check_min)
    _check(g.max_volunteers >= 1, "gateway.max_volunteers", ">= 1", g.max_volunteers)
    _check(
        g.max_result_norm is None or g.max_result_norm > 0,
        "gateway.max_result_norm",
        "> 0 or null",
        g.max_result_norm,
    )


def _validate_offload(c: JobConfig) -> None:
    o = c.offload
    _check(
        o.optimizer in OFFLOAD_OPTIMIZER,
        "offload.optimizer",
        f"one of {list(OFFLOAD_OPTIMIZER)}",
        o.optimizer,
    )
    _check(o.params in OFFLOAD_PARAMS, "offload.params", f"one of {list(OFFLOAD_PARAMS)}", o.params)
    _check(o.host_bytes >= 0, "offload.host_bytes", ">= 0 (0: available memory)", o.host_bytes)
    _check(o.nvme_bytes >= 0, "offload.nvme_bytes", ">= 0 (0: free disk space)", o.nvme_bytes)
    _check(o.chunk_mb > 0, "offload.chunk_mb", "> 0", o.chunk_mb)
    _check(o.prefetch >= 0, "offload.prefetch", ">= 0 (0: no read-ahead)", o.prefetch)
    on_nvme = "nvme" in (o.optimizer, o.params)
    _check(
        on_nvme or (o.nvme_path is None and not o.nvme_bytes),
        "offload.optimizer",
        "nvme when offload.nvme_path or offload.nvme_bytes is set (nothing else uses them)",
        o.optimizer,
    )
    if o.optimizer == "none" and o.params == "none":
        return
    used = [
        f"offload.{k}={getattr(o, k)}" for k in ("optimizer", "params") if getattr(o, k) != "none"
    ]
    _check(
        c.strategy.name in OFFLOAD_STRATEGIES,
        "strategy.name",
        f"one of {list(OFFLOAD_STRATEGIES)} with {' '.join(used)} (offload is built for the "
        "data-parallel strategies only)",
        c.strategy.name,
    )
    if params_leave_worker(o.params, on_gpu=c.cluster.gpus_per_worker > 0):
        _check(
            c.strategy.name == "zero3",
            "offload.params",
            f"none with strategy={c.strategy.name} (parameters leave the worker under "
            "strategy=zero3 only, where each worker keeps just its shard and gathers a block "
            "at a time)",
            o.params,
        )
        _check(
            o.optimizer != "none",
            "offload.optimizer",
            f"host or nvme with offload.params={o.params} (parameters go off the worker "
            "together with the optimizer state they are updated with)",
            o.optimizer,
        )
    if on_nvme:
        _check(
            bool(o.nvme_path),
            "offload.nvme_path",
            "a directory on a local disk with offload to nvme (e.g. "
            "offload.nvme_path=/tmp/shoal-nvme)",
            o.nvme_path,
        )
        path = Path(str(o.nvme_path)).expanduser()
        o.nvme_path = str(path.resolve())
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        _check(
            existing is not None and existing.is_dir() and os.access(existing, os.W_OK | os.X_OK),
            "offload.nvme_path",
            "a directory you can write (or one that can be created)",
            str(path),
        )


def _check_finite(node: Any, path: str = "") -> None:
    """No number anywhere in the config may be NaN or infinite (``train.lr=inf`` passes ``> 0``)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        name = f"{path}[{key}]" if isinstance(node, list | tuple) else f"{path}{key}"
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value}")
        if isinstance(value, dict | list | tuple):
            _check_finite(value, name if isinstance(value, list | tuple) else f"{name}.")


def _validate_shard_weights(weights: Any, workers: int) -> None:
    allowed = f"null, 'auto' or a list of {workers} positive numbers (one per worker)"
    if weights is None or weights == "auto":
        return
    ok = (
        isinstance(weights, list | tuple)
        and len(weights) == workers
        and all(isinstance(w, int | float) and w > 0 for w in weights)
    )
    _check(ok, "strategy.shard_weights", allowed, weights)


def _validate_cluster(cl: ClusterConfig) -> None:
    _check(cl.workers >= 1, "cluster.workers", ">= 1", cl.workers)
    if cl.min_workers is None:
        cl.min_workers = cl.workers
    if cl.max_workers is None:
        cl.max_workers = max(cl.workers, cl.min_workers)
    _check(cl.min_workers >= 1, "cluster.min_workers", ">= 1", cl.min_workers)
    _check(
        cl.min_workers <= cl.workers <= cl.max_workers,
        "cluster.workers",
        f"between cluster.min_workers ({cl.min_workers}) and cluster.max_workers "
        f"({cl.max_workers})",
        cl.workers,
    )
    _check(cl.cpus_per_worker > 0, "cluster.cpus_per_worker", "> 0", cl.cpus_per_worker)
    _check(cl.gpus_per_worker >= 0, "cluster.gpus_per_worker", ">= 0", cl.gpus_per_worker)
    _check(cl.start_timeout_s > 0, "cluster.start_timeout_s", "> 0", cl.start_timeout_s)
    _check(
        cl.collective_timeout_s > 0, "cluster.collective_timeout_s", "> 0", cl.collective_timeout_s
    )
    peak = cl.peak_tflops_per_worker
    _check(peak is None or peak > 0, "cluster.peak_tflops_per_worker", "null or > 0", peak)


def _validate_targets(c: JobConfig) -> None:
    """The model and dataset targets (and ``task.loss``) must import.

    Whether the model builds is checked once the dataset's facts are known
    (``orchestrator.preflight.model_shape``), before anything starts.
    """
    for group in ("model", "data"):
        node = getattr(c, group)
        target = _target_of(node)
        _check(bool(target), f"{group}._target_", "a dotted path to a class or function", target)
        try:
            module_name, _, attr = target.rpartition(".")
            getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"{group}._target_: cannot import {target!r} ({e})") from None
    if c.task.loss:
        from actors.task import TaskError, import_function

        try:
            import_function(str(c.task.loss), "task.loss")
        except TaskError as e:
            raise ConfigError(str(e)) from None
    seq_len = _field(c.model, "seq_len")
    if seq_len is not None:
        _check(isinstance(seq_len, int) and seq_len >= 1, "model.seq_len", "an int >= 1", seq_len)
    if _target_of(c.data) == "actors.data.text_file":
        _validate_text_file(c.data, seq_len or 1)


def _validate_text_file(data: Any, seq_len: int) -> None:
    """``data=text_file``: the file exists, can be read and holds more than one sample.

    Checked from its size (one token per byte), so a bad file stops the run
    before Ray starts rather than once the corpus is loaded.
    """
    path = Path(str(data.path)).expanduser()
    _check(path.is_file(), "data.path", "an existing text file", str(path))
    _check(os.access(path, os.R_OK), "data.path", "a file you can read", str(path))
    size = path.stat().st_size
    if data.max_bytes is not None:
        size = min(size, data.max_bytes)
    _check(
        size > seq_len + 1,
        "data.path",
        f"a text of more than model.seq_len + 1 = {seq_len + 1} bytes ({size} bytes used)",
        str(path),
    )


def _target_of(node: Any) -> str:
    return str(_field(node, "_target_") or "")


def _field(node: Any, name: str) -> Any:
    return node.get(name) if isinstance(node, dict) else getattr(node, name, None)
