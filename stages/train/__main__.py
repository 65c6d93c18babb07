"""``python -m stages.train RUN_DIR/train_job.json``: the rank entry point.

A separate module so that :mod:`stages.train.loop` is imported as itself on every rank
(running it with ``-m`` would load a second copy as ``__main__``).
"""

from stages.train.loop import main

main()
