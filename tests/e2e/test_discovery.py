"""Stock nnU-Net finds the VerSemi trainers through nnUNet_extTrainer, as the very same class objects."""

import os
import pickle
import subprocess
import sys

import pytest

import nnunetv2_versemi.training.variants as variants
from nnunetv2_versemi.discovery import ensure_ext_trainer_env, export_line, ext_trainer_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["package", "repo"])
def ext_dir(request):
    return ext_trainer_dir() if request.param == "package" else os.path.join(REPO, "trainers")


@pytest.mark.parametrize("name", ["VerSemiTrainer", "VerSemiTrainer_tiny", "VerSemiTrainer_noUnsup"])
def test_train_lookup_finds_same_class(monkeypatch, ext_dir, name):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", ext_dir)
    cls = recursive_find_trainer_class_by_name(name)
    assert cls is getattr(variants, name)
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_lookup_fails_without_env(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError, match="Could not find"):
        recursive_find_trainer_class_by_name("VerSemiTrainer")


def test_predict_lookups_use_the_same_finder(monkeypatch):
    # both nnUNetv2_predict and nnUNetv2_predict_from_modelfolder resolve the trainer through
    # nnUNetPredictor.initialize_from_trained_model_folder -> recursive_find_trainer_class_by_name
    import inspect

    from nnunetv2.inference import predict_from_raw_data as p

    src = inspect.getsource(p.nnUNetPredictor.initialize_from_trained_model_folder)
    assert "recursive_find_trainer_class_by_name" in src
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_dir())
    assert p.recursive_find_trainer_class_by_name("VerSemiTrainer") is variants.VerSemiTrainer


def test_ensure_env_keeps_other_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path))
    value = ensure_ext_trainer_env()
    assert value.split(os.pathsep) == [str(tmp_path), ext_trainer_dir()]
    assert ensure_ext_trainer_env() == value  # idempotent


def test_export_command_prints_usable_line():
    out = subprocess.run([sys.executable, "-c", "from nnunetv2_versemi.entrypoints.training import ext_trainer_path_main as e; e([])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == export_line()
    assert os.path.isfile(os.path.join(out.split("=", 1)[1], "versemi_trainers.py"))


def test_trainer_folders_hold_only_reexports():
    for folder in (ext_trainer_dir(), os.path.join(REPO, "trainers")):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
        assert files == ["versemi_trainers.py"]
        code = [ln for ln in open(os.path.join(folder, files[0])) if ln.strip() and not ln.startswith("#")]
        assert code == ["from nnunetv2_versemi.training.variants import *  # noqa: F401,F403\n"]


def test_top_level_trainer_reexport_is_a_copy_of_the_package_one():
    """The source is nnunetv2_versemi/_ext/versemi_trainers.py (installed, what nnUNet_extTrainer points at);
    trainers/versemi_trainers.py is the copy the repository layout asks for."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    source = (root / "nnunetv2_versemi" / "_ext" / "versemi_trainers.py").read_text()
    assert (root / "trainers" / "versemi_trainers.py").read_text() == source
