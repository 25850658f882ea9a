"""The command line: help on every verb, one-line errors with exit code 2, and the tiny pipeline end to end."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
import typer
from typer.testing import CliRunner

from photon import cli
from photon.config import config_to_dict, load_config, preset_names
from tests.helpers import FIXTURE_CORPUS

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: steady timing on a shared 2-core box

FIXTURE_CORPUS = FIXTURE_CORPUS


def _verbs(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if isinstance(cmd, click.Group):
            yield from _verbs(cmd, (*prefix, name))


VERBS = list(_verbs(typer.main.get_command(cli.app)))


def run_cli(*args, cwd=None):
    """`python -m photon.cli ARGS` in a fresh interpreter, as a user runs it."""
    env = {**os.environ, "COLUMNS": "80", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "photon.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_every_verb_is_listed():
    names = {v[-1] for v in VERBS}
    assert {"prepare", "train-central", "eval", "export", "generate", "plot", "run", "presets", "bench",
            "trainer"} <= names


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_help_for_every_verb(verb):
    result = CliRunner().invoke(cli.app, [*verb, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and verb[-1] in result.output


def test_help_in_a_fresh_interpreter():
    r = run_cli("--help")
    assert r.returncode == 0 and "train-central" in r.stdout and r.stderr == ""


def test_user_error_is_one_line_on_stderr_with_exit_2(tmp_path):
    r = run_cli("prepare", "--preset", "tiny", "--data", "/nonexistent", "--out", tmp_path / "prep", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # not wrapped, however long
    assert r.stderr.startswith("error: /nonexistent")


def test_version(photon):
    from photon import __version__

    code, out, _ = photon("--version")
    assert code == 0 and out.startswith(f"photon {__version__} (torch ")


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("--debug", "prepare", "--preset", "tiny", "--data", "/nonexistent", "--out", tmp_path / "p",
                cwd=tmp_path)
    assert r.returncode not in (0, 2)
    assert "Traceback" in r.stderr and "UserError" in r.stderr and "/nonexistent" in r.stderr


def test_bad_set_key_exits_2_naming_the_key(tmp_path):
    r = run_cli("train-central", "--preset", "tiny", "--set", "train.lrr=1", "--out", tmp_path / "run",
                cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "train.lrr" in r.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


def test_error_message_is_printed_verbatim(photon, tmp_path):
    # Rich markup in a path must not be interpreted (it used to print "/x/" for "/x/[bold]y").
    code, _, err = photon("prepare", "--preset", "tiny", "--data", tmp_path / "[bold]y", "--out", tmp_path / "p")
    assert code == 2 and f"{tmp_path}/[bold]y" in err


def test_bad_value_and_unknown_preset(photon):
    code, _, err = photon("train-central", "--preset", "tiny", "--set", "train.lr=-1")
    assert code == 2 and "train.lr" in err and "greater than 0" in err
    code, _, err = photon("train-central", "--preset", "nope")
    assert code == 2 and "tiny" in err and "paper-7b" in err


def test_presets_lists_every_preset_with_its_size(photon):
    code, out, _ = photon("presets")
    assert code == 0
    text = " ".join(out.split())  # rich wraps at the terminal width
    for name in preset_names():
        m = re.search(rf"\b{re.escape(name)} (\d+) layers.*? ([\d.]+[KMB]) parameters", text)
        assert m, name
        assert int(m.group(1)) == load_config(name).model.n_layer
    assert text.index("paper-125m") < text.index("paper-7b")
    assert re.search(r"paper-7b 32 layers.*? 6\.\d+B parameters", text)


# ---------------------------------------------------------------------------------------------------------
# prepare -> train-central -> eval -> export --hf -> generate -> plot, all on the tiny preset


def test_tiny_pipeline_end_to_end(photon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    prep, run, hf = tmp_path / "prep", tmp_path / "run", tmp_path / "hf"

    code, out, err = photon("prepare", "--preset", "tiny", "--data", FIXTURE_CORPUS, "--out", prep)
    assert code == 0, err
    assert (prep / "manifest.json").is_file()

    code, out, err = photon("train-central", "--preset", "tiny", "--data", "prep", "--steps", 20, "--out", run,
                            "--set", "train.warmup_steps=2", "--set", "train.eval_every=10",
                            "--set", "train.ckpt_every=10", "--set", "train.eval_batches=1")
    assert code == 0, err
    assert "final validation loss" in out and (run / "checkpoints" / "step_00000020").is_dir()

    code, out, err = photon("train-central", "--preset", "tiny", "--data", prep, "--steps", 20, "--out", run)
    assert code == 2 and "--resume" in err  # the run dir is taken

    code, out, err = photon("train-central", "--resume", "--out", run)
    assert code == 2 and "nothing left to train" in err  # at its last step: refused, its config left as it was
    code, out, err = photon("run", "--resume", run)
    assert code == 2 and "central run" in err and "photon train-central --resume" in err

    code, out, err = photon("eval", run)
    assert code == 0, err
    for domain in ("code_python", "literature", "speech_sotu", "overall"):
        assert domain in out
    assert "bits/byte" in out
    other = tmp_path / "other-vocab"  # data whose manifest says another vocabulary
    shutil.copytree(prep, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 2048}))
    code, out, err = photon("eval", run, "--data", other)
    assert code == 2 and "vocab_size=2048" in err
    retokenized = tmp_path / "retokenized"  # the same vocabulary size, another tokenizer (prepared again)
    shutil.copytree(prep, retokenized)
    (retokenized / "tokenizer.json").write_text((prep / "tokenizer.json").read_text() + "\n")
    from photon.digest import sha256_file

    (retokenized / "manifest.json").write_text(json.dumps(
        {**manifest, "tokenizer_sha256": sha256_file(retokenized / "tokenizer.json")}))
    code, out, err = photon("eval", run, "--data", retokenized)
    assert code == 2 and "tokenized by another tokenizer" in err
    assert json.loads((run / "config.json").read_text())["data"]["prep_dir"] == str(prep)  # absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run names its data from any folder
    code, out, err = photon("eval", run)
    assert code == 0 and "overall" in out, err
    monkeypatch.chdir(tmp_path)
    held_out = tmp_path / "held_out.jsonl"  # any text, no prepared data needed
    held_out.write_text('{"text": "A letter, never seen in training."}\n{"text": "def g(y): return y"}\n')
    code, out, err = photon("eval", run, "--text", held_out)
    assert code == 0 and "held_out" in out and "bits/byte" in out, err
    if importlib.util.find_spec("lm_eval"):  # the optional evaluation harness, on a local task
        (tmp_path / "tasks").mkdir()
        (tmp_path / "tasks" / "held_out.yaml").write_text(
            f"task: held_out\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {held_out}\n"
            'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
            "metric_list:\n  - metric: bits_per_byte\n")
        code, out, err = photon("eval", run, "--tasks", tmp_path / "tasks")
        assert code == 0 and "held_out" in out and "bits_per_byte" in out, err
    else:
        code, out, err = photon("eval", run, "--tasks", "arc_easy")
        assert code == 2 and "pip install -e '.[eval]'" in err
    code, out, err = photon("eval", run, "--tasks", "arc_easy", "--text", held_out)
    assert code == 2 and "give one" in err
    (tmp_path / "notes.md").write_text("# a format prepare does not read\n")
    code, out, err = photon("eval", run, "--text", tmp_path / "notes.md")
    assert code == 2 and "notes.md: evaluate .txt, .jsonl or .parquet files" in err

    code, out, err = photon("export", run, "--hf", hf)
    assert code == 0, err
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    from photon.checkpoint import load_model_checkpoint

    ours, _, _, _ = load_model_checkpoint(run)
    x = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x).logits, ours(x)[0], rtol=1e-4, atol=1e-4)

    code, out, err = photon("generate", run, "--prompt", "To be", "--tokens", 12, "--seed", 1)
    assert code == 0, err
    assert out.startswith("To be") and len(out.strip()) > len("To be")
    assert photon("generate", run, "--prompt", "To be", "--tokens", 12, "--seed", 1)[1] == out  # seeded

    code, out, err = photon("plot", run)
    assert code == 0, err
    png = run / "curves.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_of_a_missing_checkpoint(photon, tmp_path):
    code, _, err = photon("eval", tmp_path / "nothing")
    assert code == 2 and "does not exist" in err


def test_unknown_key_hint_names_a_real_verb(photon):
    code, _, err = photon("train-central", "--preset", "tiny", "--set", "train.lrr=1")
    assert code == 2
    hinted = re.findall(r"`photon ([\w-]+)", err)
    assert hinted and all((verb,) in VERBS for verb in hinted)


def test_a_path_that_cannot_be_used_is_one_line_naming_it(photon, tmp_path):
    (tmp_path / "afile").write_text("")
    code, out, err = photon("certs", "--out", tmp_path / "afile" / "certs")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{tmp_path}/afile/certs" in err and "a file, not a folder" in err


def test_a_mistyped_engine_is_refused_before_any_data_is_prepared(photon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = photon("run", "--preset", "tiny", "--engine", "simulaton")
    assert code == 2 and "choose simulation or inprocess" in err
    assert not (tmp_path / "data").exists()


def test_a_taken_run_folder_is_refused_before_data_is_prepared_or_ray_started(photon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken" / "checkpoints" / "round-00001").mkdir(parents=True)
    code, _, err = photon("run", "--preset", "tiny", "--out", "taken")
    assert code == 2 and "taken already holds a run; pass --resume" in err
    assert not (tmp_path / "data").exists()


def test_a_new_run_is_refused_in_a_folder_of_other_files_and_a_resume_of_a_non_run(photon, tmp_path, monkeypatch):
    """An export or a corpus given as --out would be written over (config.json first)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "export").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "export" / name).write_text("{}")
    for verb in ("run", "train-central"):
        code, _, err = photon(verb, "--preset", "tiny", "--out", "export")
        assert code == 2 and "export holds files that are not a photon run's (model.safetensors, tokenizer.json)" in err
    assert (tmp_path / "export" / "config.json").read_text() == "{}" and not (tmp_path / "data").exists()
    code, _, err = photon("train-central", "--resume", "--out", "nowhere")
    assert code == 2 and "nowhere holds no run to resume" in err and not (tmp_path / "nowhere").exists()


