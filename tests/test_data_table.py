"""`csv:FILE`: scikit-learn's breast-cancer table written as a CSV, with a categorical column of our own and
missing values, trained through the command line, exported and served with one named input per column."""
import csv
import json
import pathlib

import numpy as np
import pytest
import sklearn.datasets
import sklearn.metrics
import tensorflow as tf

from conftest import kerasbig
from kerasbig import data
from kerasbig.errors import UsageError
from data_helpers import assert_bad_data, data_config, post, serving

BANDS = ("small", "medium", "large")


def write_cancer_csv(path: pathlib.Path) -> pathlib.Path:
    """569 rows: 30 numeric columns (every 17th `mean area` missing), a `size band` column made from the area's
    tertiles (every 23rd missing) and the `diagnosis` label."""
    cancer = sklearn.datasets.load_breast_cancer()
    area = cancer.data[:, list(cancer.feature_names).index("mean area")]
    band = np.digitize(area, np.quantile(area, [1 / 3, 2 / 3]))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*cancer.feature_names, "size band", "diagnosis"])
        for i, (row, b, target) in enumerate(zip(cancer.data, band, cancer.target)):
            cells = [f"{v:.6g}" for v in row]
            cells[3] = "" if i % 17 == 0 else cells[3]
            writer.writerow([*cells, "" if i % 23 == 0 else BANDS[b], cancer.target_names[target]])
    return path


@pytest.fixture(scope="module")
def cancer(tmp_path_factory):
    return write_cancer_csv(tmp_path_factory.mktemp("csv") / "cancer.csv")


def test_columns_are_inferred_and_statistics_learnt_on_train(cancer):
    config = data_config(f"csv:{cancer}", label="diagnosis")
    task = data.load_task(config)
    assert task.spec.class_names == ("benign", "malignant")
    assert set(task.serving_input) == {"size_band", "mean_area", "mean_radius", *(
        name.replace(" ", "_") for name in sklearn.datasets.load_breast_cancer().feature_names)}
    assert task.serving_input["size_band"].dtype == tf.string and task.serving_input["mean_area"].dtype == tf.float32
    assert task.spec.input_shape == (30 + 1 + 3,)  # 30 numbers, mean area's "was missing" flag, 3 bands
    columns, _ = next(iter(task.train.batch(1000)))
    features = task.preprocess(columns).numpy()
    assert np.isfinite(features).all()
    numbers = features[:, :31]
    np.testing.assert_allclose(np.delete(numbers, 4, axis=1).mean(0), 0, atol=1e-4)  # standardised on train
    bands = features[:, 31:]
    assert set(bands.sum(1)) == {0.0, 1.0}  # one-hot; missing bands are all zeros
    test_columns, _ = next(iter(task.test.batch(1000)))
    assert abs(task.preprocess(test_columns).numpy()[:, 0].mean()) > 1e-3  # test did not feed the statistics


def test_listed_columns_override_inference(cancer):
    config = data_config(f"csv:{cancer}", label="diagnosis", categorical="mean radius")
    task = data.load_task(config)
    assert task.serving_input["mean_radius"].dtype == tf.string
    unknown = data_config(f"csv:{cancer}", label="diagnosis", numeric="no such column")
    with pytest.raises(UsageError, match="config.data.numeric.*no_such_column"):
        data.load_task(unknown)
    with pytest.raises(UsageError, match="size_band.*not a number"):
        data.load_task(data_config(f"csv:{cancer}", label="diagnosis", numeric="size band"))


@pytest.mark.parametrize("case", ["no_label_key", "no_label_column", "single_value", "missing_file", "ragged",
                                  "missing_label"])
def test_bad_tables_are_named(cancer, tmp_path, case):
    path, label = cancer, "diagnosis"
    if case == "no_label_key":
        label = ""
    if case == "no_label_column":
        label = "outcome"
    if case == "single_value":
        path = tmp_path / "one.csv"
        path.write_text("x,y\n1,a\n2,a\n3,a\n")
        label = "y"
    if case == "missing_file":
        path = tmp_path / "none.csv"
    if case == "ragged":
        path = tmp_path / "ragged.csv"
        path.write_text("x,y\n1,a\n2\n")
        label = "y"
    if case == "missing_label":
        path = tmp_path / "gap.csv"
        path.write_text("x,y\n1,a\n\n2,\n3,b\n")  # line 3 is blank, line 4 has no label
        label = "y"
    expected = {"no_label_key": "--config.data.label=COLUMN", "no_label_column": "no column 'outcome'",
                "single_value": "single value", "missing_file": "does not exist", "ragged": "line 3",
                "missing_label": "line 4 has no value in the label column 'y'"}[case]
    with pytest.raises(UsageError, match=expected) as error:
        data.load_task(data_config(f"csv:{path}", label=label))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_bad_table_exits_2_and_writes_nothing(cancer, tmp_path):
    assert_bad_data("--config=configs/digits_mlp.py", f"--config.data.name=csv:{cancer}",
                    "--config.data.label=outcome", workdir=tmp_path / "run", names="'outcome'")


@pytest.mark.slow
def test_trained_exported_and_served_with_named_columns(cancer, tmp_path):
    run, models = tmp_path / "run", tmp_path / "models"
    kerasbig("train", "--config=configs/digits_mlp.py", f"--config.data.name=csv:{cancer}",
             "--config.data.label=diagnosis", "--config.train.epochs=4", "--config.model.hidden=(16,)",
             "--config.schedule.warmup_steps=0", f"--workdir={run}", f"--export_dir={models / 'cancer'}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.85
    task = data.load_task(data_config(f"csv:{cancer}", label="diagnosis"))
    rows = [{name: value.numpy().decode() if value.dtype == tf.string else float(value) for name, value in x.items()}
            for x, _ in task.examples("test")]
    labels = [int(y) for _, y in task.examples("test")]
    assert any(np.isnan(row["mean_area"]) for row in rows)  # sent as NaN, as TF Serving's JSON parser takes it
    with serving(models) as url:
        predictions = post(f"{url}/v1/models/cancer:predict", {"instances": rows})["predictions"]
    classes = [p["classes"] for p in predictions]
    # Training's own evaluation of the test split, and the server's answers to its rows: the same predictions.
    assert sklearn.metrics.confusion_matrix(labels, classes, labels=range(2)).tolist() == metrics["confusion_matrix"]
