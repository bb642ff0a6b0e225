"""A volunteer that lies: it computes honestly, then sends its answer scaled by -5.

Run as ``python -m tests.malicious_volunteer HOST:PORT TOKEN CA_PATH``. As a
federated client it scales its update; as an expert replica its outputs and
gradients. Its results have the right names, shapes, dtype and finite values,
so only a spot check (or a robust rule) can tell.
"""

from __future__ import annotations

import sys

from actors.volunteer_client import VolunteerClient
from actors.volunteer_work import KINDS, VolunteerWork


def main() -> None:
    address, token, ca = sys.argv[1:4]
    holder: dict[str, VolunteerWork] = {}

    def handler(method, tensors, args):
        if "work" not in holder:
            holder["work"] = VolunteerWork(client.job_config())
        out, stats = holder["work"](method, tensors, args)
        return {name: t * -5.0 for name, t in out.items()}, stats

    client = VolunteerClient(address, token, ca, "mallory", {"kinds": KINDS}, handler)
    client.run_forever()


if __name__ == "__main__":
    main()
