"""The shipped TFDS configs train and export on TFDS's mock data (real builders and metadata, fake examples),
through kerasbig's own training loop and exporter."""
import importlib.util
import pathlib

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kerasbig import data, export, models
from kerasbig.train import make_optimizer
from kerasbig.trainer import Trainer
from test_data_tfds import prepare_metadata

pytestmark = pytest.mark.slow
EXAMPLES = 20


def load_config(name: str):
    path = pathlib.Path(__file__).resolve().parent.parent / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("config_name, dataset", [("mnist_cnn", "mnist"), ("cifar10_resnet", "cifar10"),
                                                  ("imdb_transformer", "imdb_reviews")])
def test_tfds_config_trains_and_exports_on_mock_data(tmp_path, config_name, dataset):
    config = load_config(config_name)
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.batch_size = config.data.eval_batch_size = 2
    config.train.steps, config.train.steps_per_execution, config.train.jit_compile = 3, 1, False
    splits = {"train": EXAMPLES, "test": EXAMPLES}
    if dataset == "imdb_reviews":
        splits["unsupervised"] = EXAMPLES
    prepare_metadata(dataset, tmp_path / "tfds", splits)
    with tfds.testing.mock_data(num_examples=EXAMPLES, data_dir=config.data.data_dir,
                                policy=tfds.testing.MockPolicy.USE_FILES):
        task = data.load_task(config.data)
        model = models.build(task.spec, config.model)
        trainer = Trainer(model, make_optimizer(config), task, tf.distribute.get_strategy(), config, tmp_path / "run")
        trainer.fit([], verbose=False)
        sums, labels, _ = trainer.evaluate("test")
        assert len(labels) == EXAMPLES and sums.count == EXAMPLES
        version = export.export(model, task, base=tmp_path / "models", name=config_name, record={})
    assert int(model.optimizer.iterations.numpy()) == 3
    assert (version / "saved_model.pb").is_file()
