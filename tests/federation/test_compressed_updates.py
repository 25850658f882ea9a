"""Compressed updates both ways: error feedback kept with the client, the down-link rebuilt exactly by every node
(no drift), nodes without the previous model get it whole, the bytes counted are the bytes sent, and resume
stays bitwise exact."""

import logging
import shutil

import pytest
import torch

from photon.federation import codec
from photon.federation.compressed_updates import (
    client_message,
    reconstruct,
    server_broadcast,
)
from photon.federation.protocol import decode_task
from photon.federation.runner import run_federation
from photon.federation.server_state import ServerState
from photon.federation.worker import ClientWorker
from photon.runlog import read_metrics
from photon.transport.inprocess import InProcessTransport
from tests.helpers import ServerCrash, crash_when, encoded_size, fed_cfg, run

TOPK_EF = ["codec=topk", "density=0.05", "values=2bit", "error_feedback=true"]


def _cfg(prep, up=(), down=(), *extra):
    return fed_cfg(prep, "data.partition.num_clients=3", "federation.clients_per_round=3", "federation.rounds=3",
                   "federation.state_backup=false", *[f"federation.compression.up.{s}" for s in up],
                   *[f"federation.compression.down.{s}" for s in down], *extra)


def _rounds(run_dir):
    return [r for r in read_metrics(run_dir) if r["kind"] == "round"]


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(300, generator=g), "b": torch.randn(7, 9, generator=g)}


def test_error_feedback_carries_what_compression_left_out():
    from photon.config import CodecConfig

    cfg = CodecConfig(codec="topk", density=0.1, values="fp32", error_feedback=True)
    update = _tensors()
    payload, residual = client_message(update, None, cfg, seed=0)
    sent = codec.decode(payload, codec.layout_of(update))
    for k in update:  # what was sent plus what is kept back is exactly the update
        torch.testing.assert_close(sent[k] + residual["ef/" + k], update[k])
    payload2, residual2 = client_message(update, residual, cfg, seed=1)
    sent2 = codec.decode(payload2, codec.layout_of(update))
    for k in update:  # the next message carries the update plus the old residual, decayed by β
        torch.testing.assert_close(sent2[k] + residual2["ef/" + k], update[k] + 0.95 * residual["ef/" + k])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_decayed_error_feedback_follows_its_definition_round_after_round(beta):
    """e' = (Δ + β·e) − D(C(Δ + β·e)), computed here directly beside the message over four rounds; the warm-up
    round sends C(Δ) and keeps nothing."""
    from photon.config import CodecConfig

    cfg = CodecConfig(codec="topk", density=0.1, values="2bit", error_feedback=True, error_feedback_decay=beta,
                      error_feedback_warmup_rounds=1)
    layout = codec.layout_of(_tensors())
    spec = codec.CodecSpec.of(cfg)
    residual, expected = None, {k: torch.zeros(s) for k, s in layout}
    for rnd in range(4):
        update = _tensors(rnd)
        payload, residual = client_message(update, residual, cfg, seed=rnd, round_=rnd)
        target = update if rnd == 0 else {k: update[k] + beta * expected[k] for k in update}
        want = codec.encode(target, spec, seed=rnd)
        assert payload.as_bytes() == want.as_bytes()
        sent = codec.decode(want, layout)
        expected = {k: torch.zeros(s) for k, s in layout} if rnd == 0 else {k: target[k] - sent[k] for k in target}
        for k in update:
            torch.testing.assert_close(residual["ef/" + k], expected[k], rtol=0, atol=1e-6)


def test_the_server_defines_the_new_model_as_what_nodes_rebuild():
    from photon.config import CodecConfig

    cfg = CodecConfig(codec="int4", error_feedback=True)
    old = _tensors(1)
    new = {k: v + 0.01 * torch.randn(v.shape) for k, v in old.items()}
    params = {k: v.clone() for k, v in new.items()}
    payload, residual = server_broadcast(params, old, None, cfg, seed=0)
    rebuilt = reconstruct(old, payload, codec.layout_of(old))
    for k in old:
        assert torch.equal(rebuilt[k], params[k])  # bitwise: server and nodes never drift
        torch.testing.assert_close(params[k] + residual[k], new[k])  # what was left out waits on the server


