"""EnginEdge Main Hexagon: an orchestrator for AI/ML workloads."""

__version__ = "0.1.0"
