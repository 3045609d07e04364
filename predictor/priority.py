"""CPU priority of the event-loop thread relative to the model threads (Linux per-thread nice).

On a saturated CPU box the event loop always has another request to parse (cache hits cost
≈ 0.3 ms each), and the kernel shares the cores evenly between it and the model threads, so cache
misses queue behind a stream of hits. With ``MOTLENS_SERVE_EVENT_LOOP_NICE`` > 0 the event-loop thread
runs at a lower priority than the model: misses are computed first and hits take what is left. Model
threads must not inherit the lower priority, so every model load runs on one thread started before
the loop thread is niced (:class:`predictor.slots.SlotManager`), and the batcher and runtime threads
descend from it. An unprivileged process can raise a nice value but never lower it again.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def thread_nice(native_id: int | None = None) -> int | None:
    """The nice value of a thread of this process (default: the calling one); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    return os.getpriority(os.PRIO_PROCESS, native_id or threading.get_native_id())


def nice_current_thread(nice: int) -> int | None:
    """Lower this thread's priority to ``nice`` (never raise it); the value now in force, None off Linux."""
    current = thread_nice()
    if current is None:
        log.warning("event-loop nice %d ignored: per-thread priorities need Linux", nice)
        return None
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        log.info("event-loop thread at nice %d; model threads stay at %d", nice, current)
    return thread_nice()
