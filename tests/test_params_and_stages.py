"""The params schema and the single stage list: errors that name the key, and dvc.yaml in step."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from cdc.params import Params, ParamsError, load_params
from components.cli import build_parser, main
from components.stages import STAGES, Stage, dvc_yaml
from tests.conftest import REPO


def test_committed_params_are_the_schema_defaults():
    """params.yaml documents every knob; its values are the schema's defaults (one source of truth)."""
    assert load_params(REPO / "params.yaml") == Params()
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(committed) == set(Params.model_fields)
    for section, fields in committed.items():
        if isinstance(fields, dict):
            assert set(fields) == set(type(getattr(Params(), section)).model_fields), section


def test_bad_params_name_the_key_value_and_allowed(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("prune:\n  ratio: 1.5\n  budget: magic\nscore:\n  criterion: nope\ndistill:\n  typo: 1\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert "prune.ratio" in message and "1.5" in message and "less than 1" in message
    assert "prune.budget" in message and "'magic'" in message and "uniform" in message
    assert "score.criterion" in message and "symdiv" in message
    assert "distill.typo" in message


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_dvc_yaml_describes_the_stage_list():
    committed = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert committed == dvc_yaml(), "dvc.yaml is stale: run `make dvc-yaml`"
    assert list(committed["stages"]) == [s.name for s in STAGES]


def test_stage_graph_is_a_chain_of_declared_outputs():
    """Every input is the raw data or an output of an earlier stage (data flows one way)."""
    produced = {"data/raw"}
    for stage in STAGES:
        for name, path in stage.inputs.items():
            assert path in produced, f"{stage.name}.{name} ({path}) is produced by no earlier stage"
        produced |= set(stage.outputs.values())
        assert set(stage.sections) <= set(Params.model_fields)
        for key in stage.params:  # a dotted key names a key of its section
            Params().get(key)


def test_cli_has_a_command_per_stage_with_its_paths():
    parser = build_parser()
    for stage in STAGES:
        args = parser.parse_args([stage.name])
        for name, path in {**stage.inputs, **stage.outputs}.items():
            if name in stage.param_paths:  # read from params.yaml, whose default is the stage's path
                assert getattr(args, name) is None
                assert Params().get(stage.param_paths[name]) == path
            else:
                assert str(getattr(args, name)) == path


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_a_bad_cdc_nproc_is_one_clear_error_of_the_stages_that_use_it(value, monkeypatch, caplog, tmp_path):
    """$CDC_NPROC is read as --nproc's default: a bad value stops a distributed stage with exit 2
    and names the variable (it once crashed every `cdc` command while the parser was built)."""
    monkeypatch.setenv("CDC_NPROC", value)
    monkeypatch.chdir(tmp_path)
    assert main(["dump_stats"]) == 2
    assert f"$CDC_NPROC) must be a whole number >= 1, got '{value}'" in caplog.text
    assert "Traceback" not in caplog.text
    assert main(["dvc-yaml"]) == 0  # commands without --nproc do not read it


def test_committed_metrics_are_those_of_the_committed_dvc_lock():
    """metrics/ holds the default run's metrics and plot sources in git (the baseline of every
    `dvc exp show` and `dvc metrics diff`); they must be the files dvc.lock recorded."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    recorded = {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])}
    tracked = [p for s in STAGES for n, p in s.outputs.items() if n in s.metrics or n in s.plots]
    assert tracked and all(p.startswith("metrics/") for p in tracked)
    for path in tracked:
        assert hashlib.md5((REPO / path).read_bytes()).hexdigest() == recorded[path], (
            f"{path} is not the file dvc.lock recorded: commit the run's metrics with its dvc.lock"
        )


def test_di_without_grid_statistics_is_refused_before_any_work(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("score:\n  criterion: di\ndump_stats:\n  grid: null\n")
    with pytest.raises(ParamsError, match="dump_stats.grid"):
        load_params(path)


def test_a_stage_names_each_input_output_flag_and_params_section_once():
    """They become the arguments of one CLI command and one Kubeflow component function."""
    with pytest.raises(ValueError, match=r"\['card'\] named twice"):
        Stage("card", "a card", {"metrics": "m.json"}, {"card": "c.md"}, {"card": "markdown"}, ("card",))
