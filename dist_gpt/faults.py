"""Re-exports dist_gpt.training.faults under its old path `dist_gpt.faults` (nothing in the package imports it)."""

from dist_gpt.training.faults import (AGENT_LOST, CODE_TO_NAME, MARKER, STOP_SIGNALS, FaultGuard, FaultInjector,
                                      Heartbeat, PeerLost, StopSignals, Verdict, named_collective_failures, pause,
                                      write_marker)

__all__ = ["AGENT_LOST", "CODE_TO_NAME", "MARKER", "STOP_SIGNALS", "FaultGuard", "FaultInjector", "Heartbeat",
           "PeerLost", "StopSignals", "Verdict", "named_collective_failures", "pause", "write_marker"]
