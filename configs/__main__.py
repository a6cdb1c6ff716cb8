"""`python -m pam_jax.configs`: list the presets; `--write` regenerates their JSON files from the
code presets (a maintainer's step: it rewrites files inside the package)."""

import argparse
import sys

from pam_jax.configs import _presets, write_all

parser = argparse.ArgumentParser(
    prog="python -m pam_jax.configs",
    description="List pam-jax's named config presets. With --write, regenerate the preset JSON "
    "files from the code presets (rewrites files inside the package).",
)
parser.add_argument("--write", action="store_true", help="regenerate the preset JSON files")
args = parser.parse_args()
if args.write:
    for p in write_all():
        print(p)
else:
    for name, (kind, _) in sorted(_presets().items()):
        print(f"{name}\t{kind}")
sys.exit(0)
