"""Known-answer tests for trainer/instruments (pure library code; small stand-in models)."""

import multiprocessing as mp
import os
import warnings

import pytest
import torch
from torch import nn

from trainer.instruments import (
    STAT_NAMES,
    NeuronHooks,
    NeuronStatsAccumulator,
    act_derivative,
    attention_entropy,
    capture_features,
    cloned_units,
    effective_rank,
    flatten_summary,
    fused_stats,
    grad_norm,
    hessian_sharpness,
    mean_abs_param,
    reference_stats,
    srank,
    stable_rank,
    update_norm,
)
from trainer.instruments import triton_stats
from trainer.instruments.neuron_stats import IDX

# --------------------------------------------------------------------------- stand-in model


class GPT2MLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.c_fc = nn.Linear(d, h)
        self.act = nn.GELU(approximate="tanh")
        self.hidden = nn.Identity()
        self.c_proj = nn.Linear(h, d)

    def forward(self, x):
        return self.c_proj(self.hidden(self.act(self.c_fc(x))))

    def neuron_params(self):
        return dict(incoming=[(self.c_fc.weight, 0), (self.c_fc.bias, 0)], outgoing=[(self.c_proj.weight, 1)])


class LlamaMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.act = nn.SiLU()
        self.hidden = nn.Identity()
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(self.hidden(self.act(self.gate(x)) * self.up(x)))

    def neuron_params(self):
        return dict(incoming=[(self.gate.weight, 0), (self.up.weight, 0)], outgoing=[(self.down.weight, 1)])


class Block(nn.Module):
    def __init__(self, d, h, flavour):
        super().__init__()
        self.mlp = GPT2MLP(d, h) if flavour == "gpt2" else LlamaMLP(d, h)

    def forward(self, x):
        return x + self.mlp(x)


class TinyLM(nn.Module):
    def __init__(self, flavour="gpt2", vocab=17, d=8, h=12, n_layer=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, h, flavour) for _ in range(n_layer)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _hook_counts(model):
    return {n: len(m._forward_hooks) for n, m in model.named_modules() if n.endswith(("mlp.act", "mlp.hidden"))}


# --------------------------------------------------------------------------- rank metrics


def test_effective_rank_known_answers():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0, rel=1e-12)
    u, v = torch.randn(7, 1), torch.randn(1, 4)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    # diag(1, 1, 2): p = (1/4, 1/4, 1/2) -> H = 1.5 log 2 -> erank = 2^1.5
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 2.0]))) == pytest.approx(2 ** 1.5, rel=1e-10)


def test_srank_known_answers():
    assert srank(torch.eye(6)) == 6
    assert srank(torch.randn(9, 1) @ torch.randn(1, 5)) == 1
    d = torch.diag(torch.tensor([100.0, 1.0]))  # 100/101 = 0.990099 >= 0.99
    assert srank(d, delta=0.01) == 1
    assert srank(d, delta=0.001) == 2
    assert srank(torch.zeros(2, 2)) == 0


def test_stable_rank_known_answers():
    assert stable_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(10.0 / 9.0, rel=1e-12)
    assert stable_rank(torch.eye(4)) == pytest.approx(4.0, rel=1e-12)
    assert stable_rank(torch.randn(5, 1) @ torch.randn(1, 3)) == pytest.approx(1.0, rel=1e-9)
    assert stable_rank(torch.zeros(2, 3)) == 0.0


# --------------------------------------------------------------------------- norms


def test_mean_abs_param_skips_embeddings():
    m = TinyLM("gpt2", vocab=5, d=2, h=3, n_layer=1)
    m.head.weight = m.wte.weight  # tied head is part of the embedding
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.fill_(10.0 if n.startswith("wte") else (-2.0 if n.endswith("bias") else 2.0))
    assert mean_abs_param(m) == pytest.approx(2.0)
    n_emb = m.wte.weight.numel()
    n_rest = sum(p.numel() for p in m.parameters()) - n_emb
    assert mean_abs_param(m, non_embedding=False) == pytest.approx((10 * n_emb + 2 * n_rest) / (n_emb + n_rest))


