"""A circuit breaker for a remote tier: stop waiting on a server that is known to be down.

Without it every request would pay the full socket timeout (plus retries) while Redis is down;
with it, after `failures` consecutive failures the breaker opens and calls fail at once with
`StoreUnavailable`, until `reset_s` has passed. Then one trial call goes through (half-open):
its success closes the breaker, its failure opens it for another `reset_s`.

Only `StoreUnavailable` raised inside `attempt()` counts as a failure: the backend translates
its transport errors into it. Other exceptions (a corrupt record, a cancelled request) say
nothing about the server's health and leave the counts alone.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from store.base import StoreUnavailable


class BreakerState(enum.IntEnum):
    # IntEnum so the state can be exported as a gauge in the integer stats.
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failures: int = 5,
        reset_s: float = 2.0,
        *,
        name: str = "backend",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        if reset_s < 0:
            raise ValueError("reset_s must not be negative")
        self._threshold = failures
        self._reset_s = reset_s
        self._name = name
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._failures = 0
        self._fast_failures = 0
        self._opens = 0

    @property
    def state(self) -> BreakerState:
        """The state as the next call would see it (open turns half-open once reset_s passed)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._reset_s:
            return BreakerState.HALF_OPEN
        return self._state

    @contextmanager
    def attempt(self, operation: str) -> Iterator[None]:
        """Guard one call. Raises `StoreUnavailable` at once while open (or while another
        call is the half-open trial); otherwise runs the block and records its outcome."""
        trial = self._admit(operation)
        try:
            yield
        except StoreUnavailable:
            self._record_failure()
            raise
        else:
            self._record_success()
        finally:
            # Any other outcome (cancelled, corrupt record) is neither healthy nor failing: a
            # trial that ended so simply lets the next call be the trial.
            if trial:
                self._trial_in_flight = False

    @property
    def stats(self) -> dict[str, int]:
        state = self.state
        return {
            "breaker_state": int(state),
            "breaker_open": int(state is not BreakerState.CLOSED),
            "breaker_opens": self._opens,
            "failures": self._failures,
            "fast_failures": self._fast_failures,
        }

    def _admit(self, operation: str) -> bool:
        """True when this call is the half-open trial."""
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = True
            return True
        self._fast_failures += 1
        raise StoreUnavailable(f"{self._name} {operation}: circuit open after repeated failures")

    def _record_failure(self) -> None:
        self._failures += 1
        self._consecutive += 1
        if self._state is BreakerState.HALF_OPEN or self._consecutive >= self._threshold:
            if self._state is not BreakerState.OPEN:
                self._opens += 1
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()

    def _record_success(self) -> None:
        self._consecutive = 0
        self._state = BreakerState.CLOSED
