"""`plasticity export RUN_DIR --format hf`: a transformers-loadable model + tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from models.gpt import GPT, ModelConfig
from trainer.errors import CheckpointError, UserError


def export_run(run_dir: str, out: Optional[str] = None, fmt: str = "hf", phase: Optional[str] = None) -> Path:
    from models.hf import export_hf
    from trainer.loop import load_weights

    run = Path(run_dir)
    phases_dir = run / "phases"
    if not phases_dir.is_dir() or not any(phases_dir.iterdir()):
        raise CheckpointError(f"{run} has no finished phase to export (no {phases_dir})")
    if phase is None:  # the last finished phase in config order
        import yaml
        order = list((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("phases", {}))
        done = [p for p in order if (phases_dir / p / "model.safetensors").is_file()]
        if not done:
            raise CheckpointError(f"{run} has no finished phase to export")
        phase = done[-1]
    src = phases_dir / phase
    if not (src / "model_config.json").is_file():
        raise CheckpointError(f"phase '{phase}' of {run} has no exported model (looked in {src})")
    model = GPT(ModelConfig(**json.loads((src / "model_config.json").read_text())))
    load_weights(model, src)
    target = Path(out) if out else run / "export" / f"{phase}-{fmt}"
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} exists and is not a directory")
    tok = run / "tokenizer.model"
    try:
        export_hf(model, target, tokenizer_model_path=tok if tok.is_file() else None)
    except OSError as e:  # e.g. a parent of --out is a file, or the disk is full
        raise UserError(f"could not export to {target}: {e.strerror or e} ({e.filename or target})") from None
    return target
