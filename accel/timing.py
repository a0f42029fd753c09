"""Timing a GPU function without the host: replayed from a CUDA graph (what ``mode="reduce-overhead"`` runs).
Shared by the GPU benchmark and ``Quantize(select="speed")``."""
from __future__ import annotations

import statistics
from typing import Callable

import torch


def cuda_graph_time(fn: Callable, n: int = 20, repeats: int = 5) -> float:
    """Median seconds per call of ``fn`` replayed from a CUDA graph of ``n`` calls (warm-up, autotuning included,
    outside the capture, on a side stream). Raises what the capture raises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(times)
