"""The default run: a small CNN on scikit-learn's embedded 8x8 digits (trains on 2 CPU cores in about a minute).

    python -m kerasbig.train --config=configs/digits_cnn.py
"""
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "digits"
    config.data.batch_size = 64
    config.data.augment = True
    config.model = dict(name="cnn", filters=(32, 64), kernel_size=3, dense=128, dropout=0.3, batch_norm=True)
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.warmup_steps = 50
    config.schedule.decay = "cosine"
    config.train.epochs = 40
    config.train.steps_per_execution = 4
    config.export.name = "digits_cnn"
    return config.lock()
