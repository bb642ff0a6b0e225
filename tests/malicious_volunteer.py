"""A volunteer that lies: it trains honestly, then sends its update scaled by -5.

Run as ``python -m tests.malicious_volunteer HOST:PORT TOKEN CA_PATH``. Its
results have the right shape, dtype and finite values, so only a spot check
(or a robust rule) can tell.
"""

from __future__ import annotations

import sys

from actors.volunteer_client import VolunteerClient
from orchestrator.volunteer_cli import VolunteerTrainer


def main() -> None:
    address, token, ca = sys.argv[1:4]
    holder: dict[str, VolunteerTrainer] = {}

    def handler(method, tensors, args):
        trainer = holder.setdefault("trainer", VolunteerTrainer(client.job_config()))
        out, stats = trainer(method, tensors, args)
        return {"delta": out["delta"] * -5.0}, stats

    client = VolunteerClient(
        address, token, ca, "mallory", {"kinds": ["federated client"]}, handler
    )
    client.run_forever()


if __name__ == "__main__":
    main()
