"""The engine core: requests, KV blocks, prefix cache and the scheduler. Pure Python, never imports torch."""
