"""Logs across resumes: metrics.jsonl, boundaries.jsonl and TensorBoard hold every step once
(docs/reliability.md, "Known limits")."""
import json
import shutil

import pytest

import reliability_helpers
from reliability_helpers import CONTINUAL, metric_rows, overrides
from conftest import StopAt
from trainer.callbacks import Callback
from trainer.config import load_config
from trainer.loop import Trainer

corpus_dir = reliability_helpers.corpus_dir  # the fixture, requested by name

STEPS = 18  # continual_tiny: 3 tasks x 6 steps


def ckpt_dir(run, step):
    return run / "checkpoints" / f"step_{step:08d}"


def test_replayed_steps_are_not_logged_twice(tmp_path, cache_dir, corpus_dir):
    run = tmp_path / "run"
    cfg = lambda: load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir))  # noqa: E731
    assert Trainer(cfg(), [StopAt(5)]).run() == "preempted"
    shutil.rmtree(ckpt_dir(run, 5))  # as if killed after step 5 was logged but before its checkpoint
    assert Trainer(cfg()).run() == "done"
    steps = [r["step"] for r in metric_rows(run) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))


class LogTaskStart(Callback):
    def on_task_start(self, trainer):
        trainer.log({"test/task_start": float(trainer.task_idx)})


def test_resume_at_a_task_boundary_logs_task_start_once(tmp_path, cache_dir, corpus_dir):
    """The task-end checkpoint is written before the next task's on_task_start logs at the same step; a resume
    from it fires on_task_start again, so metrics.jsonl goes back to what it held at the checkpoint."""
    run = tmp_path / "run"
    cfg = lambda: load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir, **{"trainer.keep_checkpoints": 9}))  # noqa: E731
    assert Trainer(cfg(), [LogTaskStart()]).run() == "done"
    for step in (14, 16, 18):  # as if killed during the third task: resume from the task-end checkpoint at 12
        shutil.rmtree(ckpt_dir(run, step))
    assert Trainer(cfg(), [LogTaskStart()]).run() == "done"
    starts = [(r["step"], r["test/task_start"]) for r in metric_rows(run) if "test/task_start" in r]
    assert starts == [(0, 0.0), (6, 1.0), (12, 2.0)]
    assert [r["step"] for r in metric_rows(run) if "train/loss" in r] == list(range(1, STEPS + 1))


def test_tensorboard_drops_replayed_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trainer.logger import RunLogger

    log = RunLogger(tmp_path, enabled=True)
    for step in range(1, 11):
        log.scalars(step, {"loss": float(step)})
        if step == 5:
            at_checkpoint = log.position()
    log.close()
    log = RunLogger(tmp_path, enabled=True)  # the resumed process
    log.rewind(5, at_checkpoint)
    for step in range(6, 11):
        log.scalars(step, {"loss": 100.0 + step})
    log.close()
    assert [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [1.0, 2.0, 3.0, 4.0, 5.0, 106.0, 107.0, 108.0, 109.0, 110.0]
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == \
        [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 11)]


@pytest.mark.parametrize("resume", ["auto", "never"])
def test_restart_without_checkpoint_logs_each_step_once(tmp_path, cache_dir, corpus_dir, resume):
    run = tmp_path / "run"
    instruments = "[{name: instruments, probe: false, sharpness_iters: 0}]"  # incl. the run-start boundary
    cfg = lambda **kw: load_config(CONTINUAL, overrides(run, cache_dir, corpus_dir, callbacks=instruments, **kw))  # noqa: E731
    assert Trainer(cfg(), [StopAt(3)]).run() == "preempted"
    shutil.rmtree(run / "checkpoints")  # as if killed after step 3, before the first checkpoint
    (run / "boundaries.jsonl").write_text('{"boundary": 0, "label": "stale", "global_step": 0}\n')
    assert Trainer(cfg(**{"trainer.resume": resume})).run() == "done"
    steps = [r["step"] for r in metric_rows(run) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))
    # the stale row is gone: every boundary is measured again, once
    rows = [json.loads(l) for l in (run / "boundaries.jsonl").read_text().splitlines()]
    assert [(r["boundary"], r["label"]) for r in rows] == [(0, "init"), (1, "pre-en"), (2, "pre-fr"), (3, "pre-de")]


def test_instruments_of_a_later_phase_trim_their_rows_on_resume(tmp_path, cache_dir, corpus_dir):
    """Instruments scoped to phase `b`, resumed from a checkpoint inside phase `a`: the rows that the lost
    attempt measured in `b` are dropped at the run start (not only when `b` begins), and `b` logs each once."""
    cfg_file = tmp_path / "two_phases.yaml"
    cfg_file.write_text(CONTINUAL.read_text().replace("  pre:", "  a:") + """\
  b:
    kind: pretrain
    mode: continual
    languages: [fr, de]
    steps_per_task: 4
""")
    run = tmp_path / "run"
    instruments = "[{name: instruments, probe: false, sharpness_iters: 0, phases: [b]}]"
    cfg = lambda: load_config(cfg_file, overrides(run, cache_dir, corpus_dir, callbacks=instruments,  # noqa: E731
                                                  **{"trainer.keep_checkpoints": 99}))
    assert Trainer(cfg()).run() == "done"
    labels = lambda: [json.loads(l)["label"] for l in (run / "boundaries.jsonl").read_text().splitlines()]  # noqa: E731
    assert labels() == ["b-fr", "b-de"]
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        if int(ckpt.name[5:]) > 10:  # resume inside phase a (18 steps), after its first checkpoints
            shutil.rmtree(ckpt)
    assert Trainer(cfg(), [StopAt(12)]).run() == "preempted"  # still in phase a
    assert not (run / "boundaries.jsonl").read_text()  # b's rows are about to be measured again
    assert Trainer(cfg()).run() == "done"
    assert labels() == ["b-fr", "b-de"]
