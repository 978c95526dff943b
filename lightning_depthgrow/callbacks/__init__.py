"""Thin Lightning shells: when to measure, grow, scale and log; on which ranks; how to stay in sync."""

from .architecture_logger import ArchitectureLogger
from .curvature_monitor import CurvatureMonitor
from .depth_growth import DepthGrowth
from .dms import DifferentiableModelScaling
from .neuron_growth import NeuronGrowth

__all__ = ["ArchitectureLogger", "CurvatureMonitor", "DepthGrowth", "DifferentiableModelScaling", "NeuronGrowth"]
