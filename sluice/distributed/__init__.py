"""Tensor parallelism: the process group, its collectives, and the executor that drives one process per rank.

    parallel_state.py   the TP group of this process (rank, world size, device and CPU groups)
    communication.py    all-reduce, all-gather, broadcast over the TP group
    support.py          what a TP > 1 engine refuses (quantization, LoRA, MoE, head counts), per-rank heads
    backends.py         make_tp_executor: the executor of --distributed-executor-backend (mp or ray)
    executor.py         rank 0: starts ranks 1..N-1, sends them each step, watches them (TPExecutor; MPExecutor:
                        child processes)
    ray_executor.py     RayExecutor: ranks 1..N-1 as Ray actors in a placement group
    worker.py           ranks 1..N-1: a ModelRunner that runs whatever step rank 0 sends
"""
