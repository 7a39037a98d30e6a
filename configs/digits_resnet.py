"""A small ResNet on the embedded 8x8 digits.

    python -m kerasbig.train --config=configs/digits_resnet.py
"""
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "digits"
    config.data.batch_size = 64
    config.data.augment = True
    config.model = dict(name="resnet", stage_widths=(32, 64), blocks_per_stage=(1, 1), bottleneck=False,
                        stem_width=32, dropout=0.2)
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 1e-4
    config.schedule.warmup_steps = 50
    config.train.epochs = 40
    config.train.steps_per_execution = 4
    config.export.name = "digits_resnet"
    return config.lock()