def test_options_that_name_the_data_twice_or_prepare_into_the_text_are_refused(photon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = photon("train-central", "-p", "tiny", "--data", "a", "--set", "data.prep_dir=b")
    assert code == 2 and "--data and --set data.prep_dir both name the prepared data" in err
    code, _, err = photon("prepare", "-p", "tiny", "--out", "a", "--set", "data.prep_dir=b")
    assert code == 2 and "--out and --set data.prep_dir both name" in err
    shutil.copytree(FIXTURE_CORPUS, tmp_path / "text")
    code, _, err = photon("prepare", "-p", "tiny", "--data", "text", "--out", "text/prepared")
    assert code == 2 and "lies inside the text folder text" in err and not (tmp_path / "text" / "prepared").exists()
    code, _, err = photon("prepare", "-p", "tiny", "--data", "text/literature/sonnets.txt", "--out", "p")
    assert code == 2 and "is a file, not a folder" in err
    (tmp_path / "afile").write_text("")
    code, _, err = photon("plot", "afile")
    assert code == 2 and "afile is a file; pass a run directory" in err


def test_full_disks_read_only_places_and_out_of_memory_are_one_line_with_the_fix():
    import errno

    from safetensors import SafetensorError

    from photon.cli.main import environment_error as line
    assert "x/y: No space left on device; the disk is full" in line(OSError(errno.ENOSPC, "No space left on device",
                                                                             "x/y"))
    assert "that file system is read-only" in line(OSError(errno.EROFS, "Read-only file system", "/ro/.prep"))
    full = SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
    assert line(full).startswith("writing a checkpoint: No space left on device; the disk is full")
    alloc = RuntimeError("[enforce fail at alloc_cpu.cpp:124] data. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)")
    assert line(alloc).startswith("out of memory: ") and "train.batch_size" in line(alloc)
    for oom in (MemoryError(), RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")):
        assert line(oom).startswith("out of memory: ")
    assert "x: No such file" in line(FileNotFoundError(errno.ENOENT, "No such file or directory", "x"))
    for bug in (ValueError("max() arg is an empty sequence"), FileNotFoundError("no path"), RuntimeError("x"),
                SafetensorError("header too large")):
        assert line(bug) is None  # a traceback: not a mistake the user can fix


@pytest.mark.parametrize("args, named", [
    (("bench", "trainer", "-p", "tiny", "--settings", ","), "--settings"),
    (("bench", "compression", "-p", "tiny", "--hs", "0,-5"), "--hs '0,-5': each must be a positive number"),
    (("bench", "prepare", "--sizes", "nan"), "--sizes 'nan': each must be a positive number"),
    (("bench", "robust", "--scales", "1,-1"), "--scales '1,-1': each must be a positive number"),
    (("bench", "robust", "--settings", "4x4"), "--settings '4x4': each must be KxM with 0 < M < K"),
    (("generate", "nowhere", "--temperature", "nan"), "--temperature nan"),
    (("generate", "nowhere", "--seed", "99999999999999999999"), "--seed"),
    (("run", "-p", "tiny", "--set", "train.warmup_steps=100000"), "exceeds the federated schedule"),
    (("submit", "--superlink", "127.0.0.1:1", "--insecure", "-p", "tiny", "--set", "federation.rounds=2"),
     "exceeds the federated schedule"),
    (("run", "-p", "tiny", "--set", "train.batch_size=1000000"), "GiB this machine has: lower "),
    (("train-central", "-p", "tiny", "--set", "model.d_model=1048576", "--set", "model.n_head=1"),
     "GiB this machine has")])
def test_numbers_that_cannot_work_are_refused_before_any_work(photon, tmp_path, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    code, _, err = photon(*args)
    assert code == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_data_the_user_named_is_never_replaced_by_the_built_in_corpus(photon, tmp_path, monkeypatch):
    """A mistyped data.prep_dir, or a resumed run's data gone missing, is an error: preparing the built-in
    corpus there instead would train on other text without a word."""
    monkeypatch.chdir(tmp_path)
    code, _, err = photon("run", "--preset", "tiny", "--set", "data.prep_dir=prep_typo")
    assert code == 2 and "data.prep_dir=" in err and "prep_typo holds no prepared data" in err
    assert not (tmp_path / "prep_typo").exists() and not (tmp_path / "data").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(config_to_dict(load_config(
        "tiny", [f"data.prep_dir={tmp_path / 'gone'}"]))))
    code, _, err = photon("run", "--resume", "old")
    assert code == 2 and "gone holds no prepared data" in err and not (tmp_path / "gone").exists()
    code, _, err = photon("run", "--resume", "old", "--out", "new")
    assert code == 2 and "--out does not go with --resume" in err
    preset = tmp_path / "mine.yaml"  # a preset of one's own naming a folder not prepared yet
    preset.write_text((Path(cli.__file__).parent.parent / "presets" / "tiny.yaml").read_text().replace(
        "prep_dir: data/prepared-v1024", "prep_dir: not_prepared_yet"))
    code, _, err = photon("run", "--preset", preset)
    assert code == 2 and "not_prepared_yet holds no prepared data" in err
    assert not (tmp_path / "not_prepared_yet").exists()
    code, _, err = photon("bench", "robust", "--preset", "tiny", "--set", "data.prep_dir=bench_typo")  # benchmarks too
    assert code == 2 and "bench_typo holds no prepared data" in err and not (tmp_path / "bench_typo").exists()


def test_ports_out_of_range_or_shared_are_refused(photon):
    code, _, err = photon("server", "--port", 70000)
    assert code == 2 and "65535" in err
    code, _, err = photon("server", "--port", 9092, "--blob-port", 9092)
    assert code == 2 and "a port of its own" in err
    code, _, err = photon("server", "--port", 65535)
    assert code == 2 and "no --port + 1" in err


def test_damaged_config_files_are_one_line_errors(photon, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{")
    code, _, err = photon("run", "--resume", tmp_path / "run")
    assert code == 2 and "config.json is damaged" in err
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe")
    code, _, err = photon("run", "--preset", tmp_path / "binary.yaml")
    assert code == 2 and "not a text file" in err


def test_submit_asks_for_certs_or_insecure_before_it_looks_for_a_token(photon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = photon("submit", "--superlink", "127.0.0.1:9092")
    assert code == 2 and "exactly one of --certs DIR" in err and "token" not in err


def test_a_mistyped_command_gets_one_suggestion(photon):
    code, _, err = photon("rum")
    assert code == 2 and err.count("Did you mean 'run'?") == 1
