"""``ModelAccess``: who may use a shared model, under which policy.

A loaded model is shared state (its engine holds one active policy and one counter), so
every piece of work — a batch step, an evaluation — holds the lock, makes its policy the
engine's and runs under the damaged-weights guard. ``LLM``, ``Batch`` and the evaluation
functions all go through this one object instead of each other's internals.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from quicksilver.api.arguments import PolicySpec
from quicksilver.errors import QuicksilverError
from quicksilver.policies import Policy, load_policy
from quicksilver.runtime.engine import Engine
from quicksilver.runtime.sampling import NonFiniteLogits


class ModelAccess:
    """The lock, the active policy and the per-thread ``use`` scopes of one model.

    ``verify_weights`` is called when logits come out NaN or inf: it returns a message
    when the converted-model cache the weights came from is damaged (None otherwise).
    """

    def __init__(self, engine: Engine, verify_weights: Callable[[], str | None]) -> None:
        self.engine = engine
        self.lock = threading.RLock()
        self._verify_weights = verify_weights
        self._scope = threading.local()

    def policy(self, spec: PolicySpec) -> Policy:
        """The Policy ``spec`` names, checked against this model (PolicyConfigError if it
        names none: an unknown preset or file, a bad mapping, another type)."""
        policy = load_policy(spec)
        policy.check_model(self.engine.model.config)
        return policy

    def scoped_policy(self) -> Policy | None:
        """The policy of the innermost ``use`` of the calling thread (None: dense)."""
        stack = self._stack()
        return stack[-1] if stack else None

    def chosen_policy(self, spec: PolicySpec) -> Policy | None:
        """A call's ``policy=``: the one it names, else the calling thread's scope."""
        return self.scoped_policy() if spec is None else self.policy(spec)

    @contextlib.contextmanager
    def use(self, spec: PolicySpec) -> Iterator[Policy]:
        """``LLM.use``: ``spec`` for the calling thread inside the block, prepared on entry
        and released on exit (the previous one comes back, so blocks nest)."""
        chosen = self.policy(spec)
        stack = self._stack()
        with self.lock:
            self._activate(chosen)
        stack.append(chosen)
        try:
            yield chosen
        finally:
            stack.pop()
            self.release()

    @contextlib.contextmanager
    def hold(self, policy: Policy | None) -> Iterator[None]:
        """Hold the model for one step under ``policy``. The policy stays active after it,
        so the next step of the same batch does not prepare it again; ``release`` ends it."""
        with self.lock, self._checked_weights():
            self._activate(policy)
            yield

    @contextlib.contextmanager
    def work(self, spec: PolicySpec) -> Iterator[None]:
        """Hold the model for one whole piece of work under the call's policy, released
        after it."""
        policy = self.chosen_policy(spec)
        try:
            with self.hold(policy):
                yield
        finally:
            self.release()

    def release(self) -> None:
        """Give the engine back to the calling thread's scope (a policy for one call ends)."""
        with self.lock:
            self._activate(self.scoped_policy())

    def _stack(self) -> list[Policy | None]:
        if not hasattr(self._scope, "stack"):
            self._scope.stack = []
        return self._scope.stack

    def _activate(self, policy: Policy | None) -> None:
        """Make ``policy`` the engine's (caller holds the lock)."""
        if self.engine.policy is not policy:
            self.engine.set_policy(policy)

    @contextlib.contextmanager
    def _checked_weights(self) -> Iterator[None]:
        """NaN or inf logits may come from a damaged converted-model cache (bytes flipped
        inside a tensor change no size, so a load cannot see them): verify the entry these
        weights came from, and if it is damaged, say so — it is removed and the next load
        rebuilds it — instead of blaming the checkpoint."""
        try:
            yield
        except NonFiniteLogits as err:
            damaged = self._verify_weights()
            if damaged is not None:
                raise QuicksilverError(f"{damaged}; load the model again") from err
            raise
