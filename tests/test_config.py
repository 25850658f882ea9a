"""Config: every preset validates, overrides parse, and every mistake is a UserError that names the key."""

import copy
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from photon.config import (
    PRESET_DIR,
    RunConfig,
    _is_text_field,
    _set_path,
    build_config,
    config_to_dict,
    load_config,
    parse_override,
    preset_names,
    same_config,
)
from photon.errors import UserError


def test_preset_registry_runs_from_tiny_to_paper_7b():
    names = preset_names()
    assert {"tiny", "small", "paper-125m", "paper-350m", "paper-1.3b", "paper-3b", "paper-7b"} <= set(names)
    assert names == sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig) and cfg.name == name
    assert cfg.model.d_model % cfg.model.n_head == 0
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    assert cfg.federation.clients_per_round <= cfg.data.partition.num_clients
    assert build_config(config_to_dict(cfg)) == cfg  # the JSON saved in run dirs rebuilds the same config


def test_paper_presets_follow_the_paper_recipe():
    for name in ("paper-125m", "paper-350m", "paper-1.3b", "paper-3b", "paper-7b"):
        cfg = load_config(name)
        assert cfg.model.max_seq_len == cfg.train.seq_len == 2048
        assert cfg.model.vocab_size == 50304
        assert cfg.train.lr == pytest.approx(6e-4) and cfg.train.min_lr_ratio == pytest.approx(0.1)
        assert cfg.federation.outer.name == "fedavg" and cfg.federation.outer.lr == 1.0


def test_overrides_parse_numbers_bools_and_nested_keys():
    cfg = load_config("tiny", ["train.lr=3e-4", "train.bf16=true", "train.steps=300",
                               "federation.outer.name=nesterov", "federation.outer.lr=0.7",
                               "data.partition.alpha=1e-1", "data.partition.kind=dirichlet"])
    assert cfg.train.lr == 0.0003 and isinstance(cfg.train.lr, float)
    assert cfg.train.bf16 is True and cfg.train.steps == 300
    assert cfg.federation.outer.name == "nesterov" and cfg.federation.outer.lr == 0.7
    assert cfg.data.partition.alpha == 0.1 and cfg.data.partition.kind == "dirichlet"
    assert cfg.model == load_config("tiny").model  # untouched sections keep the preset's values


def test_parse_override_values():
    # Float-looking strings stay strings here (YAML 1.1 wants a dot): pydantic converts them for float
    # fields, and a path field keeps them verbatim.
    assert parse_override("train.lr=3e-4") == ("train.lr", "3e-4")
    assert load_config("tiny", ["train.lr=3e-4"]).train.lr == 0.0003
    assert parse_override("data.prep_dir=/my data #1") == ("data.prep_dir", "/my data #1")
    assert parse_override(" train.steps = 12") == ("train.steps", 12)
    assert parse_override("train.bf16=false") == ("train.bf16", False)
    assert parse_override("train.threads=") == ("train.threads", None)
    assert parse_override("data.prep_dir=/a=b") == ("data.prep_dir", "/a=b")  # split on the first '='
    assert parse_override("federation.faults.fail_clients=[1, 2]")[1] == [1, 2]
    for bad in ("train.lr", "=3", ""):
        with pytest.raises(UserError, match="KEY=VALUE"):
            parse_override(bad)


def test_override_through_a_value_is_refused():
    with pytest.raises(UserError, match="'lr' is not a section"):
        load_config("tiny", ["train.lr.x=1"])


@pytest.mark.parametrize("override, key", [("train.lrr=1", "train.lrr"), ("modle.n_layer=2", "modle"),
                                           ("federation.outer.nam=fedavg", "federation.outer.nam"), ("x=1", "x")])
def test_unknown_key_is_named(override, key):
    with pytest.raises(UserError, match=re.escape(key) + ": unknown key"):
        load_config("tiny", [override])


