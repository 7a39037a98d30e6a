"""`images:DIR`: real PNG and JPEG files in class folders, split, decoded, augmented, trained through the command
line, exported and served with encoded bytes over REST."""
import base64
import json
import pathlib

import numpy as np
import pytest
import sklearn.metrics
import tensorflow as tf

from conftest import kerasbig
from data_helpers import assert_bad_data, assert_core_ops, data_config, post, serving
from kerasbig import data
from kerasbig.data import images
from kerasbig.errors import UsageError

CLASSES = ("circle", "square", "stripes")
SIZE = 16


def draw(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy uint8 picture of class `kind` at a random size; some grayscale, most RGB."""
    h, w = rng.integers(18, 40, 2)
    y, x = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    shape = [(y - .5) ** 2 + (x - .5) ** 2 < .1, (abs(y - .5) < .3) & (abs(x - .5) < .3), np.sin(x * 20) > 0][kind]
    gray = (shape * 200 + rng.integers(0, 55, (h, w))).astype(np.uint8)
    return gray[..., None] if rng.random() < 0.2 else np.stack([gray, gray // 2, 255 - gray], -1)


def write_image_folder(root: pathlib.Path, per_class: int, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    for kind, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = draw(kind, rng)
            encoded = tf.io.encode_png(pixels) if i % 2 else tf.io.encode_jpeg(pixels, quality=95)
            (root / name / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(encoded.numpy())
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "shapes", per_class=10)


def test_split_is_stratified_seeded_and_by_file(folder):
    task = data.load_task(data_config(f"images:{folder}", image_size=SIZE))
    assert task.spec.class_names == CLASSES and task.spec.input_shape == (SIZE, SIZE, 3)
    paths = {split: [p.decode() for p, _ in getattr(task, split).as_numpy_iterator()] for split in data.text.SPLITS}
    assert sum(map(len, paths.values())) == 30 and len(set(sum(paths.values(), []))) == 30
    labels = np.array([label for _, label in task.test.as_numpy_iterator()])
    assert np.bincount(labels).tolist() == [2, 2, 2]  # 20% of 10 per class, stratified
    again = data.load_task(data_config(f"images:{folder}", image_size=SIZE))
    assert [p.decode() for p, _ in again.test.as_numpy_iterator()] == paths["test"]
    other = data.load_task(data_config(f"images:{folder}", image_size=SIZE, split_seed=1))
    assert sorted(p.decode() for p, _ in other.test.as_numpy_iterator()) != sorted(paths["test"])
    pixels, _ = next(iter(task.examples("test")))
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == tf.float32 and 0 <= tf.reduce_min(pixels)
    assert task.preprocess(pixels).numpy().max() <= 1.0


def test_given_splits_are_kept_and_a_missing_one_is_carved_from_train(tmp_path):
    for split, count in (("train", 10), ("test", 3)):
        write_image_folder(tmp_path / split, per_class=count, seed=len(split))
    task = data.load_task(data_config(f"images:{tmp_path}", image_size=SIZE))
    tests = [p.decode() for p, _ in task.test.as_numpy_iterator()]
    assert len(tests) == 9 and all("/test/" in p for p in tests)
    assert task.num_examples == {"train": 27, "validation": 3, "test": 9}  # 10% of train's 30 files


def test_grayscale_folders_have_one_channel_and_decoding_matches_the_signature(tmp_path):
    for name in CLASSES[:2]:
        (tmp_path / name).mkdir()
        for i in range(5):
            gray = np.random.default_rng(i).integers(0, 255, (20 + i, 30, 1), dtype=np.uint8)
            (tmp_path / name / f"{i}.png").write_bytes(tf.io.encode_png(gray).numpy())
    task = data.load_task(data_config(f"images:{tmp_path}", image_size=SIZE))
    assert task.spec.input_shape == (SIZE, SIZE, 1)
    encoded = next(iter(task.encoded.examples("test").batch(8)))[0]
    raw = next(iter(task.examples("test").batch(8)))[0]
    np.testing.assert_array_equal(task.encoded.decode(encoded).numpy(), raw.numpy())


def test_cached_images_are_the_streamed_ones(folder):
    config = data_config(f"images:{folder}", image_size=SIZE)
    streamed = next(iter(data.load_task(config).examples("test").batch(100)))
    config.cache_images = True
    cached = data.load_task(config)
    assert cached.load is None  # the splits hold decoded images
    for _ in range(2):  # the first pass fills the cache, the second reads it
        for a, b in zip(streamed, next(iter(cached.examples("test").batch(100)))):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_augmentation_is_stateless_and_draws_for_each_image(folder):
    """One seed gives one augmented batch; another seed another; each image of the batch gets its own flip and
    shift (eight copies of one image do not all come out the same)."""
    image = next(iter(data.load_task(data_config(f"images:{folder}", image_size=SIZE)).examples("train")))[0]
    batch = tf.stack([image] * 8)
    seed = tf.constant([3, 7], tf.int64)
    once, again = images.augment(batch, seed).numpy(), images.augment(batch, seed).numpy()
    assert once.shape == batch.shape
    np.testing.assert_array_equal(once, again)
    assert not np.array_equal(images.augment(batch, tf.constant([3, 8], tf.int64)).numpy(), once)
    assert len({copy.tobytes() for copy in once}) > 1


@pytest.mark.parametrize("case", ["missing", "empty", "single_class", "empty_class", "corrupt", "few_files"])
def test_bad_folders_are_named(tmp_path, case):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case in ("single_class", "empty_class", "corrupt"):
        write_image_folder(root, per_class=5)
    if case == "single_class":
        for name in CLASSES[1:]:
            for f in (root / name).iterdir():
                f.unlink()
            (root / name).rmdir()
    if case == "empty_class":
        (root / "nothing").mkdir()
    if case == "corrupt":
        (root / "circle" / "broken.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
    if case == "few_files":
        write_image_folder(root, per_class=2)
    expected = {"missing": "is not a folder", "empty": "no class subfolders", "single_class": "single class",
                "empty_class": "nothing has no files", "corrupt": "broken.jpg is not a readable",
                "few_files": "needs at least 3 per class"}[case]
    with pytest.raises(UsageError, match=expected) as error:
        data.load_task(data_config(f"images:{root}", image_size=SIZE))
    assert "\n" not in str(error.value)


def test_skip_bad_files_skips_and_lists_them(folder, tmp_path, capsys):
    copy = write_image_folder(tmp_path / "shapes", per_class=5)
    (copy / "square" / "notes.txt").write_text("not an image")
    task = data.load_task(data_config(f"images:{copy}", image_size=SIZE, skip_bad_files=True))
    assert sum(task.num_examples.values()) == 15
    assert "Skipped 1 unreadable file(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_image_data_exits_2_and_writes_nothing(tmp_path):
    root = write_image_folder(tmp_path / "shapes", per_class=5)
    (root / "circle" / "broken.png").write_bytes(b"garbage")
    assert_bad_data("--config=configs/digits_cnn.py", f"--config.data.name=images:{root}",
                    workdir=tmp_path / "run", names=str(root / "circle" / "broken.png"))


@pytest.mark.slow
def test_dry_run_on_10000_files_reads_only_names(tmp_path):
    one = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(5000):
            (tmp_path / name / f"{i}.png").write_bytes(one if i < 10 else b"not read by a dry run")
    result = kerasbig("train", "--config=configs/digits_cnn.py", f"--config.data.name=images:{tmp_path}",
                      "--config.data.image_size=32", "--mode=dry_run", timeout=60)
    assert "parameters" in result.stdout


@pytest.mark.slow
def test_trained_exported_and_served_with_encoded_bytes(folder, tmp_path):
    run, models = tmp_path / "run", tmp_path / "models"
    kerasbig("train", "--config=configs/digits_cnn.py", f"--config.data.name=images:{folder}",
             f"--config.data.image_size={SIZE}", "--config.data.batch_size=8", "--config.train.epochs=3",
             "--config.model.filters=(8,)", "--config.model.dense=16", "--config.schedule.warmup_steps=0",
             f"--workdir={run}", f"--export_dir={models / 'shapes'}")
    metrics = json.loads((run / "metrics.json").read_text())
    task = data.load_task(data_config(f"images:{folder}", image_size=SIZE))
    files = [path.decode() for path, _ in task.test.as_numpy_iterator()]
    labels = [label for _, label in task.test.as_numpy_iterator()]
    signatures = tf.saved_model.load(str(models / "shapes" / "1")).signatures
    assert set(signatures) == {"serving_default", "pixels"}
    assert_core_ops(models / "shapes" / "1")
    with serving(models) as url:
        body = {"instances": [{"b64": base64.b64encode(pathlib.Path(f).read_bytes()).decode()} for f in files]}
        predictions = post(f"{url}/v1/models/shapes:predict", body)["predictions"]
    classes = [p["classes"] for p in predictions]
    # The server decodes the bytes in the graph; training decoded the same files in tf.data: same answers.
    assert sklearn.metrics.confusion_matrix(labels, classes, labels=range(3)).tolist() == metrics["confusion_matrix"]
    assert [p["class_names"] for p in predictions] == [CLASSES[c] for c in classes]
    pixels = next(iter(task.examples("test").batch(len(files))))[0]
    assert signatures["pixels"](pixels=pixels)["classes"].numpy().tolist() == classes
