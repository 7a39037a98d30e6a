"""Every shipped config: passes dry_run with exact parameter counts, trains a few steps in kerasbig's own loop,
exports, and its SavedModel is served by `kerasbig.serve` with the numbers of the SavedModel loaded directly.
TFDS configs run on TFDS's mock data (real builders and metadata, fake examples)."""
import pathlib
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import REPO, TFDS, load_config, prepare_metadata
from kerasbig import data, export, models
from kerasbig.models import sizing
from kerasbig.train import make_optimizer
from kerasbig.trainer import Trainer
from data_helpers import post, serving

pytestmark = pytest.mark.slow
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))
GPT2_PARAMS = {"gpt2_124m": 124_439_808, "gpt2_350m": 354_823_168, "gpt2_774m": 774_030_080,
               "gpt2_1558m": 1_557_611_200}
RUNNABLE = [name for name in CONFIGS if not name.startswith(("gpt2_", "gpt_7b"))]
MOCK_EXAMPLES = 20


def load_task(name: str, config, tmp_path: pathlib.Path):
    """The config's task; TFDS datasets from mock examples written under tmp_path."""
    if name not in TFDS:
        return data.load_task(config.data)
    config.data.data_dir = str(tmp_path / "tfds")
    splits = {"train": MOCK_EXAMPLES, "test": MOCK_EXAMPLES}
    if TFDS[name] == "imdb_reviews":
        splits["unsupervised"] = MOCK_EXAMPLES
    prepare_metadata(TFDS[name], tmp_path / "tfds", splits)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=config.data.data_dir,
                                policy=tfds.testing.MockPolicy.USE_FILES):
        task = data.load_task(config.data)
        # Read the mock examples now, while the mock is active.
        for split in ("train", "validation", "test"):
            setattr(task, split, getattr(task, split).cache())
            for _ in getattr(task, split):
                pass
    return task


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in TFDS])
def test_dry_run_counts(name):
    config = load_config(name)
    task = data.load_task(config.data)
    start = time.perf_counter()
    estimate = sizing.estimate(task.spec, config.model, batch_per_replica=1)
    assert time.perf_counter() - start < 60
    if name in GPT2_PARAMS:
        assert estimate.total_params == GPT2_PARAMS[name]
    elif name == "gpt_7b":
        assert estimate.total_params >= 6.5e9
    else:
        assert estimate.total_params == models.build(task.spec, config.model).count_params()
    assert estimate.train_flops_per_example > 0 and "memory / replica" in estimate.format()


def test_dry_run_command_plans_7b_without_building_it(train):
    result = train("--config=configs/gpt_7b.py", "--mode=dry_run")
    assert "6,658,596,864" in result.stdout and "training FLOPs / token" in result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each runnable config trained 3 steps and exported under one model base path."""
    root = tmp_path_factory.mktemp("shipped")
    exports = {}
    for name in RUNNABLE:
        config = load_config(name)
        config.data.batch_size = config.data.eval_batch_size = 4
        config.train.steps, config.train.steps_per_execution, config.train.jit_compile = 3, 1, False
        task = load_task(name, config, root / name)
        model = models.build(task.spec, config.model)
        trainer = Trainer(model, make_optimizer(config), task, tf.distribute.get_strategy(), config, root / name)
        trainer.fit([], verbose=False)
        sums, _, _ = trainer.evaluate("test")
        assert np.isfinite(sums.loss) and sums.count > 0
        exports[name] = (task, export.export(model, task, base=root / "models", name=name, record={}))
    return root / "models", exports


@pytest.mark.parametrize("name", RUNNABLE)
def test_config_trains_and_exports(trained, name):
    _, exports = trained
    task, version = exports[name]
    assert (version / "saved_model.pb").is_file()
    signature = tf.saved_model.load(str(version)).signatures["serving_default"]
    assert list(signature.structured_input_signature[1]) == [task.serving_input.name]


def test_serve_answers_like_the_saved_model(trained, tmp_path):
    """A digits CNN, a text classifier and the GPT through the REST server, row and column formats."""
    base, exports = trained
    with serving(base) as url:
        for name in ("digits_cnn", "text_transformer", "gpt_small"):
            task, version = exports[name]
            raw = export.sample_inputs(task, 3)
            direct = tf.saved_model.load(str(version)).signatures["serving_default"](
                **{task.serving_input.name: tf.constant(raw)})
            values = [r.decode() if isinstance(r, bytes) else r for r in raw.tolist()]
            rows = post(f"{url}/v1/models/{name}:predict", {"instances": values})["predictions"]
            columns = post(f"{url}/v1/models/{name}:predict", {"inputs": values})["outputs"]
            for key, expected in direct.items():
                got_rows = np.array([row[key] for row in rows] if isinstance(rows[0], dict) else rows)
                got_columns = np.array(columns[key] if isinstance(columns, dict) else columns)
                if expected.dtype == tf.string:  # class_names
                    assert got_rows.tolist() == got_columns.tolist() == [v.decode() for v in expected.numpy()]
                    continue
                np.testing.assert_allclose(got_rows, expected.numpy(), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got_columns, expected.numpy(), rtol=1e-5, atol=1e-6)
