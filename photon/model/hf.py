"""Export a trained model to a Hugging Face ``LlamaForCausalLM`` folder (weights, config, tokenizer).

Everything is offline: the folder loads with ``from_pretrained(dir)`` without the Hub. This module does not
import transformers (it writes the files by hand), so the training path never pays for that import.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from photon.config import ModelConfig
from photon.errors import UserError
from photon.model.transformer import (
    Transformer,
    unique_state_dict,
)


def hf_config(cfg: ModelConfig, eot_id: int) -> dict[str, Any]:
    """A LlamaConfig as a dict, in the transformers 5.x form (``rope_parameters``)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        # transformers 4.x reads the base from the top level; 5.x prefers rope_parameters when both exist.
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
    }


# What export_hf writes, and so how an earlier export is recognised: a folder holding exactly these files.
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                          "tokenizer.json", "tokenizer_config.json"})


def _check_out_dir(out_dir: Path, source: Path) -> Path:
    """out_dir resolved to an absolute path, or a UserError if replacing it could destroy anything but an export."""
    out_dir = out_dir.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out_dir == cwd or out_dir in cwd.parents:
        raise UserError(f"{out_dir} is the current folder or holds it; pass a new folder name, e.g. --hf hf-export")
    if out_dir == source or out_dir in source.parents or source in out_dir.parents:
        raise UserError(f"{out_dir} is, holds or lies inside the checkpoint being exported ({source}); "
                        "pass a folder outside it, e.g. RUN_DIR/hf")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir} exists and is not a folder; choose another output path")
        entries = list(out_dir.iterdir())
        if entries and ({p.name for p in entries} != EXPORT_FILES or not all(p.is_file() for p in entries)):
            raise UserError(f"{out_dir} is not empty and is not an earlier photon export (it would be replaced); "
                            "pass a new or empty folder")
    return out_dir


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def export_hf(model: Transformer, cfg: ModelConfig, tokenizer_json: Path, out_dir: Path,
              eos_token: str = "<|endoftext|>") -> None:
    """Write a complete HF folder at out_dir, replacing it atomically (readers never see half a folder).

    out_dir may be missing, empty, or an earlier export (exactly the files in `EXPORT_FILES`); any other folder
    is refused, as is the current folder or one above it, and a folder that is, holds or lies inside the folder
    of tokenizer_json (the checkpoint being exported, when called from `photon export`).
    """
    tokenizer_json, out_dir = Path(tokenizer_json), Path(out_dir)
    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise UserError(f"{tokenizer_json}: not a readable tokenizers JSON file ({e})") from None
    eot_id = tok.token_to_id(eos_token)
    if eot_id is None:
        raise UserError(f"{tokenizer_json}: has no token {eos_token!r}; pass the tokenizer's end-of-text token")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise UserError(f"{tokenizer_json}: has {tok.get_vocab_size()} tokens but model.vocab_size="
                        f"{cfg.vocab_size}; export with the tokenizer the model was trained with")
    out_dir = _check_out_dir(out_dir, tokenizer_json.resolve().parent)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # safetensors wants contiguous, unshared tensors; fp32 so HF's from_pretrained needs no cast.
        sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unique_state_dict(model).items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(cfg, eot_id))
        # safetensors writes 0600 whatever the umask: an export is for sharing, so like its other files
        os.chmod(tmp / "model.safetensors", stat.S_IMODE((tmp / "config.json").stat().st_mode))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id})
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eos_token, "eos_token": eos_token, "unk_token": eos_token,
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
        })
        _write_json(tmp / "special_tokens_map.json",
                    {"bos_token": eos_token, "eos_token": eos_token, "unk_token": eos_token})
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    # rename() cannot replace a non-empty folder, so move the old one aside first and delete it last.
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)




