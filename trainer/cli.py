"""`plasticity` command line. Bad input of any kind: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from trainer.errors import UserError


def _train(args) -> int:
    from trainer.config import load_config
    from trainer.loop import train

    cfg = load_config(args.config, args.overrides)
    outcome = train(cfg)
    print(f"{outcome}: {cfg.trainer.run_dir}")
    return 0


def _data_build(args) -> int:
    from data.corpus_builder import main as build_main

    return build_main(args.rest)


def _export(args) -> int:
    from trainer.export import export_run

    out = export_run(args.run_dir, args.out, fmt=args.format, phase=args.phase)
    print(f"exported to {out}")
    return 0


def _slurm(args) -> int:
    from launch.slurm import main as slurm_main

    return slurm_main(args.rest)


# Sub-commands provided by other modules: name -> (module, help). Each module has main(argv) -> int.
DELEGATED: Dict[str, tuple] = {
    "compare": ("trainer.compare", "compare runs: table + plot of probe ΔAUC and dormancy"),
    "study": ("trainer.study", "scaling studies: run a grid, analyse, report"),
    "report": ("trainer.study_report", "write the Markdown/PNG report of a study dir"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plasticity", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a run config (all of its phases)"),
                            ("run", "same as train: run a pipeline config")):
        t = sub.add_parser(name, help=help_text)
        t.add_argument("config", help="YAML config file")
        t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.run_dir=runs/x")
        t.set_defaults(func=_train)
    d = sub.add_parser("data", help="data tools: `plasticity data build --out DIR`")
    d.add_argument("action", choices=["build"])
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(func=_data_build)
    e = sub.add_parser("export", help="export a run's model (HF transformers format)")
    e.add_argument("run_dir")
    e.add_argument("--format", default="hf", choices=["hf"])
    e.add_argument("--phase", default=None, help="phase name (default: the last finished phase)")
    e.add_argument("--out", default=None, help="output dir (default RUN_DIR/export/PHASE-hf)")
    e.set_defaults(func=_export)
    s = sub.add_parser("slurm", help="render (and optionally submit) a Slurm batch script")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_slurm)
    for name, (module, help_text) in DELEGATED.items():
        x = sub.add_parser(name, help=help_text, add_help=False)
        x.add_argument("rest", nargs=argparse.REMAINDER)
        x.set_defaults(func=lambda a, m=module: __import__(m, fromlist=["main"]).main(a.rest))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("slurm", *DELEGATED):
        # everything after the name goes to that command's own parser, --help included (argparse's REMAINDER
        # would reject a leading option such as --help)
        args = parser.parse_args(argv[:1])
        args.rest = argv[1:]
    else:
        args = parser.parse_args(argv)  # argparse already exits 2 with a one-line usage error
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"plasticity: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