def test_grad_norm_and_update_norm():
    a = nn.Parameter(torch.zeros(1))
    b = nn.Parameter(torch.zeros(2))
    c = nn.Parameter(torch.zeros(3))  # no grad: skipped
    a.grad = torch.tensor([3.0])
    b.grad = torch.tensor([0.0, 4.0])
    assert grad_norm([a, b, c]) == pytest.approx(5.0)
    assert grad_norm([torch.tensor([6.0]), torch.tensor([8.0])]) == pytest.approx(10.0)
    before = {"w": torch.zeros(2), "v": torch.ones(1)}
    after = {"w": torch.tensor([3.0, 0.0]), "v": torch.tensor([5.0])}
    assert update_norm(before, after) == pytest.approx(5.0)
    assert update_norm(list(before.values()), list(after.values())) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        update_norm([torch.zeros(1)], [])


# --------------------------------------------------------------------------- attention


def _causal_uniform(B, nh, T):
    a = torch.tril(torch.ones(T, T))
    a = a / a.sum(-1, keepdim=True)
    return a.expand(B, nh, T, T).clone()


def _one_hot_first(B, nh, T):
    a = torch.zeros(B, nh, T, T)
    a[..., 0] = 1.0  # every query attends only to key 0 (visible under the causal mask)
    return a


def test_attention_entropy_uniform_and_one_hot():
    r = attention_entropy(_causal_uniform(2, 3, 6))
    assert torch.allclose(r["entropy"], torch.ones(3, dtype=torch.float64))
    assert (r["lazy"], r["collapsed"], r["n_heads"]) == (3, 0, 3)
    r = attention_entropy(_one_hot_first(2, 3, 6))
    assert torch.allclose(r["entropy"], torch.zeros(3, dtype=torch.float64))
    assert (r["lazy"], r["collapsed"]) == (0, 3)
    mixed = torch.cat([_causal_uniform(1, 1, 5), _one_hot_first(1, 1, 5)], dim=1)
    r = attention_entropy(mixed)
    assert (r["lazy"], r["collapsed"]) == (1, 1)
    assert r["mean"] == pytest.approx(0.5)
    # list of layers -> (L, n_head)
    r = attention_entropy([mixed, _causal_uniform(1, 2, 5)])
    assert r["entropy"].shape == (2, 2) and (r["lazy"], r["collapsed"]) == (3, 1)
    # thresholds are arguments
    assert attention_entropy(_causal_uniform(1, 2, 4), lazy_threshold=1.5)["lazy"] == 0
    # non-causal uniform over all T keys is also 1
    full = torch.full((1, 2, 4, 4), 0.25)
    assert torch.allclose(attention_entropy(full, causal=False)["entropy"], torch.ones(2, dtype=torch.float64))


def test_attention_entropy_known_value():
    # T=3: query 1 sees 2 keys with (0.5, 0.5) -> 1; query 2 sees 3 keys (1, 0, 0) -> 0. Mean 0.5.
    a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [1.0, 0, 0]]).view(1, 1, 3, 3)
    assert float(attention_entropy(a)["entropy"][0]) == pytest.approx(0.5)


# --------------------------------------------------------------------------- clones


def test_cloned_units_known_count():
    torch.manual_seed(0)
    a, b = torch.randn(50), torch.randn(50)
    F = torch.stack([a, 2 * a, b, -a, torch.zeros(50), torch.zeros(50)], dim=1)
    r = cloned_units(F)
    assert r["cloned_pairs"] == 1 and r["cloned_units"] == 2
    assert r["cloned_pair_fraction"] == pytest.approx(1 / 15)
    # add a near copy of a: pairs (0,1) (0,6) (1,6)
    F2 = torch.cat([F, (a + 1e-3 * torch.randn(50))[:, None]], dim=1)
    r = cloned_units(F2, threshold=0.95, block=2)  # small block exercises the chunked path
    assert r["cloned_pairs"] == 3 and r["cloned_units"] == 3
    assert cloned_units(torch.eye(4))["cloned_pairs"] == 0


# --------------------------------------------------------------------------- sharpness


