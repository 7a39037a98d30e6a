"""A multi-layer perceptron on the embedded 8x8 digits: the smallest model, fast enough for every test.

    python -m kerasbig.train --config=configs/digits_mlp.py
"""
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "digits"
    config.data.batch_size = 64
    config.model = dict(name="mlp", hidden=(256, 128), dropout=0.2, activation="relu")
    config.optimizer.learning_rate = 2e-3
    config.schedule.warmup_steps = 20
    config.train.epochs = 30
    config.train.steps_per_execution = 4  # a step of ~1.5 ms: the loop's Python per call is 1-2% of it
    config.export.name = "digits_mlp"
    return config.lock()
