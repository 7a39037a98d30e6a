"""Checkpoint folders and TF Serving version folders: one rule each, and damaged checkpoints fall back."""
import json

import keras
import numpy as np
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


def _net(hidden: int, depth: int = 1, outputs: int = 2) -> keras.Model:
    """Named layers: their variables' paths are the same in every model built here."""
    return keras.Sequential([keras.Input((3,)), *(keras.layers.Dense(hidden, name=f"hidden{i}") for i in range(depth)),
                             keras.layers.Dropout(0.5), keras.layers.Dense(outputs, name="out")], name="net")


def _model_and_optimizer():
    """A model with a random-number state (dropout's) and an optimizer with slots, built."""
    model = _net(hidden=4)
    optimizer = keras.optimizers.SGD(momentum=0.9)
    optimizer.build(model.trainable_variables)
    for i, variable in enumerate(model.variables + optimizer.variables):  # every value distinct from its initial
        variable.assign(np.full(variable.shape, i + 1).astype(variable.dtype))
    return model, optimizer


def _scramble(model, optimizer):
    for variable in model.variables + optimizer.variables:
        variable.assign(np.zeros(variable.shape, variable.dtype))


def test_a_checkpoint_is_one_safetensors_file_of_every_variable_by_keras_path(tmp_path):
    from safetensors.numpy import load_file

    model, optimizer = _model_and_optimizer()
    checkpoint.Checkpoints(tmp_path, model=model, optimizer=optimizer, keep=1).save(3, {"step": 3, "complete": False,
                                                                                        "callbacks": {}})
    stored = load_file(str(checkpoint.folder(tmp_path, 3) / "weights.safetensors"))
    expected = checkpoint.flat_state(model, optimizer)
    assert sorted(stored) == sorted(expected) and any(key.startswith("model/rng/") for key in stored)
    for key, variable in expected.items():
        np.testing.assert_array_equal(stored[key], keras.ops.convert_to_numpy(variable.value), err_msg=key)


def _write_tf_checkpoint(model, optimizer, folder):
    """What kerasbig wrote before safetensors on TensorFlow: a `tf.train.Checkpoint` of nested dicts."""
    import tensorflow as tf

    state = checkpoint.model_state(model)
    tf.train.Checkpoint(model={"weights": {k: v.value for k, v in state["weights"].items()},
                               "rng": [v.value for v in state["rng"]]},
                        optimizer={k: v.value for k, v in checkpoint.by_path(optimizer.variables).items()}
                        ).write(str(folder / "ckpt"))


def _write_npz(model, optimizer, folder):
    """What kerasbig wrote before safetensors on JAX: `weights.npz` of the same keys."""
    arrays = {k: keras.ops.convert_to_numpy(v.value) for k, v in checkpoint.flat_state(model, optimizer).items()}
    with open(folder / "weights.npz", "wb") as file:
        np.savez(file, **arrays)


@pytest.mark.parametrize("write", [_write_tf_checkpoint, _write_npz])
def test_checkpoints_of_earlier_versions_still_resume(tmp_path, write):
    model, optimizer = _model_and_optimizer()
    expected = {k: keras.ops.convert_to_numpy(v.value) for k, v in checkpoint.flat_state(model, optimizer).items()}
    old = checkpoint.folder(tmp_path, 7)
    old.mkdir()
    write(model, optimizer, old)
    (old / "state.json").write_text(json.dumps({"step": 7, "complete": False, "callbacks": {}}))
    _scramble(model, optimizer)
    saves = checkpoint.Checkpoints(tmp_path, model=model, optimizer=optimizer, keep=5)
    assert saves.restore_latest()[0]["step"] == 7
    for key, variable in checkpoint.flat_state(model, optimizer).items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable.value), expected[key], err_msg=key)


def test_a_checkpoint_of_other_shapes_or_variables_is_refused_before_anything_is_assigned(tmp_path):
    model, optimizer = _model_and_optimizer()
    checkpoint.Checkpoints(tmp_path, model=model, optimizer=optimizer, keep=1).save(1, {"step": 1})
    # The first layer of each matches the checkpoint; a later one does not.
    for other, error in ((_net(hidden=4, outputs=3), "has shape"), (_net(hidden=4, depth=2), "not in the checkpoint")):
        before = [keras.ops.convert_to_numpy(v.value) for v in other.weights]
        with pytest.raises(ValueError, match=error):
            checkpoint.load_model_weights(tmp_path, other)
        for variable, value in zip(other.weights, before):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable.value), value, err_msg=variable.path)


@pytest.mark.parametrize("error, line", [(ValueError("first\nsecond"), "first"), (KeyError(), "KeyError"),
                                         (RuntimeError("  padded \n"), "padded")])
def test_first_line_of_an_error(error, line):
    assert first_line(error) == line
