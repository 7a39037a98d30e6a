"""Pre-training a 6.7B-parameter GPT (context 2048) for GPUs and TPUs; `--mode=dry_run` plans it on any machine.

    python -m kerasbig.train --config=configs/gpt_7b.py --mode=dry_run
"""
from kerasbig.config import gpt_pretraining


def get_config():
    return gpt_pretraining("gpt_7b").lock()
