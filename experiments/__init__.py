"""Experiments that train and measure the agent (the learning proof, the grounding probe), apart from the speed and
quality benchmarks in `benchmarks/`. Run from the repository root with `python -m experiments.<name>`; not installed
with the package (setup.py installs `ibisagent` and `ibisagent_training` only)."""
