"""``python -m tests.paused_epochs recipes.X ARGS``: run a recipe, pausing after every epoch's backup.

For the kill-and-resume tests only: the killer polls the backup and SIGKILLs the run once it
holds epoch 2; without a pause, a short epoch 3 could finish (on two busy cores) before the
kill lands. The pause (``RECIPES_TEST_PAUSE`` seconds, default 2) follows both backup paths:
``keras.callbacks.BackupAndRestore.on_epoch_end`` (``fit``) and the custom step's history
write (``common.distributed._save_history``, right after each epoch's checkpoint).
"""

from __future__ import annotations

import os
import runpy
import sys
import time

import keras

from common import distributed

PAUSE = float(os.environ.get("RECIPES_TEST_PAUSE", "2"))


def _paused(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        time.sleep(PAUSE)
        return result

    return wrapper


keras.callbacks.BackupAndRestore.on_epoch_end = _paused(keras.callbacks.BackupAndRestore.on_epoch_end)
distributed._save_history = _paused(distributed._save_history)

if __name__ == "__main__":
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
