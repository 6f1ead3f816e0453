"""Run configuration: OmegaConf structured dataclasses + YAML + `key=value` overrides.

Modelled on OLMo's `BaseConfig.load`: the dataclasses are the schema, so an unknown or
mistyped key is an error naming the key, and the resolved config is saved with every run
and checkpoint.  Phases are a mapping name -> PhaseConfig so that overrides read well
(`phases.sft.optim.lr=1e-4`) and the YAML order is the execution order.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from models.gpt import ModelConfig
from trainer.errors import ConfigError

PHASE_KINDS = ("pretrain", "sft", "rl")
PRETRAIN_MODES = ("stationary", "continual")
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class DataConfig:
    corpus_dir: str = ""  # "" = the corpus bundled in data/corpus
    vocab_size: int = 2048  # sentencepiece vocabulary; the model's vocab_size follows the tokenizer
    tokenizer_languages: List[str] = field(default_factory=list)  # [] = every corpus language (docs/data.md)
    tokenizer_sample_lines: int = 20000  # per language, for tokenizer training
    val_fraction: float = 0.05  # per language, held out for validation
    cache_dir: str = ".cache/plasticity"  # tokenizers and tokenized corpora, keyed by content hash


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd | constant (all after linear warm-up)
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: the last fraction of steps that decays linearly
    weight_decay: float = 0.1  # decoupled (AdamW)
    no_decay: List[str] = field(default_factory=lambda: ["norm", "bias", "embedding"])
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class SFTConfig:
    task_families: List[str] = field(default_factory=lambda: ["add", "reverse", "sort", "copy"])
    data_files: List[str] = field(default_factory=list)  # extra user jsonl files {"prompt","response"}
    num_examples: int = 4000
    eval_examples: int = 64
    max_new_tokens: int = 12


@dataclass
class RLConfig:
    task_families: List[str] = field(default_factory=lambda: ["add", "reverse", "sort", "copy"])
    prompts_per_step: int = 8  # global, split across ranks
    group_size: int = 8  # completions per prompt (GRPO group)
    max_new_tokens: int = 12
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # > 0 keeps a frozen reference copy
    eval_examples: int = 64


@dataclass
class PhaseConfig:
    kind: str = "pretrain"  # pretrain | sft | rl
    # pretraining: `continual` trains one language per task; `stationary` mixes all languages
    # and places a boundary every `steps_per_task` steps, so both modes see the same budget.
    mode: str = "stationary"
    languages: List[str] = field(default_factory=lambda: ["en", "fr", "de"])
    weights: List[float] = field(default_factory=list)  # stationary mixture weights ([] = uniform)
    steps_per_task: int = 50
    cycles: int = 1  # continual: how many times the language sequence repeats
    steps: int = 0  # sft / rl: total optimizer steps
    reset_optimizer_per_task: bool = True  # Hernandez-Garcia et al. reset Adam at every task
    reset_warmup_per_task: bool = True  # ...and re-warm the learning rate
    init_from: str = "previous"  # previous | fresh | path to a checkpoint directory
    load_optimizer_state: bool = False  # keep Adam moments from the previous phase
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    seed: int = 1337
    micro_batch_size: int = 16  # per process
    grad_accum: int = 1
    eval_interval: int = 50  # steps; evaluation also runs at every task/phase end
    eval_batches: int = 4  # per language
    log_interval: int = 10
    ckpt_interval: int = 100  # 0 = only at task/phase ends
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest valid checkpoint, if any) | never | path to a checkpoint
    force: bool = False  # allow reusing a run dir whose saved config differs
    mixed_precision: str = "no"  # no | bf16 | fp16
    max_nonfinite_steps: int = 5  # skipped non-finite steps tolerated before stopping
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # A preset name from models.sizes.PRESETS or a non-embedding parameter count ("50k", "1M",
    # "5e6"); when set it chooses n_layer/n_head/n_embd and the explicit fields are ignored.
    model_size: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    phases: Dict[str, PhaseConfig] = field(default_factory=dict)
    callbacks: List[Any] = field(default_factory=list)  # instruments/mitigations: [{name: ..., ...}]


def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    _reject_duplicate_keys(yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader), path)
    return loaded


def _reject_duplicate_keys(node, path: Path, prefix: str = "") -> None:
    """yaml.safe_load keeps the last of two equal keys, silently dropping e.g. a whole phase."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, path, f"{prefix}{i}.")
    elif isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                if key in seen:
                    raise ConfigError(f"config file {path}: duplicate key '{prefix}{key}' "
                                      f"(line {key_node.start_mark.line + 1})")
                seen.add(key)
            _reject_duplicate_keys(value_node, path, f"{prefix}{key}.")


