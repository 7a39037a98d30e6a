"""A ResNet on CIFAR-10 from TensorFlow Datasets (prepared locally: `--config.data.data_dir` or TFDS_DATA_DIR).

    python -m kerasbig.train --config=configs/cifar10_resnet.py --strategy=mirrored --mixed_precision=mixed_bfloat16
"""
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "tfds:cifar10"
    config.data.batch_size = 256
    config.data.eval_batch_size = 512
    config.model = dict(name="resnet", stage_widths=(64, 128, 256), blocks_per_stage=(2, 2, 2), bottleneck=False,
                        stem_width=64, dropout=0.0)
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.label_smoothing = 0.1
    config.schedule.warmup_steps = 500
    config.train.epochs = 60
    config.train.steps_per_execution = 50
    config.train.jit_compile = True
    config.export.name = "cifar10_resnet"
    return config.lock()
