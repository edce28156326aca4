"""The executor: the one place that decides when the engine commits.

The engine only offers commit() (and flush(), a commit that a request asked
for); this module's CommitPolicy, owned by the data plane's engine thread,
decides when the open metadata transaction becomes a group commit:

- a durable request (flush, FUA write/zero/trim, FUSE fsync): one commit after
  the batch that holds it, before its reply;
- COMMIT_EVERY metadata updates: a group commit after the batch's replies are
  sent (and new requests handed to the reducer), or at one of the engine's
  safe points inside long work (a big trim, a background step);
- IDLE_COMMIT_SECONDS without requests: commit what is open, which bounds
  what a crash can lose.
"""

from __future__ import annotations

from ..engine.engine import Engine

COMMIT_EVERY = 16384  # metadata updates per group commit when no flush comes
IDLE_COMMIT_SECONDS = 1.0


class CommitPolicy:
    """When to group-commit. Engine thread only; installs itself at the engine's
    safe points (Engine.safe_point)."""

    __slots__ = ("engine", "every")

    def __init__(self, engine: Engine, every: int = COMMIT_EVERY) -> None:
        self.engine = engine
        self.every = every
        engine.safe_point = self.at_safe_point

    def due(self) -> bool:
        """The open transaction is big enough for a group commit."""
        return self.engine.meta.pending_ops >= self.every

    def at_safe_point(self) -> None:
        if self.engine.meta.pending_ops >= self.every:
            self.engine.commit()

    def idle(self) -> None:
        """No requests wait: commit what is open."""
        eng = self.engine
        if eng.failed is None and (eng.dirty or eng.meta.pending_ops):
            eng.commit()
