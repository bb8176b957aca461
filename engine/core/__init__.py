"""The engine loop: the Engine and its thread, the scheduler, the runner, requests, the step kinds
(steps/), the prefix and passage caches, decoding and passage encoding. Knows no HTTP."""