def _key_of(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", "") or getattr(e, "key", "") or "?")


def _check_shapes(schema: DictConfig, src: dict, origin: str, prefix: str = "") -> None:
    """A list where the schema has a mapping (or the reverse) fails here naming its key: OmegaConf's own
    error for it is a TypeError without a key (or a '?')."""
    element = schema._metadata.element_type  # Dict[str, PhaseConfig]: the schema of a new phase
    for k, v in src.items():
        key = f"{prefix}{k}"
        try:
            node = schema._get_node(k)
        except OmegaConfBaseException:  # an unknown key: named by the merge
            continue
        if node is None and dataclasses.is_dataclass(element):
            node = OmegaConf.structured(element)
        if v is None or (isinstance(v, str) and "${" in v):
            continue
        if isinstance(node, DictConfig) and not isinstance(v, dict):
            raise ConfigError(f"bad value for config key '{key}' (from {origin}): must be a mapping, "
                              f"got {type(v).__name__} {v!r}")
        if isinstance(node, ListConfig) and not isinstance(v, list):
            raise ConfigError(f"bad value for config key '{key}' (from {origin}): must be a list, "
                              f"got {type(v).__name__} {v!r}")
        if isinstance(node, DictConfig):
            _check_shapes(node, v, origin, f"{key}.")


def load_config(path: Optional[str | Path] = None, overrides: List[str] = ()) -> RunConfig:
    """YAML file (optional) + dotlist overrides, merged onto the schema and validated."""
    cfg = _schema()
    sources = []
    if path is not None:
        sources.append((str(path), _read_yaml(Path(path))))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
    if overrides:
        try:
            sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad override: {e.msg if hasattr(e, 'msg') else e}") from None
    for origin, src in sources:
        if isinstance(src, DictConfig):
            src = OmegaConf.to_container(src, resolve=False)
        _check_shapes(cfg, src, origin)
        try:
            cfg = OmegaConf.merge(cfg, src)
        except ConfigKeyError as e:
            raise ConfigError(f"unknown config key '{_key_of(e)}' (from {origin})") from None
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            raise ConfigError(f"bad value for config key '{_key_of(e)}' (from {origin}): {msg}") from None
        except (TypeError, ValueError) as e:  # shapes OmegaConf cannot merge that _check_shapes did not name
            raise ConfigError(f"bad value in the config (from {origin}): {e}") from None
    try:
        run_cfg: RunConfig = OmegaConf.to_object(cfg)  # resolves ${...} interpolations
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value for config key '{_key_of(e)}': {str(e).splitlines()[0]}") from None
    validate(run_cfg)
    return run_cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: RunConfig) -> None:
    """Impossible values fail here, before anything is written."""
    t, d = cfg.trainer, cfg.data
    _require(bool(cfg.phases), "phases", "at least one phase is required")
    _require(t.micro_batch_size >= 1, "trainer.micro_batch_size", "must be >= 1")
    _require(t.grad_accum >= 1, "trainer.grad_accum", "must be >= 1")
    _require(t.mixed_precision in PRECISIONS, "trainer.mixed_precision", f"must be one of {PRECISIONS}")
    _require(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", "must be >= 1")
    _require(t.eval_interval >= 1, "trainer.eval_interval", "must be >= 1")
    _require(t.log_interval >= 1, "trainer.log_interval", "must be >= 1")
    _require(t.ckpt_interval >= 0, "trainer.ckpt_interval", "must be >= 0")
    _require(d.vocab_size >= 300, "data.vocab_size", "must be >= 300 (byte fallback needs 256 pieces)")
    _require(0.0 < d.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)")
    first_name, first = next(iter(cfg.phases.items()))
    for name, p in cfg.phases.items():
        k = f"phases.{name}"
        # The optimizer's parameter groups are built once, from the first phase (trainer/optim.py).
        _require(set(p.optim.no_decay) == set(first.optim.no_decay), f"{k}.optim.no_decay",
                 f"{list(p.optim.no_decay)} differs from phase '{first_name}' ({list(first.optim.no_decay)}): "
                 f"the decay/no-decay parameter groups are fixed for the whole run")
        _require(p.kind in PHASE_KINDS, f"{k}.kind", f"'{p.kind}' is not one of {PHASE_KINDS}")
        o = p.optim
        _require(o.lr > 0 and math.isfinite(o.lr), f"{k}.optim.lr", f"must be a positive number, got {o.lr}")
        _require(0.0 <= o.min_lr_ratio <= 1.0, f"{k}.optim.min_lr_ratio", "must be in [0, 1]")
        _require(o.schedule in SCHEDULES, f"{k}.optim.schedule", f"'{o.schedule}' is not one of {SCHEDULES}")
        _require(o.warmup_steps >= 0, f"{k}.optim.warmup_steps", "must be >= 0")
        _require(0.0 < o.decay_fraction <= 1.0, f"{k}.optim.decay_fraction", "must be in (0, 1]")
        _require(o.weight_decay >= 0, f"{k}.optim.weight_decay", "must be >= 0")
        _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"{k}.optim.betas", "need two values in [0, 1)")
        _require(o.grad_clip >= 0, f"{k}.optim.grad_clip", "must be >= 0")
        if p.kind == "pretrain":
            _require(p.mode in PRETRAIN_MODES, f"{k}.mode", f"'{p.mode}' is not one of {PRETRAIN_MODES}")
            _require(bool(p.languages), f"{k}.languages", "at least one language is required")
            _require(p.steps_per_task >= 1, f"{k}.steps_per_task", "must be >= 1")
            _require(p.cycles >= 1, f"{k}.cycles", "must be >= 1")
            _require(not p.weights or len(p.weights) == len(p.languages), f"{k}.weights",
                     "needs one weight per language")
            _require(all(w >= 0 for w in p.weights) and (not p.weights or sum(p.weights) > 0), f"{k}.weights",
                     "weights must be >= 0 and not all zero")
        else:
            _require(p.steps >= 1, f"{k}.steps", f"a {p.kind} phase needs steps >= 1")
        if p.kind == "rl":
            _require(p.rl.group_size >= 2, f"{k}.rl.group_size", "GRPO needs at least 2 completions per prompt")
            _require(p.rl.prompts_per_step >= 1, f"{k}.rl.prompts_per_step", "must be >= 1")
            _require(p.rl.temperature > 0, f"{k}.rl.temperature", "must be > 0")
            _require(0 < p.rl.top_p <= 1, f"{k}.rl.top_p", "must be in (0, 1]")
            _require(p.rl.max_new_tokens >= 1, f"{k}.rl.max_new_tokens", "must be >= 1")
            _require(p.rl.clip_eps > 0, f"{k}.rl.clip_eps", "must be > 0")
            _require(p.rl.kl_coef >= 0, f"{k}.rl.kl_coef", "must be >= 0")
        if p.kind == "sft":
            _require(p.sft.max_new_tokens >= 1, f"{k}.sft.max_new_tokens", "must be >= 1")
    for i, entry in enumerate(cfg.callbacks):
        _require(isinstance(entry, dict) and "name" in entry, f"callbacks.{i}", "each entry needs a 'name'")
        scope = entry.get("phases", [])
        _require(isinstance(scope, list), f"callbacks.{i}.phases", f"must be a list of phase names, got {scope!r}")
        unknown = [n for n in scope if not isinstance(n, str) or n not in cfg.phases]
        _require(not unknown, f"callbacks.{i}.phases",
                 f"unknown phase {', '.join(map(repr, unknown))} (phases: {', '.join(cfg.phases)})")
    _validate_model(cfg)
    _validate_resume(t.resume)
    _validate_rl_world(cfg)
    _validate_sources(cfg)


