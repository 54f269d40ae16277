"""Config loading: YAML + base chains + dotted overrides into typed dataclasses, and its errors."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from tests.helpers import DEMO_CONFIG


def write(path, text: str):
    path.write_text(textwrap.dedent(text))
    return path


def test_demo_config_loads_with_its_values():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.cam.backbone == "resnet18"
    assert cfg.cam.weights is None
    assert cfg.source == str(DEMO_CONFIG)
    # untouched sections keep their defaults
    assert cfg.run.workdir == "runs"


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.cam.eval_bg_threshold == 0.15
    assert cfg.cam.scales == [1.0, 0.5, 1.5, 2.0]


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(
        tmp_path / "typo.yaml",
        """
        cam:
          epoch: 3
    """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "'cam.epoch'" in message
    assert "did you mean 'cam.epochs'" in message
    assert "\n" not in message


def test_unknown_section_is_an_error(tmp_path):
    path = write(tmp_path / "c.yaml", "camm: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'camm' \(did you mean 'cam'\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    "text, key, kind",
    [
        ("cam: {epochs: three}", "cam.epochs", "integer"),
        ("cam: {epochs: 2.5}", "cam.epochs", "integer"),
        ("cam: {lr: fast}", "cam.lr", "number"),
        ("cam: {flip: 1}", "cam.flip", "true or false"),
        ("cam: {scales: 1.0}", "cam.scales", "list"),
        ("cam: {scales: [1.0, big]}", "cam.scales[1]", "number"),
        ("cam: {backbone: resnet99}", "cam.backbone", "one of"),
        ("cam: {epochs: true}", "cam.epochs", "integer"),
        ("cam: 3", "cam", "mapping"),
    ],
)
def test_wrong_types_name_file_and_key(tmp_path, text, key, kind):
    path = write(tmp_path / "bad.yaml", text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and key in message and kind in message


def test_floats_in_any_yaml_spelling(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; the loader must still make it a float
    path = write(
        tmp_path / "f.yaml",
        """
        cam:
          lr: 1e-4
          weight_decay: 5.0e-3
          eval_bg_threshold: 1
    """,
    )
    cfg = load_config(path)
    assert cfg.cam.lr == pytest.approx(1e-4) and isinstance(cfg.cam.lr, float)
    assert cfg.cam.weight_decay == pytest.approx(5e-3)
    assert cfg.cam.eval_bg_threshold == 1.0 and isinstance(cfg.cam.eval_bg_threshold, float)
    cfg = load_config(path, ["cam.lr=3e-3"])
    assert cfg.cam.lr == pytest.approx(3e-3)


def test_base_chain_later_files_win(tmp_path):
    write(
        tmp_path / "root.yaml",
        """
        cam: {epochs: 1, lr: 0.5, scales: [1.0, 2.0]}
        run: {seed: 7}
    """,
    )
    (tmp_path / "sub").mkdir()
    write(
        tmp_path / "sub" / "middle.yaml",
        """
        base: ../root.yaml
        cam: {epochs: 2}
    """,
    )
    top = write(
        tmp_path / "sub" / "top.yaml",
        """
        base: middle.yaml
        cam: {batch_size: 4}
    """,
    )
    cfg = load_config(top)
    assert (cfg.cam.epochs, cfg.cam.lr, cfg.cam.batch_size, cfg.run.seed) == (2, 0.5, 4, 7)
    assert cfg.cam.scales == [1.0, 2.0]


def test_a_section_left_empty_changes_nothing(tmp_path):
    """`cam:` with every key commented out reads as null: it must not wipe the layer below."""
    write(tmp_path / "a.yaml", "cam: {epochs: 3, backbone: resnet18}\n")
    write(tmp_path / "b.yaml", "cam:\n  # epochs: 9\nseg: {epochs: 2}\n")
    write(tmp_path / "c.yaml", "base: a.yaml\ncam:\nirn:\n  crf:\n")
    for cfg in (load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"]), load_config(tmp_path / "c.yaml")):
        assert (cfg.cam.epochs, cfg.cam.backbone) == (3, "resnet18")
    cfg = load_config(tmp_path / "c.yaml", ["cam.lr=0.5", "irn.crf.gauss_sxy=4"])
    assert (cfg.cam.lr, cfg.cam.epochs, cfg.irn.crf.gauss_sxy) == (0.5, 3, 4.0)


def test_base_loop_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "c.yaml")


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(
        DEMO_CONFIG,
        [
            "cam.epochs=3",
            "cam.scales=[1.0, 0.5]",
            "cam.weights=null",
            "run.device=cpu",
            "cam.flip=false",
            "data.root=/x/y",
        ],
    )
    assert cfg.cam.epochs == 3
    assert cfg.cam.scales == [1.0, 0.5]
    assert cfg.cam.weights is None
    assert cfg.run.device == "cpu"
    assert cfg.cam.flip is False
    assert cfg.data.root == "/x/y"


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"unknown key 'cam.epochz'.*did you mean 'cam.epochs'"):
        load_config(DEMO_CONFIG, ["cam.epochz=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(DEMO_CONFIG, ["cam.epochs"])
    with pytest.raises(ConfigError, match=r"^override 'cam.epochs=many': cam.epochs must be an integer"):
        load_config(DEMO_CONFIG, ["cam.epochs=3", "cam.epochs=many"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("cam.lr=-1", "cam.lr must be > 0, got -1.0"),
        ("seg.epochs=0", "seg.epochs must be >= 1, got 0"),
        ("irn.conf_fg_threshold=30", r"irn.conf_fg_threshold must be in \[0, 1\], got 30.0"),
        ("irn.crf.gt_prob=1", r"irn.crf.gt_prob must be in \(0, 0.99\], got 1.0"),
        ("cam.scales=[1.0, 0]", "cam.scales must be > 0, got 0.0"),
        ("cam.multiscale_stages=[2, 5]", r"cam.multiscale_stages must be in \[0, 4\], got 5"),
        ("irn.resize_long=[640, 320]", r"irn.resize_long must be \[shortest, longest\] long side"),
        ("run.device=gpu", "run.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("run.workers=-3", "run.workers must be >= -1"),
        ("run.seed=-1", "run.seed must be >= 0, got -1"),
        ("cam.lr=nan", "cam.lr must be a finite number, got nan"),
        ("cam.lr=.inf", "cam.lr must be a finite number, got inf"),
        ("cam.scales=[]", "cam.scales must not be empty"),
        ("seg.losses={}", "seg.losses must not be empty"),
        ("seg.losses={ce: -1.0}", "seg.losses must be >= 0, got -1.0"),
        ("seg.holdout_fraction=0", r"seg.holdout_fraction must be in \(0, 0.9\], got 0.0"),
        ("cam.frozen_stages=5", r"cam.frozen_stages must be in \[-1, 4\], got 5"),
    ],
)
def test_values_out_of_range_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO_CONFIG, [override])


def test_mapping_settings_are_replaced_whole_and_sections_merge(tmp_path):
    """A file over its base, or a second -c file, replaces `seg.losses` whole (as -o does), and
    merges sections and nested sections (irn.crf) key by key."""
    base = write(
        tmp_path / "base.yaml",
        """
        seg: {losses: {ce: 1.0, dice: 1.0}, epochs: 3}
        irn: {crf: {gauss_sxy: 2, bilateral_sxy: 13}}
    """,
    )
    layer = """
        seg: {losses: {lovasz: 1.0}}
        irn: {crf: {gauss_sxy: 4}}
    """
    top = write(tmp_path / "top.yaml", "base: base.yaml\n" + textwrap.dedent(layer))
    for cfg in (load_config(top), load_config([base, write(tmp_path / "layer.yaml", layer)])):
        assert cfg.seg.losses == {"lovasz": 1.0} and cfg.seg.epochs == 3
        assert cfg.irn.crf.gauss_sxy == 4 and cfg.irn.crf.bilateral_sxy == 13
    assert load_config(top, ["seg.losses={focal: 2}"]).seg.losses == {"focal": 2.0}
    for override in ["irn.crf={gauss_sxy: 5}", "irn={crf: {gauss_sxy: 5}}"]:  # -o merges as a file does
        crf = load_config(top, [override]).irn.crf
        assert crf.gauss_sxy == 5 and crf.bilateral_sxy == 13, override


def test_a_dotted_key_inside_a_mapping_setting_changes_one_entry(tmp_path):
    """`-o seg.losses.dice=2` keeps the other losses whether they come from the file or the default."""
    from_file = write(tmp_path / "with.yaml", "seg: {losses: {ce: 1.0, lovasz: 0.5}}\n")
    without = write(tmp_path / "without.yaml", "seg: {epochs: 2}\n")
    assert load_config(from_file, ["seg.losses.dice=2"]).seg.losses == {"ce": 1.0, "lovasz": 0.5, "dice": 2.0}
    assert load_config(without, ["seg.losses.dice=2"]).seg.losses == {"ce": 1.0, "dice": 2.0}
    assert load_config(None, ["seg.losses.focal=1", "seg.losses.ce=0.5"]).seg.losses == {
        "ce": 0.5,
        "dice": 1.0,
        "focal": 1.0,
    }


def test_text_settings_keep_what_was_typed(tmp_path):
    """YAML reads 1.10 as the number 1.1 and 010 as 8: an override of a text setting keeps the
    text; a file must quote it."""
    cfg = load_config(None, ["data.train_split=1.10", "data.val_split=010", "cam.weights=0x1F", "run.workdir=12:30"])
    assert (cfg.data.train_split, cfg.data.val_split, cfg.cam.weights, cfg.run.workdir) == (
        "1.10",
        "010",
        "0x1F",
        "12:30",
    )
    assert load_config(None, ["cam.weights=null"]).cam.weights is None
    path = write(tmp_path / "c.yaml", "data: {train_split: 1.10}\n")
    with pytest.raises(ConfigError, match=r"data.train_split must be a string \(put it in quotes\), got 1.1"):
        load_config(path)
    assert load_config(write(tmp_path / "q.yaml", "data: {train_split: '1.10'}\n")).data.train_split == "1.10"


def test_an_error_in_a_base_file_names_that_file(tmp_path):
    parent = write(tmp_path / "parent.yaml", "cam: {epoch: 3}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\n")
    with pytest.raises(ConfigError, match=rf"^{parent}: unknown key 'cam.epoch'"):
        load_config(child)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"base: 3\n", "base must be the path of one config file, got 3"),
        (b"base: [a.yaml]\n", "base must be the path of one config file"),
        (b"cam: {epochs: 3}\n# caf\xe9\n", "not a UTF-8 text file"),
    ],
)
def test_unreadable_config_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_suggested_commands_carry_the_overrides():
    cfg = load_config(DEMO_CONFIG, ["irn.conf_fg_threshold=0.9", "run.workdir=my runs"])
    assert cfg.cli_args() == f"-c {DEMO_CONFIG} -o irn.conf_fg_threshold=0.9 -o 'run.workdir=my runs'"


def test_values_at_the_edges_of_their_ranges_load():
    cfg = load_config(
        DEMO_CONFIG,
        [
            "irn.conf_bg_threshold=0",
            "seg.threshold=1",
            "run.device=cuda:3",
            "run.workers=-1",
            "cam.resize_long=[128, 128]",
            "irn.exp_times=0",
        ],
    )
    assert cfg.run.device == "cuda:3" and cfg.irn.exp_times == 0


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = write(tmp_path / "bad.yaml", "cam: [unclosed\nirn: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(bad)
    assert "\n" not in str(error.value) and "line 2, column 4" in str(error.value)
    top_list = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top_list)


def test_dump_round_trips(tmp_path):
    cfg = load_config(DEMO_CONFIG, ["cam.epochs=3", "cam.lr=1e-4"])
    dumped = write(tmp_path / "dumped.yaml", cfg.dump())
    again = load_config(dumped)
    assert again.to_dict() == cfg.to_dict()


def test_config_show_cli(cli):
    result = cli("config", "show", "-c", DEMO_CONFIG, "-o", "cam.epochs=3")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["cam"]["epochs"] == 3
    assert {"data", "run", "cam"} <= set(shown)


def test_config_typo_on_the_cli_is_one_line(cli):
    result = cli("config", "show", "-c", DEMO_CONFIG, "-o", "cam.epoch=3")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'cam.epochs'" in lines[0]


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("cam:\n  epochs: 3\nirn:\n  epochs: 2\ncam:\n  lr: 0.1\n", "'cam'", "lines 1 and 5"),
        ("cam:\n  epochs: 3\n  lr: 0.1\n  'epochs': 4\n", "'cam.epochs'", "lines 2 and 4"),
        (
            "irn:\n  crf:\n    gauss_sxy: 3\n    bilateral_sxy: 9\n    gauss_sxy: 4\n",
            "'irn.crf.gauss_sxy'",
            "lines 3 and 5",
        ),
        ("seg:\n  losses: {ce: 1.0, dice: 1.0, ce: 2.0}\n", "'seg.losses.ce'", "lines 2 and 2"),
    ],
)
def test_a_key_given_twice_names_both_lines(tmp_path, text, key, lines):
    """PyYAML keeps the last of two equal keys: a second `cam:` section would silently drop the
    first's settings."""
    path = write(tmp_path / "twice.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: key {key} appears twice, at {lines}") and "\n" not in message


