"""A bidirectional GRU classifying standard-library source snippets by their package (text shipped with CPython).

    python -m kerasbig.train --config=configs/text_rnn.py
"""
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "text_classification"
    config.data.seq_len = 256
    config.data.batch_size = 64
    config.model = dict(name="rnn", cell="gru", units=64, layers=1, bidirectional=True, embed_dim=32, dropout=0.1,
                        vocab_size=256)
    config.optimizer.learning_rate = 3e-3
    config.optimizer.clip_norm = 1.0
    config.schedule.warmup_steps = 50
    config.train.epochs = 6
    config.train.early_stopping.enabled = True
    config.train.early_stopping.monitor = "val_accuracy"
    config.train.early_stopping.patience = 2
    config.train.steps_per_execution = 4
    config.export.name = "text_rnn"
    return config.lock()
