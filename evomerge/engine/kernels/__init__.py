"""Merge kernels: per-method tensor code (:mod:`.methods`), the chunked CPU/GPU kernels
(:mod:`.chunked`), their compiled twins for resident re-merges (:mod:`.compiled`), and what those
two share (:mod:`.common`)."""
