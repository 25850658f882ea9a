"""The local trainer: seeded determinism, the global schedule, clipping, AdamW groups and state round trip."""

import pytest
import torch

from photon.data.shards import TokenStream
from photon.model.transformer import Transformer
from photon.train.local import (
    load_optimizer_state_tensors,
    make_optimizer,
    optimizer_state_tensors,
    train_local,
)
from photon.train.schedule import get_lr
from tests.helpers import assert_close_by_norm, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: steady timing on a shared 2-core box


def _setup(prepared, *overrides):
    cfg = tiny_cfg(prepared.path, *overrides)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    stream = TokenStream([prepared.tokens(d, "train") for d in prepared.domains], cfg.train.seq_len,
                         cfg.train.batch_size, cfg.train.seed)
    return cfg, model, make_optimizer(model, cfg.train), stream


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seeded_runs_are_bitwise_equal(tiny_prepared):
    runs = []
    for _ in range(2):
        cfg, model, opt, stream = _setup(tiny_prepared)
        result = train_local(model, opt, stream, 0, 0, 6, cfg.train, cfg.train.steps)
        runs.append((_params(model), result.losses, result.cursor))
    assert _equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]


def test_result_counts_steps_samples_tokens_and_cursor(tiny_prepared):
    cfg, model, opt, stream = _setup(tiny_prepared)
    r = train_local(model, opt, stream, 40, 0, 3, cfg.train, cfg.train.steps)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    assert (r.steps, r.samples, r.tokens, r.cursor) == (3, 3 * B, 3 * B * T, 40 + 3 * B)
    assert len(r.losses) == 3 and r.loss == pytest.approx(sum(r.losses) / 3) and r.seconds > 0


def test_lr_follows_the_global_schedule_from_global_step(tiny_prepared):
    cfg, model, opt, stream = _setup(tiny_prepared, "train.warmup_steps=4", "train.steps=20")
    seen = []

    def on_step(step, loss, lr):
        seen.append((step, lr, [g["lr"] for g in opt.param_groups]))

    t = cfg.train
    train_local(model, opt, stream, 0, 2, 5, t, 12, on_step)  # schedule of 12 steps, not train.steps
    assert [s for s, _, _ in seen] == [2, 3, 4, 5, 6]
    for step, lr, group_lrs in seen:
        assert lr == get_lr(step, t.lr, t.warmup_steps, 12, t.min_lr_ratio)
        assert group_lrs == [lr, lr]  # both AdamW groups use it


def test_loss_falls_on_tiny_data(tiny_prepared):
    cfg, model, opt, stream = _setup(tiny_prepared, "train.warmup_steps=5", "train.steps=40")
    r = train_local(model, opt, stream, 0, 0, 40, cfg.train, cfg.train.steps)
    first, last = sum(r.losses[:3]) / 3, sum(r.losses[-5:]) / 5
    assert first > 6.5, r.losses  # ~ln(1024) at init
    assert last < first - 0.7, r.losses


def test_gradient_clipping_changes_the_update(tiny_prepared):
    out = {}
    for clip in ("0", "1e-4"):
        cfg, model, opt, stream = _setup(tiny_prepared, f"train.grad_clip={clip}")
        train_local(model, opt, stream, 0, 30, 3, cfg.train, cfg.train.steps)
        out[clip] = _params(model)
    assert not _equal(out["0"], out["1e-4"])
    # And the clipped gradient has the requested norm: check it on one step by hand.
    cfg, model, opt, stream = _setup(tiny_prepared, "train.grad_clip=1e-4")
    x, y, _ = stream.next_batch(0)
    model(x, y)[1].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(1e-4, rel=1e-3)


def test_optimizer_state_round_trip_continues_bitwise(tiny_prepared):
    cfg, model, opt, stream = _setup(tiny_prepared)
    t = cfg.train
    assert optimizer_state_tensors(model, opt) == {}  # nothing before the first step
    r = train_local(model, opt, stream, 0, 0, 4, t, t.steps)
    # The export is a live view of AdamW's tensors (it is serialized at once in practice): copy it here.
    saved_params = _params(model)
    saved_opt = {k: v.clone() for k, v in optimizer_state_tensors(model, opt).items()}
    names = {n for n, _ in model.named_parameters()}
    assert {k.rsplit(".", 1)[0] for k in saved_opt} == names
    assert {k.rsplit(".", 1)[1] for k in saved_opt} == {"step", "exp_avg", "exp_avg_sq"}

    train_local(model, opt, stream, r.cursor, 4, 4, t, t.steps)  # uninterrupted
    straight = _params(model)

    _, model2, opt2, _ = _setup(tiny_prepared)  # fresh model and optimizer, then restore
    model2.load_state_dict(saved_params)
    load_optimizer_state_tensors(model2, opt2, saved_opt)
    train_local(model2, opt2, stream, r.cursor, 4, 4, t, t.steps)
    assert _equal(straight, _params(model2))


