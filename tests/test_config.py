"""Config loading: the shipped configs, overrides, and one clear error line for bad input."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import REPO, run_cli, tiny_config, write_config
from mcjax.config import Config, load_config, mesh_shape, save_config
from mcjax.errors import ConfigError


@pytest.mark.parametrize("name", ["tiny_cpu", "run10_d12", "my_text_folder"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config) and cfg.name


def test_derived_quantities_of_the_benchmark_model():
    cfg = load_config(REPO / "configs/run10_d12.yaml")
    assert cfg.model_dim == 768  # 64 · depth
    assert cfg.model_dim // cfg.base_model.head_dim == 6
    assert cfg.training.grad_accum_steps == 8
    assert cfg.tokens_per_step == 256 * 2048
    assert cfg.total_steps == 2621440000 // (256 * 2048)


def test_overrides_are_typed_and_nested(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    cfg = load_config(path, ["training.seed=7", "base_model.softcap=10", "run_name=other", "telemetry.jsonl=false"])
    assert cfg.training.seed == 7
    assert cfg.base_model.softcap == 10.0 and isinstance(cfg.base_model.softcap, float)
    assert cfg.run == "other" and cfg.telemetry.jsonl is False


def test_save_config_round_trips(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))
    save_config(cfg, tmp_path / "mirror.yaml")
    again = load_config(tmp_path / "mirror.yaml")
    assert dataclasses.replace(again, source_file=cfg.source_file) == cfg


def _error(tmp_path, overrides=(), **sections) -> str:
    path = write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, **sections))
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_unknown_key_names_key_and_file(tmp_path):
    assert "unknown key training.batchsize" in _error(tmp_path, training={"batchsize": 3})


def test_unknown_key_in_override(tmp_path):
    assert "unknown key base_model.widht" in _error(tmp_path, ["base_model.widht=3"])


def test_wrong_type(tmp_path):
    msg = _error(tmp_path, training={"batch_size": "eight"})
    assert "training.batch_size: expected an integer, got str 'eight'" in msg


def test_bool_is_not_an_int(tmp_path):
    assert "training.seed: expected an integer" in _error(tmp_path, ["training.seed=true"])


# YAML 1.1 reads an exponent as a float only with a dot and a sign (`1.0e+6`): `3e-4`, `1e-3`,
# `1.0e6` reach the loader as strings. Float keys take whatever float() reads, however YAML typed it.
SPELLINGS = ["3e-4", "1e-3", "1.0e6", "1.0e+6", "2E-2", ".5e-1", "1_000.5", "7"]


def _file_with_lr(tmp_path, text: str):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, training={"matrix_lr": 0.5}))
    path.write_text(path.read_text().replace("matrix_lr: 0.5", f"matrix_lr: {text}"))
    assert f"matrix_lr: {text}\n" in path.read_text()
    return path


@pytest.mark.parametrize("text", SPELLINGS)
def test_float_keys_take_every_float_spelling_in_files(tmp_path, text):
    cfg = load_config(_file_with_lr(tmp_path, text))
    assert cfg.training.matrix_lr == float(text) and type(cfg.training.matrix_lr) is float


@pytest.mark.parametrize("text", SPELLINGS)
def test_float_keys_take_every_float_spelling_in_overrides(tmp_path, text):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    cfg = load_config(path, [f"training.matrix_lr={text}", f"megacontext.lens_temperature={text}"])
    assert cfg.training.matrix_lr == cfg.megacontext.lens_temperature == float(text)
    assert type(cfg.training.matrix_lr) is float


def test_scientific_notation_still_meets_the_range_checks(tmp_path):
    assert "training.matrix_lr: must be ≥ 0, got -200000.0" in _error(tmp_path, ["training.matrix_lr=-2E+5"])


@pytest.mark.parametrize("text, shown", [("abc", "str 'abc'"), ("1e", "str '1e'"), ("''", "str ''"), ("true", "bool True")])
def test_float_keys_reject_non_numbers_in_files(tmp_path, text, shown):
    path = _file_with_lr(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: training.matrix_lr: expected a number, got {shown}"


@pytest.mark.parametrize("text, shown", [("abc", "str 'abc'"), ("1e", "str '1e'"), ("1e-3x", "str '1e-3x'"), ("", "nothing")])
def test_float_keys_reject_non_numbers_in_overrides(tmp_path, text, shown):
    msg = _error(tmp_path, [f"training.matrix_lr={text}"])
    assert msg.endswith(f": training.matrix_lr: expected a number, got {shown}")


@pytest.mark.parametrize("text, shown", [("nan", "str 'nan'"), ("-inf", "str '-inf'"), ("Infinity", "str 'Infinity'"),
                                         (".nan", "float nan"), (".inf", "float inf"), ("1e999", "str '1e999'")])
def test_float_keys_reject_nan_and_infinity(tmp_path, text, shown):
    # float() reads them, but no key means anything by them, and `lr < 0` would let NaN through
    msg = _error(tmp_path, [f"training.matrix_lr={text}"])
    assert msg.endswith(f": training.matrix_lr: expected a finite number, got {shown}")


def test_integer_keys_stay_strict(tmp_path):
    assert _error(tmp_path, ["training.max_steps=1e3"]).endswith(": training.max_steps: expected an integer, got str '1e3'")
    assert "training.max_steps: expected an integer, got float 1000.0" in _error(tmp_path, ["training.max_steps=1.0e+3"])


def test_context_not_multiple_of_block(tmp_path):
    msg = _error(tmp_path, ["dataset.context_tokens=100"])
    assert "dataset.context_tokens: must be a positive multiple of dataset.block_size (32), got 100" in msg


def test_horizon_must_be_shorter_than_context(tmp_path):
    assert "dataset.horizon" in _error(tmp_path, ["dataset.horizon=64"])


def test_choice_values(tmp_path):
    assert "base_model.remat: must be one of none, full, save_dots" in _error(tmp_path, ["base_model.remat=all"])
    assert "gistnet.kind: must be one of mean, transformer" in _error(tmp_path, ["gistnet.kind=conv"])


def test_micro_batch_must_divide_batch(tmp_path):
    assert "training.micro_batch_size" in _error(tmp_path, ["training.micro_batch_size=3"])


def test_exactly_one_of_steps_and_budget(tmp_path):
    assert "exactly one of" in _error(tmp_path, ["training.token_budget=1000"])


def test_missing_required_key(tmp_path):
    cfg = tiny_config(tmp_path)
    del cfg["dataset"]["splits"]
    path = write_config(tmp_path / "bad.yaml", cfg)
    with pytest.raises(ConfigError, match="missing required key dataset.splits"):
        load_config(path)


def test_bad_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndataset: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml \(line \d+\): not valid YAML"):
        load_config(path)


def test_mesh_must_divide_devices(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, mesh={"data": -1, "fsdp": 3})))
    with pytest.raises(ConfigError, match="data×fsdp×tensor = 3 does not divide the 8 devices"):
        mesh_shape(cfg, 8)
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, mesh={"data": 2, "fsdp": 2})))
    assert mesh_shape(cfg, 4) == {"data": 2, "fsdp": 2, "tensor": 1}
    with pytest.raises(ConfigError, match="but 8 devices are present"):
        mesh_shape(cfg, 8)


def test_batch_must_split_over_data_parallel_devices(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path)))  # micro-batch 4
    with pytest.raises(ConfigError, match="do not split over data×fsdp = 8 devices"):
        mesh_shape(cfg, 8)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write_config(tmp_path / "bad.yaml", tiny_config(tmp_path, training={"batch_size": 0}))
    res = run_cli(["train", "--config", str(path)], cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"mcjax: error: {path}: training.batch_size: must be ≥ 1, got 0"]
    assert "Traceback" not in res.stderr


def test_wc_capacity_must_hold_tail_plus_one_block(tmp_path):
    msg = _error(tmp_path, ["megacontext.wc_capacity=40"])  # tail 32 + block 32 = 64
    assert "megacontext.wc_capacity: 40 is smaller than the protected tail (32) plus one block (32)" in msg


def test_wc_capacity_must_hold_the_most_compressed_layout(tmp_path):
    from mcjax.config import min_wc_entries

    # T = 2048, K = 32: 64 blocks; tail 128 tokens = 4 blocks; 60 older blocks = 1 LOD2 + 28 LOD1
    assert min_wc_entries(64, 32, 128, 2) == 128 + 1 + 28
    assert min_wc_entries(64, 32, 128, 1) == 128 + 60
    msg = _error(tmp_path, ["dataset.context_tokens=2048", "megacontext.recent_tokens=128",
                            "megacontext.wc_capacity=160", "megacontext.max_lod=1"])
    assert "cannot hold even the most compressed layout of 2048 tokens (188 entries)" in msg


def test_the_protected_head_is_counted_and_checked(tmp_path):
    from mcjax.config import min_wc_entries

    # T = 4096, K = 32, tail 4 blocks, head 1 block: superblock 0 holds the head and 3 the
    # tail, so superblocks 1 and 2 collapse to LOD2 and blocks 1-31 and 96-123 stay LOD1 gists
    assert min_wc_entries(128, 32, 128, 2, 32) == (4 + 1) * 32 + 2 + 31 + 28
    assert min_wc_entries(128, 32, 128, 1, 32) == (4 + 1) * 32 + 123
    assert min_wc_entries(128, 32, 128, 2) == 4 * 32 + 3 + 28  # without a head superblock 0 collapses too
    assert "megacontext.sink_tokens: must be a multiple of dataset.block_size (32)" in _error(
        tmp_path, ["megacontext.sink_tokens=16"])
    msg = _error(tmp_path, ["dataset.context_tokens=256", "megacontext.sink_tokens=32", "megacontext.wc_capacity=64"])
    assert "megacontext.wc_capacity: 64 is smaller than the protected tail (32) and head (32) plus one block (32)" in msg


def test_tail_must_cover_horizon(tmp_path):
    msg = _error(tmp_path, ["dataset.horizon=48"])
    assert "megacontext.recent_tokens: the protected tail (32) must cover dataset.horizon (48)" in msg


def test_tail_in_whole_blocks(tmp_path):
    assert "multiple of dataset.block_size (32)" in _error(tmp_path, ["megacontext.recent_tokens=40"])


def test_unknown_modes(tmp_path):
    assert "allocator.policy: must be one of greedy, stochastic" in _error(tmp_path, ["allocator.policy=best"])
    assert "gistnet.pooling: must be one of mean, query, cls" in _error(tmp_path, ["gistnet.pooling=max"])
    assert "megacontext.rope: must be one of gaussian, simple" in _error(tmp_path, ["megacontext.rope=alibi"])
    assert "megacontext.max_lod: must be 1 or 2" in _error(tmp_path, ["megacontext.max_lod=3"])


def test_allocator_values(tmp_path):
    assert "allocator.expand_threshold: must be in [0, 1]" in _error(tmp_path, ["allocator.expand_threshold=1.5"])
    assert "allocator.max_replacements: must be ≥ 1" in _error(tmp_path, ["allocator.max_replacements=0"])
    assert "allocator.span_blocks: must be in 1..8" in _error(tmp_path, ["allocator.span_blocks=0"])
    assert "allocator.span_back: must be in 0..7 (0 = no block lends to the one before it), got 8" in _error(
        tmp_path, ["allocator.span_back=8"])
    assert "lensnet.num_heads" in _error(tmp_path, ["lensnet.num_heads=3"])
    assert "gistnet.width: must be an even number in [2, model_dim = 64]" in _error(tmp_path, ["gistnet.width=128"])
    assert "gistnet.num_heads: must split gistnet width 32 into even-sized heads, got 3" in _error(
        tmp_path, ["gistnet.width=32", "gistnet.num_heads=3"])


def test_list_keys_round_trip_and_check_their_items(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, eval={"wmax": [128, 512], "targets": ["1e-1", 0.5]}))
    cfg = load_config(path, ["eval.horizons=[8,16]"])
    assert cfg.eval.wmax == (128, 512) and cfg.eval.targets == (0.1, 0.5) and cfg.eval.horizons == (8, 16)
    save_config(cfg, tmp_path / "mirror.yaml")
    assert load_config(tmp_path / "mirror.yaml") == dataclasses.replace(cfg, source_file=str(tmp_path / "mirror.yaml"))
    with pytest.raises(ConfigError, match=r"c.yaml: eval.wmax: expected a list, got int 5"):
        load_config(path, ["eval.wmax=5"])
    with pytest.raises(ConfigError, match=r"c.yaml: eval.wmax\[1\]: expected an integer, got str 'x'"):
        load_config(path, ["eval.wmax=[64,x]"])
    with pytest.raises(ConfigError, match=r"eval.targets: must be a non-empty list of fractions in \(0, 1\], got \[1.5\]"):
        load_config(path, ["eval.targets=[1.5]"])
    with pytest.raises(ConfigError, match=r"dataset.eval_fraction: must be in \[0, 1\), got 1.0"):
        load_config(path, ["dataset.eval_fraction=1"])
    assert load_config(path, ["eval.retrieval_methods=[megacontext]"]).eval.retrieval_methods == ("megacontext",)
    for bad in ("[]", "[full,full]", "[truncation]"):
        with pytest.raises(ConfigError, match=r"eval.retrieval_methods: must list distinct engines of full, megacontext, recency"):
            load_config(path, [f"eval.retrieval_methods={bad}"])
