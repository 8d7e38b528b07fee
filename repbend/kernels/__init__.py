"""repbend.kernels: the fused RepBend loss kernels (Triton on CUDA, eager PyTorch on the CPU).

Imports nothing but torch and triton, so other trainers can use them directly:

    from repbend.kernels import rep_distance, pairwise_cosine_loss, linear_kl

- `rep_distance(hidden, ref, rows)`: per-layer sums of ||h - r||_2, cos(h, r), relu(cos(h, r)) and ||h - r||^2 over
  the selected tokens (rows: int64 flat positions b * T + t, or a [B, T] mask).
- `pairwise_cosine_loss(x)`: mean over layers of the mean over ordered pairs i != j of 1 - cos(x_i, x_j).
- `linear_kl(hidden, ref_hidden, weight, temperature, softcap=None)`: T^2 * sum_n KL(softmax(c(ref W^T)/T) ||
  softmax(c(h W^T)/T)), c an optional logit soft-cap, without ever materialising the [N, V] logits.
- `linear_logprob(hidden, weight, labels, softcap=None)`: [N] log_softmax(c(h W^T))[labels] per row, also without
  the [N, V] logits.

Every function takes impl="auto" | "triton" | "torch" and returns float32 results. The Triton paths are custom ops
(torch.ops.repbend.*) with autograd registered, so torch.compile(fullgraph=True) traces them.
"""
from .linear_kl import LinearKL, linear_kl
from .linear_logprob import LinearLogprob, linear_logprob
from .pairwise_cosine import PairwiseCosineLoss, pairwise_cosine_loss
from .rep_distance import RepDistance, RepDistanceLoss, rep_distance

__all__ = ["rep_distance", "RepDistance", "RepDistanceLoss", "pairwise_cosine_loss", "PairwiseCosineLoss",
           "linear_kl", "LinearKL"]
__all__ += ["linear_logprob", "LinearLogprob"]
