"""Config files, overrides and every bad input: exit code 2, one line on stderr, nothing written."""
import pytest

from conftest import REPO
from kerasbig import config as config_lib
from kerasbig.errors import UsageError

BAD_INPUTS = [
    (["--config=configs/nope.py"], "configs/nope.py does not exist"),
    (["--config=README.md"], "get_config"),
    (["--config.train.nope=3"], "unknown config key 'nope'"),
    (["--config.model.foo=1"], "unknown config key 'foo'"),
    (["--config.train.epochs=abc"], "--config.train.epochs=abc"),
    (["--config.data.batch_size=0"], "config.data.batch_size=0 must be >= 1"),
    (["--config.data.batch_size=5000"], "larger than the training set"),
    (["--config.train.epochs=0"], "config.train.epochs=0 must be >= 1"),
    (["--mode=fly"], "--mode='fly' is not one of"),
    (["--strategy=warp"], "--strategy='warp' is not one of"),
    (["--mixed_precision=fp8"], "--mixed_precision='fp8' is not one of"),
    (["--config.model.name=zzz"], "config.model.name='zzz' is not a model builder"),
    (["--config.optimizer.name=rmsprop"], "config.optimizer.name='rmsprop' is not one of"),
    (["--strategy=mirrored", "--num_cpu_replicas=3", "--config.data.batch_size=64"], "not divisible by the 3 replicas"),
    (["stray"], "unexpected arguments"),
    (["--config.export.name=../../x"], "config.export.name='../../x' must be a plain folder name"),
    (["--config.export.name=/tmp/x"], "must be a plain folder name"),
    (["--config.optimizer.label_smoothing=1.0"], "config.optimizer.label_smoothing=1.0 must be [0, 1)"),
    (["--config.optimizer.weight_decay=-0.1"], "config.optimizer.weight_decay=-0.1 must be >= 0"),
    (["--config.optimizer.clip_norm=nan"], "config.optimizer.clip_norm=nan must be >= 0"),
    (["--config.train.checkpoint_every_steps=-5"], "config.train.checkpoint_every_steps=-5 must be >= 0"),
    (["--config.data.test_fraction=0.0"], "config.data.test_fraction=0.0 must be in (0, 1)"),
    (["--config.data.test_fraction=1.0"], "config.data.test_fraction=1.0 must be in (0, 1)"),
    (["--seed=-1"], "--seed=-1 must be in [0, 4294967296)"),
    (["--seed=99999999999"], "must be in [0, 4294967296)"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(train, tmp_path, args, message):
    workdir, export_dir = tmp_path / "run", tmp_path / "models" / "digits"
    result = train(f"--workdir={workdir}", f"--export_dir={export_dir}", *args, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not workdir.exists() and not export_dir.exists()


@pytest.mark.parametrize("flag", ["--workdir", "--export_dir"])
def test_unwritable_dirs_are_rejected_before_training(train, tmp_path, flag):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    other = "--export_dir" if flag == "--workdir" else "--workdir"
    result = train(f"{flag}={blocker}/sub", f"{other}={tmp_path / 'ok'}", "--config.train.epochs=1", check=False)
    assert result.returncode == 2
    assert f"{flag}={blocker}/sub cannot be written" in result.stderr
    assert not (tmp_path / "ok" / "checkpoints").exists()


def test_overrides_are_applied_and_saved(train, tmp_path):
    workdir = tmp_path / "run"
    result = train("--config=configs/digits_mlp.py", f"--workdir={workdir}", "--mode=train",
                   "--config.train.steps=3", "--config.model.hidden=(16,)", "--config.data.batch_size=32")
    assert "  hidden: !!python/tuple\n  - 16\n  name: mlp" in result.stdout  # the resolved config, printed
    saved = (workdir / "config.json").read_text()
    assert '"hidden": [\n      16\n    ]' in saved and '"batch_size": 32' in saved and '"steps": 3' in saved


def test_base_config_is_locked_and_typed():
    config = config_lib.base().lock()
    with pytest.raises(AttributeError):
        config.train.epochz = 1
    with pytest.raises(TypeError):
        config.train.epochs = "many"


def test_validate_names_the_key():
    config = config_lib.base()
    config.optimizer.accumulation_steps = 3
    with pytest.raises(UsageError, match="accumulation_steps=3"):
        config_lib.validate(config)


def test_every_shipped_config_loads():
    import importlib.util
    paths = sorted((REPO / "configs").glob("*.py"))
    assert len(paths) >= 14 and REPO / "configs" / "digits_cnn.py" in paths  # found wherever pytest runs from
    for path in paths:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        assert config.is_locked, path
        config_lib.validate(config)
