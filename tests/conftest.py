"""Shared fixtures: one tokenizer cache for the whole session, tiny run configs."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from trainer.callbacks import Callback  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Tokenizers/tokenized data are keyed by content hash, so sharing them across tests is safe."""
    return str(tmp_path_factory.mktemp("plasticity-cache"))


def tiny_overrides(run_dir, cache_dir, **extra):
    """A model and data small enough that a few dozen steps take seconds."""
    base = {
        "trainer.run_dir": str(run_dir), "data.cache_dir": cache_dir, "data.vocab_size": 512,
        "data.tokenizer_languages": "[en,fr,de]", "data.tokenizer_sample_lines": 2000,
        "model.block_size": 32, "model.n_layer": 1, "model.n_head": 1, "model.n_embd": 32,
        "trainer.micro_batch_size": 4, "trainer.eval_batches": 1, "trainer.log_interval": 1,
        "trainer.progress": "false", "trainer.tensorboard": "false",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


class StopAt(Callback):
    """Requests a stop (as SIGTERM would) after the given global step."""

    def __init__(self, step):
        self.step = step

    def post_step(self, trainer, logs):
        if trainer.global_step == self.step:
            trainer._stop_requested = True
