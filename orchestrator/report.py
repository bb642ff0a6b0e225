"""What a person sees: the loss plot and the end-of-run summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.status import JobStatus


def plot_loss(metrics: list[dict[str, Any]], path: Path) -> None:
    """Write the training-loss curve (raw and smoothed) to ``path`` as a PNG.

    With evaluations in the records (``train.eval_every``), a second panel
    shows the held-out loss and the task's metric (accuracy or perplexity).
    """
    if not metrics:
        return
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    loss = [m["loss"] for m in metrics]
    smooth, ema = [], loss[0]
    for v in loss:
        ema = 0.9 * ema + 0.1 * v
        smooth.append(ema)
    evals = [m for m in metrics if "eval_loss" in m]
    panels = 2 if evals else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label="loss (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per token or sample)")
    ax.set_title(f"training loss: {loss[0]:.3f} -> {loss[-1]:.3f}")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        _plot_evals(axes[0][1], evals)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _plot_evals(ax: Any, evals: list[dict[str, Any]]) -> None:
    """Held-out loss, and accuracy (or perplexity) on a second axis."""
    steps = [m["step"] + 1 for m in evals]  # evaluated after the step
    ax.plot(steps, [m["eval_loss"] for m in evals], "o-", color="tab:blue", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss", color="tab:blue")
    ax.grid(alpha=0.3)
    metric = "accuracy" if "accuracy" in evals[-1] else "perplexity"
    if metric in evals[-1]:
        right = ax.twinx()
        values = [m.get(metric) for m in evals]
        right.plot(steps, values, "s-", color="tab:orange", label=metric)
        right.set_ylabel(metric, color="tab:orange")
        last = values[-1]
        shown = f"{last:.1%}" if metric == "accuracy" else f"{last:.3g}"
        ax.set_title(f"held-out: {metric} {shown} at step {steps[-1]}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def data_wait_share(metrics: list[dict[str, Any]], warmup: int = 2) -> float | None:
    """Seconds the most-waiting rank spent waiting for its batch, over step time, summed over
    the steps after ``warmup`` (the first reads open files and start readers). None: no steps
    that say."""
    steady = [m for m in metrics[warmup:] if m.get("data_wait_s") and m.get("step_time_s")]
    if not steady:
        return None
    return sum(max(m["data_wait_s"]) for m in steady) / sum(m["step_time_s"] for m in steady)


def summary(status: JobStatus, metrics: list[dict[str, Any]]) -> str:
    """A short end-of-run report: outcome, loss, time, throughput, memory, outputs."""
    lines = [f"job {status.job_id}: {status.state.value}"]
    tok_s = status.tokens_per_s
    if metrics:
        first = metrics[0]
        n = min(10, len(metrics))
        tail_loss = sum(m["loss"] for m in metrics[-n:]) / n
        steady = metrics[min(len(metrics) - 1, 2) :]  # skip warm-up steps
        rates = [m["tokens_per_s"] for m in steady if "tokens_per_s" in m]
        tok_s = sum(rates) / len(rates) if rates else None
        lines.append(
            f"  loss        {first['loss']:.3f} (step {first['step']}) -> {tail_loss:.3f} "
            f"(mean of last {n} steps)"
        )
    elif status.loss is not None:
        lines.append(f"  loss        {status.loss:.3f} (last step)")
    if tok_s:
        rate = f", {tok_s:,.0f} tokens/s"
    elif status.samples_per_s:
        rate = f", {status.samples_per_s:,.0f} samples/s"
    else:
        rate = ""
    lines.append(
        f"  steps       {status.step}/{status.total_steps} in {status.elapsed_s:.1f}s{rate}"
    )
    share = data_wait_share(metrics)
    if share is not None:
        lines.append(f"  input       waiting for data {share:.1%} of step time (slowest rank)")
    if status.eval_loss is not None:
        metric = ""
        if status.accuracy is not None:
            metric = f", accuracy {status.accuracy:.1%}"
        elif status.perplexity is not None:
            metric = f", perplexity {status.perplexity:.3g}"
        lines.append(f"  held-out    loss {status.eval_loss:.3f}{metric} (the last evaluation)")
    lines += [f"  {line}" for line in status.program.get("summary", [])]
    if "first_step" in status.startup_s:
        phases = ", ".join(
            f"{name.replace('_', ' ')} {t:.1f}s" for name, t in status.startup_s.items()
        )
        lines.append(f"  start-up    since submit: {phases}")
    if status.resumed_from:
        lines.append(f"  resumed     from {status.resumed_from}")
    if status.resume_note:
        lines.append(f"  note        {status.resume_note}")
    if status.epoch > 1 or status.failures_survived:
        training = [w for w in status.workers if not w.get("standing")]
        lines.append(
            f"  elastic     epoch {status.epoch}, {len(training)} workers now, "
            f"{status.failures_survived} failures survived, {status.steps_redone} steps redone, "
            f"{status.recovery_s:.1f}s recovering (events.jsonl)"
        )
    if not status.memory:  # still running: who is in the current epoch
        for w in status.workers:
            if w.get("standing"):  # a member of a standing role holds a slot, not a shard
                lines.append(
                    f"  slot {w['rank']}      {w.get('role')} {w.get('worker_id', '?')}, "
                    f"pid {w['pid']} on {w.get('node_ip', '?')}"
                    + (f", experts {w['experts']}" if "experts" in w else "")
                    + (f", version {w['version']}" if "version" in w else "")
                    + (f", {w['latency_ms']:.1f} ms per call" if w.get("latency_ms") else "")
                )
                continue
            lo, hi = w.get("shard", (0, 0))
            share = w.get("batch_share")
            lines.append(
                f"  rank {w['rank']}      {w.get('role', 'worker')} {w.get('worker_id', '?')}, "
                f"pid {w['pid']} on {w.get('node_ip', '?')}"
                + (f", {w['part']}" if "part" in w else "")
                + f", shard [{lo}, {hi})"
                + (f" {human_bytes(w['shard_bytes'])}" if "shard_bytes" in w else "")
                + (
                    f", replicas {human_bytes(w['replica_bytes'])} host memory"
                    if "replica_bytes" in w
                    else ""
                )
                + (f", batch share {share}" if share is not None else "")
                + (f", {w['compute_s'] * 1000:.0f} ms compute" if "compute_s" in w else "")
                + (f", {w['busy_s'] * 1000:.0f} ms busy" if "busy_s" in w else "")
            )
        for w in status.spares:  # placed, outside the epoch: the next lost worker's place
            lines.append(
                f"  spare       {w.get('role', 'worker')} {w['worker_id']}, pid {w['pid']}, "
                "standing by"
            )
    for w, mem in zip(status.workers, status.memory, strict=False):
        lines.append(
            f"  rank {w['rank']}      {w.get('role', 'worker')}, pid {w['pid']} on "
            f"{w['node_ip']} ({w['device']}): "
            f"params {human_bytes(mem['params'])}, grads {human_bytes(mem['grads'])}, "
            f"optimizer {human_bytes(mem['optimizer'])}{_offloaded(mem)}, "
            f"peak RSS {human_bytes(mem['peak_rss'])}"
        )
    if status.error:
        lines.append("  error       " + status.error.replace("\n", "\n              "))
    lines.append(f"  run folder  {status.run_dir}  (config.yaml, metrics.jsonl, loss.png)")
    if status.last_checkpoint:
        lines.append(f"  checkpoint  {status.last_checkpoint}")
    if status.checkpoints_failed:
        lines.append(
            f"  warning     {status.checkpoints_failed} checkpoint(s) failed to save: "
            f"{status.checkpoint_warning}"
        )
    if status.sample:
        lines.append("  sample      " + status.sample.replace("\n", "\n              "))
    return "\n".join(lines)


def _plot_from_file(metrics_path: str, png_path: str) -> None:
    """Draw ``png_path`` from a ``metrics.jsonl`` (a partly written last line is skipped)."""
    import json

    records = []
    with open(metrics_path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    plot_loss(records, Path(png_path))


if __name__ == "__main__":  # the reporter's plotting child: python -m orchestrator.report M P
    import sys

    _plot_from_file(sys.argv[1], sys.argv[2])


def _offloaded(mem: dict[str, int]) -> str:
    """``; host 1.0 GiB, NVMe 3.0 GiB``: state a worker keeps in offload tiers, by tier."""
    tiers = {"host": 0, "nvme": 0}
    for key, n in mem.items():
        kind = key.rsplit("_", 1)[-1]
        if "_" in key and kind in tiers:
            tiers[kind] += n
    held = [f"{'NVMe' if k == 'nvme' else k} {human_bytes(n)}" for k, n in tiers.items() if n]
    return f" (offloaded: {', '.join(held)})" if held else ""
