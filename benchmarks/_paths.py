"""Where the benchmarks find the shared data: `../shared/data` beside the repository (read in place, never copied)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO = SHARED_DATA / "biomedparse-demo" / "biomedparse_datasets" / "BiomedParseData-Demo"
