"""Stand-in for Slicer's `slicer.ScriptedLoadableModule` (Slicer's Base/Python, not in slicer-core): the base classes
the module derives from, as far as a Logic and a headless self-test use them. The Module and Widget bases raise when
made: they need Slicer's application and Qt. The Logic base keeps Slicer's parameter node API on a real scene; the
Test base is unittest.TestCase whose `delayDisplay` logs, as Slicer's does without a main window."""

from __future__ import annotations

import logging
import unittest

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent):
        raise RuntimeError("ScriptedLoadableModule needs Slicer's application (module parent); not on slicer-core")


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        raise RuntimeError("ScriptedLoadableModuleWidget needs Qt; the Widget is checked in a real Slicer only")


class ScriptedLoadableModuleLogic:
    """Slicer's parameter node lookup: one vtkMRMLScriptedModuleNode per module name, singleton-tagged."""

    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        logging.info(message)

    def runTest(self):
        raise NotImplementedError("the module's test class defines runTest")
