"""The registry tags on a model version that the promotion workflow reads and writes."""

from __future__ import annotations

from motlens.labels import CANARY_PERCENT_TAG, PROMOTION_STATUS_TAG

STATUS_TAG = PROMOTION_STATUS_TAG
STEP_AT_TAG = "promotion.step_at"
STARTED_AT_TAG = "promotion.canary_started_at"
PREVIOUS_TAG = "promotion.previous_production"  # on a production version: the one it replaced ("" = none)
VERDICTS = ("rejected", "retired")  # a version so tagged is not rolled out again without --force
PERCENT_TAG = CANARY_PERCENT_TAG
