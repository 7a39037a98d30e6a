"""Pre-training GPT-2 XL (1.5B) for GPUs and TPUs; `--mode=dry_run` plans it on any machine.

    python -m kerasbig.train --config=configs/gpt2_1558m.py --mode=dry_run
"""
from kerasbig.config import gpt_pretraining


def get_config():
    return gpt_pretraining("gpt2_1558m").lock()
