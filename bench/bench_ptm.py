"""Benchmark: PTM temporal attention, fused kernel vs materialised logits (target: fused no slower, <= 60% peak memory).

Run from the repository root: ``python bench/bench_ptm.py [--repeats 5] [--device cpu|cuda]``.
SD1.5 shapes: latent 64x64 with 320 channels and 32x32 with 640, 8 heads, 16 frames, batch 2
(both halves of classifier-free guidance). Two scopes:

- ``attention``: given q, k, v as the processor holds them ([B*h*w, heads, F, d] views of the
  projections), the PTM attention itself - fused: query scaled in place by 1/T, then
  ``scaled_dot_product_attention``; materialised: ``softmax((q k^T) * scale / T) v`` written out.
- ``layer``: the whole temporal ``Attention`` module call (projections included), with
  :class:`PTMAttnProcessor` (rows in chunks of ``DEFAULT_CHUNK_BYTES`` per slab, the default),
  the same processor with all rows in one chunk (``fused 1 chunk``, shown for reference: what the
  chunking saves), and a processor that writes out the logits.

Each case runs in a fresh subprocess. Peak memory is the rise above what the inputs already hold:
on CUDA from ``torch.cuda.max_memory_allocated``; on the CPU from the process's resident-set high
water mark (``ru_maxrss``) during the first call, with glibc told to return every large block on
free (``MALLOC_MMAP_THRESHOLD_``) so the resident set follows live tensors. Time is the median of
``--repeats`` calls after that one; on the CPU it is taken in a second subprocess with glibc's
default allocator settings, because the memory setting makes every large allocation fault in
fresh pages and would time the page faults rather than the attention.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_memory import run_worker  # noqa: E402

CASES = ((64, 320), (32, 640))
SCOPES = ("attention", "layer")
IMPLS = {"attention": ("fused", "materialised"), "layer": ("fused", "fused 1 chunk", "materialised")}
HEADS = 8
TIME_TARGET = 1.0
MEMORY_TARGET = 0.60


def resident_bytes() -> int:
    """Current resident set of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """High-water mark of the resident set of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def materialised_attention(query, key, value, temperature_rows):
    """softmax((q k^T) * scale / T) v with the logits written out; [N, heads, F, d] -> [N, heads, F, d]."""
    scale = query.shape[-1] ** -0.5
    logits = (query @ key.transpose(-1, -2)) * scale / temperature_rows
    return logits.softmax(dim=-1) @ value


class MaterialisedPTMProcessor:
    """Temporal attention with the PTM logits written out, as research code usually does it."""

    def __init__(self, temperature_rows) -> None:
        self.temperature_rows = temperature_rows

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        rows, frames, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query, key, value = (t.view(rows, frames, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = materialised_attention(query, key, value, self.temperature_rows)
        out = out.transpose(1, 2).reshape(rows, frames, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


def worker(spec: dict) -> dict:
    """Run one case in this process; return its peak memory above the inputs and median time."""
    import torch
    from diffusers.models.attention_processor import Attention

    from tcan_core.animation.ptm import PTMAttnProcessor, PTMState, inverse_temperature_per_row

    device = torch.device(spec["device"])
    size, channels, frames, batch = spec["size"], spec["channels"], spec["frames"], spec["batch"]
    rows = batch * size * size
    head_dim = channels // HEADS
    generator = torch.Generator(device=device).manual_seed(0)
    state = PTMState()
    state.set(1 + 3 * torch.rand(size, size, generator=generator, device=device))
    temperature_rows = state.inverse_rows(size, size, device, torch.float32).reciprocal()
    temperature_rows = temperature_rows.view(1, -1).expand(batch, -1).reshape(rows, 1, 1, 1)

    if spec["scope"] == "attention":
        projections = [torch.randn(rows, frames, channels, generator=generator, device=device) for _ in range(3)]
        query, key, value = (t.view(rows, frames, HEADS, head_dim).transpose(1, 2) for t in projections)
        if spec["impl"] == "fused":
            def call():
                query.mul_(inverse_temperature_per_row(state, rows, 0, device, query.dtype).view(-1, 1, 1, 1))
                return torch.nn.functional.scaled_dot_product_attention(query, key, value)
        else:
            def call():
                return materialised_attention(query, key, value, temperature_rows)
    else:
        torch.manual_seed(0)
        attn = Attention(query_dim=channels, heads=HEADS, dim_head=head_dim, bias=False).to(device).eval()
        hidden = torch.randn(rows, frames, channels, generator=generator, device=device)
        if spec["impl"] == "fused":
            attn.set_processor(PTMAttnProcessor(state, level=0))
        elif spec["impl"] == "fused 1 chunk":
            attn.set_processor(PTMAttnProcessor(state, level=0, chunk_bytes=None))
        else:
            attn.set_processor(MaterialisedPTMProcessor(temperature_rows))

        def call():
            return attn(hidden)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = call()
            sync()
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            before = resident_bytes()
            out = call()
            peak = peak_resident_bytes() - before
        del out
        times = []
        for _ in range(spec["repeats"]):
            sync()
            start = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - start)
    return {"peak_bytes": max(peak, 0), "seconds": statistics.median(times) if times else None}


def run_case(spec: dict) -> dict:
    """Peak memory and median time of one case (on the CPU from two processes, see the module docstring)."""
    if spec["device"] != "cpu":
        return run_worker(__file__, spec, dict(os.environ))
    memory = run_worker(__file__, dict(spec, repeats=0), dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    timing = run_worker(__file__, spec, {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"})
    return {"peak_bytes": memory["peak_bytes"], "seconds": timing["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    threads = torch.get_num_threads()
    print(f"PTM temporal attention: {args.frames} frames, batch {args.batch}, {HEADS} heads, {args.device}"
          f"{f' ({threads} threads)' if args.device == 'cpu' else ''}; median of {args.repeats} runs; "
          f"peak = memory above the inputs")
    print(f"target: fused/materialised time <= {TIME_TARGET:.2f} and peak memory <= {MEMORY_TARGET:.2f}")
    header = f"{'latent':<7} {'C':>4} {'scope':<10} {'impl':<13} {'ms':>9} {'peak MiB':>9}"
    print(header)
    print("-" * (len(header) + 34))
    for size, channels in CASES:
        for scope in SCOPES:
            results = {}
            for impl in IMPLS[scope]:
                spec = dict(size=size, channels=channels, frames=args.frames, batch=args.batch, scope=scope,
                            impl=impl, device=args.device, repeats=args.repeats)
                results[impl] = run_case(spec)
                print(f"{size}x{size:<4} {channels:>4} {scope:<10} {impl:<13} {results[impl]['seconds'] * 1e3:>9.1f} "
                      f"{results[impl]['peak_bytes'] / 2**20:>9.1f}", flush=True)
            time_ratio = results["fused"]["seconds"] / results["materialised"]["seconds"]
            memory_ratio = results["fused"]["peak_bytes"] / max(results["materialised"]["peak_bytes"], 1)
            met = time_ratio <= TIME_TARGET and memory_ratio <= MEMORY_TARGET
            print(f"{'':<7} {'':>4} {scope:<10} {'fused/mat.':<13} {time_ratio:>9.2f} {memory_ratio:>9.2f}   "
                  f"target {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
