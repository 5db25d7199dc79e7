"""How a training run meets signals: SIGTERM (a pod preempted or evicted, `kill`) lets the step in
flight finish before the trainer checkpoints and stops (components/training.py raises Terminated);
Ctrl-C's own checkpoint is not cut short by a second Ctrl-C. Across ranks the launcher turns
both into SIGTERM for every rank (components/launch.py).
"""

import signal
import threading
from contextlib import contextmanager


@contextmanager
def handling(signums, handler):
    """`handler` for these signals inside the block, the previous handlers restored after it; nothing
    off the main thread (signals reach only the main thread, and only it may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def finish_the_step_on_sigterm(trainer):
    """SIGTERM sets a flag the loop reads after each optimizer step: stopping mid-step could save
    updated weights under the previous step's count, and the resumed run would differ. Kubernetes
    waits terminationGracePeriodSeconds (30 s by default) after SIGTERM, far longer than a step."""
    def request_stop(signum, frame):
        trainer.terminate_requested = True

    with handling((signal.SIGTERM,), request_stop):
        yield


@contextmanager
def sigint_held():
    """Hold SIGINT while Ctrl-C's checkpoint is saved and synced: a terminal's Ctrl-C reaches the
    whole process group, and a second one cut the upload to s3:// short (the run then resumed
    from the checkpoint before). A held SIGINT is delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
