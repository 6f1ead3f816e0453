"""The CPU benchmark code runs and measures what it says (tiny settings; the numbers live in bench/RESULTS.md)."""
import math

import pytest
import torch

from bench import throughput as T


def test_throughput_measure_compares_identical_models():
    res = T.measure("llama", "0.1M", batch=2, steps=1, rounds=1, warmup=0, log=lambda m: None)
    losses = res["first_loss"]
    # ours, HF and minimal start from the same weights: the same first loss (ours uses the fused loss path)
    assert max(losses.values()) - min(losses.values()) < 1e-4, losses
    assert all(v > 0 for v in res["tok_s"].values())
    assert math.isclose(res["ours_over_hf"], res["tok_s"]["ours"] / res["tok_s"]["hf"])


def test_loss_path_check_and_profile_share():
    rows = T.loss_path_check(sizes=("0.1M",), batch=2, steps=1, rounds=1, log=lambda m: None)
    assert [r["flavour"] for r in rows] == ["gpt2", "llama"]
    assert all(r["first_loss_abs_diff"] < 1e-4 and r["fused"] > 0 and r["unfused"] > 0 for r in rows)
    prof = T.profile("gpt2", "0.1M", batch=2, steps=1)
    assert set(prof["tables"]) == {"ours", "hf", "minimal"}
    assert all(0.05 < s < 1.0 for s in prof["gemm_attention_share"].values()), prof["gemm_attention_share"]
    assert "aten::mm" in prof["tables"]["ours"]


def test_unfused_loss_fn_matches_model_loss():
    cfg, models = T.build("gpt2", 1e5)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    with torch.no_grad():
        a = T.loss_fn("ours", models["ours"])(x, x)
        b = T.loss_fn("unfused", models["ours"])(x, x)
        c = T.loss_fn("hf", models["hf"])(x, x)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(b, c, atol=1e-5)


def test_neuron_stats_agreement_report():
    from bench.instrument_overhead import agreement
    from trainer.instruments.neuron_stats import IDX, fused_stats, reference_stats

    x = torch.randn(4, 64, 48, generator=torch.Generator().manual_seed(0))
    h = torch.nn.functional.silu(x)
    fused, ref = fused_stats(h, x, "silu"), reference_stats(h, x, "silu")
    assert agreement(fused, ref).endswith("counts differ for 0 of 12,288 elements")
    fused[IDX["saturated"], :3] += 1  # three neurons count one more saturated element
    assert agreement(fused, ref).endswith("counts differ for 3 of 12,288 elements")


def test_gpu_bench_logic_runs_on_cpu():
    """bench/gpu.py has never had a GPU here; its measuring code is run on CPU with a tiny model so that a
    GPU session does not spend device time on a crash."""
    from bench import gpu
    from models.sizes import preset

    t = gpu.train_throughput(batch=2, steps=2, compile_=False, device="cpu", cfg=preset("nano", block_size=32))
    assert t["tok_s"] > 0 and t["mfu"] is None  # no peak FLOPs for a CPU
    assert math.isfinite(t["first_loss"]) and t["last_loss"] < t["first_loss"]  # 6 steps on one batch


def test_gpu_bench_triton_comparison_runs_interpreted(monkeypatch):
    """The Triton-vs-torch rows of bench/gpu.py, with the kernel interpreted on CPU (skipped without triton)."""
    from bench import gpu
    from trainer.instruments import triton_stats

    if not triton_stats.triton_importable():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = gpu.neuron_stats_kernel(repeats=1, device="cpu", shapes=(((2, 16, 64), "silu"),))
    assert [r["dtype"] for r in rows] == ["torch.float32", "torch.bfloat16"]
    for r in rows:
        assert "error" not in r and r["equal_to_reference"] and r["torch_fused_equal"], r
        assert r["triton_ms"] > 0 and r["reference_ms"] > 0


def test_gpu_bench_reports_a_missing_triton(monkeypatch):
    from bench import gpu

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors without the interpreter: no kernel
    rows = gpu.neuron_stats_kernel(repeats=1, device="cpu", shapes=(((2, 16, 64), "silu"),))
    assert [r.get("error") for r in rows] == ["Triton not available"] * 2


def test_loss_memory_fused_holds_no_logits():
    mem = T.loss_memory(vocab=16000, tokens=4096, d=64)  # one float32 logits tensor = 250 MiB
    assert mem["unfused_mib"] > 2 * mem["logits_mib"]  # logits, log-probs and their gradient
    assert mem["fused_mib"] < 0.5 * mem["logits_mib"]
