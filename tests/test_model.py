import math

import pytest
import torch
import torch.nn.functional as F

from models import GPT, ModelConfig
from models.sizes import PRESETS, config_for_params, flops_per_token, non_embedding_params, preset
from trainer.errors import ConfigError

FLAVOURS = ["gpt2", "llama"]


def tiny(flavour="gpt2", **kw):
    base = dict(flavour=flavour, vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_shapes_and_layout(flavour):
    torch.manual_seed(0)
    m = GPT(tiny(flavour))
    idx = torch.randint(0, 97, (3, 11))
    logits, loss = m(idx)
    assert logits.shape == (3, 11, 97) and loss is None
    logits, loss = m(idx, idx)
    assert logits is None and loss.ndim == 0 and loss.dtype == torch.float32  # fused loss: no logits
    assert (m.wpe is not None) == (flavour == "gpt2")
    names = dict(m.named_modules())
    for i in range(2):
        assert f"blocks.{i}.attn" in names and f"blocks.{i}.mlp.act" in names and f"blocks.{i}.mlp.hidden" in names
    assert isinstance(m.blocks[0].mlp.act, torch.nn.GELU if flavour == "gpt2" else torch.nn.SiLU)
    assert m.lm_head.weight is m.wte.weight
    assert GPT(tiny(flavour, tie_embeddings=False)).lm_head.weight is not None
    with pytest.raises(ValueError):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_loss_ignores_minus_100(flavour):
    torch.manual_seed(0)
    m = GPT(tiny(flavour))
    idx = torch.randint(0, 97, (2, 10))
    tgt = torch.randint(0, 97, (2, 10))
    tgt[0, :4] = -100
    tgt[1, 7:] = -100
    _, loss = m(idx, tgt)
    logits, _ = m(idx)
    keep = tgt != -100
    ref = F.cross_entropy(logits[keep].float(), tgt[keep])
    assert torch.allclose(loss, ref, atol=1e-6)
    # changing logits-irrelevant targets at ignored positions changes nothing; all-ignored gives 0, not NaN
    _, loss_all_ignored = m(idx, torch.full_like(tgt, -100))
    assert loss_all_ignored.item() == 0.0


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_analytic(flavour, tie):
    for cfg in (tiny(flavour, tie_embeddings=tie), tiny(flavour, tie_embeddings=tie, mlp_hidden=40, n_layer=3)):
        m = GPT(cfg)
        assert m.num_params(non_embedding=True) == non_embedding_params(cfg)
        emb = cfg.vocab_size * cfg.n_embd * (1 if tie else 2) + (cfg.block_size * cfg.n_embd if flavour == "gpt2" else 0)
        assert m.num_params(non_embedding=False) == non_embedding_params(cfg) + emb


def test_default_mlp_hidden():
    assert tiny("gpt2").hidden_dim == 128
    assert tiny("llama", n_embd=128).hidden_dim == 352  # 8/3*128 = 341.3 -> 352
    assert tiny("llama", n_embd=64).hidden_dim == 192


def test_presets_counts():
    for name, cfg in PRESETS.items():
        cfg.validate()
    assert 0.04e6 < non_embedding_params(PRESETS["nano"]) < 0.06e6
    assert 0.15e6 < non_embedding_params(PRESETS["micro"]) < 0.25e6
    assert 0.8e6 < non_embedding_params(PRESETS["tiny"]) < 1.3e6
    assert 4e6 < non_embedding_params(PRESETS["small"]) < 6e6
    assert preset("nano", flavour="llama").flavour == "llama" and PRESETS["nano"].flavour == "gpt2"
    with pytest.raises(ConfigError):
        preset("nope")


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("target", [0.05e6, 0.2e6, 1e6, 3e6, 10e6])
def test_config_for_params(flavour, target):
    cfg = config_for_params(target, flavour=flavour, vocab_size=500, block_size=64)
    n = non_embedding_params(cfg)
    assert abs(n / target - 1) < 0.25, (n, target)
    if cfg.n_embd >= 64:
        assert cfg.head_dim == 64
    else:
        assert cfg.n_head == 1
    assert cfg.vocab_size == 500 and cfg.block_size == 64
    if target >= 1e6:
        assert 20 <= cfg.n_embd / cfg.n_layer <= 160


def test_flops_per_token_hand_computed():
    cfg = ModelConfig(flavour="gpt2", n_layer=2, n_head=1, n_embd=8, vocab_size=10, block_size=4)
    # per layer: 4*64 + 2*8*32 + 9*8 + 32 = 256 + 512 + 72 + 32 = 872; x2 + final LN 16 = 1760
    assert non_embedding_params(cfg) == 1760
    assert flops_per_token(cfg) == 6 * 1760 + 12 * 2 * 8 * 4
    assert flops_per_token(cfg, seq_len=10) == 10560 + 1920


@pytest.mark.parametrize("bad,field", [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(flavour="bert"), "flavour"),
    (dict(init="xavier"), "init"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(block_size=0), "block_size"),
    (dict(mlp_hidden=-5), "mlp_hidden"),
    (dict(dropout=1.5), "dropout"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(flavour="llama", n_embd=6, n_head=2), "n_head"),
])
def test_validate_errors(bad, field):
    with pytest.raises(ConfigError) as e:
        tiny(**bad).validate()
    msg = str(e.value)
    assert field in msg and "\n" not in msg
    with pytest.raises(ConfigError):
        GPT(tiny(**bad))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_return_attn_matches_sdpa(flavour):
    torch.manual_seed(0)
    m = GPT(tiny(flavour)).eval()
    idx = torch.randint(0, 97, (2, 9))
    logits, _ = m(idx)
    logits2, _, attn = m(idx, return_attn=True)
    assert torch.allclose(logits, logits2, atol=1e-5)
    assert len(attn) == 2 and attn[0].shape == (2, 2, 9, 9)
    assert torch.allclose(attn[0].sum(-1), torch.ones(2, 2, 9))
    assert torch.all(attn[1].triu(diagonal=1) == 0)


