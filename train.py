"""Distil Wan2.2 T2V-A14B into a Flax image student: parse flags, build the config, train.

    python train.py                                   # tiny CPU default (minutes, no downloads)
    python train.py --preset a14b --teacher_path /data/Wan2.2-T2V-A14B --data.prompts prompts.txt
    python train.py --help                            # every option, its type and default

An error the user can fix prints `error: ...` (what is wrong, what to do) and exits with status 2;
`--debug` shows its traceback instead (distill/errors.py).
"""

import sys


def main(argv=None) -> int:
    from distill.cli import train_main  # the same entry as `wan-distill train`

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
