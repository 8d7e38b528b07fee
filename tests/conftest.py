import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Without a GPU, Triton kernels run on the CPU only in interpreter mode; with one, the tests run the compiled
# kernels. The flag must be set before any module that defines @triton.jit functions is imported: importing
# torch (which loads no such module) to ask first is fine, and tests/test_environment.py checks both.
# An explicit TRITON_INTERPRET in the environment is left as it is.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every test uses small shapes, where extra threads only add barrier waits (and CI's two cores are shared with
# the subprocesses some tests start).
torch.set_num_threads(1)
