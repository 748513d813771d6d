"""What keeps a weight exact when several threads use it, and when a state change is interrupted.

Weight locks. The "swap" strategy of sparse_delta_linear and scatter_swap_ write a weight in
place (the swap strategy only for the length of one call, restoring it bit for bit); every
other op of the package only reads it. Each weight maps to a shared/exclusive lock (a fixed
table of stripes keyed by the weight's address, so nothing grows and nothing is freed): the
package's readers hold it shared, its writers exclusive, inside the op bodies, so that no op of
this package reads a weight while another thread has it half-written, and two writers never
interleave. Stripes are taken in address order when one call writes several weights, so two
such calls cannot deadlock. Code outside the package that reads the same weight (a plain
F.linear on it) is not covered: see the README's reliability section.

Deferred interrupts. A switch is a swap of the weights followed by bookkeeping in Python; a
KeyboardInterrupt between the two would leave the weights switched and the books saying
otherwise. ``interrupts_deferred()`` holds SIGINT back for the few microseconds of such a
critical section (Python handles signals on the main thread) so that it arrives once the state
is consistent again; exceptions raised by the calls inside are handled by the caller rolling
back.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch

_STRIPES = 256


class SharedExclusiveLock:
    """Many holders in shared mode or one in exclusive mode; a waiting exclusive holder is
    served before new shared ones (a stream of forwards cannot starve a switch). The exclusive
    holder may take it again, in either mode (a merge holds its weight while it reads the base
    entries and swaps the new ones in); it is free once every such hold is released."""

    __slots__ = ("_mutex", "_cond", "_shared", "_exclusive", "_waiting", "_owner", "_depth")

    def __init__(self):
        # The state under a plain mutex (its with-statement is one C call, where a Condition's
        # is Python code): every forward takes and releases a lock; waiting is the rare case.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # threads waiting for an exclusive hold
        self._owner = None  # the exclusive holder's thread id
        self._depth = 0  # its holds

    def acquire_shared(self) -> None:
        with self._mutex:
            if not (self._exclusive or self._waiting):
                self._shared += 1
                return
            if self._owner == threading.get_ident():
                self._depth += 1
                return
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._mutex:
            if self._exclusive and self._owner == threading.get_ident():
                self._release_owned()
                return
            self._shared -= 1
            if not self._shared and self._waiting:  # only exclusive waiters wait for this
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            except BaseException:  # interrupted (KeyboardInterrupt): it may have held readers back
                self._waiting -= 1
                self._cond.notify_all()
                raise
            self._waiting -= 1
            self._exclusive, self._owner, self._depth = True, me, 1

    def release_exclusive(self) -> None:
        with self._mutex:
            self._release_owned()

    def _release_owned(self) -> None:
        self._depth -= 1
        if not self._depth:
            self._exclusive, self._owner = False, None
            self._cond.notify_all()


_LOCKS = tuple(SharedExclusiveLock() for _ in range(_STRIPES))


def _stripe(weight: torch.Tensor) -> int:
    # Weights are at least 64-byte aligned allocations: drop the bits that never differ.
    return (weight.data_ptr() >> 6) % _STRIPES


def weight_lock(weight: torch.Tensor) -> SharedExclusiveLock:
    """The lock of ``weight`` (for hot paths that acquire and release it directly)."""
    return _LOCKS[_stripe(weight)]


@contextlib.contextmanager
def reading(weight: torch.Tensor):
    """Hold ``weight``'s lock shared: no op of this package writes it meanwhile."""
    lock = _LOCKS[_stripe(weight)]
    lock.acquire_shared()
    try:
        yield
    finally:
        lock.release_shared()


@contextlib.contextmanager
def writing(*weights: torch.Tensor):
    """Hold the locks of ``weights`` exclusively (in stripe order: no deadlock between two
    calls that write overlapping sets)."""
    locks = [_LOCKS[i] for i in sorted({_stripe(w) for w in weights})]
    taken = []
    try:
        for lock in locks:
            lock.acquire_exclusive()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release_exclusive()


@contextlib.contextmanager
def interrupts_deferred():
    """A SIGINT (KeyboardInterrupt) arriving during the block is held back and delivered when
    the block ends. Python runs signal handlers in the main thread only, so elsewhere this does
    nothing; a handler other than a Python function (ignored, default) is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(signal.SIGINT, held[0])
