"""The drift job: Evidently reports over the prediction log."""