def _validate_model(cfg: RunConfig) -> None:
    """Model shape errors before the run dir is touched (the vocab size follows the tokenizer later)."""
    if cfg.model_size:
        from models.sizes import PRESETS

        if cfg.model_size not in PRESETS:
            from models.sizes import config_for_params
            from trainer.model_setup import parse_count

            count = parse_count(cfg.model_size)
            _require(count > 0, "model_size", f"'{cfg.model_size}' must be > 0 parameters")
            m = cfg.model  # the vocabulary follows the tokenizer later; it does not change the search
            config_for_params(count, flavour=m.flavour, vocab_size=m.vocab_size, block_size=m.block_size)
    else:
        dataclasses.replace(cfg.model).validate()  # raises ConfigError naming model.<field>


def _validate_resume(resume: str) -> None:
    if resume in ("auto", "never"):
        return
    from trainer.checkpoint import MANIFEST

    path = Path(resume)
    _require(path.is_dir(), "trainer.resume", f"'{resume}' is neither auto, never nor a checkpoint directory")
    _require((path / MANIFEST).is_file(), "trainer.resume", f"{resume} is not a complete checkpoint (no {MANIFEST})")


def _validate_rl_world(cfg: RunConfig) -> None:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    for name, p in cfg.phases.items():
        if p.kind == "rl":
            check_rl_world(name, p, world)


def check_rl_world(name: str, p: PhaseConfig, world: int) -> None:
    """An RL step's prompts are split evenly over the processes."""
    _require(p.rl.prompts_per_step % world == 0, f"phases.{name}.rl.prompts_per_step",
             f"{p.rl.prompts_per_step} is not divisible by the number of processes ({world})")


def _validate_sources(cfg: RunConfig) -> None:
    """Data paths named in the config must exist (cheap checks, before the run dir is touched).

    Language codes are checked when the corpus is read (a DataError naming the language), so
    that loading a config does not depend on which corpus is installed on this machine.
    """
    from data import corpus

    d = cfg.data
    if d.corpus_dir:
        _require(Path(d.corpus_dir).is_dir(), "data.corpus_dir", f"corpus directory not found: {d.corpus_dir}")
    wanted = [("data.tokenizer_languages", lang) for lang in d.tokenizer_languages]
    wanted += [(f"phases.{name}.languages", lang) for name, p in cfg.phases.items() if p.kind == "pretrain"
               for lang in p.languages]
    for key, lang in wanted:
        if corpus._looks_like_path(lang):
            _require(lang.endswith(corpus._USER_SUFFIXES), key,
                     f"data file {lang}: unsupported type (expected one of {', '.join(corpus._USER_SUFFIXES)})")
            _require(os.path.isfile(lang), key, f"data file not found: {lang}")
    for name, p in cfg.phases.items():
        if p.kind == "sft":
            for f in p.sft.data_files:
                _require(os.path.isfile(f), f"phases.{name}.sft.data_files", f"data file not found: {f}")
