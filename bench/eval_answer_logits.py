"""Scoring long probes without the full [T, vocab] logits: peak memory and time, side by side.

Each variant runs in its own child process (peak RSS is per process) on the same random
Llama (hidden 64, 2 layers, vocab 32000) and the same 8192-token input:
  full_logits     model(...).logits, log-softmax, then read the answer positions (naive)
  answer_only     stages.evaluate.retrieval.score_batch: body + lm_head on the answer positions
  loss_full       next-token loss from the full logits
  loss_tiled      stages.evaluate.loss_by_position: lm_head tile by tile (tile 1024)
  body_only       the forward without any head: the floor both are measured against
"""

from __future__ import annotations

from common import child_json, write_result

T, V, A = 8192, 32000, 8

CHILD = r'''
import json, resource, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0); torch.set_num_threads(2)
T, V, A, variant = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=T)
model = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, V, (1, T))
from stages.evaluate.tasks import Probe
from stages.evaluate.retrieval import score_batch
from stages.evaluate.loss_by_position import loss_by_position
from stages.evaluate.models import final_hidden
probe = Probe("needle", T - A + 1, 0.5, 0, ids[0, :T - A + 1].tolist(), ids[0, T - A + 1:].tolist() + [1], 0)
row = {"input_ids": ids[0].tolist(), "doc_starts": [0]}
pos = torch.arange(T)[None]
with torch.no_grad():
    def run():
        if variant == "full_logits":
            logp = torch.log_softmax(model(input_ids=ids, position_ids=pos).logits.float(), -1)  # [1, T, V]
            return logp[0, -A:].argmax(-1)
        if variant == "answer_only":
            return score_batch(model, [probe])
        if variant == "loss_full":
            logits = model(input_ids=ids, position_ids=pos).logits.float()
            return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        if variant == "loss_tiled":
            return loss_by_position(model, [row], "cross_doc", 4, tile=1024)
        return final_hidden(model.model, ids)
    run()
    t0 = time.perf_counter(); run(); dt = time.perf_counter() - t0
print(json.dumps({"variant": variant, "seconds": dt,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def measure(variant: str) -> dict:
    return child_json(["-c", CHILD, str(T), str(V), str(A), variant])


def main() -> None:
    r = {v: measure(v) for v in ("body_only", "full_logits", "answer_only", "loss_full", "loss_tiled")}
    floor = r["body_only"]["peak_rss_mib"]
    extra = {v: round(r[v]["peak_rss_mib"] - floor, 1) for v in r}
    logits_mib = T * V * 4 / 2**20
    # Goal: answer-only scoring adds under a tenth of what one [T, V] float32 logits tensor would.
    write_result(
        "eval_answer_logits", metric="answer_only_extra_peak_rss_mib", value=extra["answer_only"],
        goal=round(logits_mib / 10, 1), direction="<=", unit="MiB", details={
            "definition": "peak RSS of scoring the answer positions only minus the body-only forward's; goal: a "
                          "tenth of one [T, V] float32 logits tensor",
            "full_over_answer_only": round(extra["full_logits"] / max(extra["answer_only"], 1.0), 1),
            "setup": {"tokens": T, "vocab": V, "answer_tokens": A, "model": "Llama hidden 64, 2 layers"},
            "extra_peak_rss_mib_over_body_only": extra,
            "peak_rss_mib": {v: round(r[v]["peak_rss_mib"], 1) for v in r},
            "seconds": {v: round(r[v]["seconds"], 3) for v in r},
            "loss_extra_rss_ratio_full_over_tiled": round(extra["loss_full"] / max(extra["loss_tiled"], 1.0), 1),
            "full_logits_tensor_mib": round(logits_mib, 1)})


if __name__ == "__main__":
    main()
