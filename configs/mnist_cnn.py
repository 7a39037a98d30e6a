"""A CNN on MNIST from TensorFlow Datasets (the data must be prepared on this machine: `--config.data.data_dir`
or TFDS_DATA_DIR; kerasbig never downloads at run time).

    python -m kerasbig.train --config=configs/mnist_cnn.py --config.data.data_dir=/data/tensorflow_datasets
"""
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "tfds:mnist"
    config.data.batch_size = 128
    config.data.eval_batch_size = 512
    config.model = dict(name="cnn", filters=(32, 64), kernel_size=3, dense=128, dropout=0.3, batch_norm=True)
    config.optimizer.learning_rate = 2e-3
    config.schedule.warmup_steps = 200
    config.train.epochs = 8
    config.train.steps_per_execution = 20
    config.export.name = "mnist_cnn"
    return config.lock()