def test_compressed_runs_train_and_count_the_bytes_they_send(tiny_prep, tmp_path):
    from photon.federation.codec import CodecSpec
    from photon.model.transformer import Transformer, unique_state_dict

    base = run(_cfg(tiny_prep), tmp_path / "fp32")
    int8 = run(_cfg(tiny_prep, ["codec=int8"], ["codec=int8"]), tmp_path / "int8")
    assert int8["losses"]["overall"] < base["losses"]["overall"] + 0.05  # int8 both ways costs little
    layout = codec.layout_of(unique_state_dict(Transformer(_cfg(tiny_prep).model)))
    per_update = encoded_size(layout, CodecSpec("int8"))
    rounds = _rounds(tmp_path / "int8")
    assert all(r["bytes_up"] == 3 * per_update for r in rounds)
    full = _rounds(tmp_path / "fp32")[0]["bytes_down"] // 3  # fp32 sends the whole model with every task
    assert rounds[0]["bytes_down"] == full  # round 1: the model once; the node's next tasks: "same model", 0 bytes
    assert all(r["bytes_down"] == per_update for r in rounds[1:])  # then one int8 update per round


@pytest.mark.parametrize("outer", [(), ("federation.outer.name=nesterov", "federation.outer.lr=0.7",
                                         "federation.min_cosine=0")])
def test_topk_with_error_feedback_resumes_bitwise(tiny_prep, tmp_path, outer):
    """Compressed both ways with error feedback; also with a momentum outer optimizer (its momentum in the
    checkpoint) behind centered clipping and the direction screen."""
    cfg = _cfg(tiny_prep, TOPK_EF, TOPK_EF, "federation.rounds=4", *outer)
    reference = run(cfg, tmp_path / "ref")

    with pytest.raises(ServerCrash):
        run(cfg, tmp_path / "b", fail=crash_when(lambda task: task.round == 2))
    resumed = run(cfg, tmp_path / "b", resume=True)
    assert resumed["params_sha"] == reference["params_sha"]
    state, _ = ServerState.load_latest(tmp_path / "b" / "checkpoints")
    assert state.down_residual and all(c.state_digest for c in state.clients)  # both residuals were kept


def test_a_node_without_the_previous_model_gets_the_full_model(tiny_prep, tmp_path, caplog):
    """Two nodes with their own caches; node 1's cache is wiped after every task (a restarted node): the
    server's compressed update cannot apply there, the node says so and the retry carries the whole model (and,
    from the server's backup, the client's kept state the wipe took too)."""
    cfg = _cfg(tiny_prep, (), ["codec=int8"], "federation.state_backup=true", "federation.state_backup_every=1")
    reference = run(cfg, tmp_path / "ref")

    class Forgetful(InProcessTransport):
        def run(self, node, wire):
            out = super().run(node, wire)
            if node == 1:
                cache = self.workers[1].cache.state_dir / decode_task(wire).run_id
                shutil.rmtree(cache, ignore_errors=True)  # the node forgot the run
            return out

    transport = Forgetful([ClientWorker(tmp_path / "a"), ClientWorker(tmp_path / "b")])
    got = run_federation(cfg, tmp_path / "forget", transport)
    assert got["params_sha"] == reference["params_sha"]


def test_a_reply_in_another_codec_than_asked_is_rejected(tiny_prep, tmp_path, caplog):
    cfg = _cfg(tiny_prep, ["codec=int8"], (), "federation.rounds=1")

    class Cheater(ClientWorker):  # sends its update as fp32 although int8 was asked
        def handle(self, wire):
            from photon.federation.protocol import Wire

            reply = super().handle(wire)
            task = decode_task(wire)
            full = codec.encode({k: torch.zeros(s) for k, s in
                                 codec.layout_of(self._model[1].state_dict()) if k != "lm_head.weight"})
            return Wire(reply.header, {**reply.payloads, "update": full}) if task.client_id == 0 else reply

    with caplog.at_level(logging.WARNING, logger="photon.federation.aggregator"):
        run_federation(cfg, tmp_path, InProcessTransport(Cheater(tmp_path / "n")))
    assert "other settings than the task asked for (int8)" in caplog.text


