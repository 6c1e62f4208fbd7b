"""Re-exports dist_gpt.parallel.dist under its old path `dist_gpt.dist` (nothing in the package imports it)."""

from dist_gpt.parallel.dist import (LAYOUTS, DistEnv, ParallelConfig, all_reduce_max, all_reduce_sum, barrier,
                                    default_store, device_mesh, exit_code, from_rank0, init, is_collective_failure,
                                    is_sharded, launch_rank, launch_world, materialize, no_grad_sync, parallelize,
                                    rank_and_world, replica_group, run_main, shutdown, wrap)

__all__ = ["LAYOUTS", "DistEnv", "ParallelConfig", "all_reduce_max", "all_reduce_sum", "barrier", "default_store",
           "device_mesh", "exit_code", "from_rank0", "init", "is_collective_failure", "is_sharded", "launch_rank",
           "launch_world", "materialize", "no_grad_sync", "parallelize", "rank_and_world", "replica_group",
           "run_main", "shutdown", "wrap"]
