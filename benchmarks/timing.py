"""GPU timing helpers shared by the benchmarks: CUDA-graph replays timed with CUDA events,
medians over repeats, inputs rotated so that data larger than L2 is really read from HBM."""

from __future__ import annotations

import statistics

import torch


def copies_needed(nbytes: int, target: int = 256 << 20, cap: int = 8) -> int:
    """How many input copies to rotate through so one pass reads >= target bytes (L2 is 50 MB)."""
    return max(1, min(cap, -(-target // max(nbytes, 1))))


def time_calls(calls, reps: int = 20, warmup: int = 3, graph: bool = True) -> dict:
    """Median milliseconds per call of the zero-argument callables `calls` run in turn."""
    for f in calls:  # compile / autotune / allocate outside the timed region
        f()
    torch.cuda.synchronize()
    replay = None
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in calls:
                f()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in calls:
                f()
        replay = g.replay
    else:
        def replay():
            for f in calls:
                f()
    for _ in range(warmup):
        replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
            "calls_per_rep": len(calls), "graph": graph}


def copy_ceiling(nbytes: int = 1 << 30, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], reps=reps, graph=False)
    t["gbps"] = 2 * nbytes / (t["ms"] * 1e-3) / 1e9
    t["bytes"] = nbytes
    return t
