"""3D Slicer module for IBISAgent: run the agent on one slice through the IBISAgent MONAI Label server, step through
its trajectory (reasoning, clicks, mask), accept a step's mask into a segment, and refine with your own points.

Thin on purpose: HTTP, the trajectory JSON, coordinate conversions and file encoding live in IBISAgentLib (Qt-free,
tested by pytest against the real server). Coordinates: see IBISAgentLib/geometry.py; arrays from
`slicer.util.arrayFromVolume` are (K, J, I).
"""

import hashlib
import logging
import os
import re
import tempfile
import threading
import time

import numpy as np
import qt
import slicer
import vtk
from IBISAgentLib import (
    VOLUME_MODEL,
    AgentRequest,
    IBISAgentClient,
    IBISAgentClientError,
    TrajectoryView,
    VolumeFormatError,
    VolumeProgress,
    VolumeRequest,
    VolumeResult,
    default_server_url,
    dims_ijk_of_kji,
    geometry_mismatch,
    ijk_index,
    ijk_to_ras,
    kji_slice,
    new_progress_id,
    pixel_to_ijk,
    pixel_to_voxel_centre,
    png_mask_bytes,
    ras_to_ijk,
    read_nifti,
    slice_axis_from_normal,
    slice_index_from_ras,
    slice_shape,
    write_nifti,
    write_slice_mask,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#
# IBISAgent
#


class IBISAgent(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "IBISAgent"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["IBISAgent developers"]
        self.parent.helpText = """
Agentic interactive segmentation of one slice: a vision-language policy reads the slice and your instruction,
writes its reasoning and click commands, and a segmentation tool turns the clicks into a mask, step by step.
The computation runs on an IBISAgent MONAI Label server (monailabel start_server --app monailabel_app ...).
Use the step slider to review each step, Accept to copy a step's mask into your segment, positive/negative points
and Continue to correct the agent, or Undo to step to roll back and continue from an earlier step.
"""
        self.parent.acknowledgementText = """
After "IBISAgent: Reinforcing Pixel-Level Visual Reasoning in MLLMs for Universal Biomedical Object Referring and
Segmentation". Server side built on MONAI Label.
"""


#
# IBISAgentWidget
#


class IBISAgentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Maps the GUI to the parameter node and calls the Logic; holds no segmentation state of its own."""

    SETTINGS_SERVER_URL = "IBISAgent/ServerUrl"

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IBISAgent.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = IBISAgentLogic()
        self.logic.statusCallback = self.setStatus

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # GUI -> parameter node
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.useRedSliceCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.sliceSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.axisComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.instructionLineEdit.connect("textChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.maxStepsSpinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.initialFromSegmentCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.agentContinuesCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.stepSlider.connect("valueChanged(double)", self.onStepChanged)

        # actions -> Logic
        self.ui.checkServerButton.connect("clicked(bool)", self.onCheckServer)
        self.ui.runButton.connect("clicked(bool)", self.onRun)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.undoAcceptButton.connect("clicked(bool)", self.onUndoAccept)
        self.ui.continueButton.connect("clicked(bool)", self.onContinue)
        self.ui.undoToStepButton.connect("clicked(bool)", self.onUndoToStep)
        self._setupVolumeSection()

        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self.logic:
            self.logic.statusCallback = None
            self.logic.progressCallback = None

    def enter(self):
        self.initializeParameterNode()
        self._connectPlaceWidgets()

    def exit(self):
        for widget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            widget.setPlaceModeEnabled(False)
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.logic.forgetSession()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
            self._connectPlaceWidgets()
        self._showTrajectory()
        self._showVolumeStatus()

    # -- parameter node ---------------------------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetParameter("ServerUrl"):
            self._parameterNode.SetParameter(
                "ServerUrl", str(qt.QSettings().value(self.SETTINGS_SERVER_URL, default_server_url()))
            )
        if not self._parameterNode.GetNodeReference("InputVolume"):
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.SetNodeReferenceID("InputVolume", volume.GetID())

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None and self.hasObserver(
            self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
        ):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            p = self._parameterNode
            self.ui.serverUrlLineEdit.text = p.GetParameter("ServerUrl")
            volume = p.GetNodeReference("InputVolume")
            self.ui.inputVolumeSelector.setCurrentNode(volume)
            self.ui.segmentSelector.setCurrentNode(p.GetNodeReference("Segmentation"))
            self.ui.segmentSelector.setCurrentSegmentID(p.GetParameter("SegmentId"))
            useRed = p.GetParameter("UseRedSlice") == "true"
            self.ui.useRedSliceCheckBox.checked = useRed
            self.ui.sliceSpinBox.enabled = not useRed
            self.ui.axisComboBox.enabled = not useRed
            axis = int(p.GetParameter("SliceAxis") or 2)
            self.ui.axisComboBox.currentIndex = axis
            if volume and volume.GetImageData():
                self.ui.sliceSpinBox.maximum = max(volume.GetImageData().GetDimensions()[axis] - 1, 0)
            self.ui.sliceSpinBox.value = int(p.GetParameter("SliceIndex") or 0)
            if self.ui.instructionLineEdit.text != p.GetParameter("Instruction"):
                self.ui.instructionLineEdit.text = p.GetParameter("Instruction")
            self.ui.maxStepsSpinBox.value = int(p.GetParameter("MaxSteps") or 10)
            self.ui.initialFromSegmentCheckBox.checked = p.GetParameter("InitialFromSegment") == "true"
            self.ui.agentContinuesCheckBox.checked = p.GetParameter("AgentContinues") == "true"
            for spinBox, name in (
                (self.volumeFirstSpinBox, "VolumeFirstSlice"),
                (self.volumeLastSpinBox, "VolumeLastSlice"),
            ):
                spinBox.value = int(p.GetParameter(name) or -1)
            self.ui.runButton.enabled = bool(volume) and bool(p.GetParameter("Instruction").strip())
            self.ui.runButton.toolTip = (
                "Run the agent on the slice."
                if self.ui.runButton.enabled
                else "Choose a volume and write an instruction."
            )
        finally:
            self._updatingGUIFromParameterNode = False
        self._updateSessionButtons()

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        p = self._parameterNode
        wasModified = p.StartModify()
        try:
            url = self.ui.serverUrlLineEdit.text.strip()
            if url != p.GetParameter("ServerUrl"):
                qt.QSettings().setValue(self.SETTINGS_SERVER_URL, url)
            p.SetParameter("ServerUrl", url)
            p.SetNodeReferenceID("InputVolume", self.ui.inputVolumeSelector.currentNodeID)
            p.SetNodeReferenceID("Segmentation", self.ui.segmentSelector.currentNodeID())
            p.SetParameter("SegmentId", self.ui.segmentSelector.currentSegmentID() or "")
            p.SetParameter("UseRedSlice", "true" if self.ui.useRedSliceCheckBox.checked else "false")
            p.SetParameter("SliceIndex", str(self.ui.sliceSpinBox.value))
            p.SetParameter("SliceAxis", str(self.ui.axisComboBox.currentIndex))
            p.SetParameter("Instruction", self.ui.instructionLineEdit.text)
            p.SetParameter("MaxSteps", str(self.ui.maxStepsSpinBox.value))
            p.SetParameter("InitialFromSegment", "true" if self.ui.initialFromSegmentCheckBox.checked else "false")
            p.SetParameter("AgentContinues", "true" if self.ui.agentContinuesCheckBox.checked else "false")
            for spinBox, name in (
                (self.volumeFirstSpinBox, "VolumeFirstSlice"),
                (self.volumeLastSpinBox, "VolumeLastSlice"),
            ):
                p.SetParameter(name, "" if spinBox.value < 0 else str(spinBox.value))
        finally:
            p.EndModify(wasModified)

    # -- display of the session -------------------------------------------------------------------------------------
    def setStatus(self, text):
        self.ui.statusLabel.text = text
        slicer.app.processEvents()

    def _connectPlaceWidgets(self):
        self.ui.positivePlaceWidget.setCurrentNode(self.logic.markupsNode(IBISAgentLogic.ROLE_INPUT_POSITIVE))
        self.ui.negativePlaceWidget.setCurrentNode(self.logic.markupsNode(IBISAgentLogic.ROLE_INPUT_NEGATIVE))

    def _updateSessionButtons(self):
        session = self.logic.session if self.logic else None
        hasSteps = bool(session and session.trajectory.num_steps)
        self.ui.acceptButton.enabled = bool(session)
        self.ui.undoAcceptButton.enabled = self.logic.canUndoAccept() if self.logic else False
        self.ui.continueButton.enabled = bool(session)
        self.ui.undoToStepButton.enabled = hasSteps
        self.ui.stepSlider.enabled = hasSteps

    def _showTrajectory(self):
        """Refresh the slider (0 = the initial state, k = after the first k steps), the stop reason and the shown
        step after the session changed; the slider goes to the last step."""
        session = self.logic.session
        slider = self.ui.stepSlider
        wasBlocked = slider.blockSignals(True)
        try:
            slider.maximum = session.trajectory.num_steps if session else 0
            slider.value = slider.maximum
        finally:
            slider.blockSignals(wasBlocked)
        self.ui.stopReasonLabel.text = (session.stopReason or "-") if session else "-"
        self._updateSessionButtons()
        if session is None:
            self.ui.reasoningTextEdit.setPlainText("")
        else:
            self.onStepChanged(slider.value)

    def onStepChanged(self, value):
        if self.logic.session is None:
            return
        with slicer.util.tryWithErrorDisplay("IBISAgent could not show this step.", waitCursor=True):
            step = self.logic.showStep(int(round(value)))
            self.ui.reasoningTextEdit.setPlainText(step.describe() if step else "Initial state: no step applied yet.")

    # -- actions ----------------------------------------------------------------------------------------------------
    def _syncLogicServer(self):
        self.updateParameterNodeFromGUI()
        self.logic.serverUrl = self._parameterNode.GetParameter("ServerUrl") or default_server_url()

    def onCheckServer(self):
        self._syncLogicServer()
        with slicer.util.tryWithErrorDisplay("IBISAgent server check failed.", waitCursor=True):
            info = self.logic.serverInfo()
            self.setStatus(
                f"Server {self.logic.serverUrl}: app {info.get('name', '?')}, models {', '.join(info.get('models', {}))}"
            )

    def onRun(self):
        self._syncLogicServer()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("IBISAgent failed.", waitCursor=True):
            self.logic.runFromParameterNode(p)
            self.logic.jumpToSessionSlice()
        self._showTrajectory()

    def onAccept(self):
        with slicer.util.tryWithErrorDisplay("IBISAgent could not accept the mask.", waitCursor=True):
            self.logic.accept(int(round(self.ui.stepSlider.value)))
            self.logic.storeSession(self._parameterNode)
        self._updateSessionButtons()

    def onUndoAccept(self):
        with slicer.util.tryWithErrorDisplay("IBISAgent could not undo the accept.", waitCursor=True):
            self.logic.undoAccept()
        self._updateSessionButtons()

    def _continue(self, undoTo=None):
        self._syncLogicServer()
        with slicer.util.tryWithErrorDisplay("IBISAgent failed to continue.", waitCursor=True):
            self.logic.continueSession(**self.logic.continueArguments(self._parameterNode, undoTo))
            self.logic.clearUserPoints()
        self._showTrajectory()

    def onContinue(self):
        self._continue()

    def onUndoToStep(self):
        self._continue(undoTo=int(round(self.ui.stepSlider.value)))

    # -- volume mode ------------------------------------------------------------------------------------------------
    def _setupVolumeSection(self):
        """The volume mode's controls, built here rather than in the .ui file: the range, the buttons, the per-slice
        status list (a click jumps the views to that slice) and the progress text. Everything they do is Logic."""
        box = qt.QGroupBox("Volume mode: key slice, propagation, repair")
        form = qt.QFormLayout(box)
        self.volumeFirstSpinBox, self.volumeLastSpinBox = qt.QSpinBox(), qt.QSpinBox()
        for spinBox in (self.volumeFirstSpinBox, self.volumeLastSpinBox):
            spinBox.minimum, spinBox.maximum = -1, 100000
            spinBox.specialValueText = "until the object ends"
            spinBox.connect("valueChanged(int)", self.updateParameterNodeFromGUI)
        form.addRow("First slice:", self.volumeFirstSpinBox)
        form.addRow("Last slice:", self.volumeLastSpinBox)
        row = qt.QHBoxLayout()
        self.volumeButtons = {}
        for name, text, tip, handler in (
            (
                "run",
                "Run volume",
                "Segment the key slice (Run's slice, your points and/or the agent), then propagate.",
                self.onRunVolume,
            ),
            ("propagate", "Propagate", "Propagate again over the first..last slice range.", self.onPropagateVolume),
            (
                "repair",
                "Repair slice",
                "Repair the selected slice with your points on it, or the agent.",
                self.onRepairSlice,
            ),
            ("undo", "Undo slice", "Undo the last change of the selected slice.", self.onUndoSlice),
            ("review", "Slice is right", "Mark the selected slice as reviewed, its mask kept.", self.onReviewSlice),
            (
                "accept",
                "Accept volume",
                "Write the proposed volume into the segment (one undo step).",
                self.onAcceptVolume,
            ),
        ):
            button = qt.QPushButton(text)
            button.toolTip = tip
            button.connect("clicked(bool)", handler)
            row.addWidget(button)
            self.volumeButtons[name] = button
        form.addRow(row)
        self.volumeStatusList = qt.QListWidget()
        self.volumeStatusList.connect("currentRowChanged(int)", self.onVolumeSliceSelected)
        form.addRow("Slices:", self.volumeStatusList)
        self.volumeProgressLabel = qt.QLabel("-")
        form.addRow("Progress:", self.volumeProgressLabel)
        self.layout.addWidget(box)
        self.logic.progressCallback = self.onVolumeProgress
        self._showVolumeStatus()

    def onVolumeProgress(self, progress):
        self.volumeProgressLabel.text = progress.describe()
        slicer.app.processEvents()

    def _showVolumeStatus(self):
        session = self.logic.volumeSession
        self.volumeStatusList.clear()
        for line in self.logic.volumeStatusLines():
            self.volumeStatusList.addItem(line)
        for name, button in self.volumeButtons.items():
            button.enabled = name == "run" or session is not None
        self.ui.undoAcceptButton.enabled = self.logic.canUndoAccept()

    def _selectedVolumeSlice(self):
        session = self.logic.volumeSession
        row = self.volumeStatusList.currentRow
        if session is None or not 0 <= row < len(session.result.slices):
            raise ValueError("select a slice in the volume mode's list first")
        return session.result.slices[row].index

    def onVolumeSliceSelected(self, row):
        session = self.logic.volumeSession
        if session is not None and 0 <= row < len(session.result.slices):
            with slicer.util.tryWithErrorDisplay("IBISAgent could not show the slice.", waitCursor=True):
                index = session.result.slices[row].index
                self.logic.jumpToSlice(index)
                trajectory = self.logic.volumeSliceTrajectory(index)
                steps = trajectory.steps if trajectory is not None else []
                self.ui.reasoningTextEdit.setPlainText("\n\n".join(step.describe() for step in steps))

    def _volumeAction(self, message, action):
        self._syncLogicServer()
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            action()
        self._showVolumeStatus()

    def onRunVolume(self):
        self._volumeAction(
            "IBISAgent failed in volume mode.", lambda: self.logic.runVolumeFromParameterNode(self._parameterNode)
        )

    def onPropagateVolume(self):
        self._volumeAction(
            "IBISAgent could not propagate.",
            lambda: self.logic.propagateVolume(*self.logic.volumeRange(self._parameterNode)),
        )

    def onRepairSlice(self):
        self._volumeAction(
            "IBISAgent could not repair the slice.",
            lambda: self.logic.repairSlice(
                self._selectedVolumeSlice(), maxSteps=int(self._parameterNode.GetParameter("MaxSteps") or 10)
            ),
        )

    def onUndoSlice(self):
        self._volumeAction(
            "IBISAgent could not undo the slice.", lambda: self.logic.undoSlice(self._selectedVolumeSlice())
        )

    def onReviewSlice(self):
        self._volumeAction(
            "IBISAgent could not mark the slice.", lambda: self.logic.acceptSlice(self._selectedVolumeSlice())
        )

    def onAcceptVolume(self):
        self._volumeAction("IBISAgent could not accept the volume.", self.logic.acceptVolume)


#
# IBISAgentLogic
#


class IBISAgentSession:
    """One server session as the Logic sees it: the nodes it works on and the latest decoded trajectory."""

    def __init__(self, imageId, volumeNode, axis, sliceIndex, instruction, segmentationNode, segmentId):
        self.imageId = imageId
        self.volumeNode = volumeNode
        self.axis = int(axis)
        self.sliceIndex = int(sliceIndex)
        self.instruction = instruction
        self.segmentationNode = segmentationNode
        self.segmentId = segmentId or ""
        self.sessionId = None
        self.stopReason = None
        self.result = None
        self.trajectory = None

    def request(self, foreground, background, maxSteps, runAgent, **fields):
        """The request for this session's instruction and slice (`fields`: the other AgentRequest fields)."""
        return AgentRequest(
            self.instruction,
            slice=self.sliceIndex,
            axis=self.axis,
            foreground=foreground,
            background=background,
            max_steps=int(maxSteps),
            run_agent=bool(runAgent),
            **fields,
        )

    def update(self, result):
        """Take a server result (the JSON of POST /infer/ibisagent) into the session."""
        missing = [key for key in ("session_id", "trajectory") if key not in result]
        if missing:
            raise ValueError(
                f"the server's answer has no {missing}; is it the IBISAgent app? It sent keys {sorted(result)}"
            )
        trajectory = TrajectoryView.from_dict(result["trajectory"])
        expected = slice_shape(self.volumeNode.GetImageData().GetDimensions(), self.axis)
        if tuple(trajectory.image_size) != tuple(expected):
            raise ValueError(
                f"the server's image {self.imageId!r} has {trajectory.image_size[1]}x{trajectory.image_size[0]} "
                f"slices but volume {self.volumeNode.GetName()!r} has {expected[1]}x{expected[0]} along axis "
                f"{self.axis}: they are not the same image. Clear the volume's "
                f"'{IBISAgentLogic.IMAGE_ID_ATTRIBUTE}' attribute or rename the volume so that it is uploaded."
            )
        self.sessionId = result["session_id"]
        self.stopReason = result.get("stop_reason") or trajectory.stop_reason
        self.result = result
        self.trajectory = trajectory


class IBISAgentVolumeSession:
    """One volume session of the server's 3D task as the Logic sees it: the nodes it works on, the latest result
    summary (`VolumeResult`: the per-slice status list) and the proposed label, a (K, J, I) uint8 array in the
    volume's own voxel grid."""

    def __init__(self, imageId, volumeNode, axis, keySlice, instruction, segmentationNode, segmentId):
        self.imageId = imageId
        self.volumeNode = volumeNode
        self.axis = int(axis)
        self.keySlice = int(keySlice)
        self.instruction = instruction
        self.segmentationNode = segmentationNode
        self.segmentId = segmentId or ""
        self.sessionId = None
        self.result = None
        self.label = None

    def dimsIjk(self):
        return tuple(self.volumeNode.GetImageData().GetDimensions())

    def update(self, result, labelBytes, volumeIjkToRas):
        """Take an answer of the 3D task (its JSON and label file) into the session; nothing changes when either is
        not what this volume needs (the message says what was wrong)."""
        dims = self.dimsIjk()
        summary = VolumeResult.from_dict(result, num_slices=dims[self.axis])
        if summary.axis != self.axis:
            raise ValueError(f"the server answered for slice axis {summary.axis}, the session works along {self.axis}")
        if labelBytes is None:
            raise ValueError("the server sent no label file with the volume result; is it the IBISAgent app?")
        try:
            label, affine = read_nifti(labelBytes)
        except ValueError as exc:
            raise ValueError(f"the server's volume label cannot be read: {exc}") from exc
        # the label must be in this volume's voxel grid (the image the server ran on was checked to be, or uploaded)
        reason = geometry_mismatch({"shape": dims_ijk_of_kji(label), "affine": affine.tolist()}, dims, volumeIjkToRas)
        if reason is not None:
            raise ValueError(
                f"the server's label for image {self.imageId!r} is not in the voxel grid of volume "
                f"{self.volumeNode.GetName()!r} ({reason}); nothing was shown"
            )
        self.sessionId = summary.session_id
        self.result = summary
        self.label = (label > 0).astype(np.uint8)

    def statusLines(self):
        """One line per slice of the status list (index order)."""
        return [s.describe() for s in self.result.slices] if self.result else []


class IBISAgentLogic(ScriptedLoadableModuleLogic):
    """Runs without a GUI: talks to the server through IBISAgentLib and writes results into MRML nodes.

    Steps are counted as the server counts them for `undo_to`: "step count" k is the state after the first k
    trajectory steps, 0 the initial state. Points are sent as integer voxel indices [i, j, k] of the session slice.
    """

    IMAGE_ID_ATTRIBUTE = "IBISAgent.ImageId"
    SLICE_TOLERANCE = 0.5  # voxels off the slice plane: a point within it lies in a voxel of the slice
    ROLE_ATTRIBUTE = "IBISAgent.Role"
    ROLE_CLICKS_POSITIVE = "clicks-positive"
    ROLE_CLICKS_NEGATIVE = "clicks-negative"
    ROLE_INPUT_POSITIVE = "input-positive"
    ROLE_INPUT_NEGATIVE = "input-negative"
    PREVIEW_SEGMENT_NAME = "IBISAgent preview"
    PREVIEW_COLOR = (1.0, 0.85, 0.1)
    POSITIVE_COLOR = (0.15, 0.85, 0.15)
    NEGATIVE_COLOR = (0.9, 0.15, 0.15)
    _MARKUPS = {
        ROLE_CLICKS_POSITIVE: ("IBISAgent clicks +", POSITIVE_COLOR, True, "+"),
        ROLE_CLICKS_NEGATIVE: ("IBISAgent clicks -", NEGATIVE_COLOR, True, "-"),
        ROLE_INPUT_POSITIVE: ("IBISAgent my points +", POSITIVE_COLOR, False, "P"),
        ROLE_INPUT_NEGATIVE: ("IBISAgent my points -", NEGATIVE_COLOR, False, "N"),
    }

    def __init__(self, serverUrl=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.serverUrl = serverUrl or default_server_url()
        self.session = None
        self.volumeSession = None
        self.statusCallback = None
        self.progressCallback = None
        self._volumeBusy = False  # the progress callback lets Slicer process events: no second request meanwhile
        self._acceptUndoStack = []

    def setDefaultParameters(self, parameterNode):
        defaults = {
            "UseRedSlice": "true",
            "SliceIndex": "0",
            "SliceAxis": "2",
            "MaxSteps": "10",
            "InitialFromSegment": "false",
            "AgentContinues": "true",
        }
        for name, value in defaults.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    # -- parameter node <-> arguments (what the Widget's buttons do, without Qt) -------------------------------------
    def runArguments(self, parameterNode):
        """The keyword arguments of `run` that the parameter node holds. With UseRedSlice the slice is the one the
        Red view shows, and SliceAxis / SliceIndex are updated to it."""
        p = parameterNode
        volume = p.GetNodeReference("InputVolume")
        if volume is None:
            raise ValueError("choose a volume first")
        if p.GetParameter("UseRedSlice") == "true":
            axis, sliceIndex = self.sliceFromView(volume, "Red")
            wasModified = p.StartModify()
            p.SetParameter("SliceAxis", str(axis))
            p.SetParameter("SliceIndex", str(sliceIndex))
            p.EndModify(wasModified)
        return {
            "volumeNode": volume,
            "sliceIndex": int(p.GetParameter("SliceIndex") or 0),
            "axis": int(p.GetParameter("SliceAxis") or 2),
            "instruction": p.GetParameter("Instruction"),
            "segmentationNode": p.GetNodeReference("Segmentation"),
            "segmentId": p.GetParameter("SegmentId"),
            "maxSteps": int(p.GetParameter("MaxSteps") or 10),
            "initialFromSegment": p.GetParameter("InitialFromSegment") == "true",
        }

    def continueArguments(self, parameterNode, undoTo=None):
        """The keyword arguments of `continueSession` for Continue (undoTo None) or Undo to step (undoTo k): with
        AgentContinues unchecked only the tool applies the points; checked, the agent goes on if the server can."""
        return {
            "maxSteps": int(parameterNode.GetParameter("MaxSteps") or 10),
            "undoTo": undoTo,
            "runAgent": None if parameterNode.GetParameter("AgentContinues") == "true" else False,
        }

    def runFromParameterNode(self, parameterNode):
        """Run: start a session with the parameter node's arguments and the points placed so far (then cleared),
        and store the session's segmentation (created when none was chosen) in the parameter node."""
        positive, negative = self.userPoints()
        trajectory = self.run(**self.runArguments(parameterNode), positiveRas=positive, negativeRas=negative)
        self.clearUserPoints()
        self.storeSession(parameterNode)
        return trajectory

    def storeSession(self, parameterNode):
        """Point the parameter node's Segmentation and SegmentId at the session's (what Accept writes into)."""
        s = self.session
        wasModified = parameterNode.StartModify()
        parameterNode.SetNodeReferenceID("Segmentation", s.segmentationNode.GetID())
        if s.segmentId:
            parameterNode.SetParameter("SegmentId", s.segmentId)
        parameterNode.EndModify(wasModified)

    def _status(self, text):
        logging.info(f"IBISAgent: {text}")
        if self.statusCallback:
            self.statusCallback(text)

    def client(self):
        return IBISAgentClient(self.serverUrl)

    def serverInfo(self, client=None):
        """GET /info/ of the server; raises ValueError when it offers no 'ibisagent' task."""
        client = client or self.client()
        info = client.info()
        if client.model not in (info.get("models") or {}):
            raise ValueError(
                f"the server at {self.serverUrl} offers models {sorted(info.get('models') or {})} but no "
                f"'{client.model}'; start it with --app monailabel_app"
            )
        return info

    def agentAvailable(self, client=None):
        """Whether the server has a policy model (else only your points are applied, by the segmentation tool)."""
        info = self.serverInfo(client)
        return bool(info["models"][(client or self.client()).model].get("config", {}).get("run_agent", True))

    # -- volumes and geometry ---------------------------------------------------------------------------------------
    @staticmethod
    def ijkToRasMatrix(volumeNode, world=True):
        """4x4 numpy IJK->RAS of the volume; with world=True composed with its (linear) parent transforms."""
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        ijkToRas = slicer.util.arrayFromVTKMatrix(m)
        transformNode = volumeNode.GetParentTransformNode()
        if world and transformNode is not None:
            if not transformNode.IsTransformToWorldLinear():
                raise ValueError(
                    f"volume {volumeNode.GetName()!r} is under a non-linear transform; harden the transform first"
                )
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            ijkToRas = slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToRas
        return ijkToRas

    @staticmethod
    def volumeArray(volumeNode):
        """The volume's voxels as a (K, J, I) numpy array; refuses what the server cannot take."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            raise ValueError("choose a volume that has image data")
        array = slicer.util.arrayFromVolume(volumeNode)
        if array.ndim != 3:
            raise ValueError(
                f"volume {volumeNode.GetName()!r} has {array.shape[-1]} components per voxel; IBISAgent takes a "
                "scalar (grayscale) volume: convert it with the Vector to Scalar Volume module"
            )
        return array

    def sliceFromView(self, volumeNode, sliceViewName="Red"):
        """(axis, slice index) of the volume slice shown in a slice view: the IJK axis most parallel to the view's
        normal and the index of the slice through the view's centre. Works without a GUI (uses the slice node)."""
        if volumeNode is None:
            raise ValueError("choose a volume first")
        sliceNode = slicer.mrmlScene.GetNodeByID(f"vtkMRMLSliceNode{sliceViewName}")
        if sliceNode is None:
            raise ValueError(f"there is no {sliceViewName} slice view; give the slice index and axis instead")
        sliceToRas = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
        ijkToWorld = self.ijkToRasMatrix(volumeNode)
        axis = slice_axis_from_normal(sliceToRas[:3, 2], ijkToWorld)
        index = slice_index_from_ras(sliceToRas[:3, 3], ijkToWorld, axis)
        n = volumeNode.GetImageData().GetDimensions()[axis]
        if not 0 <= index < n:
            raise ValueError(
                f"the {sliceViewName} view shows slice {index} along IJK axis {axis}, outside the volume "
                f"(0..{n - 1}); scroll the view into the volume or give the slice index"
            )
        return axis, index

    def jumpToSessionSlice(self):
        """Move the slice views to the centre of the session's slice, so placed points land on it."""
        s = self.session
        if s is None:
            return
        self._jumpToSliceCentre(s.volumeNode, s.axis, s.sliceIndex)

    def _jumpToSliceCentre(self, volumeNode, axis, sliceIndex):
        h, w = slice_shape(volumeNode.GetImageData().GetDimensions(), axis)
        ras = ijk_to_ras(pixel_to_ijk((w / 2.0, h / 2.0), axis, sliceIndex), self.ijkToRasMatrix(volumeNode))
        slicer.modules.markups.logic().JumpSlicesToLocation(float(ras[0]), float(ras[1]), float(ras[2]), True)

    def pointsToIjk(self, pointsRas, volumeNode, axis, sliceIndex):
        """World RAS points -> integer voxel indices [i, j, k] on slice `sliceIndex` (what the server takes).

        A point whose voxel is not on the slice (more than SLICE_TOLERANCE voxels off its centre plane) is refused
        rather than silently moved onto it: a point on a neighbouring slice's centre is one voxel off."""
        out = []
        dims = np.asarray(volumeNode.GetImageData().GetDimensions())
        ijkToWorld = self.ijkToRasMatrix(volumeNode)
        for ras in pointsRas:
            ijk = ras_to_ijk(np.asarray(ras, float), ijkToWorld)
            if not abs(ijk[axis] - sliceIndex) < self.SLICE_TOLERANCE:
                raise ValueError(
                    f"point at RAS {np.round(ras, 1).tolist()} lies on slice {ijk[axis]:.1f} along IJK axis {axis}, "
                    f"but the session works on slice {sliceIndex}; place points on that slice"
                )
            index = ijk_index(ijk)
            index[axis] = sliceIndex
            if np.any(index < 0) or np.any(index >= dims):
                raise ValueError(f"point at RAS {np.round(ras, 1).tolist()} is outside the volume")
            out.append([int(v) for v in index])
        return out

    # -- the image on the server ------------------------------------------------------------------------------------
    def imageIdForVolume(self, volumeNode, client=None):
        """The server's image id for this volume, uploading the volume when the server does not have it.

        1. the volume's IBISAgent.ImageId attribute (set by you or by a tool that fetched it), if the server has it;
        2. the volume's name, if the server's datastore has an image of that id (MONAI Label's Slicer module names
           the volumes it loads from the datastore after their image ids);
        3. otherwise an id made of the name and a hash of the voxels and geometry; uploaded (as NIfTI written by
           IBISAgentLib, voxel (i, j, k) preserved) unless the server already holds it.
        A match in 1 or 2 is used only when the server's image has the volume's voxel grid (dimensions and
        IJK->RAS, `geometry_mismatch`): Slicer's reader reverses axes of left-handed NIfTI files where the server's
        does not, so the same file can number its voxels differently on both sides. Otherwise the volume is uploaded.
        """
        client = client or self.client()
        array = self.volumeArray(volumeNode)
        ijkToRas = self.ijkToRasMatrix(volumeNode, world=False)
        name = volumeNode.GetName() or ""
        for candidate in dict.fromkeys(v for v in (volumeNode.GetAttribute(self.IMAGE_ID_ATTRIBUTE), name) if v):
            if not client.has_image(candidate):
                continue
            reason = geometry_mismatch(client.image_info(candidate).get("geometry"), dims_ijk_of_kji(array), ijkToRas)
            if reason is None:
                return candidate
            self._status(f"Server image {candidate!r} is not volume {name!r} voxel for voxel ({reason}); uploading it")
        digest = hashlib.sha1()
        digest.update(str((array.shape, array.dtype.str, np.round(ijkToRas, 6).tolist())).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
        imageId = f"slicer-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)[:40] or 'volume'}-{digest.hexdigest()[:12]}"
        if client.has_image(imageId):
            return imageId
        self._status(f"Uploading volume {name!r} to the server as {imageId} ...")
        with tempfile.TemporaryDirectory() as folder:
            path = write_nifti(os.path.join(folder, imageId + ".nii.gz"), array, ijkToRas)
            return client.upload_image(path, imageId)

    # -- running the agent ------------------------------------------------------------------------------------------
    def run(
        self,
        volumeNode,
        sliceIndex,
        axis,
        instruction,
        segmentationNode=None,
        segmentId="",
        maxSteps=10,
        initialFromSegment=False,
        positiveRas=None,
        negativeRas=None,
        runAgent=None,
    ):
        """Start a new session on slice `sliceIndex` along IJK `axis` of the volume; returns the trajectory.

        segmentationNode / segmentId: where Accept writes (created when None / empty, under the volume's parent
        transform); a chosen segmentation must lie in the volume's frame (`checkSegmentationFrame`). initialFromSegment
        sends the segment's current mask on this slice as the starting mask. positiveRas / negativeRas: world RAS
        points applied first. runAgent: None = when the server has a policy model. Shows the last step as a preview.
        """
        AgentRequest(instruction, max_steps=int(maxSteps)).check()  # before the server is asked anything
        array = self.volumeArray(volumeNode)
        kji_slice(array, axis, sliceIndex)  # a clear error for a bad axis or an out-of-range slice
        if segmentationNode is not None:
            self.checkSegmentationFrame(volumeNode, segmentationNode)
        foreground = self.pointsToIjk(positiveRas or [], volumeNode, axis, sliceIndex)
        background = self.pointsToIjk(negativeRas or [], volumeNode, axis, sliceIndex)
        client = self.client()
        if runAgent is None:
            runAgent = self.agentAvailable(client)
            if not runAgent and not (foreground or background):
                raise ValueError(
                    "the server has no policy model (started without --conf model): place positive/negative points "
                    "on the slice, then Run applies them with the segmentation tool"
                )
        if segmentationNode is None:
            segmentationNode = self._newSegmentation(volumeNode)
        self.removePreview()
        session = IBISAgentSession(None, volumeNode, axis, sliceIndex, instruction.strip(), segmentationNode, segmentId)
        session.imageId = self.imageIdForVolume(volumeNode, client)
        request = session.request(foreground, background, maxSteps, runAgent)
        what = "Running the agent" if runAgent else "Applying your points"
        self._status(f"{what} on slice {sliceIndex} (axis {axis}) of {session.imageId} ...")
        with tempfile.TemporaryDirectory() as folder:
            labelPath = None
            if initialFromSegment and segmentId:
                mask = self.segmentSliceMask(segmentationNode, segmentId, volumeNode, axis, sliceIndex)
                if mask.any():
                    labelPath = os.path.join(folder, "initial_mask.png")
                    with open(labelPath, "wb") as f:
                        f.write(png_mask_bytes(mask))
            params = request.to_params(has_label=labelPath is not None)
            result, _ = client.infer(session.imageId, params, label_path=labelPath, output="json")
        session.update(result)
        self.session = session
        self._acceptUndoStack = []
        self.showStep(session.trajectory.num_steps)
        self._status(self._summary())
        return session.trajectory

    def continueSession(
        self, positiveRas=None, negativeRas=None, maxSteps=10, undoTo=None, runAgent=None, removeClicks=None
    ):
        """Continue the session: optionally keep only the first `undoTo` steps (0 = back to the initial state), add
        your points (world RAS; default: those placed in the 'my points' markups), then let the agent go on
        (runAgent; None = when the server has a policy model) or only apply the points. removeClicks: [x, y] pixels
        of clicks to take back. Returns the new trajectory."""
        s = self.session
        if s is None:
            raise ValueError("run the agent first; there is no session to continue")
        if positiveRas is None and negativeRas is None:
            positiveRas, negativeRas = self.userPoints()
        foreground = self.pointsToIjk(positiveRas or [], s.volumeNode, s.axis, s.sliceIndex)
        background = self.pointsToIjk(negativeRas or [], s.volumeNode, s.axis, s.sliceIndex)
        if runAgent is None:
            runAgent = self.agentAvailable()
        if undoTo is not None and not 0 <= int(undoTo) <= s.trajectory.num_steps:
            raise ValueError(f"undo to step {undoTo}: the trajectory has steps 0..{s.trajectory.num_steps}")
        params = s.request(
            foreground,
            background,
            maxSteps,
            runAgent,
            remove_clicks=[list(p) for p in removeClicks or []],
            session_id=s.sessionId,
            undo_to=None if undoTo is None else int(undoTo),
        ).to_params()
        self._status(
            f"Continuing session {s.sessionId} with {len(foreground)} positive and {len(background)} negative "
            "points ..."
        )
        result, _ = self.client().infer(s.imageId, params, output="json")
        s.update(result)
        self.showStep(s.trajectory.num_steps)
        self._status(self._summary())
        return s.trajectory

    def _summary(self):
        s = self.session
        pixels = int(s.trajectory.final_mask.sum())
        return (
            f"Session {s.sessionId}: {s.trajectory.num_steps} steps, stop: {s.stopReason}, final mask {pixels} pixels."
        )

    @staticmethod
    def _newSegmentation(volumeNode):
        """A new segmentation in the volume's frame and voxel grid (what `checkSegmentationFrame` asks for)."""
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "IBISAgent segmentation")
        segmentationNode.CreateDefaultDisplayNodes()
        # the transform first: the reference geometry is taken in the segmentation's frame
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return segmentationNode

    # -- volume mode: key slice, propagation, per-slice status, repair, undo, accept of the whole volume -----------
    PROGRESS_POLL_SECONDS = 0.5
    PROGRESS_TIMEOUT = 5.0  # one poll; a poll that times out is skipped, the request goes on

    def volumeServerInfo(self, client=None):
        """GET /info/ of the server; raises ValueError when it offers no volume task."""
        client = client or self.client()
        info = client.info()
        if VOLUME_MODEL not in (info.get("models") or {}):
            raise ValueError(
                f"the server at {self.serverUrl} offers models {sorted(info.get('models') or {})} but no "
                f"'{VOLUME_MODEL}' (the volume mode's 3D task); update the IBISAgent server"
            )
        return info

    def volumeArguments(self, parameterNode):
        """The keyword arguments of `runVolume` that the parameter node holds: those of `runArguments` (the key slice
        is the slice of Run: the Red view's, or the one given) and the propagation range (VolumeFirstSlice /
        VolumeLastSlice, empty: until the object ends)."""
        args = self.runArguments(parameterNode)
        args.pop("initialFromSegment")
        args["keySlice"] = args.pop("sliceIndex")
        args["firstSlice"], args["lastSlice"] = self.volumeRange(parameterNode)
        return args

    @staticmethod
    def volumeRange(parameterNode):
        """(first, last) slice of the propagation range in the parameter node; None where it is not set."""
        out = []
        for name in ("VolumeFirstSlice", "VolumeLastSlice"):
            value = parameterNode.GetParameter(name).strip()
            try:
                out.append(int(value) if value else None)
            except ValueError as exc:
                raise ValueError(f"{name} {value!r} must be a slice index or empty") from exc
        return tuple(out)

    def runVolumeFromParameterNode(self, parameterNode):
        """Run in volume mode with the parameter node's arguments and the points placed so far (then cleared), and
        store the session's segmentation in the parameter node."""
        positive, negative = self.userPoints()
        result = self.runVolume(**self.volumeArguments(parameterNode), positiveRas=positive, negativeRas=negative)
        self.clearUserPoints()
        vs = self.volumeSession
        wasModified = parameterNode.StartModify()
        parameterNode.SetNodeReferenceID("Segmentation", vs.segmentationNode.GetID())
        if vs.segmentId:
            parameterNode.SetParameter("SegmentId", vs.segmentId)
        parameterNode.EndModify(wasModified)
        return result

    def runVolume(
        self,
        volumeNode,
        keySlice,
        axis,
        instruction,
        segmentationNode=None,
        segmentId="",
        maxSteps=10,
        positiveRas=None,
        negativeRas=None,
        runAgent=None,
        firstSlice=None,
        lastSlice=None,
        repairBudget=None,
        autoRepair=None,
    ):
        """Start a volume session: segment slice `keySlice` along IJK `axis` (your points on it, world RAS, and/or the
        agent: runAgent None = when the server has a policy model), then propagate slice by slice (within
        firstSlice..lastSlice when given) until the object ends. Shows the whole proposed volume in the preview
        segment and returns the result summary (`VolumeResult`: the per-slice status list).

        segmentationNode / segmentId: where `acceptVolume` writes (created as in `run`). The request runs on a worker
        thread while this thread polls its progress (`progressCallback(VolumeProgress)`); MRML is touched only here."""
        array = self.volumeArray(volumeNode)
        dims = dims_ijk_of_kji(array)
        kji_slice(array, axis, keySlice)  # a clear error for a bad axis or an out-of-range slice
        if segmentationNode is not None:
            self.checkSegmentationFrame(volumeNode, segmentationNode)
        foreground = self.pointsToIjk(positiveRas or [], volumeNode, axis, keySlice)
        background = self.pointsToIjk(negativeRas or [], volumeNode, axis, keySlice)
        client = self.client()
        self.volumeServerInfo(client)
        if runAgent is None:
            runAgent = self.agentAvailable(client)
            if not runAgent and not (foreground or background):
                raise ValueError(
                    "the server has no policy model (started without --conf model): place positive/negative points "
                    "on the key slice, then the segmentation tool segments it and the mask is propagated"
                )
        request = VolumeRequest(
            instruction,
            axis=int(axis),
            key_slice=int(keySlice),
            foreground=foreground,
            background=background,
            run_agent=bool(runAgent),
            max_steps=int(maxSteps),
            first_slice=firstSlice,
            last_slice=lastSlice,
            repair_budget=repairBudget,
            auto_repair=autoRepair,
            progress_id=new_progress_id(),
        )
        request.check(dims)  # before anything is uploaded
        if segmentationNode is None:
            segmentationNode = self._newSegmentation(volumeNode)
        session = IBISAgentVolumeSession(
            None, volumeNode, axis, keySlice, instruction.strip(), segmentationNode, segmentId
        )
        session.imageId = self.imageIdForVolume(volumeNode, client)
        what = "Running the agent" if runAgent else "Applying your points"
        self._status(f"{what} on key slice {keySlice} (axis {axis}) of {session.imageId}, then propagating ...")
        self._volumeCall(client, session, request)
        return session.result

    def _continueVolume(self, action, sliceIndex=None, **fields):
        vs = self.volumeSession
        if vs is None:
            raise ValueError("run the volume mode first; there is no volume session")
        request = VolumeRequest(
            vs.instruction,
            axis=vs.axis,
            session_id=vs.sessionId,
            action=action,
            slice=sliceIndex,
            progress_id=new_progress_id(),
            **fields,
        )
        self._volumeCall(self.client(), vs, request)
        return vs.result

    def propagateVolume(self, firstSlice=None, lastSlice=None):
        """Propagate again, e.g. over a wider range (firstSlice..lastSlice; None: until the object ends)."""
        self._status(
            f"Propagating over slices {firstSlice if firstSlice is not None else 'start'}.."
            f"{lastSlice if lastSlice is not None else 'end'} ..."
        )
        return self._continueVolume("propagate", first_slice=firstSlice, last_slice=lastSlice)

    def repairSlice(self, sliceIndex, positiveRas=None, negativeRas=None, runAgent=None, maxSteps=10):
        """Repair slice `sliceIndex` with your points on it (world RAS; default: those placed in the 'my points'
        markups, then cleared) and/or the agent (runAgent None: when the server has a policy model and you placed no
        points); the server re-propagates outward from it. Returns the new result summary."""
        vs = self.volumeSession
        if vs is None:
            raise ValueError("run the volume mode first; there is no volume session")
        placed = positiveRas is None and negativeRas is None
        if placed:
            positiveRas, negativeRas = self.userPoints()
        foreground = self.pointsToIjk(positiveRas or [], vs.volumeNode, vs.axis, sliceIndex)
        background = self.pointsToIjk(negativeRas or [], vs.volumeNode, vs.axis, sliceIndex)
        if runAgent is None:
            runAgent = not (foreground or background) and self.agentAvailable()
        self._status(f"Repairing slice {sliceIndex} ({'the agent' if runAgent else 'your points'}) ...")
        result = self._continueVolume(
            "repair",
            sliceIndex,
            foreground=foreground,
            background=background,
            run_agent=bool(runAgent),
            max_steps=int(maxSteps),
        )
        if placed:
            self.clearUserPoints()
        return result

    def undoSlice(self, sliceIndex):
        """Undo the last change about slice `sliceIndex` (a repair, or the key) on the server; the slices it touched
        go back. Returns the new result summary."""
        self._status(f"Undoing slice {sliceIndex} ...")
        return self._continueVolume("undo_slice", sliceIndex)

    def _volumeCall(self, client, session, request):
        """Send `request` for `session` on a worker thread (HTTP only: no Qt or MRML there), poll its progress here,
        then take the answer into the session and show the proposed volume."""
        if self._volumeBusy:
            raise ValueError("a volume request is still running; wait for it to finish")
        params = request.to_params(session.dimsIjk())
        self._volumeBusy = True
        try:
            self._volumeExchange(client, session, request, params)
        finally:
            self._volumeBusy = False

    def _volumeExchange(self, client, session, request, params):
        box = {}

        def work():
            try:
                box["answer"] = client.infer(session.imageId, params, output="all", model=VOLUME_MODEL)
            except BaseException as exc:  # handed to the caller's thread, raised there
                box["error"] = exc

        worker = threading.Thread(target=work, name="IBISAgent volume request", daemon=True)
        started = time.monotonic()
        worker.start()
        poller = IBISAgentClient(self.serverUrl, timeout=self.PROGRESS_TIMEOUT, token=client.token)
        while True:
            worker.join(self.PROGRESS_POLL_SECONDS)
            if not worker.is_alive():
                break
            self._pollProgress(poller, request.progress_id, started)
        if "error" in box:
            raise box["error"]
        result, label = box["answer"]
        session.update(result, label, self.ijkToRasMatrix(session.volumeNode, world=False))
        self.volumeSession = session  # a new session replaces the last one only once its answer was taken
        if self.progressCallback:
            self.progressCallback(
                VolumeProgress("done", "done", len(session.result.slices), None, time.monotonic() - started)
            )
        self.showVolume()
        self._status(self._volumeSummary())

    def _pollProgress(self, poller, progressId, started):
        """One progress report to `progressCallback`; a poll that fails only skips this report."""
        if not self.progressCallback:
            return
        try:
            report = poller.progress(progressId)
            progress = VolumeProgress.from_dict(report) if report is not None else None
        except (IBISAgentClientError, VolumeFormatError) as exc:
            logging.debug(f"IBISAgent: progress not available ({exc})")
            progress = None
        if progress is None:
            progress = VolumeProgress("running", "waiting for the server", 0, None, time.monotonic() - started)
        self.progressCallback(progress)

    def _volumeSummary(self):
        r = self.volumeSession.result
        counts = {}
        for s in r.slices:
            counts[s.status] = counts.get(s.status, 0) + 1
        parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        text = (
            f"Volume session {r.session_id}: slices {r.range[0]}..{r.range[1]} ({parts}), {len(r.flagged)} flagged, "
            f"repairs {r.repairs_used}/{'-' if r.repair_budget is None else r.repair_budget}, stop: {r.stop_reason}."
        )
        if r.ignored_points:
            text += f" The server ignored {len(r.ignored_points)} point(s) (not on the slice it worked on)."
        return text

    def volumeSliceTrajectory(self, sliceIndex):
        """The 2D trajectory (TrajectoryView) that made slice `sliceIndex` (the key or a repair), or None."""
        vs = self.volumeSession
        return vs.result.trajectories.get(int(sliceIndex)) if vs is not None and vs.result else None

    def volumeStatusLines(self):
        """The per-slice status list as text lines (what the Widget lists)."""
        return self.volumeSession.statusLines() if self.volumeSession else []

    def showVolume(self):
        """Show the whole proposed volume in the preview segment of the session's segmentation."""
        vs = self.volumeSession
        if vs is None or vs.label is None:
            raise ValueError("run the volume mode first")
        self.checkSegmentationFrame(vs.volumeNode, vs.segmentationNode)
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            vs.label, vs.segmentationNode, self.previewSegmentId(segmentationNode=vs.segmentationNode), vs.volumeNode
        )

    def jumpToSlice(self, sliceIndex):
        """Move the slice views to the centre of slice `sliceIndex` of the volume session (e.g. a flagged one), so
        it is shown and placed points land on it."""
        vs = self.volumeSession
        if vs is None:
            raise ValueError("run the volume mode first")
        n = vs.dimsIjk()[vs.axis]
        if not 0 <= int(sliceIndex) < n:
            raise ValueError(f"slice {sliceIndex} is outside the volume (0..{n - 1} along IJK axis {vs.axis})")
        self._jumpToSliceCentre(vs.volumeNode, vs.axis, int(sliceIndex))

    def acceptSlice(self, sliceIndex):
        """Mark slice `sliceIndex` as reviewed (its mask kept as it is, e.g. a flagged slice you checked) on the
        server. Returns the new result summary."""
        self._status(f"Marking slice {sliceIndex} as reviewed ...")
        return self._continueVolume("accept", sliceIndex)

    def acceptVolume(self):
        """Write the proposed volume into the session's segment as ONE undoable step (`undoAccept`): every slice the
        session has a record of (key, propagated, repaired, absent) becomes the proposal's; other slices keep their
        content. The server's session stays open (repair and accept again as often as needed). Returns the segment
        id (a new segment is made when none was chosen)."""
        vs = self.volumeSession
        if vs is None or vs.label is None:
            raise ValueError("run the volume mode first")
        self.checkSegmentationFrame(vs.volumeNode, vs.segmentationNode)
        segmentation = vs.segmentationNode.GetSegmentation()
        vs.segmentId, created = self._segmentToWrite(vs.segmentationNode, vs.segmentId, vs.instruction)
        self._segmentEditorSaveStateForUndo(vs.segmentationNode)
        before = self.segmentArray(vs.segmentationNode, vs.segmentId, vs.volumeNode)
        after = before.copy()
        for index in vs.result.indices:
            write_slice_mask(after, kji_slice(vs.label, vs.axis, index) > 0, vs.axis, index)
        slicer.util.updateSegmentBinaryLabelmapFromArray(after, vs.segmentationNode, vs.segmentId, vs.volumeNode)
        self._acceptUndoStack.append(
            (vs.segmentationNode.GetID(), vs.segmentId, before, vs.volumeNode.GetID(), created)
        )
        self.removePreview(vs.segmentationNode)
        name = segmentation.GetSegment(vs.segmentId).GetName()
        self._status(f"Accepted the volume ({len(vs.result.indices)} slices) into segment {name!r}.")
        return vs.segmentId

    # -- markups ----------------------------------------------------------------------------------------------------
    def markupsNode(self, role):
        """The module's markups node for `role` (created on first use): trajectory clicks or your input points."""
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode"):
            if node.GetAttribute(self.ROLE_ATTRIBUTE) == role:
                return node
        name, color, locked, label = self._MARKUPS[role]
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.SetAttribute(self.ROLE_ATTRIBUTE, role)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)
        node.SetLocked(locked)
        if hasattr(node, "SetControlPointLabelFormat"):
            node.SetControlPointLabelFormat(label + "%d")
        else:  # Slicer < 5.2
            node.SetMarkupLabelFormat(label + "%d")
        return node

    @staticmethod
    def _pointsOf(node):
        out = []
        for n in range(node.GetNumberOfControlPoints()):
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(n, position)
            out.append(position)
        return out

    def userPoints(self):
        """(positive, negative) lists of world RAS points placed in the 'my points' markups nodes."""
        return (
            self._pointsOf(self.markupsNode(self.ROLE_INPUT_POSITIVE)),
            self._pointsOf(self.markupsNode(self.ROLE_INPUT_NEGATIVE)),
        )

    def clearUserPoints(self):
        for role in (self.ROLE_INPUT_POSITIVE, self.ROLE_INPUT_NEGATIVE):
            self.markupsNode(role).RemoveAllControlPoints()

    def _showClicks(self, clicks):
        """Trajectory clicks as markups at the centre of the voxel each clicked pixel indexes."""
        s = self.session
        ijkToWorld = self.ijkToRasMatrix(s.volumeNode)
        for role, positive in ((self.ROLE_CLICKS_POSITIVE, True), (self.ROLE_CLICKS_NEGATIVE, False)):
            node = self.markupsNode(role)
            xy = np.asarray([(c.x, c.y) for c in clicks if c.positive == positive], float).reshape(-1, 2)
            points = ijk_to_ras(pixel_to_voxel_centre(xy, s.axis, s.sliceIndex), ijkToWorld) if len(xy) else []
            wasModified = node.StartModify()
            node.RemoveAllControlPoints()
            for point in points:
                node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in point]))
            node.EndModify(wasModified)

    # -- segments ---------------------------------------------------------------------------------------------------
    @classmethod
    def segmentArray(cls, segmentationNode, segmentId, volumeNode):
        """The segment as a (K, J, I) uint8 array in the volume's geometry (zeros for an empty segment).

        A segment that cannot be read, or reads in another shape, raises: taking it for empty would let an accept
        erase its other slices."""
        cls.checkSegmentationFrame(volumeNode, segmentationNode)
        shape = slicer.util.arrayFromVolume(volumeNode).shape[:3]
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise ValueError(f"segmentation {segmentationNode.GetName()!r} has no segment {segmentId!r}")
        try:
            array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        except Exception as exc:
            if cls._segmentIsEmpty(segment):  # an empty segment cannot be exported in some Slicer versions
                return np.zeros(shape, np.uint8)
            raise ValueError(
                f"segment {segment.GetName()!r} could not be read in the volume's geometry: {exc}"
            ) from exc
        if array is None or array.shape != shape:
            raise ValueError(
                f"segment {segment.GetName()!r} reads as {None if array is None else array.shape}, the volume is "
                f"{shape} (K, J, I); nothing was written"
            )
        return (array > 0).astype(np.uint8)

    @staticmethod
    def _segmentIsEmpty(segment):
        """Whether every representation the segment holds is an empty image (a surface counts as content)."""
        names = []
        segment.GetContainedRepresentationNames(names)
        for name in names:
            representation = segment.GetRepresentation(name)
            if representation is not None and not (hasattr(representation, "IsEmpty") and representation.IsEmpty()):
                return False
        return True

    @staticmethod
    def checkSegmentationFrame(volumeNode, segmentationNode):
        """Raise ValueError unless the segmentation lies in the volume's frame and grid: the same (linear) parent
        transforms to world, and a reference geometry, if it has one, equal to the volume's voxel grid. Slicer's
        segment export applies a transform difference that its import does not, and an import resamples into another
        grid, so every accept through another frame or grid would move the segment's content."""

        def toWorld(node):
            transformNode = node.GetParentTransformNode()
            if transformNode is None:
                return np.eye(4)
            if not transformNode.IsTransformToWorldLinear():
                raise ValueError(f"{node.GetName()!r} is under a non-linear transform; harden the transform first")
            m = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(m)
            return slicer.util.arrayFromVTKMatrix(m)

        if not np.allclose(toWorld(volumeNode), toWorld(segmentationNode), atol=1e-6):
            transformNode = volumeNode.GetParentTransformNode()
            where = f"under transform {transformNode.GetName()!r}" if transformNode else "under no transform"
            raise ValueError(
                f"segmentation {segmentationNode.GetName()!r} is not in the frame of volume {volumeNode.GetName()!r}: "
                f"put it {where}, as the volume (Data module), or harden both, or choose no segmentation to get a "
                "new one"
            )
        geometry = segmentationNode.GetSegmentation().GetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        )
        if geometry:
            grid = slicer.vtkOrientedImageData()
            slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, grid)
            m = vtk.vtkMatrix4x4()
            grid.GetImageToWorldMatrix(m)
            extent = grid.GetExtent()
            dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
            origin = slicer.util.arrayFromVTKMatrix(m) @ [extent[0], extent[2], extent[4], 1.0]
            volumeMatrix = vtk.vtkMatrix4x4()
            volumeNode.GetIJKToRASMatrix(volumeMatrix)
            volumeMatrix = slicer.util.arrayFromVTKMatrix(volumeMatrix)
            same = (
                list(dims) == list(volumeNode.GetImageData().GetDimensions())
                and np.allclose(slicer.util.arrayFromVTKMatrix(m)[:3, :3], volumeMatrix[:3, :3], atol=1e-4)
                and np.allclose(origin[:3], volumeMatrix[:3, 3], atol=1e-3)
            )
            if not same:
                raise ValueError(
                    f"segmentation {segmentationNode.GetName()!r} has another voxel grid than volume "
                    f"{volumeNode.GetName()!r} (its geometry was set for another volume or frame): in the Segment "
                    "Editor, Specify geometry with this volume as source, or choose no segmentation to get a new one"
                )

    def segmentSliceMask(self, segmentationNode, segmentId, volumeNode, axis, sliceIndex):
        """HxW bool mask of the segment on one slice (rows/columns as in IBISAgentLib.geometry)."""
        return kji_slice(self.segmentArray(segmentationNode, segmentId, volumeNode), axis, sliceIndex) > 0

    def previewSegmentId(self, create=True, segmentationNode=None):
        """The preview segment's id in `segmentationNode` (default: the session's); the 2D and the volume mode
        share it, so it shows whichever result was shown last."""
        if segmentationNode is None:
            if self.session is None:
                return ""
            segmentationNode = self.session.segmentationNode
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName(self.PREVIEW_SEGMENT_NAME)
        if not segmentId and create:
            segmentId = segmentation.AddEmptySegment("", self.PREVIEW_SEGMENT_NAME, list(self.PREVIEW_COLOR))
        return segmentId

    def removePreview(self, segmentationNode=None):
        """Remove the preview segment from `segmentationNode` (default: the session's)."""
        if segmentationNode is None:
            segmentationNode = self.session.segmentationNode if self.session is not None else None
        if segmentationNode is None or segmentationNode.GetScene() is None:
            return
        segmentId = self.previewSegmentId(create=False, segmentationNode=segmentationNode)
        if segmentId:
            segmentationNode.GetSegmentation().RemoveSegment(segmentId)

    def _stepCount(self, count):
        t = self.session.trajectory
        return min(max(int(count), 0), t.num_steps)

    def showStep(self, count):
        """Show the state after the first `count` trajectory steps (0 = initial): its mask in the preview segment on
        the session slice and its clicks as markups. Returns the last of those steps (None for count 0)."""
        s = self.session
        if s is None:
            raise ValueError("run the agent first")
        count = self._stepCount(count)
        mask = s.trajectory.mask_at(count - 1)
        self.checkSegmentationFrame(s.volumeNode, s.segmentationNode)
        array = np.zeros(slicer.util.arrayFromVolume(s.volumeNode).shape[:3], np.uint8)
        write_slice_mask(array, mask, s.axis, s.sliceIndex)
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            array, s.segmentationNode, self.previewSegmentId(), s.volumeNode
        )
        self._showClicks(s.trajectory.clicks_at(count - 1))
        return s.trajectory.steps[count - 1] if count else None

    def accept(self, count):
        """Write the mask after the first `count` steps into the session's segment on the session slice (other
        slices keep their content). Undoable with `undoAccept` (and with the Segment Editor's undo when it edits
        this segmentation). Returns the segment id (a new segment is made when none was chosen)."""
        s = self.session
        if s is None:
            raise ValueError("run the agent first")
        count = self._stepCount(count)
        mask = s.trajectory.mask_at(count - 1)
        self.checkSegmentationFrame(s.volumeNode, s.segmentationNode)
        segmentation = s.segmentationNode.GetSegmentation()
        s.segmentId, created = self._segmentToWrite(s.segmentationNode, s.segmentId, s.instruction)
        self._segmentEditorSaveStateForUndo(s.segmentationNode)
        before = self.segmentArray(s.segmentationNode, s.segmentId, s.volumeNode)
        after = before.copy()
        write_slice_mask(after, mask, s.axis, s.sliceIndex)
        slicer.util.updateSegmentBinaryLabelmapFromArray(after, s.segmentationNode, s.segmentId, s.volumeNode)
        self._acceptUndoStack.append((s.segmentationNode.GetID(), s.segmentId, before, s.volumeNode.GetID(), created))
        self.removePreview()
        self._status(f"Accepted step {count} into segment {segmentation.GetSegment(s.segmentId).GetName()!r}.")
        return s.segmentId

    @staticmethod
    def _segmentToWrite(segmentationNode, segmentId, instruction):
        """(segment id, created): the chosen segment, or a new one named after the instruction's target."""
        segmentation = segmentationNode.GetSegmentation()
        if segmentId and segmentation.GetSegment(segmentId) is not None:
            return segmentId, False
        name = re.sub(r"^(please\s+)?segment(\s+the)?\s+", "", instruction, flags=re.IGNORECASE)[:40]
        return segmentation.AddEmptySegment("", name or "IBISAgent"), True

    def canUndoAccept(self):
        return bool(self._acceptUndoStack)

    def undoAccept(self):
        """Restore the segment as it was before the last `accept`; returns False when there is nothing to undo."""
        if not self._acceptUndoStack:
            return False
        segmentationId, segmentId, before, volumeId, created = self._acceptUndoStack.pop()
        segmentationNode = slicer.mrmlScene.GetNodeByID(segmentationId)
        volumeNode = slicer.mrmlScene.GetNodeByID(volumeId)
        if segmentationNode is None or volumeNode is None:
            raise ValueError("the segmentation or volume of that accept was removed from the scene")
        self.checkSegmentationFrame(volumeNode, segmentationNode)
        if created:
            segmentationNode.GetSegmentation().RemoveSegment(segmentId)
            if self.session is not None and self.session.segmentId == segmentId:
                self.session.segmentId = ""
        else:
            slicer.util.updateSegmentBinaryLabelmapFromArray(before, segmentationNode, segmentId, volumeNode)
        self._status("Undid the last accept.")
        return True

    @staticmethod
    def _segmentEditorSaveStateForUndo(segmentationNode):
        """Let Ctrl+Z in the Segment Editor undo our write too, when the editor works on this segmentation."""
        if slicer.app.commandOptions().noMainWindow:
            return False
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            current = editor.segmentationNode()
            if current is not None and current.GetID() == segmentationNode.GetID():
                editor.saveStateForUndo()
                return True
        except Exception as exc:  # the Segment Editor's internals differ between Slicer versions; our own undo remains
            logging.debug(f"IBISAgent: Segment Editor undo state not saved ({exc})")
        return False

    def forgetSession(self):
        """Drop the sessions (e.g. the scene is closing); nodes are left to the scene."""
        self.session = None
        self.volumeSession = None
        self._acceptUndoStack = []


