"""Merge kernels: per-method tensor code (:mod:`.methods`), the chunked CPU/GPU kernels
(:mod:`.chunked`), their compiled twins for resident re-merges (:mod:`.compiled`), what those two
share (:mod:`.common`) and the keep rules of the task-vector family (:mod:`.rules`)."""
