"""Test session set-up.

Without a GPU, Triton kernels run on CPU tensors through the Triton interpreter; it must be
switched on before triton is imported anywhere, so it is set here, at collection start.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fixed, small thread count: the CI machine has 2 cores and pytest runs 2 workers.
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
