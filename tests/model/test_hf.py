"""Hugging Face export: the folder loads offline in transformers and gives our logits and token ids."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from photon.config import ModelConfig
from photon.errors import UserError
from photon.model.hf import export_hf
from photon.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

EOT = "<|endoftext|>"
TEXT = ["the quick brown fox jumps over the lazy dog", "federated pre-training of language models",
        "photon trains a small llama on many clients", "hello world, hello photon"] * 4


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny(tie, n_kv_head=2):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, n_layer=2, d_model=64, n_head=4, n_kv_head=n_kv_head, max_seq_len=64,
                      tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-5)
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms, so a wrong norm convention would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval(), cfg


@pytest.mark.parametrize("tie,n_kv_head", [(True, 2), (False, 2), (False, None)])
def test_transformers_loads_export_with_same_logits(tmp_path, tokenizer_json, tie, n_kv_head):
    model, cfg = tiny(tie, n_kv_head)
    out = tmp_path / "hf"
    export_hf(model, cfg, tokenizer_json, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True,
                                                           dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tie
    idx = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_tokenizer_matches(tmp_path, tokenizer_json):
    model, cfg = tiny(True)
    export_hf(model, cfg, tokenizer_json, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ours = Tokenizer.from_file(str(tokenizer_json))
    text = "hello photon, the lazy fox" + EOT
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text).ids
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == ours.token_to_id(EOT)



EXPORTED = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
            "tokenizer.json", "tokenizer_config.json"]


def test_export_replaces_earlier_export_and_empty_folder(tmp_path, tokenizer_json):
    model, cfg = tiny(True)
    out = tmp_path / "hf"
    out.mkdir()  # an empty folder is fine
    export_hf(model, cfg, tokenizer_json, out)
    (out / "config.json").write_text("{}")  # an earlier export (same file names) is replaced as a whole
    export_hf(model, cfg, tokenizer_json, f"{out}/")  # a trailing slash names the same folder
    assert sorted(p.name for p in out.iterdir()) == EXPORTED
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp folders left behind
    c = json.loads((out / "config.json").read_text())
    assert c["eos_token_id"] == c["bos_token_id"] == Tokenizer.from_file(str(tokenizer_json)).token_to_id(EOT)


def test_exported_weights_are_as_readable_as_the_other_files(tmp_path, tokenizer_json):
    """safetensors writes 0600 whatever the umask; an export is for sharing."""
    import os

    model, cfg = tiny(True)
    before = os.umask(0o022)
    try:
        export_hf(model, cfg, tokenizer_json, tmp_path / "hf")
    finally:
        os.umask(before)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()} == dict.fromkeys(EXPORTED, 0o644)


@pytest.mark.parametrize("extra", ["notes.txt", "README.md"])
def test_export_refuses_folder_that_is_not_an_export(tmp_path, tokenizer_json, extra):
    model, cfg = tiny(True)
    out = tmp_path / "mine"
    out.mkdir()
    (out / extra).write_text("keep me")
    if extra == "README.md":  # an export plus one file of the user's is not an export any more
        export_hf(model, cfg, tokenizer_json, tmp_path / "hf")
        for name in EXPORTED:
            (out / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match="not empty and is not an earlier photon export"):
        export_hf(model, cfg, tokenizer_json, out)
    assert sorted(p.name for p in out.iterdir()) == before and (out / extra).read_text() == "keep me"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    (out / "file").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        export_hf(model, cfg, tokenizer_json, out / "file")


def fake_run(tmp_path, tokenizer_json):
    """A run directory as train writes it: config, metrics and a checkpoint that holds the tokenizer."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (ckpt / "model.safetensors").write_text("weights")
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run, ckpt


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_export_refuses_the_run_or_checkpoint_being_exported(tmp_path, tokenizer_json):
    model, cfg = tiny(True)
    run, ckpt = fake_run(tmp_path, tokenizer_json)
    before = tree(tmp_path)
    for out in (run, ckpt, ckpt / "hf", run / "checkpoints"):
        with pytest.raises(UserError, match="checkpoint being exported"):
            export_hf(model, cfg, ckpt / "tokenizer.json", out)
    assert tree(tmp_path) == before
    export_hf(model, cfg, ckpt / "tokenizer.json", run / "hf")  # next to the checkpoints is fine
    assert sorted(p.name for p in (run / "hf").iterdir()) == EXPORTED


@pytest.mark.parametrize("arg", [".", "./", "..", "../.."])
def test_export_refuses_current_folder_and_its_parents(tmp_path, tokenizer_json, monkeypatch, arg):
    model, cfg = tiny(True)
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    if arg == ".":  # even when the current folder is an earlier export, it is not replaced under our feet
        export_hf(model, cfg, tokenizer_json, tmp_path / "hf")
        for name in EXPORTED:
            (cwd / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    before = tree(tmp_path)
    with pytest.raises(UserError, match="current folder"):
        export_hf(model, cfg, tokenizer_json, arg)
    assert tree(tmp_path) == before and Path.cwd() == cwd.resolve()


def test_export_relative_path(tmp_path, tokenizer_json, monkeypatch):
    model, cfg = tiny(True)
    monkeypatch.chdir(tmp_path)
    export_hf(model, cfg, tokenizer_json, "./out/../hf/")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == EXPORTED
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_user_errors(tmp_path, tokenizer_json):
    model, cfg = tiny(True)
    with pytest.raises(UserError, match="no token"):
        export_hf(model, cfg, tokenizer_json, tmp_path / "hf", eos_token="<eos>")
