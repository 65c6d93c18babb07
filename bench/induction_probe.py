"""Which short-pretraining data gives the demo's 2-layer, width-64 student an induction mechanism?

A single-process probe (plain AdamW, no DeepSpeed), one torch thread, batch 16, window 256.
It prints the training loss and copy accuracy on held-out periodic rows (printable
alphabet, periods 16-100, loss after the first period) every 100 steps; jumps from ~0.02 to
> 0.8 mark the emergence. Logs of the runs behind docs/teacher.md ("The demo's students"):
bench/results/induction_probe/<variant>.log.

    python bench/induction_probe.py [VARIANT STEPS LR const|decay LAYERS [PACK_DIR]]
    (default: bytes-b98 1200 3e-3 const 2, the recipe the demo adopted)

VARIANT: "bytes" (periodic rows over ids 0..255) or "printable" (ASCII 32..126), or
"packed" (the first windows file of PACK_DIR, e.g. a window-256 pack of the demo's text
documents under runs/demo/pack); "U" trains on every position (as packed windows do) instead of after the first
period; "b98" uses AdamW betas (0.9, 0.98); "p64" caps periods at 64 (default 128); "-sN"
seeds the initialisation.
"""
import glob
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pyarrow.parquet as pq
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from stages.bootstrap import periodic_row, alphabet_ids
torch.set_num_threads(1)
argv = sys.argv[1:] or ["bytes-b98", "1200", "3e-3", "const", "2"]
variant, steps, lr, decay, layers = argv[0], int(argv[1]), float(argv[2]), argv[3] == "decay", int(argv[4])
torch.manual_seed(int(variant.split("-s")[-1]) if "-s" in variant else 0)
cfg = LlamaConfig(vocab_size=260, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=32, intermediate_size=256, max_position_embeddings=1024, rope_theta=1e4, bos_token_id=257, eos_token_id=258, pad_token_id=259)
cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1e4}
m = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.98) if "b98" in variant else (0.9, 0.999), weight_decay=0.0)
gen = torch.Generator().manual_seed(0)
byts, prn = alphabet_ids("bytes", "ab"), alphabet_ids("printable", "ab")
packed = None
if variant.startswith("packed"):
    f = sorted(glob.glob(f"{argv[5]}/windows-*.parquet"))[0]
    packed = torch.tensor(pq.read_table(f).column("input_ids").to_pylist(), dtype=torch.long)
egen = torch.Generator().manual_seed(123)
ev = [periodic_row(egen, 256, 16, 100, prn) for _ in range(64)]
eids = torch.stack([e[0] for e in ev]); elab = torch.stack([e[1] for e in ev])
def acc():
    m.eval()
    with torch.no_grad():
        lg = m(input_ids=eids).logits[:, :-1]
    m.train(); lab = elab[:, 1:]; mask = lab != -100
    return ((lg.argmax(-1) == lab) & mask).sum().item() / mask.sum().item()
t0 = time.time(); idx = 0
for step in range(steps):
    cur = lr * min(1, (step + 1) / 20)
    if decay: cur *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
    for g in opt.param_groups: g["lr"] = cur
    if packed is not None:
        ids = packed[idx:idx + 16]; idx = (idx + 16) % (len(packed) - 16); labels = ids
    else:
        maxp = 64 if "p64" in variant else 32 if "p32" in variant else 128
        rows = [periodic_row(gen, 256, 4, maxp, byts if "bytes" in variant else prn) for _ in range(16)]
        ids = torch.stack([r[0] for r in rows]); labels = ids if "U" in variant else torch.stack([r[1] for r in rows])
    loss = m(input_ids=ids, labels=labels).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    if step % 100 == 0 or step == steps - 1:
        print(variant, step, round(loss.item(), 3), "copy-acc", round(acc(), 3), f"{time.time()-t0:.0f}s", flush=True)
