"""Evaluate a trained student against its teacher: `python -m distill.evaluate --workdir RUN`.

Reads the run's `config.json`, restores its latest checkpoint and runs every evaluator once: the
held-out velocity error and the sample quality (attribute accuracy on toy-world captions, PSNR and
R^2 to the teacher's samples from the same noise, diversity, saturation) for the teacher and for the
student's EMA at each `--eval.student_steps`. Prints one JSON line per figure and writes
RUN/evaluation.json and the grid RUN/samples/step_<step>.png. Any other flag overrides the run's
config (e.g. `--eval.student_steps 1 2 4 8 16 --eval.quality_noises 8`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import config as config_lib
    from .distiller import Distiller
    from .loop import _setup_logging, runtime

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    pre.add_argument("--workdir")
    pre.add_argument("-h", "--help", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.help:
        print(__doc__)
        return 0
    if not known.workdir:
        raise SystemExit("error: --workdir RUN is required: the run directory made by train.py")
    path = Path(known.workdir) / "config.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: --workdir must be a run directory made by train.py")
    # the run as saved, in the folder given: a run directory moved since it was trained evaluates where it is
    cfg = config_lib.from_dict(json.loads(path.read_text()), overrides=["--workdir", known.workdir, *rest])
    rt = runtime(cfg)
    _setup_logging(rt.is_main)
    try:
        out = Distiller(cfg, rt, mode="evaluate").evaluate()
    finally:
        rt.shutdown()
    if rt.is_main:
        for key, value in out.items():
            print(json.dumps({"figure": key, "value": value}))
    return 0


if __name__ == "__main__":
    from .errors import main as report_user_errors

    raise SystemExit(report_user_errors(main))
