"""The trainer's components: the Trainer and its build order (trainer.py), the Evaluator
(evaluator.py, tasks.py), the fault guard (faults.py), the run's own files (run_files.py) and its
lock (runlock.py). The commands (dist_gpt.train, .evaluate) sit above this package."""
