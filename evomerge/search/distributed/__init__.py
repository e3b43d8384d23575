"""Several workers on one study: claims on the work done once per study, heartbeats, recovery of
dead workers' trials, worker processes on one host, and the :class:`~.coordinator.Coordinator`
the search loop talks to (:mod:`.coordinator`)."""
