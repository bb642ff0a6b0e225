"""What returning freed memory to the OS costs a training step (``cluster.return_freed_memory``).

glibc keeps freed large buffers in its heap, which hides sharding savings in
RSS; ``MALLOC_MMAP_THRESHOLD_=65536`` makes every buffer of 64 KiB or more an
mmap that is returned at once, so RSS tracks what is held, but every step
then pays for fresh pages. This runs the same one-process training steps of
gpt_small in two child processes, with and without the setting, and prints
CPU and wall time per step and peak RSS for both.

    python bench/allocator_cost.py --steps 6 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, time, torch, torch.nn.functional as F
from actors.models.gpt import GPT
torch.set_num_threads(1); torch.manual_seed(0)
m = GPT(256, n_layer=6, n_head=8, d_model=256, seq_len=128)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randint(0, 256, (16, 128)); y = torch.randint(0, 256, (16, 128))
def step():
    opt.zero_grad()
    F.cross_entropy(m(x).reshape(-1, 256), y.reshape(-1)).backward()
    opt.step()
for _ in range(2):
    step()
cpu, wall, n = time.process_time(), time.perf_counter(), STEPS
for _ in range(n):
    step()
print(json.dumps({"cpu": (time.process_time() - cpu) / n, "wall": (time.perf_counter() - wall) / n,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(steps: int, release: bool) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if release:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, "-c", CHILD.replace("STEPS", str(steps))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    rows = {False: [], True: []}
    for _ in range(args.repeats):
        for release in (False, True):  # alternate, so drifting load hits both
            rows[release].append(run(args.steps, release))
    print(f"load average: {os.getloadavg()}")
    print(f"{'setting':28} {'CPU s/step':>10} {'wall s/step':>11} {'peak RSS MiB':>13}")
    for release, name in ((False, "glibc default"), (True, "MALLOC_MMAP_THRESHOLD_=65536")):
        best = min(rows[release], key=lambda r: r["cpu"])
        print(f"{name:28} {best['cpu']:10.3f} {best['wall']:11.3f} {best['rss_mb']:13.0f}")
    ratio = min(r["cpu"] for r in rows[True]) / min(r["cpu"] for r in rows[False])
    print(f"CPU per step, returning memory / default: {ratio:.2f}")


if __name__ == "__main__":
    main()
