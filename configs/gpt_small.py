"""A byte-level GPT on English documentation shipped with CPython (pydoc topics): trains on 2 CPU cores in minutes.

    python -m kerasbig.train --config=configs/gpt_small.py
    python -m kerasbig.generate --workdir=logs/gpt_small --prompt="The for statement"
"""
from kerasbig import lora
from kerasbig.config import base


def get_config():
    config = base()
    config.data.name = "text_lm"
    config.data.source = "pydoc_topics"
    config.data.seq_len = 128
    config.data.batch_size = 32
    config.data.eval_batch_size = 64
    config.model = dict(name="gpt", width=128, depth=4, heads=4, mlp_ratio=4, dropout=0.1, bias=True,
                        **lora.DEFAULTS)
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 0.1
    config.optimizer.clip_norm = 1.0
    config.schedule.warmup_steps = 100
    config.schedule.decay = "cosine"
    config.schedule.min_learning_rate = 1e-4
    config.train.steps = 1500             # language models count steps: about 16 passes over the 91-step data
    config.train.eval_every_steps = 250   # validation, a generated sample and a checkpoint every 250 steps
    config.train.steps_per_execution = 10
    config.train.jit_compile = True
    config.export.name = "gpt_small"
    return config.lock()
