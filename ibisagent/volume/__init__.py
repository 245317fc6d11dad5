"""Volumes: slice-wise agentic 3D segmentation — key slice, propagation, audit, repair (`VolumeSession`), the
propagation protocol and its weight-free adapter, and the serialisable per-slice record (`VolumeRecord`)."""

from ibisagent.volume.audit import AuditSpec
from ibisagent.volume.propagation import Propagator, SliceOutput, ToolPropagator
from ibisagent.volume.record import VOLUME_VERSION, SliceRecord, VolumeRecord
from ibisagent.volume.session import VolumeSession, run_volume
from ibisagent.volume.slices import SliceStack

__all__ = [
    "VOLUME_VERSION",
    "AuditSpec",
    "Propagator",
    "SliceOutput",
    "SliceRecord",
    "SliceStack",
    "ToolPropagator",
    "VolumeRecord",
    "VolumeSession",
    "run_volume",
]