#
# IBISAgentTest
#


class IBISAgentTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (and headless on slicer-core: tests/slicer_core). The geometry test needs no server; the
    agent test runs against the server named by the IBISAGENT_SERVER environment variable (e.g.
    http://127.0.0.1:8000) and is skipped when it is unset. Both run on a right-handed oblique and a left-handed (LAS)
    volume, and compare physical positions: Slicer's NIfTI reader may number a left-handed file's voxels otherwise."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_IBISAgentLibMatchesSlicer()
        self.setUp()
        self.test_IBISAgentOnServer()

    def _volumes(self):
        """(name, volume node): a synthetic right-handed oblique volume, a left-handed (LAS) one, and the CTChest
        sample when SampleData can get it."""
        k, j, i = np.mgrid[0:40, 0:64, 0:80]
        array = (1000.0 * np.exp(-((i - 46) ** 2 + (j - 30) ** 2 + (k - 20) ** 2) / 300.0)).astype(np.int16)
        array[k < 6] += 7 * (i[k < 6] % 5).astype(np.int16)  # no symmetry that a wrong axis order could hide
        oblique = np.array([[0.0, 0.8, 0.0, -20.0], [-0.7, 0.0, 0.0, 15.0], [0.0, 0.0, 2.5, -40.0], [0, 0, 0, 1]])
        las = np.diag([-0.8, 0.7, 2.5, 1.0])
        las[:3, 3] = (12.0, -9.0, 30.0)
        volumes = [
            ("oblique", slicer.util.addVolumeFromArray(array, ijkToRAS=oblique, name="IBISAgentSyntheticOblique")),
            ("LAS", slicer.util.addVolumeFromArray(array, ijkToRAS=las, name="IBISAgentSyntheticLAS")),
        ]
        try:
            import SampleData

            volumes.append(("CTChest", SampleData.downloadSample("CTChest")))
        except Exception as exc:  # offline or no SampleData module: the synthetic volumes exercise the same paths
            self.delayDisplay(f"SampleData CTChest not available ({exc}); synthetic volumes only")
        return volumes

    @staticmethod
    def _vtkMatrix(volume, ras_to_ijk=False):
        m = vtk.vtkMatrix4x4()
        (volume.GetRASToIJKMatrix if ras_to_ijk else volume.GetIJKToRASMatrix)(m)
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])

    def _assertSamePhysicalVoxels(self, loaded, original):
        """Every voxel of `loaded` lies on a voxel centre of `original` and holds its value (Slicer's own matrices)."""
        a, b = slicer.util.arrayFromVolume(loaded), slicer.util.arrayFromVolume(original)
        self.assertEqual(a.size, b.size)
        kji = np.argwhere(np.ones(a.shape, bool))
        ijk = np.c_[kji[:, ::-1], np.ones(len(kji))]
        mapped = (self._vtkMatrix(original, ras_to_ijk=True) @ self._vtkMatrix(loaded) @ ijk.T).T[:, :3]
        np.testing.assert_allclose(mapped, np.round(mapped), atol=1e-2)
        index = np.round(mapped).astype(int)
        np.testing.assert_array_equal(a[tuple(kji.T)], b[index[:, 2], index[:, 1], index[:, 0]])

    def test_IBISAgentLibMatchesSlicer(self):
        """IBISAgentLib's conventions agree with Slicer: IJK->RAS, arrayFromVolume's (K, J, I) layout, the NIfTI
        writer read back by Slicer's reader (the same physical voxels, whatever numbering the reader chooses), and
        slice masks written into a segment land on the voxels Slicer places there."""
        self.delayDisplay("Checking IBISAgentLib conventions against Slicer")
        logic = IBISAgentLogic()
        for label, volume in self._volumes():
            ijkToRas = logic.ijkToRasMatrix(volume)
            image = volume.GetImageData()
            dims = image.GetDimensions()
            array = slicer.util.arrayFromVolume(volume)
            for ijk in ([0, 0, 0], [dims[0] - 1, 1, dims[2] // 2], [3, dims[1] - 2, dims[2] - 1]):
                ras = self._vtkMatrix(volume) @ [*ijk, 1.0]
                np.testing.assert_allclose(ijk_to_ras(ijk, ijkToRas), ras[:3], atol=1e-6)
                np.testing.assert_allclose(ras_to_ijk(ras[:3], ijkToRas), ijk, atol=1e-6)
                self.assertEqual(array[ijk[2], ijk[1], ijk[0]], image.GetScalarComponentAsDouble(*ijk, 0))

            # the NIfTI written by IBISAgentLib (what the server receives) holds the same physical voxels in Slicer
            with tempfile.TemporaryDirectory() as folder:
                path = write_nifti(os.path.join(folder, "roundtrip.nii.gz"), array, logic.ijkToRasMatrix(volume, False))
                loaded = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), "roundtrip")
                self.assertIsNotNone(loaded, f"Slicer could not read the NIfTI written for {label}")
                self._assertSamePhysicalVoxels(loaded, volume)
                slicer.mrmlScene.RemoveNode(loaded)

            # a slice mask lands where the geometry says: pixel (x, y) of an axis-2 slice s is voxel (x, y, s), at
            # the RAS point Slicer's own IJK->RAS gives
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            segmentId = segmentation.GetSegmentation().AddEmptySegment("", "check")
            h, w = slice_shape(dims, 2)
            mask = np.zeros((h, w), bool)
            mask[2:5, 7:12] = True  # rows y 2..4, columns x 7..11
            labelmap = np.zeros(array.shape, np.uint8)
            write_slice_mask(labelmap, mask, 2, dims[2] // 2)
            slicer.util.updateSegmentBinaryLabelmapFromArray(labelmap, segmentation, segmentId, volume)
            back = logic.segmentArray(segmentation, segmentId, volume)
            self.assertEqual(int(back.sum()), int(mask.sum()))
            ras = self._vtkMatrix(volume) @ [7.0, 2.0, dims[2] // 2, 1.0]  # pixel (x 7, y 2) of that slice
            k, j, i = np.round(self._vtkMatrix(volume, ras_to_ijk=True) @ ras)[:3][::-1].astype(int)
            self.assertEqual(back[k, j, i], 1, f"{label}: the mask is not at the voxel Slicer places at {ras[:3]}")
        self.delayDisplay("IBISAgentLib conventions match Slicer")

    def test_IBISAgentOnServer(self):
        url = os.environ.get("IBISAGENT_SERVER")
        if not url:
            self.delayDisplay("IBISAGENT_SERVER is not set: skipping the IBISAgent server test")
            return
        for label, volume in self._volumes():
            self.delayDisplay(f"Running IBISAgent against {url} on the {label} volume")
            self._runOnServer(url, volume)
        self.delayDisplay("IBISAgent server test passed")

    def _runOnServer(self, url, volume):
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "target")
        logic = IBISAgentLogic(url)
        logic.serverInfo()
        dims = volume.GetImageData().GetDimensions()
        axis, sliceIndex = 2, dims[2] // 2
        h, w = slice_shape(dims, axis)
        centre = [w // 2, h // 2, sliceIndex]  # voxel (i, j, k) = pixel (x, y) of the axis-2 slice
        centreRas = (self._vtkMatrix(volume) @ [*centre, 1.0])[:3]

        if logic.agentAvailable():
            trajectory = logic.run(volume, sliceIndex, axis, "segment the lung", segmentation, segmentId, maxSteps=3)
        else:
            self.delayDisplay("The server has no policy model: starting the session with a positive point (tool only)")
            trajectory = logic.run(
                volume, sliceIndex, axis, "segment the lung", segmentation, segmentId, 3, positiveRas=[centreRas]
            )

        # the preview shows the server's final mask, decoded by IBISAgentLib, on the chosen slice only
        preview = logic.segmentArray(segmentation, logic.previewSegmentId(create=False), volume)
        np.testing.assert_array_equal(kji_slice(preview, axis, sliceIndex) > 0, trajectory.final_mask)
        self.assertEqual(int(preview.sum()), int(trajectory.final_mask.sum()))

        if not trajectory.final_mask.any():
            # the policy may find nothing; one positive click applied by the tool alone must give a mask
            self.delayDisplay("The mask is empty; adding a positive point at the slice centre (tool only)")
            trajectory = logic.continueSession(positiveRas=[centreRas], negativeRas=[], maxSteps=1, runAgent=False)
        self.assertTrue(trajectory.final_mask.any(), "the final mask is empty")

        # back to the initial state, then only the centre point: one step whose click is the centre voxel's pixel
        redone = logic.continueSession(positiveRas=[centreRas], negativeRas=[], maxSteps=1, undoTo=0, runAgent=False)
        self.assertEqual(redone.num_steps, 1)
        clicks = redone.clicks_at(0)
        self.assertEqual([(int(c.x), int(c.y), c.positive) for c in clicks], [(centre[0], centre[1], True)])
        final = redone.final_mask
        self.assertTrue(final.any(), "the tool gave an empty mask for a positive click")

        logic.accept(redone.num_steps)
        accepted = logic.segmentArray(segmentation, segmentId, volume)
        np.testing.assert_array_equal(kji_slice(accepted, axis, sliceIndex) > 0, final)
        self.assertEqual(int(accepted.sum()), int(final.sum()))  # nothing written on other slices
        # physically: the clicked point lies in the accepted segment where Slicer's own RAS->IJK places it
        k, j, i = np.round(self._vtkMatrix(volume, ras_to_ijk=True) @ [*centreRas, 1.0])[:3][::-1].astype(int)
        self.assertEqual(accepted[k, j, i], int(final[centre[1], centre[0]]))
        self.assertTrue(logic.undoAccept())
        self.assertEqual(int(logic.segmentArray(segmentation, segmentId, volume).sum()), 0)
