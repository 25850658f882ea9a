
import numpy as np
import pytest

from photon.config import DataConfig, PartitionConfig
from photon.data.partition import (
    client_stream,
    make_partition,
)
from photon.data.shards import open_prepared, prepare
from photon.errors import UserError
from tests.helpers import FIXTURE_CORPUS

FIXTURE = FIXTURE_CORPUS
SIZES = {"a": 10_000, "b": 7_000, "c": 3_000, "d": 997, "e": 5}


def _manifest(sizes=SIZES):
    return {"domains": {d: {"train": {"tokens": n}, "val": {"tokens": 10}} for d, n in sizes.items()}}


def _check_cover(part, sizes=SIZES):
    """Every train token of every domain belongs to exactly one client."""
    owner = {d: np.zeros(n, np.int64) for d, n in sizes.items()}
    for c in part["clients"]:
        assert c["tokens"] == sum(s["end"] - s["start"] for s in c["spans"])
        for s in c["spans"]:
            assert 0 <= s["start"] < s["end"] <= sizes[s["domain"]]
            owner[s["domain"]][s["start"]:s["end"]] += 1
    assert all((o == 1).all() for o in owner.values())
    assert [c["id"] for c in part["clients"]] == list(range(part["num_clients"]))


@pytest.mark.parametrize("kind", ["iid", "by-domain", "dirichlet"])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_cover_and_disjoint(kind, n):
    _check_cover(make_partition(_manifest(), PartitionConfig(kind=kind, num_clients=n, alpha=0.3, seed=7)))


def test_iid_gives_equal_slices_of_every_domain():
    part = make_partition(_manifest(), PartitionConfig(kind="iid", num_clients=4))
    for c in part["clients"]:
        per = {s["domain"]: s["end"] - s["start"] for s in c["spans"]}
        assert per["a"] == 2500 and per["b"] == 1750 and per["c"] == 750 and per["d"] in (249, 250)


def test_by_domain_keeps_domains_whole_and_balances():
    part = make_partition(_manifest(), PartitionConfig(kind="by-domain", num_clients=2))
    doms = [sorted(s["domain"] for s in c["spans"]) for c in part["clients"]]
    # largest first to the lighter client: a -> 0, b -> 1, c -> 1 (7000 < 10000), d -> 0 (tie, lower id), e -> 1
    assert doms == [["a", "d"], ["b", "c", "e"]]
    assert all(s["start"] == 0 and s["end"] == SIZES[s["domain"]] for c in part["clients"] for s in c["spans"])


def test_by_domain_more_clients_than_domains():
    part = make_partition(_manifest(), PartitionConfig(kind="by-domain", num_clients=8))
    per_client = [{s["domain"] for s in c["spans"]} for c in part["clients"]]
    assert all(len(d) == 1 for d in per_client)  # each client holds a slice of exactly one domain
    counts = {d: sum(d in x for x in per_client) for d in SIZES}
    # one client each, then D'Hondt on tokens per client: a (10000), b (7000), a (5000 > 3500, 3000)
    assert counts == {"a": 3, "b": 2, "c": 1, "d": 1, "e": 1}


def test_dirichlet_is_deterministic_and_skewed():
    cfg = PartitionConfig(kind="dirichlet", num_clients=6, alpha=0.1, seed=3)
    assert make_partition(_manifest(), cfg) == make_partition(_manifest(), cfg)
    other = make_partition(_manifest(), cfg.model_copy(update={"seed": 4}))
    assert other != make_partition(_manifest(), cfg)
    # small alpha: most clients are dominated by one domain
    part = make_partition(_manifest(), cfg)
    top = [max(s["end"] - s["start"] for s in c["spans"]) / max(c["tokens"], 1) for c in part["clients"]]
    assert np.median(top) > 0.6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("part")
    cfg = DataConfig(prep_dir=tmp / "prep", tokenizer_sample_mb=0.1, val_fraction=0.1)
    return open_prepared(prepare(cfg, 512, source=FIXTURE))


@pytest.mark.parametrize("kind", ["iid", "by-domain", "dirichlet"])
def test_client_streams_read_their_own_tokens(prepared, kind):
    part = make_partition(prepared.manifest, PartitionConfig(kind=kind, num_clients=3, alpha=1.0))
    sizes = {d: prepared.manifest["domains"][d]["train"]["tokens"] for d in prepared.domains}
    _check_cover(part, sizes)
    for c in part["clients"]:
        s = client_stream(prepared, part, c["id"], seq_len=32, batch_size=4, seed=0)
        x, y, cursor = s.next_batch(0)
        assert x.shape == (4, 32) and cursor == 4
        own = np.concatenate([prepared.tokens(sp["domain"], "train")[sp["start"]:sp["end"]] for sp in c["spans"]])
        text = own.tobytes()
        for row in x.numpy().astype(own.dtype):
            assert row.tobytes() in text  # every row is a real run of this client's tokens


def test_too_many_clients_says_how_many(prepared):
    part = make_partition(prepared.manifest, PartitionConfig(kind="iid", num_clients=200))
    with pytest.raises(UserError, match=r"use at most \d+ clients") as e:
        client_stream(prepared, part, 0, seq_len=256, batch_size=4, seed=0)
    assert "\n" not in str(e.value)
    at_most = int(str(e.value).split("at most ")[1].split()[0])
    ok = make_partition(prepared.manifest, PartitionConfig(kind="iid", num_clients=at_most))
    for c in ok["clients"]:
        client_stream(prepared, ok, c["id"], seq_len=256, batch_size=4, seed=0)


def test_partition_mismatch(prepared):
    part = make_partition(_manifest(), PartitionConfig(kind="iid", num_clients=2))
    with pytest.raises(UserError, match="does not match the prepared data"):
        client_stream(prepared, part, 0, seq_len=16, batch_size=2, seed=0)
