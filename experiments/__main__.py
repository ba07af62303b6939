"""``python -m experiments SCRIPT [flags]``: run one of the experiment scripts.

Scripts: multimnist (the main job), qm9, celeba, nyuv2, cityscapes, robustness,
ablation_z_vs_theta. ``python -m experiments SCRIPT --help`` lists the flags.
"""

from __future__ import annotations

import importlib
import sys

SCRIPTS = ("multimnist", "qm9", "celeba", "nyuv2", "cityscapes", "robustness", "ablation_z_vs_theta")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SCRIPTS:
        print(f"python -m experiments: error: unknown script {name!r}; choose from {', '.join(SCRIPTS)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"experiments.{name}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
