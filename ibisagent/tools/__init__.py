"""Segmentation tools by name. `build_tool` is the one place that maps a name to an adapter; each adapter imports
its heavy library (torch, sam2, segment_anything) only when built."""

from __future__ import annotations

from ibisagent.tools.base import SegmentationTool, ToolError, ToolOutput

TOOLS = ("classical", "sam2", "medsam2", "sam", "medsam")


def build_tool(
    name: str, checkpoint: str | None = None, config: str | None = None, device: str = "cpu"
) -> SegmentationTool:
    """Build a tool.

    name:       one of TOOLS. "classical" needs no weights. "sam2"/"medsam2" use the installed `sam2` package
                (config: a SAM2.1 config name such as "sam2.1_hiera_t", default per name); "sam"/"medsam" use
                `segment_anything` (config: "vit_b" | "vit_l" | "vit_h", default "vit_b").
    checkpoint: path of the weights file. None builds random weights for the model tools: for tests only.
    """
    if name == "classical":
        if checkpoint:
            raise ToolError(
                "the classical tool takes no checkpoint; drop --checkpoint or pick a model tool (sam2, medsam2, sam, medsam)"
            )
        from ibisagent.tools.classical import ClassicalTool

        return ClassicalTool()
    if name in ("sam2", "medsam2"):
        from ibisagent.tools.sam2_tool import SAM2Tool

        return SAM2Tool.from_checkpoint(checkpoint, config=config, medsam2=name == "medsam2", device=device)
    if name in ("sam", "medsam"):
        from ibisagent.tools.sam_tool import SAMTool

        return SAMTool.from_checkpoint(checkpoint, model_type=config or "vit_b", medsam=name == "medsam", device=device)
    raise ToolError(f"unknown tool {name!r}; choose one of: {', '.join(TOOLS)}")


def build_propagator(
    tool: SegmentationTool, checkpoint: str | None = None, config: str | None = None, device: str = "cpu"
):
    """The volume propagator (`ibisagent.volume.Propagator`) that goes with `tool`: sam2's video predictor for the
    "sam2" and "medsam2" tools (same checkpoint and config), else the weight-free `ToolPropagator` around `tool`."""
    if tool.name in ("sam2", "medsam2"):
        from ibisagent.tools.sam2_video import SAM2VideoPropagator

        return SAM2VideoPropagator.from_checkpoint(
            checkpoint, config=config, medsam2=tool.name == "medsam2", device=device
        )
    from ibisagent.volume.propagation import ToolPropagator

    return ToolPropagator(tool)


__all__ = ["TOOLS", "SegmentationTool", "ToolError", "ToolOutput", "build_propagator", "build_tool"]
