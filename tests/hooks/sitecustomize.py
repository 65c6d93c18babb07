"""Test-only fault injection, loaded into every process a test starts (the CLI, Ray workers,
training ranks) because tests/conftest.py puts this folder on PYTHONPATH and sets
POSDISTILL_TEST_HOOKS=1. Production code reads nothing of this: the hooks wrap stage
functions from outside, and each fault is a file in the output directory, so it reaches
whichever process does the work.

``<cache dir>/.test-fault``: comma-separated ``crash_once:<shard>`` (the worker process dies
right after writing the first row group of that shard, once: a ``.fault-crashed-<shard>``
marker remembers it) and ``sleep:<seconds>`` (after every row group) and ``nan:<window>:<position>`` (the teacher's
hidden state there becomes NaN, as an overflowing teacher would make it).
``<run dir>/.test-step-delay``: seconds to sleep after every optimizer step.
``<run dir>/.test-fault``: ``nan_target:<step>`` (rank 0's teacher log-probs of that step
become NaN) or ``nan_loss:<step>`` (a rank-0 weight becomes NaN just before that step).
"""

import os


def _install() -> None:
    import time
    from pathlib import Path

    import stages.cache.writer as writer
    import stages.train.loop as loop

    write = writer.CacheWriter.write

    def faulty_write(self, *args, **kwargs):
        out = write(self, *args, **kwargs)
        spec = self.final.parent / ".test-fault"
        if spec.is_file():
            index = int(self.final.name.split("-")[1].split(".")[0])
            for part in filter(None, spec.read_text().strip().split(",")):
                kind, _, arg = part.partition(":")
                if kind == "sleep":
                    time.sleep(float(arg))
                elif kind == "crash_once" and int(arg) == index:
                    marker = self.final.parent / f".fault-crashed-{index}"
                    if not marker.exists():
                        marker.touch()
                        os._exit(1)
        return out

    writer.CacheWriter.write = faulty_write

    import stages.cache.stage as cache_stage

    init = cache_stage.CacheWorker.__init__

    def poisoned_init(self, job, *args, **kwargs):
        init(self, job, *args, **kwargs)
        spec = Path(job.cache_dir) / ".test-fault"
        nans = [p.split(":")[1:] for p in spec.read_text().strip().split(",") if p.startswith("nan:")] \
            if spec.is_file() else []
        if not nans:
            return
        select = self.scorer.select

        def poisoned_select(hidden, window_ids=None):
            for window, pos in nans:
                if window_ids is not None and int(window) in window_ids:
                    hidden = hidden.clone()
                    hidden[window_ids.index(int(window)), int(pos)] = float("nan")
            return select(hidden, window_ids)

        self.scorer.select = poisoned_select

    cache_stage.CacheWorker.__init__ = poisoned_init

    train, step = loop.train, loop.train_step

    def slowed_train(spec, inputs, run, *args, **kwargs):
        delay_file = Path(run) / ".test-step-delay"
        fault_file = Path(run) / ".test-fault"
        if fault_file.is_file() and os.environ.get("RANK", "0") == "0":
            kind, _, at = fault_file.read_text().strip().partition(":")
            calls = [0]

            def faulty_step(engine, data, *a, **k):
                calls[0] += 1
                if calls[0] == int(at) and kind == "nan_loss":
                    next(engine.module.parameters()).data.fill_(float("nan"))
                if calls[0] == int(at) and kind == "nan_target":
                    inner = data

                    class Poisoned:
                        def __next__(self):
                            batch = next(inner)
                            batch.logp.view(-1)[7] = float("nan")
                            return batch

                    data = Poisoned()
                return step(engine, data, *a, **k)

            loop.train_step = faulty_step
        if delay_file.is_file():
            delay = float(delay_file.read_text())

            def slow_step(*a, **k):
                out = step(*a, **k)
                time.sleep(delay)
                return out

            loop.train_step = slow_step
        return train(spec, inputs, run, *args, **kwargs)

    loop.train = slowed_train


def _ray_system_process() -> bool:
    """Ray's own daemons (dashboard, agents, monitors) run no project code: importing the stages
    (torch) into each of them only slows a node's start, past Ray's start-up timeouts on a
    loaded machine. Its workers (``default_worker.py``) do run the stages and get the hooks."""
    import sys

    script = (sys.argv or [""])[0].replace("\\", "/")
    return "/ray/" in script and not script.endswith("default_worker.py")


if os.environ.get("POSDISTILL_TEST_HOOKS") == "1" and not _ray_system_process():
    try:
        _install()
    except ImportError:  # a process without the project on its path
        pass
