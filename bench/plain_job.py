"""A shoal job's GPT-on-stdlib configuration as plain values, for benchmarks' peer scripts.

The peer side of a benchmark (plain DDP, FSDP2, ...) runs in children that
should need no Hydra, Ray or shoal control plane: they get these values.
"""

from __future__ import annotations

from typing import Any


def gpt_job_values(spec: Any) -> dict[str, Any]:
    """Model, data, schedule and optimizer values of ``spec`` (a ``JobSpec``)."""
    from orchestrator.schedule import lr_at

    t, model = spec.train, spec.model
    assert spec.data._target_ == "actors.data.stdlib_text", "the benchmark uses data=stdlib_text"
    assert model._target_ == "actors.models.gpt.GPT", "the benchmark uses the GPT model"
    assert t.optimizer == "adamw", "the benchmark uses AdamW"
    return {
        "model_kwargs": {
            k: getattr(model, k) for k in ("n_layer", "n_head", "d_model", "seq_len", "dropout")
        },
        "max_bytes": spec.data.max_bytes,
        "seed": t.seed,
        "steps": t.steps,
        "global_batch": t.global_batch,
        "seq_len": spec.seq_len,
        "lrs": tuple(lr_at(s, t) for s in range(t.steps)),
        "weight_decay": t.weight_decay,
        "betas": (t.beta1, t.beta2),
        "grad_clip": t.grad_clip,
    }
