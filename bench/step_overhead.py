"""Training step time with cached KD targets / step time with plain CE, same model and batch
(issue: <= 1.10): what the sparse KD loss adds on top of next-token training.

One in-process DeepSpeed rank (ZeRO-2, CPU, fp32) trains a Llama student (vocab 32000,
hidden 512, 4 layers) on one window of 2048 tokens per step; the KD step reads top-32
targets with a tail bucket, the CE step has no targets (alpha 0). Time is the CPU time of the
training thread with torch on one thread (other processes on a shared machine do not enter
it); KD and CE steps alternate (bench/common.alternate, 7 pairs) and the value is the median of
the per-pair ratios, with their range.
"""

from __future__ import annotations

from common import alternate, paired_ratios, spread, write_result
from train_common import engine_for, llama, one_thread, step, synthetic_rows

VOCAB, HIDDEN, LAYERS, HEADS, WINDOW, K = 32000, 512, 4, 8, 2048, 32


def main() -> None:
    from pipeline.config import KDConfig
    from stages.train.data import collate

    one_thread()
    engine = engine_for(llama(VOCAB, HIDDEN, LAYERS, HEADS))
    rows = synthetic_rows(1, WINDOW, VOCAB, K)
    common = dict(mode="cross_doc", window_len=WINDOW, sp=1, sp_rank=0)
    kd_batch = collate(rows, with_targets=True, **common)
    ce_batch = collate(rows, with_targets=False, **common)
    kd, ce = KDConfig(alpha=1.0), KDConfig(alpha=0.0)
    times = alternate({"kd": lambda: step(engine, kd_batch, kd), "ce": lambda: step(engine, ce_batch, ce)},
                      repeats=7, warmup=1)
    ratio = paired_ratios(times["kd"], times["ce"], 3)
    write_result(
        "step_overhead", metric="kd_step_over_ce_step", value=ratio["median"], goal=1.10, direction="<=", unit="x",
        details={"definition": "median over alternated pairs of (KD step CPU s) / (CE-only step CPU s)",
                 "ratio": ratio, "kd_step_s": spread(times["kd"]), "ce_step_s": spread(times["ce"]),
                 "setup": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "window": WINDOW, "k": K,
                           "micro_batch": 1, "zero_stage": 2, "dtype": "float32", "loss_tile": 1024, "tail": "bucket",
                           "time": "thread CPU time, torch on 1 thread, 7 pairs in alternated order"}})


if __name__ == "__main__":
    main()
