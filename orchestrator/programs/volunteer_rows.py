"""How a job's status shows its volunteers (any program with ``gateway.enabled``)."""

from __future__ import annotations

import time
from typing import Any


def volunteer_lines(volunteers: list[dict[str, Any]]) -> list[str]:
    """Summary lines: one header, then per volunteer its name, role, state since when, work
    done and rejected, and credit (rows as ``GatewayRuntime.volunteers`` gives them)."""
    lines = [f"  volunteers  {len(volunteers)} seen (gateway)"]
    for v in volunteers:
        state = (
            f"banned ({v['banned']})"
            if v["banned"]
            else ("connected" if v["connected"] else "gone")
        )
        since = v.get("connected_since")
        since_text = time.strftime("%H:%M:%S", time.localtime(since)) if since else "-"
        lines.append(
            f"    {v['name']:<12} {v['role'] or '-'}, {state} since {since_text}, "
            f"work done {v['work_done']}, rejected {v['work_rejected']}, credit {v['credit']:g}"
        )
    return lines
