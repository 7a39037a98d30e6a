"""A transformer encoder classifying standard-library source snippets by their package (text shipped with CPython).
Bytes are grouped in patches of 4 (byte 4-grams as units), which keeps it fast on a CPU.

    python -m kerasbig.train --config=configs/text_transformer.py
"""
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "text_classification"
    config.data.seq_len = 256
    config.data.batch_size = 64
    config.model = dict(name="transformer", vocab_size=256, width=96, depth=2, heads=4, mlp_ratio=4, dropout=0.1,
                        pooling="mean", patch_size=4)
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.clip_norm = 1.0
    config.schedule.warmup_steps = 100
    config.train.epochs = 4
    config.train.early_stopping.enabled = True
    config.train.early_stopping.monitor = "val_accuracy"
    config.train.early_stopping.patience = 2
    config.train.steps_per_execution = 4
    config.train.jit_compile = True
    config.export.name = "text_transformer"
    return config.lock()
