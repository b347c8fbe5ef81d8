"""Test hooks for the processes of `accelerate launch` (tests/test_train_processes.py puts this folder on
PYTHONPATH): each process records what it trained on and sampled, to a file of its own rank, and can be
made to fail at a step, as a killed run would.

DDP_TEST_RECORD=FOLDER: `rank-R.jsonl` gets one row per training batch (`train sft`: the decoded rows) and
per rollout round (`train grpo --rollouts engine`: the prompts, the engine's request keys and the class of
the trainer's wrapped model). DDP_TEST_CRASH_STEP=N: every process raises at the end of step N;
DDP_TEST_CRASH_ROWS=N: every process of a generation run raises once it has journalled N rows.
Nothing heavy is imported here: the hooks wrap gsmkit's classes and load torch only when called.
"""

import json
import os
from pathlib import Path

RECORD = os.environ.get("DDP_TEST_RECORD")
CRASH = os.environ.get("DDP_TEST_CRASH_STEP")


def _write(row):
    path = Path(RECORD) / f"rank-{os.environ.get('RANK', '0')}.jsonl"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


if RECORD:
    from gsmkit.training import collate, rollouts

    real_collate = collate.PadCollator.__call__

    def recording_collate(self, rows):
        batch = real_collate(self, rows)
        _write({"kind": "batch", "rows": [list(map(int, r["input_ids"])) for r in rows]})
        return batch

    collate.PadCollator.__call__ = recording_collate
    real_rollout = rollouts.EngineRollouts.__call__

    def recording_rollout(self, prompts, trainer):
        out = real_rollout(self, prompts, trainer)
        _write({"kind": "rollout", "step": trainer.state.global_step, "prompts": [str(p) for p in prompts],
                "keys": sorted({r.key for r in self.last}), "wrapped": type(trainer.model_wrapped).__name__,
                "policy": type(trainer.accelerator.unwrap_model(trainer.model)).__name__})
        return out

    rollouts.EngineRollouts.__call__ = recording_rollout

if CRASH:
    from gsmkit.training import callbacks

    real_callbacks = callbacks.log_callbacks

    def crashing_callbacks(*args, **kwargs):
        from transformers import TrainerCallback

        class Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # noqa: ARG002 - the Trainer's signature
                if state.global_step == int(CRASH):
                    raise RuntimeError(f"killed at step {CRASH} (test)")

        return [*real_callbacks(*args, **kwargs), Crash()]

    callbacks.log_callbacks = crashing_callbacks

CRASH_ROWS = os.environ.get("DDP_TEST_CRASH_ROWS")
if CRASH_ROWS:  # every process of `eval gsm8k` / `generate-traces` fails after journalling N rows
    from gsmkit.evaluation import run as problem_run

    real_record = problem_run.ProblemRun.record

    def crashing_record(self, key, row):
        real_record(self, key, row)
        self._test_rows = getattr(self, "_test_rows", 0) + 1
        if self._test_rows == int(CRASH_ROWS):
            raise RuntimeError(f"killed after {CRASH_ROWS} rows (test)")

    problem_run.ProblemRun.record = crashing_record
