"""Evaluation: benchmark readers (`cases`), the runner of the agent and its baselines (`runner`) and the
reports (`report`: tables, plots, one self-contained HTML page). The `ibisagent eval` command drives all three."""

from ibisagent.evaluation.cases import JSON_SCHEMA, BenchmarkError, Case, load_benchmark
from ibisagent.evaluation.report import summarize, write_report
from ibisagent.evaluation.runner import (
    BASELINES,
    RESULT_FIELDS,
    Method,
    agent_method,
    baseline_methods,
    evaluate,
    read_results,
)

__all__ = [
    "BASELINES",
    "JSON_SCHEMA",
    "RESULT_FIELDS",
    "BenchmarkError",
    "Case",
    "Method",
    "agent_method",
    "baseline_methods",
    "evaluate",
    "load_benchmark",
    "read_results",
    "summarize",
    "write_report",
]
