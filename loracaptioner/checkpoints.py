"""Finding the checkpoint to resume from: only a completely written one counts."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_problem(checkpoint: str | os.PathLike) -> str:
    """'' when a checkpoint folder was completely written, else what is wrong with it.

    The Trainer (transformers 5.24, `Trainer._save_checkpoint`) writes a checkpoint in place, with no temporary folder
    and no rename: weights, optimizer, scheduler, RNG state, and `trainer_state.json` last. So a folder whose
    `trainer_state.json` is missing, unreadable or of another step was cut off while being written. (Under DDP the
    other ranks write their `rng_state_<rank>.pth` alongside; one missing costs only the exact RNG stream, and the
    Trainer warns.)"""
    state_file = Path(checkpoint) / TRAINER_STATE_NAME
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME} (written last: the save was cut off)"
    except (OSError, ValueError) as error:
        return f"unreadable {TRAINER_STATE_NAME} ({type(error).__name__}: {error})"
    match = _CHECKPOINT.match(Path(checkpoint).name)
    if match and state.get("global_step") != int(match.group(1)):
        return f"{TRAINER_STATE_NAME} is for step {state.get('global_step')}, not {match.group(1)}"
    return ""


def last_complete_checkpoint(output_dir: str | os.PathLike, set_aside_incomplete: bool = False) -> str | None:
    """The highest-numbered `checkpoint-N` in `output_dir` that was completely written (see `checkpoint_problem`),
    or None. Newer, incomplete ones are logged and, with `set_aside_incomplete` (the main process only), renamed to
    `checkpoint-N.incomplete-<time>`: left in place, the Trainer would later write step N into the half-written
    folder, and its checkpoint rotation (by modification time) could then delete the newest checkpoint."""
    if not os.path.isdir(output_dir):
        return None
    steps = {int(m.group(1)): name for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))}
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, steps[step])
        if not os.path.isdir(path):
            continue
        problem = checkpoint_problem(path)
        if not problem:
            return path
        if set_aside_incomplete:
            aside = f"{path}.incomplete-{int(time.time())}"
            os.rename(path, aside)
            logger.warning(f"skipping incomplete checkpoint {path}: {problem}; moved to {aside}")
        else:
            logger.warning(f"skipping incomplete checkpoint {path}: {problem}")
    return None
