"""shoal's control plane: the job schema and API, the CLI, the per-job controller."""

from orchestrator.spec import ConfigError, JobSpec
from orchestrator.status import JobState, JobStatus

__all__ = ["ConfigError", "JobHandle", "JobSpec", "JobState", "JobStatus", "run", "submit"]


def __getattr__(name: str):
    # The API pulls in Ray; import it only when asked for, so that `shoal --help`
    # and config validation stay fast.
    if name in ("submit", "run", "JobHandle"):
        from orchestrator import api

        return getattr(api, name)
    raise AttributeError(name)
