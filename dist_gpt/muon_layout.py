"""Re-exports dist_gpt.optim.muon_layout under its old path `dist_gpt.muon_layout` (nothing in the package imports it)."""

from dist_gpt.optim.muon_layout import (Layout, NewtonSchulz, assign_workers, layout_key, layout_of, local, ns_cost,
                                        orthogonalise_across)

__all__ = ["Layout", "NewtonSchulz", "assign_workers", "layout_key", "layout_of", "local", "ns_cost",
           "orthogonalise_across"]
