"""Process state for spreading work with ``accelerate`` (one place, so CPU machines work too).

``accelerate launch --num_processes N`` starts N processes on a multi-GPU machine; on a CPU-only machine
use ``accelerate launch --multi_gpu --num_processes N`` (accelerate's torchrun launcher) and the processes
talk over gloo: :func:`state` asks for the CPU backend whenever CUDA is absent.
"""
from __future__ import annotations

import torch


def state():
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def gather(objects: list) -> list:
    """All processes' lists concatenated in process order (the list itself with one process)."""
    s = state()
    if s.num_processes == 1:
        return objects
    from accelerate.utils import gather_object

    return gather_object(objects)
