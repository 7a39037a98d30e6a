"""`text:DIR`: class folders of text files made from CPython's docs and sources, trained through the command line,
exported and served: raw strings in, class names out."""
import json
import pathlib

import numpy as np
import pytest
import sklearn.metrics
import tensorflow as tf

from conftest import kerasbig
from kerasbig import data
from kerasbig.data import text
from kerasbig.errors import UsageError
from data_helpers import data_config, post, serving

SEQ_LEN = 64


def write_text_folder(root: pathlib.Path, per_class: int = 20) -> pathlib.Path:
    """Two classes that bytes tell apart: English help pages ("prose") and asyncio's sources ("code")."""
    prose = sorted(text.pydoc_topics().values(), key=len)[-per_class:]
    code = [source for _, source in sorted(text.stdlib_sources(("asyncio",)).items()) if len(source) > 1000]
    for name, documents in (("prose", prose), ("code", code[:per_class])):
        (root / name).mkdir(parents=True)
        for i, document in enumerate(documents):
            (root / name / f"{i}.txt").write_text(document[500:900], encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_text_folder(tmp_path_factory.mktemp("text") / "docs")


def test_files_become_raw_strings_and_byte_ids(folder):
    task = data.load_task(data_config(f"text:{folder}", seq_len=SEQ_LEN))
    assert task.spec.class_names == ("code", "prose") and task.serving_input.dtype == tf.string
    assert task.num_examples == {"train": 28, "validation": 4, "test": 8}
    path, _ = next(task.test.as_numpy_iterator())
    raw, label = next(iter(task.examples("test")))
    assert raw.numpy() == pathlib.Path(path.decode()).read_bytes()
    assert task.spec.class_names[int(label)] == pathlib.Path(path.decode()).parent.name
    ids = task.preprocess(raw[None]).numpy()[0]
    np.testing.assert_array_equal(ids, text.encode(raw.numpy().decode())[:SEQ_LEN])


def test_non_utf8_text_is_named_or_replaced_when_asked(folder, tmp_path):
    copy = write_text_folder(tmp_path / "docs", per_class=5)
    bad = copy / "prose" / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match=f"{bad} is not UTF-8 text.*decode_errors=replace"):
        data.load_task(data_config(f"text:{copy}"))
    task = data.load_task(data_config(f"text:{copy}", decode_errors="replace"))
    contents = [x.numpy() for split in text.SPLITS for x, _ in task.examples(split)]
    assert "caf\ufffd".encode() in contents


@pytest.mark.slow
def test_trained_exported_and_served_with_raw_text(folder, tmp_path):
    run, models = tmp_path / "run", tmp_path / "models"
    kerasbig("train", "--config=configs/text_rnn.py", f"--config.data.name=text:{folder}",
             f"--config.data.seq_len={SEQ_LEN}", "--config.data.batch_size=7", "--config.train.epochs=3",
             "--config.model.units=8", "--config.model.embed_dim=8", "--config.schedule.warmup_steps=0",
             "--config.train.early_stopping.enabled=False", f"--workdir={run}", f"--export_dir={models / 'docs'}")
    metrics = json.loads((run / "metrics.json").read_text())
    task = data.load_task(data_config(f"text:{folder}", seq_len=SEQ_LEN))
    strings = [x.numpy().decode() for x, _ in task.examples("test")]
    labels = [int(y) for _, y in task.examples("test")]
    with serving(models) as url:
        predictions = post(f"{url}/v1/models/docs:predict", {"instances": strings})["predictions"]
    classes = [p["classes"] for p in predictions]
    assert sklearn.metrics.confusion_matrix(labels, classes, labels=range(2)).tolist() == metrics["confusion_matrix"]
    assert [p["class_names"] for p in predictions] == [("code", "prose")[c] for c in classes]
