"""The seed paper's analyses: positional perturbation traced through the layers, and the
RoPE-frequency spans of W_q / W_k that long-context extension moved. See docs/eval.md."""
