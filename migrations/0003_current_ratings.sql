-- The rating a new one supersedes is found among the current ratings of the same answer and
-- rater only: without this, superseding scanned every earlier rating of the answer, so each
-- rating cost more than the last (a flood of ratings slowed to a crawl).
CREATE INDEX ratings_current ON ratings (session_id, turn, target_alias, attempt, rater)
    WHERE superseded_by IS NULL;
