"""Hugging Face export: the folder loads offline in transformers and gives our logits and token ids."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from photon.config import ModelConfig
from photon.errors import UserError
from photon.model.hf import export_hf, import_hf
from photon.model.transformer import Transformer, unique_state_dict

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


@pytest.mark.parametrize("tie", [True, False])
def test_import_round_trip(tmp_path, tokenizer_json, tie):
    model, cfg = tiny(tie)
    export_hf(model, cfg, tokenizer_json, tmp_path / "hf")
    back, cfg2 = import_hf(tmp_path / "hf")
    assert cfg2 == cfg
    a, b = unique_state_dict(model), unique_state_dict(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_replaces_folder_and_files(tmp_path, tokenizer_json):
    model, cfg = tiny(True)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_hf(model, cfg, tokenizer_json, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp folders left behind
    c = json.loads((out / "config.json").read_text())
    assert c["eos_token_id"] == c["bos_token_id"] == Tokenizer.from_file(str(tokenizer_json)).token_to_id(EOT)


def test_user_errors(tmp_path, tokenizer_json):
    model, cfg = tiny(True)
    with pytest.raises(UserError, match="no token"):
        export_hf(model, cfg, tokenizer_json, tmp_path / "hf", eos_token="<eos>")
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path)
    export_hf(model, cfg, tokenizer_json, tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**c, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="not 'llama'"):
        import_hf(tmp_path / "hf")
