"""What a user reads of a study: the leaderboard (:mod:`.leaderboard`), the exported recipe
(:mod:`.export`) and the report (:mod:`.report`)."""
