"""The search: preparing it (:mod:`.setup`), the ask -> merge -> score -> tell loop (:mod:`.loop`:
:func:`~evomerge.search.loop.run_search`), stopping candidates early (:mod:`.pruning`), samplers
(:mod:`.samplers`), baselines, validation and test re-scores (:mod:`.finalists`), typed records
in the Optuna storage (:mod:`.records`), what a study's scores depend on (:mod:`.inputs`), where a
study lives (:mod:`.storage`) and its results table (:mod:`.table`). Several workers share one
study through :mod:`.distributed`.

Nothing is imported here: the readers of a study (results, export, report) import the records,
storage and table modules without lm-eval, which the loop loads."""
