-- optional: a projection; `log count` reads every row without it, with the same answer.
-- Per-part row counts by model, version and slot on every shard table (see ../004_predictions_counts.sql);
-- a count through the Distributed table uses each shard's projection.
ALTER TABLE ${db}.predictions_local ON CLUSTER '{cluster}' ADD PROJECTION IF NOT EXISTS p_counts
(
    SELECT model_name, model_version, slot, count(), countIf(embedding_q != []), min(ts), max(ts)
    GROUP BY model_name, model_version, slot
);

ALTER TABLE ${db}.predictions_local ON CLUSTER '{cluster}' MATERIALIZE PROJECTION p_counts;
