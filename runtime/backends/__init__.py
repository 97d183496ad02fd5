"""Execution backends behind one protocol: ``Session.run(feeds) -> outputs`` and ``run_bound``."""

from runtime.backends.base import BackendConfig, Session
from runtime.backends.factory import open_session

__all__ = ["BackendConfig", "Session", "open_session"]
