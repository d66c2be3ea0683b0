"""The workers of a torchrun job stop together: one that fails says why, and the others say the same.

A worker that fails (a full disk on rank 0, data missing on one node, a bug) leaves its peers
waiting in their next collective: NCCL waits for its timeout, gloo fails with "Connection closed by
peer", and torchrun kills them 30 s later. Instead, every worker watches a key in the rendezvous
store that torchrun already runs (MASTER_ADDR:MASTER_PORT): the failing worker posts its one line
there and waits until every peer has taken it; each peer prints that line and exits at once, from
whatever collective it was in. The watch is a thread of its own with its own store client, so it
sees the key while the main thread is blocked in C++.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

POLL_S = 0.2  # how often a worker looks for a peer's failure
WAIT_S = 5.0  # how long a failing worker waits for its peers to take its line before it exits anyway
EXIT_CODE = 2  # a peer's failure ends this worker as an earlybird error ends the CLI

_generation = 0  # one per process group joined, the same on every worker: a key never outlives its group


class Watch:
    """This worker's view of the job's failures: ``post`` one, ``posted`` a peer's."""

    def __init__(self, store: dist.Store, prefix: str, size: int):
        self.store, self.size = store, size
        self.failed, self.stopped = f"{prefix}/failed", f"{prefix}/stopped"
        self.lock = threading.Lock()  # one store request at a time on this client
        self.done = threading.Event()  # this worker stopped watching (it posted, finished or failed)
        self.thread = threading.Thread(target=self._run, name="earlybird-peers", daemon=True)

    def _run(self) -> None:
        while not self.done.wait(POLL_S):
            try:
                with self.lock:
                    if self.done.is_set() or not self.store.check([self.failed]):
                        continue
                    line = self.store.get(self.failed).decode()
                    self.store.add(self.stopped, 1)
            except Exception:  # the store is gone (torchrun stopped): nothing left to watch
                return
            print(line, file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_CODE)  # the main thread may be blocked in a collective that never returns

    def post(self, line: str) -> None:
        """Tell the peers that this worker failed with ``line`` (the first failure posted is the one
        they print) and wait until each has taken it or failed too, at most ``WAIT_S``: a worker that
        exits first closes its connections, and its peers would fail in their collectives instead."""
        with self.lock:
            self.done.set()
            try:
                self.store.compare_set(self.failed, "", line)
                self.store.add(self.stopped, 1)
            except Exception:
                return
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                if self.store.add(self.stopped, 0) >= self.size:
                    return
            except Exception:
                return
            time.sleep(POLL_S / 4)

    def posted(self, wait: float = 0.0) -> str | None:
        """A peer's failure line, if one was posted (within ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with self.lock:
                    if self.store.check([self.failed]):
                        return self.store.get(self.failed).decode()
            except Exception:
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(POLL_S / 4)


_WATCH: Watch | None = None


def watch(size: int) -> None:
    """Start watching the peers of the process group just joined (torchrun's environment: its
    store's address, run id and restart count); without a store address there is nothing to watch."""
    global _WATCH, _generation
    close()
    _generation += 1
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port or not port.isdigit():
        return
    try:  # the group was just joined through this store; should it be gone, the run goes on unwatched
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)
    except (RuntimeError, OSError):
        return
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    prefix = f"earlybird/{run}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_generation}"
    _WATCH = Watch(store, prefix, size)
    _WATCH.thread.start()


def active() -> bool:
    """Whether this worker watches peers (it joined a group of several under torchrun)."""
    return _WATCH is not None


def post(line: str) -> None:
    """This worker failed with ``line``: stop the others with it (nothing without a watch)."""
    if _WATCH is not None:
        _WATCH.post(line)


def posted(wait: float = 0.0) -> str | None:
    """The line a peer failed with, if any."""
    return _WATCH.posted(wait) if _WATCH is not None else None


def close() -> None:
    """Stop watching (the command is over)."""
    global _WATCH
    if _WATCH is not None:
        with _WATCH.lock:
            _WATCH.done.set()
        _WATCH = None


def lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because a peer went away without posting (gloo says
    "Connection closed by peer" or "reset by peer", "typically caused by a remote worker ...")."""
    return isinstance(exc, dist.DistError) or any(s in str(exc) for s in ("by peer", "remote worker"))
