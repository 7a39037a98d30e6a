"""Pre-training GPT-2 small (124M) for GPUs and TPUs; `--mode=dry_run` plans it on any machine.

    python -m kerasbig.train --config=configs/gpt2_124m.py --mode=dry_run
"""
from kerasbig.config import gpt_pretraining


def get_config():
    return gpt_pretraining("gpt2_124m").lock()
