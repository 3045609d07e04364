"""The registry tags on a model version that the promotion workflow reads and writes."""

from __future__ import annotations

from motlens.labels import CANARY_PERCENT_TAG, PROMOTION_STATUS_TAG

STATUS_TAG = PROMOTION_STATUS_TAG
STEP_AT_TAG = "promotion.step_at"
STARTED_AT_TAG = "promotion.canary_started_at"
PREVIOUS_TAG = "promotion.previous_production"  # on a production version: the one it replaced ("" = none)
VERDICTS = ("rejected", "retired")  # a version so tagged is not rolled out again without --force
#: the actions that tag a version with each verdict. Releases before ``promotion.{verdict}_at`` (38dbe5d)
#: dated a verdict only by the event tags ``promotion.last_action``/``last_at``: while the last action is
#: one of these, ``last_at`` is when the verdict was given
VERDICT_ACTIONS = {"rejected": ("rollback", "reject"), "retired": ("canary_start", "promote", "deploy")}
PERCENT_TAG = CANARY_PERCENT_TAG
#: on the registered model, + a digest of the target's name: the change a run is making there, written
#: before the target changes and removed once its audit is written (JSON; promotion.workflow)
INTENT_TAG = "promotion.intent."
