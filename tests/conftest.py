import os

# Triton kernels run on the CPU only in interpreter mode, and the flag must be set before any module that
# defines @triton.jit functions is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Every test uses small shapes, where extra threads only add barrier waits (and CI's two cores are shared with
# the subprocesses some tests start).
torch.set_num_threads(1)
