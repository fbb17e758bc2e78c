"""--mode=sweep: the paper's w x p_uncond table for every training run under a workdir,
and the comparison of guidance methods on the same model.

A run is a directory holding ``checkpoints/`` and ``config.json`` (what --mode=train
writes): WORKDIR itself, or each of its sub-directories. For the latest checkpoint of
each run, each method of config.sweep.methods and every weight of its grid
(`configs.method_weights`), it draws config.sweep.num_samples images (the same labels and
seeds everywhere), evaluates them, and appends one row to WORKDIR/sweep/results.csv.
Finished cells are skipped, so an interrupted sweep resumes where it stopped; with
sweep.poll_seconds > 0 it keeps waiting for new checkpoints (an evaluation job beside a
training job).

`orchestrate` runs it, `store` keeps the rows and their files, `report` renders them.
"""

from cfgdiff.sweep.orchestrate import SweepError, run

__all__ = ["SweepError", "run"]
