"""Checkpoint folders and TF Serving version folders: one rule each, and damaged checkpoints fall back."""
import json

import keras
import pytest

from kerasbig import checkpoint, export, versions
from kerasbig.errors import first_line


def test_version_folders_are_parsed_as_tf_serving_parses_them(tmp_path):
    for name in ("1", "00000123", "7", ".tmp-200", "²", "١٢", "-4", "3.5", "latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "99").write_text("TF Serving lists files too (and fails to load them)")
    assert list(versions.folders(tmp_path)) == [-4, 1, 7, 99, 123]  # absl::SimpleAtoi takes a sign
    assert versions.folders(tmp_path)[123].name == "00000123"
    assert export.next_version(tmp_path) == 124
    assert versions.folders(tmp_path / "missing") == {}


def test_checkpoint_folders_have_one_name_and_only_complete_ones_count(tmp_path):
    assert checkpoint.folder(tmp_path, 42).name == "step-00000042"
    complete = checkpoint.folder(tmp_path, 5)
    complete.mkdir()
    (complete / "state.json").write_text("{}")
    checkpoint.folder(tmp_path, 9).mkdir()  # a bogus empty folder: not a checkpoint, and takes no kept slot
    assert checkpoint.saved_steps(tmp_path) == [5]


def test_a_state_without_its_step_falls_back_to_the_previous_checkpoint(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="ones")])
    optimizer = keras.optimizers.SGD()
    optimizer.build(model.trainable_variables)
    saves = checkpoint.Checkpoints(tmp_path, model=model, optimizer=optimizer, keep=5)
    saves.save(1, {"step": 1, "complete": False, "callbacks": {}})
    model.layers[0].kernel.assign([[2.0], [2.0]])
    saves.save(2, {"step": 2, "complete": False, "callbacks": {}})
    (checkpoint.folder(tmp_path, 2) / "state.json").write_text(json.dumps({}))
    state, _ = saves.restore_latest()
    assert state["step"] == 1 and model.layers[0].kernel.numpy().tolist() == [[1.0], [1.0]]


def test_a_background_save_keeps_the_values_of_its_step_and_reports_a_failed_write(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, kernel_initializer="ones")])
    optimizer = keras.optimizers.SGD()
    optimizer.build(model.trainable_variables)
    saves = checkpoint.Checkpoints(tmp_path, model=model, optimizer=optimizer, keep=5)
    saves.save(1, {"step": 1, "complete": False, "callbacks": {}}, {"Best.best_weights": [[3.0]]}, background=True)
    model.layers[0].kernel.assign([[2.0], [2.0]])  # training goes on while the files are written
    saves.wait()
    assert checkpoint.saved_steps(tmp_path) == [1]
    state, arrays = saves.restore_latest()
    assert state["step"] == 1 and model.layers[0].kernel.numpy().tolist() == [[1.0], [1.0]]
    assert arrays["Best.best_weights"][0].tolist() == [3.0]

    saves.save(2, {"step": 2, "not json": object()}, background=True)
    with pytest.raises(TypeError):
        saves.wait()
    assert checkpoint.saved_steps(tmp_path) == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    saves.wait()  # reported once


@pytest.mark.parametrize("error, line", [(ValueError("first\nsecond"), "first"), (KeyError(), "KeyError"),
                                         (RuntimeError("  padded \n"), "padded")])
def test_first_line_of_an_error(error, line):
    assert first_line(error) == line