def test_hessian_sharpness_quadratic():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ q.T
    x = nn.Parameter(torch.randn(4, dtype=torch.float64))
    lam = hessian_sharpness(lambda: 0.5 * x @ A @ x, [x], iters=60)
    assert lam == pytest.approx(5.0, rel=1e-6)
    # across two parameter tensors: L = 1.5 a² + 3.5 b² -> Hessian diag(3, 7)
    a = nn.Parameter(torch.ones(1))
    b = nn.Parameter(torch.ones(1))
    lam = hessian_sharpness(lambda: 1.5 * (a**2).sum() + 3.5 * (b**2).sum(), [a, b], iters=60, tol=1e-9)
    assert lam == pytest.approx(7.0, rel=1e-4)


# --------------------------------------------------------------------------- neuron stats


@pytest.mark.parametrize("kind,fn", [("gelu_tanh", lambda x: nn.functional.gelu(x, approximate="tanh")),
                                     ("gelu", nn.functional.gelu), ("silu", nn.functional.silu)])
def test_act_derivative_matches_autograd(kind, fn):
    x = torch.linspace(-12, 12, 401, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    assert torch.allclose(act_derivative(x.detach(), kind), g, atol=1e-12)


def _dormant_case():
    T = 10
    h = torch.zeros(T, 4)
    h[0::2, 1] = 0.1  # mean|h| 0.05, active half the time
    h[:, 2] = 1.0
    h[:, 3] = -2.95
    return h


def test_dormant_dead_frequency_known_case():
    acc = NeuronStatsAccumulator(eps=1e-6)
    acc.update("l", _dormant_case())
    row = acc.summary(taus=(0.0, 0.01, 0.1))["layers"]["l"]
    # scores = mean|h| / mean_k mean|h_k| = (0, 0.05, 1, 2.95) / 1
    assert row["dormant@0"] == 1 and row["dormant@0.01"] == 1 and row["dormant@0.1"] == 2
    assert row["dormant_ratio@0.1"] == pytest.approx(0.5)
    assert row["dead"] == 1 and row["dead_ratio"] == pytest.approx(0.25)
    assert row["active_freq"] == pytest.approx((0 + 0.5 + 1 + 1) / 4)
    assert row["pos_freq"] == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert row["tokens"] == 10 and row["n_neurons"] == 4
    assert row["saturated"] is None  # no pre-activation recorded
    pn = acc.per_neuron()
    assert torch.allclose(pn["l/score"], torch.tensor([0.0, 0.05, 1.0, 2.95]))
    assert torch.allclose(pn["l/max_abs"], torch.tensor([0.0, 0.1, 1.0, 2.95]))
    assert torch.allclose(pn["l/mean"], torch.tensor([0.0, 0.05, 1.0, -2.95]))
    assert set(k.split("/")[1] for k in pn) == {"count", "mean_abs", "mean", "active_freq", "pos_freq",
                                               "max_abs", "sat_frac", "score"}
    flat = flatten_summary(acc.summary(), prefix="p/")
    assert flat["p/overall/dead"] == 1 and "p/l/saturated" not in flat


def test_dormant_tau0_is_exact_zero_and_all_silent_layer():
    h = torch.zeros(6, 3)
    h[:, 1] = 1e-9  # tiny but not exactly zero: not dormant@0, but dead (|h| <= eps)
    h[:, 2] = 1.0
    acc = NeuronStatsAccumulator(eps=1e-6)
    acc.update("l", h)
    row = acc.summary()["layers"]["l"]
    assert row["dormant@0"] == 1 and row["dead"] == 2 and row["dormant@0.01"] == 2
    acc2 = NeuronStatsAccumulator()
    acc2.update("z", torch.zeros(4, 5))
    row = acc2.summary()["layers"]["z"]
    assert row["dormant@0"] == 5 and row["dormant@0.1"] == 5 and row["dead"] == 5


@pytest.mark.parametrize("kind,phi", [("gelu_tanh", lambda x: nn.functional.gelu(x, approximate="tanh")),
                                      ("silu", nn.functional.silu)])
def test_saturation_known_case(kind, phi):
    x = torch.zeros(8, 3)
    x[:, 0] = -10.0  # deep in the flat negative tail: saturated every token
    x[:4, 1] = -10.0  # half the time
    x[:, 2] = 10.0  # large positive: φ' ≈ 1, not saturated
    acc = NeuronStatsAccumulator(delta=0.01)
    acc.update("l", phi(x), x, kind)
    s = acc.summary()
    assert s["layers"]["l"]["saturated"] == 1 and s["overall"]["saturated"] == 1
    assert s["overall"]["saturated_ratio"] == pytest.approx(1 / 3)
    assert acc.summary(sat_threshold=0.4)["layers"]["l"]["saturated"] == 2
    assert torch.allclose(acc.per_neuron()["l/sat_frac"], torch.tensor([1.0, 0.5, 0.0]))


def _random_case(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 5
    h = nn.functional.gelu(x, approximate="tanh")
    if h.numel():
        h.view(-1, shape[-1])[:, 0] = 0.0  # a dead neuron
        h.view(-1, shape[-1])[::3, -1] = 1e-6  # exactly at eps (not > eps)
    return h.to(dtype), x.to(dtype)


CASES = [((4, 16, 24), torch.float32), ((3, 5, 7), torch.float64), ((2, 9, 10), torch.bfloat16),
         ((1, 1, 1), torch.float32), ((0, 6), torch.float32), ((257, 3), torch.float32), ((5, 1), torch.float32)]


@pytest.mark.parametrize("kind", ["gelu_tanh", "silu", "gelu", None])
@pytest.mark.parametrize("shape,dtype", CASES)
def test_fused_equals_reference(shape, dtype, kind):
    h, x = _random_case(shape, dtype, seed=len(shape) * 100 + shape[-1])
    ref = reference_stats(h, x, kind, eps=1e-6, delta=0.01)
    for chunk in (1 << 22, 13):  # one chunk and many chunks
        fus = fused_stats(h, x, kind, eps=1e-6, delta=0.01, chunk_elems=chunk)
        assert fus.shape == (len(STAT_NAMES), shape[-1]) and fus.dtype == torch.float32
        assert torch.allclose(fus, ref, rtol=1e-5, atol=1e-3), (fus - ref).abs().max()
    # no pre-activation -> zero saturation row, everything else unchanged
    fus = fused_stats(h, None, kind)
    assert torch.all(fus[IDX["saturated"]] == 0)
    assert torch.allclose(fus[: IDX["saturated"]], ref[: IDX["saturated"]], rtol=1e-5, atol=1e-3)


def test_fused_non_contiguous_and_validation():
    h, x = _random_case((6, 8), torch.float32, 1)
    ht, xt = h.t().contiguous().t(), x.t().contiguous().t()  # same values, transposed strides
    assert torch.allclose(fused_stats(ht, xt, "silu"), reference_stats(h, x, "silu"))
    with pytest.raises(ValueError):
        fused_stats(h, x[:, :3], "silu")
    with pytest.raises(ValueError):
        fused_stats(h, x, "relu6")


def test_accumulate_two_batches_equals_concatenation_and_merge():
    h1, x1 = _random_case((2, 5, 9), torch.float32, 3)
    h2, x2 = _random_case((3, 5, 9), torch.float32, 4)
    a = NeuronStatsAccumulator()
    a.update("l", h1, x1, "gelu_tanh")
    a.update("l", h2, x2, "gelu_tanh")
    b = NeuronStatsAccumulator()
    b.update("l", torch.cat([h1, h2]), torch.cat([x1, x2]), "gelu_tanh")
    assert torch.allclose(a.stats["l"], b.stats["l"], rtol=1e-6, atol=1e-4)
    c1, c2 = NeuronStatsAccumulator(), NeuronStatsAccumulator()
    c1.update("l", h1, x1, "gelu_tanh")
    c2.update("l", h2, x2, "gelu_tanh")
    c1.merge(c2)
    assert torch.allclose(c1.stats["l"], b.stats["l"], rtol=1e-6, atol=1e-4)
    assert c1.summary()["overall"] == pytest.approx(b.summary()["overall"], rel=1e-6)
    c1.all_reduce()  # not distributed: no-op
    assert torch.allclose(c1.stats["l"], b.stats["l"], rtol=1e-6, atol=1e-4)


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    h, x = _random_case((2, 4, 6), torch.float32, 10 + rank)
    acc = NeuronStatsAccumulator()
    acc.update("a", h, x, "silu")
    acc.update("b", h[..., :3] * (rank + 1))
    acc.all_reduce()
    torch.save(acc.stats, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_all_reduce_two_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, str(tmp_path / "init"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    ref = NeuronStatsAccumulator()
    for r in range(2):
        h, x = _random_case((2, 4, 6), torch.float32, 10 + r)
        ref.update("a", h, x, "silu")
        ref.update("b", h[..., :3] * (r + 1))
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt")
        for k in ("a", "b"):
            assert torch.allclose(got[k], ref.stats[k], rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- triton


@pytest.mark.parametrize("kind", ["gelu_tanh", "silu", "gelu", None])
def test_triton_matches_reference_interpreted(kind, monkeypatch):
    if not triton_stats.triton_importable():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_stats.available(torch.zeros(1))
    for shape, dtype in [((3, 7, 45), torch.float32), ((70, 5), torch.float32), ((0, 4), torch.float32)]:
        h, x = _random_case(shape, dtype, 7)
        ref = reference_stats(h, x, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy exp overflow inside sigmoid
            got = triton_stats.triton_stats(h, x, kind, block_n=16, block_h=32, split=2)
            via_dispatch = fused_stats(h, x, kind, use_triton=True)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-3), (got - ref).abs().max()
        assert torch.allclose(via_dispatch, ref, rtol=1e-5, atol=1e-3)


def test_triton_not_used_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_stats.available(torch.zeros(1))
    h, x = _random_case((4, 5), torch.float32, 0)
    assert torch.allclose(fused_stats(h, x, "silu"), reference_stats(h, x, "silu"))  # torch path
    with pytest.raises(RuntimeError):
        fused_stats(h, x, "silu", use_triton=True)


# --------------------------------------------------------------------------- hooks


def test_hooks_only_between_start_and_stop():
    torch.manual_seed(0)
    m = TinyLM("gpt2")
    hooks = NeuronHooks(m)
    assert all(v == 0 for v in _hook_counts(m).values())
    idx = torch.randint(0, 17, (2, 5))
    m(idx)
    assert len(hooks.accumulator) == 0
    hooks.start()
    assert all(v == 1 for v in _hook_counts(m).values())
    m(idx)
    hooks.stop()
    assert all(v == 0 for v in _hook_counts(m).values())
    m(idx)  # not recorded
    assert hooks.accumulator.stats["blocks.0.mlp.hidden"][IDX["count"], 0] == 10
    with NeuronHooks(m, accumulator=hooks.accumulator):
        assert all(v == 1 for v in _hook_counts(m).values())
    assert all(v == 0 for v in _hook_counts(m).values())


def _manual_capture(model, idx):
    """Record (act input, act output, hidden input) with the test's own hooks."""
    rec, hs = {}, []
    for i, b in enumerate(model.blocks):
        hs.append(b.mlp.act.register_forward_hook(lambda m, inp, out, i=i: rec.update({(i, "x"): inp[0], (i, "a"): out})))
        hs.append(b.mlp.hidden.register_forward_hook(lambda m, inp, out, i=i: rec.update({(i, "h"): inp[0]})))
    model(idx)
    for h in hs:
        h.remove()
    return rec


def test_hooks_gpt2_entries_match_reference_eval_no_grad():
    torch.manual_seed(1)
    m = TinyLM("gpt2").eval()
    idx = torch.randint(0, 17, (3, 6))
    with torch.no_grad():
        rec = _manual_capture(m, idx)
        with NeuronHooks(m) as hooks:
            m(idx)
    acc = hooks.accumulator
    assert sorted(acc.stats) == ["blocks.0.mlp.hidden", "blocks.1.mlp.hidden"]
    for i in range(2):
        ref = reference_stats(rec[(i, "h")], rec[(i, "x")], "gelu_tanh")
        assert torch.allclose(acc.stats[f"blocks.{i}.mlp.hidden"].float(), ref, rtol=1e-5, atol=1e-5)
    s = acc.summary()
    assert s["overall"]["n_neurons"] == 24 and s["overall"]["saturated"] is not None


def test_hooks_llama_records_hidden_and_gate():
    torch.manual_seed(2)
    m = TinyLM("llama")
    idx = torch.randint(0, 17, (2, 4))
    rec = _manual_capture(m, idx)
    with NeuronHooks(m) as hooks:
        m(idx).sum().backward()  # train mode with grad works too
    acc = hooks.accumulator
    assert sorted(acc.stats) == ["blocks.0.mlp.act", "blocks.0.mlp.hidden", "blocks.1.mlp.act", "blocks.1.mlp.hidden"]
    for i in range(2):
        ref_h = reference_stats(rec[(i, "h")], None, None)
        ref_a = reference_stats(rec[(i, "a")], rec[(i, "x")], "silu")
        assert torch.allclose(acc.stats[f"blocks.{i}.mlp.hidden"].float(), ref_h, rtol=1e-5, atol=1e-5)
        assert torch.allclose(acc.stats[f"blocks.{i}.mlp.act"].float(), ref_a, rtol=1e-5, atol=1e-5)
    s = acc.summary()
    assert s["overall"]["n_neurons"] == 24  # hidden entries only
    assert s["layers"]["blocks.0.mlp.hidden"]["saturated"] is None
    assert s["layers"]["blocks.0.mlp.act"]["saturated"] is not None
    assert s["overall"]["saturated"] is not None


def test_hooks_two_batches_equal_one_concatenated():
    torch.manual_seed(3)
    m = TinyLM("gpt2").eval()
    i1, i2 = torch.randint(0, 17, (2, 5)), torch.randint(0, 17, (3, 5))
    with torch.no_grad():
        with NeuronHooks(m) as a:
            m(i1)
            m(i2)
        with NeuronHooks(m) as b:
            m(torch.cat([i1, i2]))
    for k in b.accumulator.stats:
        assert torch.allclose(a.accumulator.stats[k], b.accumulator.stats[k], rtol=1e-5, atol=1e-5)


def test_hooks_require_mlp_modules():
    with pytest.raises(ValueError):
        NeuronHooks(nn.Linear(2, 2))


def test_capture_features_shapes_and_mode():
    torch.manual_seed(4)
    for flavour in ("gpt2", "llama"):
        m = TinyLM(flavour, h=12).train()
        batches = [(torch.randint(0, 17, (2, 8)), None) for _ in range(3)]  # 48 tokens
        F = capture_features(m, batches, max_rows=5)
        assert m.training  # mode restored
        assert sorted(F) == ["blocks.0.mlp.hidden", "blocks.1.mlp.hidden"]
        assert F["blocks.0.mlp.hidden"].shape == (12, 12)  # raised to H rows
        F = capture_features(m, batches, max_rows=100)
        assert F["blocks.1.mlp.hidden"].shape == (48, 12)  # all tokens
        assert _hook_counts(m) == {k: 0 for k in _hook_counts(m)}
    # rows are real activations: with all tokens, features equal the hidden inputs
    m = TinyLM("gpt2").eval()
    idx = torch.randint(0, 17, (1, 4))
    rec = _manual_capture(m, idx)
    F = capture_features(m, [idx], max_rows=4, min_rows_per_neuron=False)["blocks.0.mlp.hidden"]
    ref = rec[(0, "h")].reshape(-1, 12)
    assert sorted(map(tuple, F.tolist())) == sorted(map(tuple, ref.tolist()))


def test_model_metrics_are_measured_without_dropout():
    """A boundary copy of the model starts in train mode; with dropout on, the sharpness and the attention
    entropy would change from one measurement of the same weights to the next."""
    from models.gpt import GPT, ModelConfig
    from trainer.instruments.callback import Instruments

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.3)).train()
    rows = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(1))
    inst = Instruments(feature_rows=32, sharpness_iters=3)
    first, second = inst._model_metrics(model, rows), inst._model_metrics(model, rows)
    assert not model.training
    for key in ("sharpness", "attention/entropy", "overall/effective_rank"):
        assert first[key] == second[key], key
