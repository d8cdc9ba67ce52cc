"""Distil Wan2.2 T2V-A14B into a Flax image student: parse flags, build the config, train.

    python train.py                                   # tiny CPU default (minutes, no downloads)
    python train.py --preset a14b --teacher_path /data/Wan2.2-T2V-A14B --data.prompts prompts.txt
    python train.py --help                            # every option, its type and default
"""

import sys


def main(argv=None) -> int:
    from distill.config import parse
    from distill.loop import train

    train(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
