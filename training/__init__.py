"""MOT data loading, synthetic data, training and MLflow registration."""
