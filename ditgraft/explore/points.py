"""Where a sweep's points live and what state each is in (read from the sweep directory alone)."""
from __future__ import annotations

import os

from ditgraft.utils import _pid_alive, read_json

STATES = ("done", "failed", "running", "partial", "pending")


def point_dir(sweep_dir: str, name: str) -> str:
    return os.path.join(sweep_dir, "points", name)


def point_state(sweep_dir: str, name: str) -> tuple[str, dict]:
    """(one of STATES, the point's status record)."""
    d = point_dir(sweep_dir, name)
    status_path = os.path.join(d, "sweep_point.json")
    status = read_json(status_path) if os.path.exists(status_path) else {}
    if status.get("state") == "done" and os.path.exists(os.path.join(d, "report.json")):
        return "done", status
    lock = os.path.join(d, ".ditgraft.lock")
    if os.path.exists(lock):
        try:
            pid = read_json(lock).get("pid")
        except (OSError, ValueError):
            pid = None
        if isinstance(pid, int) and _pid_alive(pid):
            return "running", status
    if status.get("state") == "failed":
        return "failed", status
    if any(os.path.exists(os.path.join(d, f)) for f in ("recipe.yaml", "recipe.pending.yaml")):
        return "partial", status
    return "pending", status
