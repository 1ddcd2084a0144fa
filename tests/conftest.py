"""Test-wide settings.

The models here are tiny, so one torch thread is as fast as two, and it keeps the suite's time stable
when anything else runs on the machine: two processes each asking for both cores slow down ~10×
(OpenMP threads spin-waiting on each other), which is what an unpinned suite suffers in that case.
"""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the training subprocesses the suite starts
