-- optional: a projection; `log count` reads every row without it, with the same answer.
-- Per-part row counts by model, version and slot, so `motlens log count` (predlog.queries.COUNTS) reads a
-- few rows per part instead of the whole table. New parts get it as they are written; MATERIALIZE builds
-- it for the parts already there as a background mutation (reads the five columns once). Until it is
-- done, parts without it are read as before, with the same answer.
ALTER TABLE ${db}.predictions ADD PROJECTION IF NOT EXISTS p_counts
(
    SELECT model_name, model_version, slot, count(), countIf(embedding_q != []), min(ts), max(ts)
    GROUP BY model_name, model_version, slot
);

ALTER TABLE ${db}.predictions MATERIALIZE PROJECTION p_counts;
