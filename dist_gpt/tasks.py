"""Re-exports dist_gpt.training.tasks under its old path `dist_gpt.tasks` (nothing in the package imports it)."""

from dist_gpt.training.tasks import (ChoiceTask, Example, load_tasks)

__all__ = ["ChoiceTask", "Example", "load_tasks"]
