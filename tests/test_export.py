"""`plasticity export RUN --format hf`: a run's phase model loads in transformers and agrees."""
from pathlib import Path

import torch

from conftest import tiny_overrides
from trainer.cli import main as cli_main
from trainer.config import load_config
from trainer.loop import Trainer

CONTINUAL = Path(__file__).parent / "data" / "continual_tiny.yaml"


def test_export_run_loads_in_transformers(tmp_path, cache_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.gpt import GPT, ModelConfig
    from trainer.loop import load_weights
    import json

    run = tmp_path / "r"
    Trainer(load_config(CONTINUAL, tiny_overrides(run, cache_dir, **{"phases.pre.steps_per_task": 2}))).run()
    assert cli_main(["export", str(run), "--format", "hf"]) == 0
    out = run / "export" / "pre-hf"
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours = GPT(ModelConfig(**json.loads((run / "phases" / "pre" / "model_config.json").read_text()))).eval()
    load_weights(ours, run / "phases" / "pre")
    ids = torch.tensor([tok("Hello world, bonjour le monde")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids)[0], atol=1e-5)


def test_export_without_finished_phase_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "nothing")]) == 2
    assert "no finished phase" in capsys.readouterr().err
