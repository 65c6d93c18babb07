"""Step time with the teacher run inside the training loop (online KD) / step time from the
cache (offline KD), same student and batch: the saving the teacher cache exists for.

One in-process DeepSpeed rank (ZeRO-2, CPU, fp32). Student: Llama vocab 32000, hidden 512,
4 layers; teacher: same vocabulary, hidden 1024, 8 layers (about 4x the student's weights).
Online: the teacher scores the window (the cache stage's own chunked top-32 scorer) and
the student takes a KD step on those targets. Offline: the student takes the same KD step on
targets already in memory (reading them from the cache costs ~0.1% of a step, see
loader_wait.json). Time is the CPU time of the training thread with torch on one thread;
steps alternate (5 pairs) and the value is the median of the per-pair ratios, with their range.
"""

from __future__ import annotations

from common import alternate, paired_ratios, spread, write_result
from train_common import engine_for, llama, one_thread, step, synthetic_rows

VOCAB, WINDOW, K = 32000, 1024, 32
STUDENT = {"hidden": 512, "layers": 4, "heads": 8}
TEACHER = {"hidden": 1024, "layers": 8, "heads": 16}


def main() -> None:
    import time

    import torch

    from pipeline.config import KDConfig
    from stages.teacher import TeacherScorer
    from stages.train.data import collate

    one_thread()
    student = llama(VOCAB, STUDENT["hidden"], STUDENT["layers"], STUDENT["heads"])
    teacher = llama(VOCAB, TEACHER["hidden"], TEACHER["layers"], TEACHER["heads"], seed=1).eval()
    scorer = TeacherScorer(teacher, kind="topk", k=K, samples=1, temperature=1.0, chunk_len=1024)
    engine = engine_for(student)
    row = synthetic_rows(1, WINDOW, VOCAB, K)[0]
    common = dict(mode="cross_doc", window_len=WINDOW, sp=1, sp_rank=0, with_targets=True)
    cached = collate([row], **common)
    kd = KDConfig(alpha=1.0)

    def online() -> float:
        t0 = time.thread_time()
        with torch.no_grad():
            t = scorer.score(row["input_ids"].long()[None], [[0]], "cross_doc")
        batch = collate([{**row, "ids": t["ids"][0], "logp": t["logp"][0].half()}], **common)
        return time.thread_time() - t0 + step(engine, batch, kd)

    times = alternate({"online": online, "offline": lambda: step(engine, cached, kd)}, repeats=5, warmup=1)
    ratio = paired_ratios(times["online"], times["offline"], 3)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # The teacher has ~4x the student's weights: its forward costs about 4/3 of the student's
    # forward + backward, so the cache should save a good third of the online step at least.
    write_result(
        "online_vs_offline", metric="online_over_offline_step", value=ratio["median"], goal=1.5, direction=">=",
        unit="x", details={
            "definition": "median over alternated pairs of (online KD step CPU s) / (offline KD step from cached "
                          "targets CPU s)", "ratio": ratio,
            "online_step_s": spread(times["online"]), "offline_step_s": spread(times["offline"]),
            "setup": {"vocab": VOCAB, "window": WINDOW, "k": K, "student": STUDENT, "teacher": TEACHER,
                      "student_params": params(student), "teacher_params": params(teacher), "zero_stage": 2,
                      "dtype": "float32", "time": "thread CPU time, torch on 1 thread, 5 pairs in alternated order"}})


if __name__ == "__main__":
    main()
