"""Student training: DeepSpeed ZeRO from cached teacher logits, phase by phase.

plan.py        what each phase trains on (resolved KD settings, data, steps), checked up front
data.py        window streams (teacher cache or packed windows), batches, sequence-parallel slices
model.py       the student wrapped with the tiled KD loss; Ulysses and tiled-MLP setup
checkpoint.py  DeepSpeed checkpoints with every rank's data position and a completion marker
metrics.py     metrics.jsonl + TensorBoard, one record per optimizer step
loop.py        the one training function every launcher runs on every rank
launch.py      starting the ranks: torchrun / deepspeed launcher, or Ray Train
export.py      checkpoint -> Hugging Face directory
"""
