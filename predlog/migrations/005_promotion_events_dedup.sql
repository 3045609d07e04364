-- optional: a table setting; every read gives the same answer without it.
-- The predictor spools its own audit rows and replays them with their insert_deduplication_token
-- (predlog.writer): like predictions (001), the table keeps the tokens of its last 10 000 inserts, so a
-- row stored before its spool copy was removed (a crash, a timeout after the insert) is stored once.
ALTER TABLE ${db}.promotion_events MODIFY SETTING non_replicated_deduplication_window = 10000;
