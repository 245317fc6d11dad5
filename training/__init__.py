"""IBISAgent training: trajectory data, cold-start SFT and agentic RL.

Installed as the package `ibisagent_training` (sam2 installs an unrelated top-level `training` package), so
modules here import each other relatively and the console entry point is `ibisagent-train`.
"""
