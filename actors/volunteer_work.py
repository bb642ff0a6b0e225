"""What a volunteer computes for a job: federated client rounds and expert replicas.

``VolunteerWork(job_config)`` is the handler ``shoal volunteer join`` gives its
``VolunteerClient``: it answers the gateway's work items by method.

- ``fed.train`` (``strategy=federated``): one client's local training, by
  the same ``ClientGroupRuntime`` a client actor runs (``VolunteerTrainer``);
- ``moe.forward`` / ``moe.backward`` (``strategy=moe``): a replica of one
  expert host's slot (``VolunteerExperts``), computing with the same
  ``SlotExperts`` the host uses, on the parameters the gateway sends.

Either way a result is exactly what the job's own actor would compute for
the same input, which is what lets the job spot-check it. What a volunteer
builds is named by the gateway (the job's model, data and training
overrides), so a volunteer only ever instantiates shoal's own built-in
models and datasets: a job asking for anything else is refused.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

# Module prefixes a gateway may ask a volunteer to instantiate (model, data).
TRUSTED_TARGETS = ("actors.models.", "actors.datasets.", "actors.data.")

FED_TRAIN = "fed.train"  # one federated client's local training
MOE_FORWARD = "moe.forward"  # {x<e>} -> {y<e>}: a slot's experts' outputs
MOE_BACKWARD = "moe.backward"  # {x<e>, dy<e>} -> {dx<e>, g<e>}: input and parameter gradients
KINDS = ["federated client", "expert host"]  # what a volunteer offers when it registers


class StaleReplica(RuntimeError):
    """The volunteer does not hold the parameters version a call names (the gateway resends)."""


def volunteer_spec(job_config: dict[str, Any]) -> Any:
    """The job's spec as the gateway described it, refusing anything but built-in parts."""
    from orchestrator.spec import JobSpec

    overrides = [str(o) for o in job_config.get("overrides", [])]
    run_dir = tempfile.mkdtemp(prefix="shoal-volunteer-")
    spec = JobSpec.from_overrides([*overrides, f"run_dir={run_dir}"])
    for field, cfg in (("model", spec.model), ("data", spec.data)):
        target = str(getattr(cfg, "_target_", None) or cfg.get("_target_", ""))
        if not target.startswith(TRUSTED_TARGETS):
            raise PermissionError(
                f"the job asks volunteers to run {field}._target_={target!r}; volunteers run "
                "only shoal's built-in models and datasets"
            )
    if spec.task.loss:
        raise PermissionError("the job has its own task.loss; volunteers run built-in losses")
    return spec


class VolunteerTrainer:
    """One federated client's local training (``fed.train``), on a ``ClientGroupRuntime``
    hosting every client (the dataset is the job's built-in one)."""

    def __init__(self, spec: Any):
        from actors.fed_clients import ClientGroupRuntime
        from actors.task import build_dataset

        self.runtime = ClientGroupRuntime(spec, 0, build_dataset(spec.data, str(spec.run_dir)))
        self.runtime.setup(None, 0, 1)  # every client's rows: the job names which one to train

    def __call__(self, tensors: dict, args: dict) -> tuple[dict, dict]:
        runtime = self.runtime
        client, round_, lr = int(args["client"]), int(args["round"]), float(args["lr"])
        if client not in runtime.rows:
            raise ValueError(f"client {client} is not one of the job's clients")
        out = runtime.train(round_, tensors["params"], [client], lr, "each")
        if out.errors:
            raise RuntimeError(out.errors[client])
        if out.updates is None:
            raise RuntimeError(f"client {client}: {out.rejected.get(client, 'no update')}")
        stats = {"samples": out.samples[0], "loss_sum": out.loss_sum, "units": out.n_units}
        return {"delta": out.updates[0].contiguous()}, stats


class VolunteerExperts:
    """Replicas of expert hosts' slots (``moe.forward`` / ``moe.backward``).

    Per slot the volunteer keeps the slot's experts and the parameters
    version it last received; a call names the version it must be computed
    at and carries the parameters when the gateway knows the volunteer lacks
    them. Nothing is trained here: parameter gradients go back with the
    input gradients, and the trusted host applies them.
    """

    def __init__(self, spec: Any, facts: Any = None):
        from actors.task import build_dataset

        self.spec = spec
        # What the model is built from (vocabulary, classes): the dataset's facts.
        self.facts = (
            facts if facts is not None else build_dataset(spec.data, str(spec.run_dir)).facts
        )
        self.held: dict[tuple[int, int], Any] = {}  # (slot, hosts) -> SlotExperts
        self.version: dict[tuple[int, int], int] = {}

    def _slot(self, slot: int, hosts: int) -> Any:
        from actors.expert_slot import SlotExperts
        from actors.task import build_model

        key = (slot, hosts)
        if key not in self.held:
            if not 0 <= slot < hosts <= self.spec.model.n_expert:
                raise ValueError(f"no slot {slot} of {hosts} expert hosts in this job")
            torch.manual_seed(self.spec.train.seed)
            self.held[key] = SlotExperts.of(build_model(self.spec.model, self.facts), slot, hosts)
        return self.held[key]

    def __call__(self, method: str, tensors: dict, args: dict) -> tuple[dict, dict]:
        slot, hosts = int(args["slot"]), int(args["hosts"])
        layer, version = int(args["layer"]), int(args["version"])
        held = self._slot(slot, hosts)
        params = tensors.pop("params", None)
        if params is not None:
            if params.shape != held.flat_param.shape:
                raise ValueError(
                    f"params: shape {tuple(params.shape)}, slot {slot} holds {held.hi - held.lo}"
                )
            with torch.no_grad():
                held.flat_param.copy_(params)
            self.version[(slot, hosts)] = version
        elif self.version.get((slot, hosts)) != version:
            raise StaleReplica(f"slot {slot}: holds version {self.version.get((slot, hosts))}")
        experts = sorted({int(name[1:]) for name in tensors if name.startswith("x")})
        for e in experts:
            if not held.holds(layer, e):
                raise ValueError(f"slot {slot} does not hold expert {e} of layer {layer}")
        if method == MOE_FORWARD:
            out = held.forward(layer, {e: tensors[f"x{e}"] for e in experts})
            return {f"y{e}": y.contiguous() for e, y in out.items()}, {"version": version}
        result: dict[str, torch.Tensor] = {}
        for e in experts:
            dx, dtheta = held.gradients(layer, e, tensors[f"x{e}"], tensors[f"dy{e}"])
            result[f"dx{e}"], result[f"g{e}"] = dx.contiguous(), dtheta
        return result, {"version": version}


class VolunteerWork:
    """The volunteer's handler: builds what a method needs on first use, then answers it."""

    def __init__(self, job_config: dict[str, Any]):
        self.job_config = job_config
        self._spec: Any = None
        self._trainer: VolunteerTrainer | None = None
        self._experts: VolunteerExperts | None = None

    def __call__(self, method: str, tensors: dict, args: dict) -> tuple[dict, dict]:
        # VolunteerClient hands work items over one at a time, on one thread.
        if method not in (FED_TRAIN, MOE_FORWARD, MOE_BACKWARD):
            raise ValueError(f"this volunteer does not do {method!r} work")
        if self._spec is None:
            self._spec = volunteer_spec(self.job_config)
        if method == FED_TRAIN:
            if self._trainer is None:
                self._trainer = VolunteerTrainer(self._spec)
            return self._trainer(tensors, args)
        if self._experts is None:
            self._experts = VolunteerExperts(self._spec)
        return self._experts(method, tensors, args)