def test_bench_summary_compares_each_seed_with_fp32_and_leaves_the_initial_download_out():
    from photon.bench.compression import summarize

    def row(codec, seed, ppl, steady_bytes):
        return {"h": 16, "codec": codec, "both": False, "seed": seed, "final_ppl": ppl, "tokens": 100,
                "bytes_up": 500, "bytes_down": 1500, "steady_bytes": steady_bytes, "steady_tokens": 50,
                "train_seconds_per_round": 2.0}

    data = {"hs": [16], "k": 4, "dp_bytes_per_token": 1000.0,
            "codec_seconds": {name: {"encode": 0.01, "decode": 0.01} for name in ("fp32", "int8")},
            "rows": [row("fp32", 0, 100.0, 500), row("fp32", 1, 200.0, 500), row("int8", 0, 101.0, 100)]}
    by = {r["codec"]: r for r in summarize(data)}
    assert by["int8"]["cost"] == pytest.approx(0.01)  # against fp32's seed 0 (100), not the mean of both (150)
    assert by["int8"]["steady_bytes_per_token"] == 2.0 and by["int8"]["vs_dp"] == 500.0
    assert by["int8"]["bytes_per_token"] == 20.0  # everything sent, the first round's download included
    assert by["int8"]["cost_best"] == pytest.approx(0.01)  # one H: its fp32 is the best-H baseline
    assert by["int8"]["codec_share"] == pytest.approx(0.02 / 2.0)  # one encode + the last decode, not K of each


SPARSELOCO = ["federation.compression.recipe=sparseloco"]


def test_sparseloco_runs_every_node_rebuilds_the_servers_model_and_resumes_bitwise(tiny_prep, tmp_path):
    """The recipe end to end on two nodes: each node rebuilds the new model from the forwarded replies and
    checks it against the server's digest (a mismatch fails the task); the down-link costs exactly the round's
    accepted up-link bytes; a killed and resumed run ends on the same parameters."""
    cfg = _cfg(tiny_prep, (), (), *SPARSELOCO, "federation.rounds=4", "federation.num_nodes=2")
    assert cfg.federation.compression.down.codec == "replies" and cfg.federation.aggregation == "contributor-mean"
    reference = run(cfg, tmp_path / "ref", nodes=2)
    rounds = _rounds(tmp_path / "ref")
    assert all(r["ok"] == 3 and not r["failed"] for r in rounds)
    # round r's replies go down in round r+1, to each node that holds round r's model (both do)
    for before, after in zip(rounds, rounds[1:]):
        assert after["bytes_down"] == 2 * before["bytes_up"]
    assert rounds[-1]["bytes_up"] < _rounds(tmp_path / "ref")[0]["bytes_down"] / 20  # sparse 2-bit vs fp32 model

    with pytest.raises(ServerCrash):
        run(cfg, tmp_path / "b", nodes=2, fail=crash_when(lambda task: task.round == 2))
    resumed = run(cfg, tmp_path / "b", nodes=2, resume=True)
    assert resumed["params_sha"] == reference["params_sha"]


def test_a_recipe_expands_in_place_and_later_overrides_win(tiny_prep):
    from photon.config import load_config
    from photon.errors import UserError

    cfg = load_config("tiny", SPARSELOCO + ["federation.compression.up.density=0.03"])
    up = cfg.federation.compression.up
    assert (up.codec, up.density, up.values, up.two_bit, up.error_feedback, up.error_feedback_decay) == \
        ("topk", 0.03, "2bit", "codebook", True, 0.95)
    with pytest.raises(UserError, match="needs contributor-mean"):
        load_config("tiny", SPARSELOCO + ["federation.aggregation=mean"])
    with pytest.raises(UserError, match="down-link codec"):
        load_config("tiny", ["federation.compression.up.codec=replies"])
    with pytest.raises(UserError, match="unknown recipe"):
        load_config("tiny", ["federation.compression.recipe=zip"])