@pytest.mark.parametrize("override, named", [
    ("train.lr=-1e-3", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("federation.local_steps=0", "federation.local_steps"),
    ("federation.clients_per_round=5", "federation.clients_per_round"),
    ("train.seq_len=256", "train.seq_len"),
    ("model.n_head=3", "model.n_head"),
    ("model.d_model=36", "model.d_model / model.n_head"),  # head dim 9: rotary embeddings need it even
    ("federation.faults.reply={9: flip}", "federation.faults names client 9"),
    ("train.beta2=1.0", "train.beta2"),
    ("data.val_fraction=0.5", "data.val_fraction"),
    ("federation.min_replies=3", "federation.min_replies"),
    ("model.n_kv_head=3", "model.n_kv_head"),
    ("train.steps=ten", "train.steps"),
])
def test_out_of_range_values_are_named(override, named):
    with pytest.raises(UserError, match=re.escape(named)) as e:
        load_config("tiny", [override])
    assert str(e.value).startswith("bad config:") and "\n" not in str(e.value)


def test_several_errors_are_reported_together():
    with pytest.raises(UserError) as e:
        load_config("tiny", ["train.lr=-1", "train.batch_size=0", "federation.rounds=0"])
    for key in ("train.lr", "train.batch_size", "federation.rounds"):
        assert key in str(e.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(UserError) as e:
        load_config("tinyy")
    msg = str(e.value)
    assert "'tinyy'" in msg
    for name in preset_names():
        assert name in msg


def test_yaml_file_path_as_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("# my run\nmodel: {vocab_size: 512, n_layer: 1, d_model: 32, n_head: 2, max_seq_len: 64}\n"
                    "train: {seq_len: 32, lr: 3e-4, warmup_steps: 0, steps: 10}\n")
    cfg = load_config(path, ["train.steps=20"])
    assert cfg.name == "mine"
    assert cfg.model.n_layer == 1 and cfg.train.lr == 3e-4 and cfg.train.steps == 20
    assert cfg.federation == RunConfig().federation  # absent sections take the defaults
    (tmp_path / "empty.yml").write_text("")
    assert load_config(tmp_path / "empty.yml", ["train.seq_len=64", "model.max_seq_len=64"]).name == "empty"


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {n_layer: 2}\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(UserError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "not valid YAML" in msg
    line = int(msg.split(" line ")[1].split(":")[0])
    assert 3 <= line <= 4  # PyYAML marks where it noticed: the open list on line 3, or just after it


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(path)



def test_yaml_file_with_a_numeric_name(tmp_path):
    path = tmp_path / "2024.yaml"
    path.write_text("train: {steps: 300}\n")
    assert load_config(path).name == "2024"


@pytest.mark.parametrize("path", ["2024", "1e3", "/tmp/my data #1", "010", "0x10", "1_000", "no", "2024-01-01",
                                  "[x]", "a: b"])
def test_path_override_is_taken_verbatim(path):
    """YAML would read 010 as 8, 0x10 as 16, no as False, a date as a date: a folder's name is its name."""
    assert str(load_config("tiny", [f"data.prep_dir={path}"]).data.prep_dir) == path
    if "/" not in path:
        assert load_config("tiny", [f"name={path}"]).name == path
    else:  # a name is part of the default run folder's name
        with pytest.raises(UserError, match="name: .* is used in folder names"):
            load_config("tiny", [f"name={path}"])


def test_a_yaml_preset_with_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.001\nfederation:\n  rounds: 2\ntrain:\n  steps: 5\n")
    with pytest.raises(UserError, match=r"dup.yaml line 5: .*key 'train' is given twice"):
        load_config(path)


def test_an_override_with_an_empty_key_part_is_refused():
    for bad in (".lr=3", "train..lr=3", "train.=3"):
        with pytest.raises(UserError, match="dotted KEY"):
            parse_override(bad)


def test_a_quoted_text_value_loses_its_quotes_and_an_empty_one_is_refused():
    assert load_config("tiny", ['data.prep_dir="/my data"']).data.prep_dir == Path("/my data")
    assert load_config("tiny", ["name='my run'"]).name == "my run"
    for empty in ("data.prep_dir=", "name="):
        with pytest.raises(UserError, match=empty.removesuffix("=")):
            load_config("tiny", [empty])


@pytest.mark.parametrize("override", ["model.init_std=.inf", "federation.outer.lr=.inf", "train.eps=-.inf",
                                      "train.weight_decay=.nan"])
def test_infinite_and_nan_values_are_refused(override):
    with pytest.raises(UserError, match=rf"{override.split('=')[0]}: Input should be a finite number"):
        load_config("tiny", [override])


# ---------------------------------------------------------------------------------------------------------
# Properties

_segment = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
_value = st.one_of(
    st.integers(-10**12, 10**12),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.booleans(),
    # Plain words, except the ones YAML 1.1 reads as bools/null (yes, off, null) or Python as floats (inf, nan).
    st.from_regex(r"[a-z][a-z0-9_/-]{0,12}", fullmatch=True).filter(
        lambda s: yaml.safe_load(s) == s and _not_float(s)),
)


def _not_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


@settings(max_examples=200, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=4), _value)
def test_override_round_trips_through_parse_and_set_path(keys, value):
    dotted = ".".join(keys)
    assume(not _is_text_field(dotted))  # a path or text field keeps the value's text (test above)
    text = f"{dotted}={value!r}" if not isinstance(value, str) else f"{dotted}={value}"
    if isinstance(value, bool):
        text = f"{dotted}={str(value).lower()}"
    key, parsed = parse_override(text)
    assert key == dotted
    if isinstance(value, float) and isinstance(parsed, str):  # "1e-05": pydantic converts it later
        parsed = float(parsed)
    assert parsed == value and type(parsed) is type(value)
    tree: dict = {}
    _set_path(tree, key, parsed)
    node = tree
    for k in keys[:-1]:
        node = node[k]
    assert node[keys[-1]] == value


_NUMERIC_FIELDS = [
    f"{section}.{name}"
    for section, model in [("model", RunConfig().model), ("train", RunConfig().train),
                           ("federation", RunConfig().federation), ("data", RunConfig().data),
                           ("data.partition", RunConfig().data.partition),
                           ("federation.outer", RunConfig().federation.outer)]
    for name, value in model.model_dump().items()
    if isinstance(value, (int, float)) or value is None
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_NUMERIC_FIELDS),
       st.one_of(st.integers(-2**40, 2**40), st.floats(width=64), st.booleans()))
def test_any_number_on_a_numeric_field_validates_or_is_a_user_error(field, value):
    text = f"{field}={str(value).lower() if isinstance(value, bool) else repr(value)}"
    try:
        cfg = load_config("tiny", [text])
    except UserError as e:
        assert field.rsplit(".", 1)[-1] in str(e)
        return
    got = config_to_dict(cfg)
    for k in field.split("."):
        got = got[k]
    if isinstance(value, float) and math.isfinite(value) and not isinstance(got, bool) and got is not None:
        assert got == pytest.approx(value)


def test_the_codec_configs_choices_and_bounds_are_the_codecs_own():
    """The config checks a codec's settings with the codec's own choices and bounds (federation/codec.py), so a
    config that loads always encodes."""
    import typing

    from photon.config import CodecConfig
    from photon.federation import codec

    fields = CodecConfig.model_fields
    assert typing.get_args(fields["codec"].annotation) == (*codec.CODECS, "replies")  # replies: down only
    assert typing.get_args(fields["values"].annotation) == codec.CODECS[:-1]
    assert next(m.le for m in fields["block_size"].metadata if hasattr(m, "le")) == codec.MAX_BLOCK
    assert next(m.le for m in fields["chunk"].metadata if hasattr(m, "le")) == codec.MAX_CHUNK
    assert typing.get_args(fields["two_bit"].annotation) == ("sign", "codebook")


@pytest.mark.parametrize("radius", ["0", "-2", "inf", "mean"])
def test_a_clipping_radius_must_be_positive_finite_or_median(radius):
    with pytest.raises(UserError, match="federation.clipping.radius"):
        load_config("tiny", [f"federation.clipping.radius={radius}"])
    assert load_config("tiny", ["federation.clipping.radius=2"]).federation.clipping.radius == 2.0


def test_a_stored_config_matches_unless_a_field_differs_or_an_added_field_left_its_default():
    def cfg(*extra):
        return config_to_dict(load_config("tiny", ["federation.rounds=3", "federation.mode=async", *extra]))

    current = cfg()
    older = copy.deepcopy(current)
    del older["federation"]["asynchronous"]["staleness"]  # a field added since, at its default
    del older["federation"]["faults"]                     # a whole section added since, at its defaults
    assert same_config(current, current) and same_config(older, current)
    assert not same_config(older, cfg("federation.asynchronous.staleness=constant"))  # not at its default
    assert not same_config(older, cfg("federation.rounds=4"))
    # a field whose default changed since it was added: its absence means the value it had then
    flipped = copy.deepcopy(current)
    del flipped["federation"]["asynchronous"]["fold_arrived_together"]
    assert not same_config(flipped, current)
    assert same_config(flipped, cfg("federation.asynchronous.fold_arrived_together=false"))
    sync = {**flipped, "federation": {**flipped["federation"], "mode": "sync"}}
    assert same_config(sync, {**current, "federation": {**current["federation"], "mode": "sync"}})  # never read
    removed = copy.deepcopy(current)
    removed["federation"]["gone"] = 1                     # a field removed since
    assert not same_config(removed, current)
