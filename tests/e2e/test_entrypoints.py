"""The command-line layer: every console script resolves and answers --help; bad input ends every command
the same way (``<prog>: error: ...`` and exit code 2); an unknown dataset is the same error everywhere."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import tomllib

from nnunetv2_versemi.entrypoints.common import input_errors_exit
from nnunetv2_versemi.errors import VerSemiInputError
from nnunetv2_versemi.nnunet_paths import DatasetNotFoundError, dataset_id, dataset_name

SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["scripts"]


def _entry(name: str):
    module, func = SCRIPTS[name].split(":")
    return getattr(importlib.import_module(module), func)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_answers_help(name, capsys):
    assert SCRIPTS[name].startswith("nnunetv2_versemi.entrypoints.")
    if name == "nnUNetv2_versemi_train":
        pytest.importorskip("nnunetv2.run.run_training")
    with pytest.raises(SystemExit) as e:
        _entry(name)(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.fixture
def empty_nnunet(tmp_path, monkeypatch):
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / v).mkdir()
        monkeypatch.setenv(v, str(tmp_path / v))
    return tmp_path


@pytest.mark.parametrize("name,argv", [
    ("nnUNetv2_versemi_merge", ["-d", "4242", "-o", "600"]),
    ("nnUNetv2_versemi_plan_and_preprocess", ["-d", "4242", "-c", "2d"]),
    ("nnUNetv2_versemi_plans_preset", ["-d", "4242", "--preset", "cpu_demo"]),
    ("nnUNetv2_versemi_extract_task", ["-d", "4242", "-t", "Liver"]),
    ("nnUNetv2_versemi_evaluate", ["-ref", "r", "-pred", "p", "-d", "4242"]),
    ("nnUNetv2_versemi_predict", ["-i", "in", "-o", "out", "-d", "4242", "-c", "2d", "-device", "cpu"]),
    ("nnUNetv2_versemi_benchmark", ["-d", "4242", "-c", "2d", "-device", "cpu"]),
    ("nnUNetv2_versemi_benchmark", ["speed", "-d", "4242", "-device", "cpu"]),
])
def test_unknown_dataset_is_one_error_everywhere(empty_nnunet, capsys, name, argv):
    with pytest.raises(SystemExit) as e:
        _entry(name)(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    prog = name + (" speed" if argv[0] == "speed" else "")
    assert f"{prog}: error: Unknown dataset '4242': no dataset of that id or name in nnUNet_raw=" in err
    assert not any(any((empty_nnunet / v).iterdir()) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))


def test_input_errors_exit_only_catches_input_errors(capsys):
    class Custom(VerSemiInputError):
        pass

    with pytest.raises(SystemExit) as e, input_errors_exit("prog"):
        raise Custom("case X: bad spacing")
    assert e.value.code == 2 and capsys.readouterr().err == "prog: error: case X: bad spacing\n"
    with pytest.raises(KeyError), input_errors_exit("prog"):  # a bug keeps its traceback
        raise KeyError("x")


def test_dataset_names_and_ids(empty_nnunet):
    (empty_nnunet / "nnUNet_raw" / "Dataset123_Abc").mkdir()
    assert dataset_name(123) == dataset_name("123") == dataset_name("Dataset123_Abc") == "Dataset123_Abc"
    assert dataset_id("Dataset123_Abc") == 123
    with pytest.raises(DatasetNotFoundError, match="not an nnU-Net dataset name"):
        dataset_id("Abc")
