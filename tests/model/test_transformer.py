"""The model: shapes, causality, init, GQA, tying, parameter counts, bf16, generate, learning, state dicts."""

import math

import pytest
import torch

from photon.config import ModelConfig
from photon.errors import UserError
from photon.model.transformer import (
    Transformer,
    count_params,
    describe,
    load_unique_state_dict,
    unique_state_dict,
)

TINY = dict(vocab_size=257, n_layer=2, d_model=32, n_head=4, max_seq_len=32)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, **kw})
    return Transformer(cfg), cfg


def batch(cfg, B=2, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)


def test_shapes_and_initial_loss_is_uniform():
    model, cfg = make()
    seq = batch(cfg, B=4, T=16)
    logits, loss = model(seq[:, :-1], seq[:, 1:])
    assert logits.shape == (4, 16, cfg.vocab_size)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    _, none = model(seq[:, :-1])
    assert none is None


def test_hf_parameter_names():
    model, _ = make(n_layer=1, tie_embeddings=False)
    names = set(model.state_dict())
    assert names == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        *(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
    }


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_causal(n_kv_head):
    model, cfg = make(n_kv_head=n_kv_head)
    x = batch(cfg)[:, :-1]
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % cfg.vocab_size
    a, _ = model(x)
    b, _ = model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_deterministic_init():
    a, _ = make(seed=3)
    b, _ = make(seed=3)
    c, _ = make(seed=4)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert torch.equal(a.model.norm.weight, torch.ones(32))


def test_gqa_shapes():
    model, cfg = make(n_kv_head=1)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (cfg.head_dim, cfg.d_model)
    logits, _ = model(batch(cfg)[:, :-1])
    assert logits.shape[-1] == cfg.vocab_size


def test_tied_and_untied():
    tied, _ = make(tie_embeddings=True)
    untied, _ = make(tie_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 257 * 32
    assert "lm_head.weight" in tied.state_dict()
    assert "lm_head.weight" not in unique_state_dict(tied)
    assert "lm_head.weight" in unique_state_dict(untied)


@pytest.mark.parametrize("kw", [
    {}, {"tie_embeddings": False}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_embeddings": False},
    {"ffn_hidden": 40, "n_layer": 3}, {"d_model": 48, "n_head": 3},
])
def test_count_params_matches_instance(kw):
    model, cfg = make(**kw)
    assert count_params(cfg) == model.num_params()
    assert model.num_params(exclude_embeddings=True) < model.num_params()


def test_describe_is_instant_for_7b():
    cfg = ModelConfig(vocab_size=50368, n_layer=32, d_model=4096, n_head=32, max_seq_len=2048)
    text = describe(cfg)
    assert text.startswith("32 layers, d_model 4096, 32 heads, vocab 50368: ")
    assert "B parameters" in text
    assert describe(ModelConfig(vocab_size=8192, n_layer=4, d_model=192, n_head=4)) == (
        "4 layers, d_model 192, 4 heads, vocab 8192: 3.34M parameters (1.57M in embeddings)")


def test_bf16_autocast_runs():
    model, cfg = make(n_kv_head=2)
    seq = batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(seq[:, :-1], seq[:, 1:])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad is not None


def test_generate_length_and_context_crop():
    model, cfg = make()
    idx = torch.zeros(2, 30, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    out = model.generate(idx, max_new_tokens=8, top_k=5, generator=g)  # runs past max_seq_len=32
    assert out.shape == (2, 38) and torch.equal(out[:, :30], idx)
    greedy = model.generate(idx[:, :4], 3, temperature=0)
    assert torch.equal(greedy, model.generate(idx[:, :4], 3, temperature=0))


def test_too_long_sequence_is_user_error():
    model, _ = make()
    with pytest.raises(UserError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_overfits_a_tiny_batch():
    model, cfg = make()
    seq = batch(cfg, B=2, T=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("tie", [True, False])
def test_unique_state_dict_round_trip(tie):
    a, _ = make(seed=0, tie_embeddings=tie)
    b, _ = make(seed=1, tie_embeddings=tie)
    load_unique_state_dict(b, unique_state_dict(a))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    if tie:
        assert b.lm_head.weight is b.model.embed_tokens.weight


@pytest.mark.parametrize("tie", [True, False])
def test_a_shared_state_dict_becomes_the_parameters_without_a_copy(tie):
    a, _ = make(seed=0, tie_embeddings=tie)
    b, _ = make(seed=1, tie_embeddings=tie)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):  # again: the tie survives, so the keys stay the same
        params = {k: v.detach().clone() for k, v in unique_state_dict(a).items()}
        load_unique_state_dict(b, params, share=True)
        got = unique_state_dict(b)
        assert got.keys() == params.keys() and all(got[k].data_ptr() == params[k].data_ptr() for k in params)
        assert (b.lm_head.weight is b.model.embed_tokens.weight) == tie
        with torch.no_grad():
            assert torch.equal(a(x)[0], b(x)[0])


def test_load_wrong_shape_or_keys_is_user_error():
    small, _ = make(d_model=32)
    wide, _ = make(d_model=64)
    with pytest.raises(UserError, match=r"different model shape: .* has shape \(257, 64\) but the model "
                                        r"expects \(257, 32\)"):
        load_unique_state_dict(small, unique_state_dict(wide))
    untied, _ = make(tie_embeddings=False)
    with pytest.raises(UserError, match="unexpected keys lm_head.weight.*tie_embeddings"):
        load_unique_state_dict(small, unique_state_dict(untied))
    sd = unique_state_dict(small)
    del sd["model.norm.weight"]
    with pytest.raises(UserError, match="missing keys model.norm.weight"):
        load_unique_state_dict(small, sd)
