"""GPU benchmark (needs CUDA): 124M GPT-2 training throughput and MFU, and the Triton neuron-stats kernel.

* Model: models.sizes.PRESETS["gpt2-124m"] (12 layers, d 768, vocab 50257, block 1024), fused AdamW,
  bf16 autocast, torch.compile (unless --no-compile), flash attention forced through
  torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION).
* tok/s = batch * block / median step time (CUDA-synchronised, after warm-up); MFU =
  models.sizes.flops_per_token(cfg) * tok/s / trainer.logger.peak_flops(device name)
  (PaLM convention: 6N + attention, lm_head not counted; the MFU with the lm_head's 6*V*d added is
  reported alongside).
* Neuron stats: fused_stats(..., use_triton=True) (the Triton kernel) vs reference_stats (torch, float64)
  on (8, 1024, 3072) GeLU activations and (8, 1024, 2048) SiLU activations: median time and equality.

    python -m bench.gpu [--batch 16] [--steps 20] [--no-compile] [--json OUT]

Without CUDA it prints a one-line message and exits with status 2. The measuring functions take a device and
a model config, so that tests/test_bench.py runs them on CPU with a tiny model (logic only, no GPU numbers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, repeats: int, device="cuda") -> float:
    ts = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _device_name(dev) -> str:
    import torch

    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} (smoke test)"


def train_throughput(batch: int, steps: int, compile_: bool, device: str = "cuda", cfg=None) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.gpt import GPT
    from models.sizes import PRESETS, flops_per_token
    from trainer.logger import peak_flops
    from trainer.optim import param_groups

    dev = torch.device(device)
    name = _device_name(dev)
    cfg = cfg or PRESETS["gpt2-124m"]
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    groups = param_groups(model, 0.1, ["norm", "bias", "embedding"])
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=dev)

    losses = []

    def step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast(dev.type, dtype=torch.bfloat16):
            _, loss = fwd(x, y)
        loss.backward()
        losses.append(loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)

    first = _time(step, 1, dev)
    for _ in range(3):
        step()
    dt = _time(step, steps, dev)
    tok_s = batch * cfg.block_size / dt
    peak = peak_flops(name)
    fpt = flops_per_token(cfg)
    fpt_head = fpt + 6.0 * cfg.vocab_size * cfg.n_embd
    return {"device": name, "batch": batch, "block": cfg.block_size, "compiled": compile_,
            "first_step_s": first, "step_ms": 1e3 * dt, "tok_s": tok_s, "peak_flops": peak,
            "mfu": fpt * tok_s / peak if peak else None, "mfu_with_lm_head": fpt_head * tok_s / peak if peak else None,
            "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
            "first_loss": float(losses[0]), "last_loss": float(losses[-1])}


SHAPES = (((8, 1024, 3072), "gelu_tanh"), ((8, 1024, 2048), "silu"))


def neuron_stats_kernel(repeats: int = 20, device: str = "cuda", shapes=SHAPES) -> list:
    import torch
    import torch.nn.functional as F

    from trainer.instruments import triton_stats
    from trainer.instruments.neuron_stats import fused_stats, reference_stats

    out = []
    for shape, kind in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=device, generator=g).to(dtype)
            h = F.gelu(x, approximate="tanh") if kind == "gelu_tanh" else F.silu(x)
            if not triton_stats.available(h):
                out.append({"shape": list(shape), "act": kind, "dtype": str(dtype), "error": "Triton not available"})
                continue
            tri = fused_stats(h, x, kind, use_triton=True)
            ref = reference_stats(h, x, kind)
            torch_fused = fused_stats(h, x, kind, use_triton=False)
            eq = bool(torch.allclose(tri, ref, rtol=1e-4, atol=1e-2))
            out.append({"shape": list(shape), "act": kind, "dtype": str(dtype),
                        "triton_ms": 1e3 * _time(lambda: fused_stats(h, x, kind, use_triton=True), repeats, device),
                        "torch_fused_ms": 1e3 * _time(lambda: fused_stats(h, x, kind, use_triton=False), repeats,
                                                      device),
                        "reference_ms": 1e3 * _time(lambda: reference_stats(h, x, kind), repeats, device),
                        "equal_to_reference": eq, "max_abs_diff": float((tri - ref).abs().max()),
                        "torch_fused_equal": bool(torch.allclose(torch_fused, ref, rtol=1e-4, atol=1e-2))})
    return out


def run(batch: int = 16, steps: int = 20, compile_: bool = True) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(2)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    res = {"torch": torch.__version__, "train": [], "neuron_stats": neuron_stats_kernel()}
    res["train"].append(train_throughput(batch, steps, compile_))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device available (torch %s, cuda build: %s) - GPU benchmark not run."
              % (torch.__version__, torch.version.cuda), file=sys.stderr)
        return 2
    res = run(a.batch, a.steps, not a.no_compile)
    for t in res["train"]:
        mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] else "n/a (unknown peak)"
        print(f"{t['device']}: gpt2-124m batch {t['batch']}x{t['block']} compiled={t['compiled']}: "
              f"{t['tok_s']:,.0f} tok/s, step {t['step_ms']:.1f} ms, MFU {mfu}, first step {t['first_step_s']:.1f}s, "
              f"max mem {t['max_mem_gib']:.1f} GiB")
    for n in res["neuron_stats"]:
        print("neuron stats", json.dumps(n))
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