def _np_sparseloco_rounds(theta, updates_per_round, density, chunk, block, beta, lr):
    """SparseLoCo's rounds in numpy from the paper's description: each client e <- beta e + delta, sends the
    top-k (per chunk) of e with the kept values 2-bit codebook-quantised per block, e <- e - sent; the server
    clips each message's tensor to the median norm, averages each coordinate over the senders, theta <- theta -
    lr * aggregate. Returns theta after every round."""
    import numpy as np

    from tests.federation.test_codec import chunks, ref_quantise

    def send(x):  # the kept values of the whole tensor, chunk after chunk, are quantised in blocks
        where = []
        for s, e in chunks(len(x), chunk):
            k = min(e - s, max(1, int(np.floor(density * (e - s) + 0.5))))
            where.append(s + np.sort(np.argsort(-np.abs(x[s:e]), kind="stable")[:k]))
        where = np.concatenate(where)
        vals, q = x[where], np.empty(len(where), np.float32)
        for b in range(0, len(vals), block):
            (lo, hi), codes = ref_quantise(vals[b:b + block], codec.CodecSpec("2bit", two_bit="codebook"))
            q[b:b + block] = np.array([lo, -lo, hi, -hi], np.float32)[codes]
        out = np.zeros_like(x)
        out[where] = q
        return out

    residuals, thetas = None, []
    for updates in updates_per_round:
        residuals = residuals or [{k: np.zeros_like(v) for k, v in u.items()} for u in updates]
        sent = []
        for u, e in zip(updates, residuals):
            msg = {}
            for k in u:
                e[k] = beta * e[k] + u[k]
                msg[k] = send(e[k].reshape(-1)).reshape(e[k].shape)
                e[k] = e[k] - msg[k]
            sent.append(msg)
        for k in theta:
            rows = np.stack([m[k].reshape(-1).astype(np.float64) for m in sent])
            norms = np.sqrt((rows ** 2).sum(1))
            med = np.sort(norms)[(len(norms) - 1) // 2]
            agg = (rows * np.where(norms > med, med / norms, 1.0)[:, None]).sum(0) / np.maximum((rows != 0).sum(0), 1)
            theta[k] = theta[k] - lr * agg.reshape(theta[k].shape).astype(np.float32)
        thetas.append({k: v.copy() for k, v in theta.items()})
    return thetas


def test_sparseloco_rounds_match_a_numpy_reference_of_the_algorithm():
    """Three rounds of three clients with given pseudo-gradients through Photon's pieces (client_message with
    decayed error feedback, the replies payload, rebuild_from_replies) against the numpy reference above."""
    from photon.config import CodecConfig

    cfg = CodecConfig(codec="topk", density=0.05, chunk=64, values="2bit", two_bit="codebook", block_size=16,
                      error_feedback=True, error_feedback_decay=0.9)
    theta = _tensors(50)
    layout = codec.layout_of(theta)
    rounds = [[_tensors(10 * r + c) for c in range(3)] for r in range(3)]
    expected = _np_sparseloco_rounds({k: v.numpy().copy() for k, v in theta.items()},
                                     [[{k: v.numpy() for k, v in u.items()} for u in us] for us in rounds],
                                     cfg.density, cfg.chunk, cfg.block_size, cfg.error_feedback_decay, lr=0.8)
    residuals = [None] * 3
    for r, updates in enumerate(rounds):
        parts = []
        for c, u in enumerate(updates):
            payload, residuals[c] = client_message(u, residuals[c], cfg, seed=0, round_=r)
            parts.append(payload)
        from photon.federation.compressed_updates import rebuild_from_replies, replies_payload

        theta = rebuild_from_replies(theta, replies_payload(parts, 0.8), layout)
        for k in theta:
            ref = torch.from_numpy(expected[r][k])
            assert torch.linalg.vector_norm(theta[k] - ref) <= 1e-5 * torch.linalg.vector_norm(ref), (r, k)


def test_bench_cost_is_also_against_fp32_at_its_best_h():
    from photon.bench.compression import summarize

    def row(codec, h, ppl):
        return {"h": h, "codec": codec, "both": codec == "SparseLoCo", "seed": 0, "final_ppl": ppl, "tokens": 100,
                "bytes_up": 10, "bytes_down": 10, "steady_bytes": 10, "steady_tokens": 50,
                "train_seconds_per_round": 1.0}

    secs = {"encode": 0.01, "decode": 0.01, "rebuild": 0.05}
    data = {"hs": [64, 512], "k": 4, "dp_bytes_per_token": 1000.0,
            "codec_seconds": {"fp32": secs, "SparseLoCo": secs},
            "rows": [row("fp32", 64, 50.0), row("fp32", 512, 60.0), row("SparseLoCo", 512, 61.2)]}
    sparse = next(r for r in summarize(data) if r["codec"] == "SparseLoCo")
    assert sparse["best_h"] == 64 and sparse["cost"] == pytest.approx(0.02)
    assert sparse["cost_best"] == pytest.approx(0.224)
    assert sparse["codec_s"] == pytest.approx(0.01 + 0.01 + 0.05)  # both ways: a node rebuilds from K replies
