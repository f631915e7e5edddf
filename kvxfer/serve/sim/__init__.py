"""A discrete-event simulator of P/D-Serve deployments (:mod:`.model`), calibrated from the
workers' measured profiles, driving the same policy objects as the real system."""

from .model import SimConfig, SimRequest, Simulation, summarize

__all__ = ["SimConfig", "SimRequest", "Simulation", "summarize"]
