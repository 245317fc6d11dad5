"""Reading a checkpoint's state dict and loading it with errors that say what the file is (shared by the SAM-family
adapters; imported only by them, after torch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ibisagent.tools.base import ToolError


@contextmanager
def seeded_init(torch, seed: int = 0) -> Iterator[None]:
    """Build a model inside this: its random initial weights are drawn from `seed`, so a model built without a
    checkpoint (tests, benchmarks) is the same in every run and every worker process. The caller's random state is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def read_state_dict(checkpoint: str, torch, family: str) -> dict:
    """The state dict of a weights file, unwrapped from a top-level 'model' key (MedSAM2 wraps it so)."""
    try:
        sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or pickled objects that weights_only refuses
        raise ToolError(f"could not read {family} checkpoint {checkpoint!r}: {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ToolError(
            f"{family} checkpoint {checkpoint!r} holds a {type(sd).__name__}, expected a state dict (or one under 'model')"
        )
    return sd


def load_weights(model, sd: dict, where: str, suggest: Callable[[dict], str]) -> None:
    """Load strictly; `where` opens the error ("'x.pt' does not match ...") and `suggest(sd)` closes it with advice."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise ToolError(f"{where}: {detail}. {suggest(sd)}") from e
    if missing or unexpected:
        raise ToolError(
            f"{where}: missing keys {list(missing)[:4]} ({len(missing)} in all), "
            f"unexpected keys {list(unexpected)[:4]} ({len(unexpected)} in all). {suggest(sd)}"
        )
