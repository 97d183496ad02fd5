"""Execution backends behind one protocol: ``Session.run(feeds) -> outputs``."""

from runtime.backends.base import BackendConfig, Session, open_session

__all__ = ["BackendConfig", "Session", "open_session"]