def test_a_key_given_twice_in_a_base_file_names_the_base(tmp_path):
    parent = write(tmp_path / "parent.yaml", "cam: {epochs: 3}\ncam: {lr: 0.1}\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\ncam: {epochs: 4}\n")
    with pytest.raises(ConfigError, match=rf"^{parent}: key 'cam' appears twice, at lines 1 and 2"):
        load_config(child)


def test_a_yaml_merge_key_may_override_what_it_merges(tmp_path):
    """`<<: *anchor` then the same key is YAML's override, not a duplicate; a section set in a base
    and again in the file over it is layering."""
    path = write(
        tmp_path / "merge.yaml",
        """
        irn:
          crf: &crf {gauss_sxy: 3, bilateral_sxy: 9}
          refine_crf_params:
            <<: *crf
            gauss_sxy: 5
    """,
    )
    cfg = load_config(path)
    assert (cfg.irn.crf.gauss_sxy, cfg.irn.refine_crf_params.gauss_sxy) == (3, 5)
    assert cfg.irn.refine_crf_params.bilateral_sxy == 9


@pytest.mark.parametrize(
    "sources, overrides",
    [
        ([], ["irn.conf_fg_threshold=0.2", "irn.conf_bg_threshold=0.3"]),
        (["irn: {conf_fg_threshold: 0.2, conf_bg_threshold: 0.3}\n"], []),
        (["irn: {conf_fg_threshold: 0.4}\n", "irn: {conf_bg_threshold: 0.45}\n"], []),
    ],
)
def test_a_background_seed_threshold_above_the_foreground_one_is_refused(tmp_path, sources, overrides):
    """Between the two thresholds lies the band of pixels the IRN ignores: inverted, it is gone."""
    paths = [write(tmp_path / f"c{i}.yaml", text) for i, text in enumerate(sources)]
    with pytest.raises(ConfigError) as info:
        load_config(paths or None, overrides)
    message = str(info.value)
    assert "irn.conf_bg_threshold" in message and "must not be above irn.conf_fg_threshold" in message
    assert "\n" not in message and all(str(p) in message for p in paths)


def test_seed_thresholds_are_checked_on_the_whole_config_not_on_each_part(tmp_path):
    """A layer or an override may hold half of a valid pair: only the result must be ordered."""
    low = write(tmp_path / "low.yaml", "irn: {conf_bg_threshold: 0.6}\n")  # over the default 0.30 alone
    high = write(tmp_path / "high.yaml", "irn: {conf_fg_threshold: 0.7}\n")
    cfg = load_config([low, high])
    assert (cfg.irn.conf_bg_threshold, cfg.irn.conf_fg_threshold) == (0.6, 0.7)
    cfg = load_config(None, ["irn.conf_bg_threshold=0.6", "irn.conf_fg_threshold=0.7"])
    assert (cfg.irn.conf_bg_threshold, cfg.irn.conf_fg_threshold) == (0.6, 0.7)
    assert load_config(None, ["irn.conf_bg_threshold=0.3"]).irn.conf_bg_threshold == 0.3  # equal: allowed
