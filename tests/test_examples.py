"""``examples/``: a user's own model, dataset and loss, run by ``shoal run`` from that folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


@pytest.mark.timeout(300)
def test_own_model_data_and_loss_from_the_working_directory(tmp_path):
    run_dir = tmp_path / "run"
    # The console script, as a user runs it: its sys.path[0] is the venv's bin/, not
    # the working directory, so this also checks that mypkg is found from there.
    shoal = Path(sys.executable).parent / "shoal"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [
            str(shoal),
            "run",
            "model._target_=mypkg.nets.ResNetTiny",
            "data._target_=mypkg.data.my_images",
            "task.loss=mypkg.losses.focal",
            "strategy=zero3",
            "cluster.workers=2",
            "train.steps=30",
            "train.eval_every=15",
            "train.global_batch=32",
            f"run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=EXAMPLES,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]

    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "succeeded"
    assert status["accuracy"] > 0.3, status  # chance is 0.1 on the ten digits

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "accuracy" in r]
    assert evals and all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    assert evals[-1]["accuracy"] == status["accuracy"]
