"""A byte-level transformer classifying IMDB reviews from TensorFlow Datasets (prepared locally:
`--config.data.data_dir` or TFDS_DATA_DIR). The SavedModel takes raw review text.

    python -m kerasbig.train --config=configs/imdb_transformer.py
"""
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "tfds:imdb_reviews"
    config.data.seq_len = 512
    config.data.batch_size = 64
    config.model = dict(name="transformer", vocab_size=256, width=128, depth=4, heads=4, mlp_ratio=4, dropout=0.1,
                        pooling="mean")
    config.optimizer.learning_rate = 5e-4
    config.optimizer.weight_decay = 0.01
    config.optimizer.clip_norm = 1.0
    config.schedule.warmup_steps = 500
    config.train.epochs = 5
    config.train.steps_per_execution = 20
    config.train.jit_compile = True
    config.export.name = "imdb_transformer"
    return config.lock()
