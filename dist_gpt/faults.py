"""Re-exports what dist_gpt.faults held, from where it lives now (nothing in the package imports it):
the guard (dist_gpt.training.faults), stop signals (dist_gpt.training.signals), test hooks
(dist_gpt.hooks) and PeerLost (dist_gpt.errors)."""

from dist_gpt.errors import PeerLost
from dist_gpt.hooks import FaultInjector, pause
from dist_gpt.training.faults import FaultGuard, Heartbeat, Verdict, named_collective_failures
from dist_gpt.training.signals import AGENT_LOST, CODE_TO_NAME, MARKER, STOP_SIGNALS, StopSignals, write_marker

__all__ = ["AGENT_LOST", "CODE_TO_NAME", "MARKER", "STOP_SIGNALS", "FaultGuard", "FaultInjector", "Heartbeat",
           "PeerLost", "StopSignals", "Verdict", "named_collective_failures", "pause", "write_marker"]
