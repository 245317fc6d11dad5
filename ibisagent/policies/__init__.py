"""Policies: the Hugging Face VLM policy (`ibisagent.policies.hf_vlm`, imports transformers when used), the oracle
and the replay policy."""

from ibisagent.policies.base import Observation, Policy
from ibisagent.policies.oracle import OraclePolicy
from ibisagent.policies.replay import ReplayPolicy

__all__ = ["Observation", "OraclePolicy", "Policy", "ReplayPolicy"]
