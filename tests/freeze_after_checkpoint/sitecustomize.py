"""Put on the PYTHONPATH of a run under test (with FREEZE_AFTER_CHECKPOINT=<step> and FREEZE_DIR=<dir>): each
process, right after the checkpoint of that step is saved, writes its pid to <dir>/rank-<RANK> and stops itself
(SIGSTOP), so that the test can kill -9 the run at a known point, after that checkpoint and before the next step,
rather than race a run that might finish first. (The pid, because torchrun starts each rank in a session of its
own: killing the launcher's process group leaves them running.)"""

import os

if os.environ.get("FREEZE_AFTER_CHECKPOINT"):
    import signal
    from pathlib import Path

    from pipeline.engine import checkpoint

    _save = checkpoint.Checkpointer.save

    def _save_then_freeze(self, step, *args, **kwargs):
        path = _save(self, step, *args, **kwargs)
        if step == int(os.environ["FREEZE_AFTER_CHECKPOINT"]):
            marker = Path(os.environ["FREEZE_DIR"], f"rank-{os.environ.get('RANK', '0')}")
            marker.with_suffix(".tmp").write_text(str(os.getpid()))
            marker.with_suffix(".tmp").rename(marker)  # whole when it appears
            os.kill(os.getpid(), signal.SIGSTOP)
        return path

    checkpoint.Checkpointer.save = _save_then_freeze
