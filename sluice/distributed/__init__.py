"""Tensor parallelism: the process group, its collectives, and the executor that drives one process per rank.

    parallel_state.py   the TP group of this process (rank, world size, device and CPU groups)
    communication.py    all-reduce, all-gather, broadcast over the TP group
    support.py          what a TP > 1 engine refuses (quantization, LoRA, MoE, head counts), per-rank heads
    executor.py         rank 0: spawns ranks 1..N-1, sends them each step, watches them (TPExecutor)
    worker.py           ranks 1..N-1: a ModelRunner that runs whatever step rank 0 sends
"""