def _greedy_reference(m, idx, n):
    for _ in range(n):
        logits, _ = m(idx[:, -m.cfg.block_size:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kv_cache_generation_equals_full_recompute(flavour):
    torch.manual_seed(0)
    m = GPT(tiny(flavour, n_layer=3)).eval()
    prompt = torch.randint(0, 97, (2, 5))
    out = m.generate(prompt, 8, temperature=0)  # stays within block_size: pure KV-cache path
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, _greedy_reference(m, prompt, 8))
    out = m.generate(prompt, 20, temperature=0)  # runs past block_size=16: crop
    assert torch.equal(out, _greedy_reference(m, prompt, 20))


def test_kv_cache_step_logits_match():
    torch.manual_seed(0)
    for flavour in FLAVOURS:
        m = GPT(tiny(flavour)).eval()
        idx = torch.randint(0, 97, (1, 10))
        full, _ = m(idx)
        x, past, _ = m._trunk(idx[:, :6])
        x2, past, _ = m._trunk(idx[:, 6:8], past=past)  # multi-token chunk on top of a cache
        x3, past, _ = m._trunk(idx[:, 8:9], past=past)
        step = torch.cat([m.lm_head(x), m.lm_head(x2), m.lm_head(x3)], dim=1)
        assert torch.allclose(step, full[:, :9], atol=1e-5)


def test_generate_sampling_and_eos():
    torch.manual_seed(0)
    m = GPT(tiny("llama"))
    prompt = torch.randint(0, 97, (2, 3))
    g1 = m.generate(prompt, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    g2 = m.generate(prompt, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g1, g2) and m.training  # training mode restored
    # top_p tiny -> greedy
    assert torch.equal(m.generate(prompt, 4, top_p=1e-9), m.generate(prompt, 4, temperature=0))
    # eos: a model whose logits are all equal picks token 0 greedily; eos_id=0 stops after one step
    m2 = GPT(tiny("gpt2", tie_embeddings=False))
    with torch.no_grad():
        m2.lm_head.weight.zero_()
    out = m2.generate(prompt, 10, temperature=0, eos_id=0)
    assert out.shape == (2, 4) and torch.all(out[:, -1] == 0)
    # rows that hit eos keep emitting eos while others continue
    m3 = GPT(tiny("gpt2")).eval()
    free = m3.generate(prompt, 6, temperature=0)
    eos = int(free[0, 3])
    out = m3.generate(prompt, 6, temperature=0, eos_id=eos)
    assert torch.all(out[0, 3:] == eos)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_neuron_params_and_reinit(flavour):
    torch.manual_seed(0)
    cfg = tiny(flavour)
    m = GPT(cfg)
    mlp = m.blocks[1].mlp
    h, d = cfg.hidden_dim, cfg.n_embd
    np_ = mlp.neuron_params()
    assert len(np_["incoming"]) == 2 and len(np_["outgoing"]) == 1
    for p, dim in np_["incoming"]:
        assert p.shape[dim] == h
    for p, dim in np_["outgoing"]:
        assert p.shape == (d, h) and dim == 1
    if flavour == "gpt2":
        assert np_["incoming"][1][0].ndim == 1
        with torch.no_grad():
            mlp.c_fc.bias.fill_(0.5)
    before = [p.detach().clone() for p, _ in np_["incoming"]]
    out_before = [p.detach().clone() for p, _ in np_["outgoing"]]
    chosen = torch.tensor([1, 5, 17])
    mlp.reinit_incoming(chosen, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(h, dtype=torch.bool)
    mask[chosen] = True
    for (p, dim), b in zip(np_["incoming"], before):
        pm, bm = p.detach().movedim(dim, 0), b.movedim(dim, 0)
        assert torch.equal(pm[~mask], bm[~mask])  # other neurons untouched
        if p.ndim == 2:
            assert not torch.any(pm[mask] == bm[mask])  # chosen rows redrawn
            assert pm[mask].std().item() == pytest.approx(0.02, rel=0.5)
        else:
            assert torch.all(pm[mask] == 0)  # bias -> 0
    for (p, _), b in zip(np_["outgoing"], out_before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hooks_see_activations(flavour):
    torch.manual_seed(0)
    m = GPT(tiny(flavour))
    seen = {}
    hooks = [m.get_submodule(f"blocks.0.mlp.{n}".rstrip(".")).register_forward_hook(
        lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out))) for n in ("act", "hidden", "")]
    m(torch.randint(0, 97, (2, 7)))
    for hk in hooks:
        hk.remove()
    pre, post = seen["act"]
    assert pre.shape == (2, 7, 128 if flavour == "gpt2" else 96)
    if flavour == "gpt2":
        assert torch.allclose(post, F.gelu(pre, approximate="tanh"))
        assert torch.equal(seen["hidden"][1], post)
    else:
        assert torch.allclose(post, F.silu(pre))
        mlp_in = seen[""][0]
        assert torch.allclose(seen["hidden"][1], F.silu(pre) * m.blocks[0].mlp.up(mlp_in))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_selfnorm_init_keeps_mlp_variance(flavour):
    torch.manual_seed(0)
    cfg = tiny(flavour, n_embd=256, n_head=4, init="selfnorm")
    mlp = GPT(cfg).blocks[0].mlp
    x = torch.randn(4096, 256)
    with torch.no_grad():
        y = mlp(x)
    assert y.var().item() == pytest.approx(x.var().item(), rel=0.2)
    assert mlp.in_std == pytest.approx(1 / math.sqrt(256))
    # the default (scaled) init shrinks it a lot
    with torch.no_grad():
        y2 = GPT(tiny(flavour, n_embd=256, n_head=4)).blocks[0].mlp(x)
    assert y2.var().item() < 0.05


def test_init_scaled_vs_plain():
    torch.manual_seed(0)
    cfg = tiny("gpt2", n_layer=8, n_embd=64)
    scaled, plain = GPT(cfg), GPT(tiny("gpt2", n_layer=8, n_embd=64, init="plain"))
    assert scaled.blocks[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert plain.blocks[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert scaled.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_backward_dropout_runs():
    torch.manual_seed(0)
    for flavour in FLAVOURS:
        m = GPT(tiny(flavour, dropout=0.1))
        idx = torch.randint(0, 97, (2, 8))
        _, loss = m(idx, idx)
        loss.backward()
        assert all(p.grad is not None for p in m.parameters())
        _, loss, _ = m(idx, idx, return_attn=True)
        assert torch.isfinite(loss)
