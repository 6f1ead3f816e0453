"""The fused, chunked linear + cross-entropy (models/lm_head.py) equals the unfused formula: loss and gradients."""
import pytest
import torch

from models.gpt import GPT, ModelConfig
from models.lm_head import LMHead, chunk_rows, linear_cross_entropy_sum, reference_cross_entropy_sum


def _data(n=37, c=12, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    w = torch.randn(v, c, generator=g) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[3:9] = -100  # ignored tokens, inside the first chunk and across a chunk boundary below
    return x, w, t


def _grads(fn, x, w, t, scale=1.0):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w, t)
    (loss * scale).backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("rows", [1, 5, 8, 37, 1000])
def test_loss_and_grads_equal_reference(rows):
    x, w, t = _data()
    ref = _grads(reference_cross_entropy_sum, x, w, t, scale=0.7)
    got = _grads(lambda a, b, c: linear_cross_entropy_sum(a, b, c, rows=rows), x, w, t, scale=0.7)
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, rtol=1e-5, atol=1e-6), (r - g).abs().max()
    assert got[1][3:9].abs().max() == 0  # ignored rows get no gradient


def test_only_the_needed_gradients_and_no_grad_path():
    x, w, t = _data()
    ref = reference_cross_entropy_sum(x, w, t)
    w_req = w.clone().requires_grad_()
    loss = linear_cross_entropy_sum(x, w_req, t, rows=4)  # x needs no grad
    loss.backward()
    assert torch.allclose(w_req.grad, _grads(reference_cross_entropy_sum, x, w, t)[2], atol=1e-6)
    with torch.no_grad():
        ev = linear_cross_entropy_sum(x, w_req, t, rows=4)
    assert not ev.requires_grad and torch.allclose(ev, ref, atol=1e-5)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    head = LMHead(12, 53)
    x = torch.randn(2, 5, 12, requires_grad=True)
    loss = head(x, torch.full((2, 5), -100))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0


def test_bf16_autocast_close_to_float32():
    x, w, t = _data(n=64, c=32, v=101)
    ref = _grads(reference_cross_entropy_sum, x, w, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda a, b, c: linear_cross_entropy_sum(a, b, c, rows=16), x, w, t)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for r, g in zip(ref, got):
        assert (r - g).abs().max() <= 0.03 * r.abs().max()


def test_chunk_rows_rule():
    assert chunk_rows(2048, torch.device("cpu")) == 256
    assert chunk_rows(50257, torch.device("cpu")) == 256  # floor keeps the weight-gradient GEMMs large
    assert chunk_rows(50257, torch.device("meta")) == (1 << 25) // 50257


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_gpt_training_gradients_equal_unfused(flavour, tie):
    cfg = ModelConfig(flavour=flavour, vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32,
                      tie_embeddings=tie)
    torch.manual_seed(0)
    fused, plain = GPT(cfg), GPT(cfg)
    plain.load_state_dict(fused.state_dict())
    idx, tgt = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    tgt[1, :5] = -100
    _, loss = fused(idx, tgt)
    loss.backward()
    logits, _ = plain(idx)
    keep = tgt != -100
    ref = torch.nn.functional.cross_entropy(logits[keep].float(), tgt[keep])
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name


def test_no_silent_second_derivative():
    x, w, t = _data()
    x.requires_grad_()
    loss = linear_cross_entropy_sum(x, w.clone().requires_grad_(), t, rows=8)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError):  # once_differentiable: double backward fails loudly, never returns zeros
        g.sum().backward()


def test_bad_targets_are_refused():
    x, w, t = _data()
    for bad, msg in ((t.clone().index_fill_(0, torch.tensor([2]), -1), "outside"),
                     (t.clone().index_fill_(0, torch.tensor([2]), 53), "outside"),
                     (t[:-1], "does not match")):
        with pytest.raises(ValueError, match=msg):
            linear_cross_entropy_sum(x, w, bad)


def test_bf16_weights_get_exactly_scaled_gradients():
    x, w, t = _data(n=64, c=32, v=101)
    grads = {}
    for scale in (1.0, 1.0 / 3000):  # 1/3000 is not exactly representable in bf16
        xb, wb = x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
        (linear_cross_entropy_sum(xb, wb, t, rows=16) * scale).backward()
        grads[scale] = xb.grad
    assert grads[1.0].dtype == torch.bfloat16
    # the incoming factor is applied in float32 and rounded once, not rounded to bf16 first
    assert torch.equal(grads[1.0 / 3000], (grads[1.0].float() * (1.0 / 3000)).bfloat16())


def test_bad_targets_refused_inside_torch_compile_without_graph_break():
    x, w, t = _data()
    f = torch.compile(lambda a, b, c: linear_cross_entropy_sum(a, b, c, rows=8), fullgraph=True)
    assert torch.allclose(f(x, w, t), reference_cross_entropy_sum(x, w, t), atol=1e-4)
    with pytest.raises(RuntimeError, match="outside"):
        f(x, w, t.clone().index_fill_(0, torch.tensor([2]), -1))
