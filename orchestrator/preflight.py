"""Checks that run before Ray starts: what would otherwise fail 8-16 s later, on a worker.

Each check turns a problem into a ``ConfigError`` (``shoal run`` exits 2)
naming the field to change. They need the checkpoint store and the model's
shape (built on the meta device), never Ray. The controller repeats the
checkpoint checks itself (``fresh_root_problem``, ``resume_mismatch``, ``nothing_left``), so a
job submitted from elsewhere is held to the same rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.spec import ConfigError, JobSpec
from storage.checkpoint import (
    CorruptCheckpointError,
    Manifest,
    committed_steps,
    read_manifest,
    resolve,
    step_dir,
    verify,
)
from storage.object_store import ObjectStore, StoreError, open_store

if TYPE_CHECKING:
    from actors.datasets import DataFacts
    from orchestrator.offload_plan import Budgets, OffloadPlan


@dataclass(frozen=True)
class ModelShape:
    """What the checks need to know about the model: its flat layout and size."""

    layout: list[dict]
    numel: int
    offload: OffloadPlan | None = None  # where the state lives, when offload is configured


def store_options(spec: JobSpec) -> dict[str, object]:
    s = spec.storage
    return {"endpoint_url": s.endpoint_url, "region": s.region, "path_style": s.path_style}


def fresh_root_problem(store: ObjectStore, spec: JobSpec) -> str | None:
    """Why a fresh run may not start over ``store`` (it holds another run's checkpoints), or None.

    A fresh run that shared a root with older checkpoints would interleave
    with them; refusing is the only choice that loses nothing. With
    ``checkpoint.overwrite=true`` the user has chosen to delete them.
    """
    if spec.resume is not None or spec.checkpoint.overwrite:
        return None
    steps = committed_steps(store)
    if not steps:
        return None
    shown = ", ".join(str(s) for s in steps[-5:])
    return (
        f"checkpoint.uri: {store.uri} already holds {len(steps)} committed checkpoint(s) "
        f"(steps {shown}) of an earlier run. Continue it with resume=latest, start afresh "
        "over it with checkpoint.overwrite=true (deletes them), or pick another run_dir or "
        "checkpoint.uri"
    )


def resume_mismatch(
    manifest: Manifest,
    layout: list[dict],
    spec: JobSpec,
    uri: str,
    fingerprint: str | None = None,
) -> str | None:
    """Why checkpoint ``manifest`` cannot be resumed by ``spec``, or None if it can.

    The model is the user's (built from their config, never from the
    manifest): its layout must match the checkpoint's. A different optimizer
    is a choice to correct, not a damaged checkpoint. ``fingerprint``: the
    job's data (``Dataset.fingerprint()``); a checkpoint saved on other data
    (another file, another tokenizer) would continue on samples it never
    saw under step numbers that meant other samples.
    """
    saved_data = manifest.data.get("fingerprint")
    if fingerprint and saved_data and saved_data != fingerprint:
        return (
            f"data: checkpoint {uri} was trained on other data (fingerprint {saved_data}, this "
            f"run's is {fingerprint}); resume with the data (and data.tokenizer) it was saved with"
        )
    if manifest.layout != layout:
        return (
            f"resume: checkpoint {uri} was saved for a different model (parameter names or "
            "shapes differ); resume it with the model config it was saved with"
        )
    saved = manifest.optimizer.get("name")
    if saved is not None and saved != spec.train.optimizer:
        return (
            f"train.optimizer: checkpoint {uri} holds {saved} state, but this run uses "
            f"{spec.train.optimizer}; resume with train.optimizer={saved}"
        )
    return None


def nothing_left(manifest: Manifest, spec: JobSpec, uri: str) -> str | None:
    """Why resuming checkpoint ``manifest`` would train nothing (None: steps remain)."""
    if manifest.step >= spec.train.steps:
        return (
            f"train.steps: checkpoint {uri} is already at step {manifest.step}, and "
            f"train.steps={spec.train.steps}: nothing is left to train. Raise train.steps above "
            f"{manifest.step} to continue"
        )
    return None


def resume_target(spec: JobSpec, store: ObjectStore) -> tuple[str, Manifest]:
    """The checkpoint ``resume`` names (its URI and manifest); ``ConfigError`` if there is none.

    ``resume=latest`` takes the newest committed checkpoint with a readable
    manifest (the controller falls back further past damaged shards, which
    its workers' reads detect).
    """
    if spec.resume == "latest":
        for step in reversed(committed_steps(store)):
            try:
                manifest = read_manifest(store, step)
            except CorruptCheckpointError:
                continue
            # One that would leave nothing to train is read in full first: if it
            # is damaged, the controller falls back past it, and so do we.
            if manifest.step >= spec.train.steps and verify(store, manifest):
                continue
            return f"{store.uri}/{step_dir(manifest.step)}", manifest
        raise ConfigError(
            f"resume=latest: no committed checkpoint under {store.uri}. Point run_dir= at "
            "the earlier run's folder (see `shoal status`), or pass resume=<checkpoint URI>"
        )
    try:
        _, manifest = resolve(spec.resume, **store_options(spec))
    except StoreError as e:
        raise ConfigError(str(e)) from None
    return spec.resume, manifest


def worker_bytes_lower_bound(numel: int, spec: JobSpec) -> int:
    """Bytes one worker needs at least, as the job's training program counts them.

    Activations, communication buffers and buddy replicas come on top, so
    this only refuses what can never fit.
    """
    from orchestrator.program import program_for

    return program_for(spec).min_worker_bytes(numel)


def check_memory(numel: int, spec: JobSpec, available: int) -> None:
    """Refuse a model whose workers on this machine cannot hold even their training state."""
    from orchestrator.program import program_for

    per_worker = worker_bytes_lower_bound(numel, spec)
    workers = program_for(spec).roles()[0].count  # the training role's members
    needed = per_worker * workers
    if needed > available:
        from orchestrator.report import human_bytes

        raise ConfigError(
            f"model: {numel:,} parameters need at least {human_bytes(per_worker)} per worker "
            f"(parameters, gradients and {spec.train.optimizer} state, strategy="
            f"{spec.strategy.name}), {human_bytes(needed)} for {workers} workers "
            f"on this machine, but {human_bytes(available)} is available. Use a smaller model, "
            "strategy=zero3, or more machines (cluster.address)"
        )


def model_shape(spec: JobSpec, facts: DataFacts) -> ModelShape:
    """The flat layout of the user's model for data with ``facts``, built on the meta device.

    Building on the meta device allocates nothing but runs the constructor's
    own checks (e.g. d_model divisible by n_head): a model that cannot be
    built is a ``ConfigError`` naming ``model``.
    """
    import torch

    from actors.task import build_model
    from orchestrator.program import program_for

    target = getattr(spec.model, "_target_", None) or spec.model.get("_target_")
    try:
        with torch.device("meta"):
            model = build_model(spec.model, facts)
            layout = program_for(spec).trained_layout(model)
    except Exception as e:  # noqa: BLE001 - a user's model may raise anything
        cause = e.__cause__ or e  # Hydra wraps the constructor's own exception
        hint = ""
        if isinstance(cause, TypeError) and "missing" in str(cause):
            data = getattr(spec.data, "_target_", None) or spec.data.get("_target_")
            given = ", ".join(sorted(facts.model_kwargs())) or "nothing"
            hint = (
                f" (the data, {data!r}, gives the model {given}: choose data that fits it, "
                "e.g. data=stdlib_text for a GPT, data=digits for an MLP)"
            )
        raise ConfigError(f"model: cannot build {target!r}: {cause}{hint}") from None
    saved = model.state_dict()
    buffers = [name for name, _ in model.named_buffers() if name in saved]
    if buffers:
        # Training state is the flat parameter vector: persistent buffers (a
        # BatchNorm's running statistics) would differ per worker and be lost
        # on resume, so they are refused rather than silently dropped.
        raise ConfigError(
            f"model: {target!r} keeps state outside its parameters ({', '.join(buffers[:3])}"
            f"{', ...' if len(buffers) > 3 else ''}), which shoal neither synchronizes across "
            "workers nor checkpoints; use GroupNorm/LayerNorm instead of BatchNorm, or register "
            "such buffers with persistent=False if they are constants"
        )
    return ModelShape(layout.to_json(), layout.numel)


def check_checkpoints(spec: JobSpec, shape: ModelShape, fingerprint: str | None = None) -> None:
    """The checkpoint root is usable, a fresh run owns it, and what ``resume`` names fits."""
    try:
        store = open_store(spec.checkpoint.uri, **store_options(spec))
        store.check()
        problem = fresh_root_problem(store, spec)
        if problem:
            raise ConfigError(problem)
        if spec.resume is not None:
            uri, manifest = resume_target(spec, store)
            problem = resume_mismatch(
                manifest, shape.layout, spec, uri, fingerprint
            ) or nothing_left(manifest, spec, uri)
            if problem:
                raise ConfigError(problem)
    except StoreError as e:
        raise ConfigError(str(e)) from None


def run_preflight(
    spec: JobSpec, local: bool, facts: DataFacts, fingerprint: str | None = None
) -> ModelShape:
    """Every check that needs no Ray; ``local``: the job runs on this machine.

    On a remote cluster (``local`` False) memory and ``file://`` paths are
    the cluster's, not this machine's: the controller checks the
    checkpoints there instead.
    """
    from actors.memory import node_available_bytes

    shape = model_shape(spec, facts)
    if local:
        check_memory(shape.numel, spec, node_available_bytes())
    plan = check_offload(spec, shape.numel, local_offload_budgets(spec) if local else None)
    if local:
        check_checkpoints(spec, shape, fingerprint)
    return dataclasses.replace(shape, offload=plan)


def check_offload(spec: JobSpec, numel: int, budgets: Budgets | None) -> OffloadPlan | None:
    """The offload plan (None: no offload configured); ``OffloadPlanError`` if it cannot fit."""
    from orchestrator.offload_plan import offload_enabled, plan_for_job

    if not offload_enabled(spec):
        return None
    return plan_for_job(spec, numel, budgets)


def local_offload_budgets(spec: JobSpec) -> Budgets:
    """One worker's share of this machine: its memory and the free space at offload.nvme_path.

    Every worker of a local job runs here, so each gets an even share. The
    GPU's memory is measured by the worker itself (its tier budgets).
    """
    import shutil
    from pathlib import Path

    from actors.memory import node_available_bytes
    from orchestrator.offload_plan import Budgets

    workers = spec.cluster.workers
    memory = node_available_bytes() // workers
    disk = None
    if "nvme" in (spec.offload.optimizer, spec.offload.params):
        path = Path(spec.offload.nvme_path)
        existing = next(p for p in (path, *path.parents) if p.exists())
        disk = shutil.disk_usage(existing).free // workers
    on_gpu = spec.cluster.gpus_per_worker > 0
    return Budgets(memory=None if on_gpu else memory, host=memory, disk=disk)
