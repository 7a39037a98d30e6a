"""`--mode=dry_run` plans from `data.load_plan`: TFDS configs from their registered metadata with no data prepared,
and user data from file names, without reading the examples."""
import pytest

from conftest import TFDS, kerasbig, load_config
from kerasbig import data
from kerasbig.models import sizing
from data_helpers import data_config, write_corpus


@pytest.mark.parametrize("name", sorted(TFDS))
def test_tfds_configs_plan_without_their_data(name, tmp_path):
    config = load_config(name)
    config.data.data_dir = str(tmp_path / "empty")
    plan = data.load_plan(config.data)
    assert plan.num_examples == {}  # not known until the data is prepared
    assert sizing.estimate(plan.spec, config.model, batch_per_replica=1).total_params > 0
    with pytest.raises(Exception, match="not on this machine"):
        data.load_task(config.data)


def test_a_corpus_plans_from_its_file_names_and_uses_its_cache_once_built(tmp_path):
    docs = write_corpus(tmp_path / "docs")
    config = data_config(f"corpus:{docs}/*.txt", seq_len=64, cache_dir=str(tmp_path / "cache"), tokenizer="bpe:1000")
    plan = data.load_plan(config)
    assert plan.spec.num_classes == 1000 and plan.num_examples == {}
    assert not (tmp_path / "cache").exists()  # planning tokenizes nothing
    task = data.load_task(config)
    assert data.load_plan(config) == data.Plan(task.spec, task.num_examples)


@pytest.mark.slow
def test_dry_run_command_on_a_tfds_config_without_data(tmp_path):
    result = kerasbig("train", "--config=configs/cifar10_resnet.py", f"--config.data.data_dir={tmp_path}",
                      "--mode=dry_run", timeout=120)
    assert "parameters" in result.stdout and not list(tmp_path.iterdir())