def test_fresh_optimizer_differs_from_restored(tiny_prepared):
    # The round trip above is not vacuous: resetting AdamW state (Photon's stateless clients) changes the result.
    cfg, model, opt, stream = _setup(tiny_prepared)
    t = cfg.train
    r = train_local(model, opt, stream, 0, 0, 4, t, t.steps)
    saved = _params(model)
    train_local(model, opt, stream, r.cursor, 4, 2, t, t.steps)
    _, model2, opt2, _ = _setup(tiny_prepared)
    model2.load_state_dict(saved)
    train_local(model2, opt2, stream, r.cursor, 4, 2, t, t.steps)
    assert not _equal(_params(model), _params(model2))


def test_weight_decay_only_on_matrices(tiny_prepared):
    cfg, model, opt, _ = _setup(tiny_prepared, "train.weight_decay=0.1")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() < 2 for p in no_decay["params"])
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in by_id[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once
    assert opt.defaults["betas"] == (cfg.train.beta1, cfg.train.beta2) and opt.defaults["eps"] == cfg.train.eps


def test_weight_decay_matches_torch_adamw_reference(tiny_prepared):
    # One step against a plain torch.optim.AdamW with decay on exactly the ≥2-D parameters.
    cfg, model, opt, stream = _setup(tiny_prepared, "train.weight_decay=0.1", "train.grad_clip=0")
    ref = Transformer(cfg.model)
    ref.load_state_dict(model.state_dict())
    t = cfg.train
    lr = get_lr(0, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False)
    x, y, _ = stream.next_batch(0)
    ref(x, y)[1].backward()
    ref_opt.step()
    train_local(model, opt, stream, 0, 0, 1, t, t.steps)
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_bf16_autocast_path_runs(tiny_prepared):
    cfg, model, opt, stream = _setup(tiny_prepared, "train.bf16=true")
    before = _params(model)
    r = train_local(model, opt, stream, 0, 0, 2, cfg.train, cfg.train.steps)
    assert all(torch.isfinite(torch.tensor(r.losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert not _equal(before, _params(model))


def test_compile_really_compiles_and_trains_like_eager(tiny_prepared):
    """train.compile wraps the model in torch.compile (Inductor, CPU here); the compiled model trains to the same
    parameters as eager within fp32 rounding, and state dicts read through the wrapper."""
    from photon.model.transformer import unique_state_dict
    from photon.train.device import place

    out = {}
    for compiled in (False, True):
        cfg, model, _, stream = _setup(tiny_prepared, f"train.compile={str(compiled).lower()}")
        trainable = place(model, cfg.train, torch.device("cpu"))
        assert (type(trainable).__name__ == "OptimizedModule") == compiled
        opt = make_optimizer(model, cfg.train)
        out[compiled] = (train_local(trainable, opt, stream, 0, 0, 3, cfg.train, 100).losses,
                         unique_state_dict(trainable))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    for k, v in out[False][1].items():
        assert_close_by_norm(out[True][1][k], v, rel=1e-4, what=k)  # Inductor's kernels sum in another order


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_add_up_to_one_full_batch(tiny_prepared, micro):
    cfg, model, opt, stream = _setup(tiny_prepared)
    full = train_local(model, opt, stream, 0, 0, 3, cfg.train, 100)
    cfg2, model2, opt2, stream2 = _setup(tiny_prepared, f"train.micro_batch_size={micro}")
    acc = train_local(model2, opt2, stream2, 0, 0, 3, cfg2.train, 100)
    assert acc.losses == pytest.approx(full.losses, rel=1e-5) and acc.cursor == full.cursor
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert_close_by_norm(a, b, rel=1e-5, what=k)  # the gradient summed in another order


def test_micro_batch_must_divide_the_batch():
    from photon.config import load_config
    from photon.errors import UserError

    with pytest.raises(UserError, match="micro_batch_size"):
        load_config("tiny", ["train.micro_batch_size=3"])


def test_chunked_cross_entropy_equals_the_full_loss_and_its_gradient():
    from photon.model.transformer import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 10, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (3, 10), generator=g)
    full = torch.nn.functional.cross_entropy((h @ w.T).view(-1, 50), t.view(-1))
    full.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    chunked = chunked_cross_entropy(h, w, t, chunk=7)
    chunked.backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(h.grad, grads[0])
    torch.testing.assert_close(w.grad, grads[1])


def test_a_large_vocabulary_never_materialises_full_logits(tiny_prepared):
    """With a 50k vocabulary the model returns no logits in training and the loss equals the unchunked one."""
    from photon.config import load_config

    cfg = load_config("tiny", ["model.vocab_size=50304"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    assert model.loss_chunk == 4096
    x = torch.randint(0, 50304, (72, 64))  # 4608 tokens: more than one chunk
    logits, loss = model(x, x)
    assert logits is None
    model.loss_chunk = None
    full_logits, full = model(x, x)
    assert full_logits.shape == (72, 64, 50304)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tiny_prepared):
    from photon.train.device import place

    grads = []
    for ckpt in (False, True):
        cfg, model, _, stream = _setup(tiny_prepared, f"train.activation_checkpointing={str(ckpt).lower()}")
        place(model, cfg.train, torch.device("cpu"))
        assert model.checkpoint_blocks == ckpt
        x, y, _ = stream.next_batch(0)
        model(x, y)[1].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k])


@pytest.mark.parametrize("clip,more", [("0", ()), ("1.0", ()), ("1e-3", ()),  # off; the paper's; always on
                                       ("1e-3", ("train.loss_chunk=100", "train.activation_checkpointing=true")),
                                       ("1.0", ("train.bf16=true", "train.activation_checkpointing=true"))])
def test_step_in_backward_equals_the_usual_step(tiny_prepared, clip, more):
    """train.step_in_backward: each parameter stepped from its gradient hook (and, with clipping, after a norm
    pass) trains to the usual step's parameters and AdamW state, bitwise, with a tied embedding (used by every
    chunk of a chunked loss too, and by checkpointed blocks recomputed in backward)."""
    from photon.train.device import place

    out = []
    for in_backward in ("false", "true"):
        cfg, model, opt, stream = _setup(tiny_prepared, f"train.grad_clip={clip}",
                                         f"train.step_in_backward={in_backward}", *more)
        model = place(model, cfg.train, torch.device("cpu"))
        assert model.lm_head.weight is model.model.embed_tokens.weight
        result = train_local(model, opt, stream, 0, 0, 4, cfg.train, 100)
        out.append((_params(model), optimizer_state_tensors(model, opt), result.losses, result.cursor))
    (p0, s0, l0, c0), (p1, s1, l1, c1) = out
    assert _equal(p0, p1) and _equal(s0, s1) and l0 == l1 and c0 == c1


def test_step_in_backward_never_holds_all_gradients(tiny_prepared):
    """At most one parameter has a gradient at any moment of a step in backward, and none after it."""
    cfg, model, opt, stream = _setup(tiny_prepared, "train.step_in_backward=true", "train.grad_clip=1.0")
    params = list(model.parameters())
    most = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: most.append(sum(q.grad is not None for q in params)))
    train_local(model, opt, stream, 0, 0, 2, cfg.train, 100)
    assert most and max(most) == 1
    assert all(p.grad is None for p in params)
    assert all(not p._post_accumulate_grad_hooks or len(p._post_accumulate_grad_hooks) == 1 for p in params)


def test_step_in_backward_refuses_what_it_cannot_do(tiny_prepared):
    from photon.config import load_config
    from photon.errors import UserError

    cfg, model, opt, stream = _setup(tiny_prepared, "train.step_in_backward=true")
    with pytest.raises(UserError, match="one process"):  # a rank of a multi-process client
        train_local(model, opt, stream, 0, 0, 1, cfg.train, 10, shard=(0, 2))
    assert all(p.grad is None for p in model.parameters())

    with pytest.raises(UserError, match="micro_batch_size"):
        load_config("tiny", ["train.step_in_backward=true", "train.micro_batch_size=2"])
    with pytest.raises(UserError, match="procs_per_node"):
        load_config("tiny", ["train.step_in_backward=true", "federation.procs_per_node=2"])
    with pytest.raises(UserError, match="eager model.*unset train.compile"):
        load_config("tiny", ["train.step_in_backward=true", "train.compile=true"])
    load_config("tiny", ["train.step_in_backward=true", "train.micro_batch_size=8"])  # = the batch: fine


@pytest.mark.parametrize("ckpt", [False, True])
def test_checkpointing_turns_off_autocasts_weight_cache(tiny_prepared, ckpt):
    """Autocast's cache keeps every weight's bf16 copy until the forward ends, which would undo activation
    checkpointing's saving; it stays on without checkpointing (backward keeps those copies anyway)."""
    cfg, model, opt, stream = _setup(tiny_prepared, "train.bf16=true",
                                     f"train.activation_checkpointing={str(ckpt).lower()}")
    seen = []
    model.lm_head.register_forward_hook(lambda *_: seen.append(torch.is_autocast_cache_enabled()))
    train_local(model, opt, stream, 0, 0, 1, cfg.train, 10)
    assert seen == [not ckpt]


def test_a_lean_node_trains_uncompiled_whatever_the_run_says():
    from photon.config import load_config
    from photon.train.local import lean_config

    lean = lean_config(load_config("tiny", ["train.compile=true", "train.micro_batch_size=4"])).train
    assert lean.step_in_backward and lean.activation_checkpointing and not lean.compile
    assert lean.micro_batch_size is None
