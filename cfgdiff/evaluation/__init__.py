"""Sample-quality evaluation: FID, Inception Score, precision/recall and class accuracy,
with the feature networks that define them (FID Inception; a Fashion-MNIST classifier)."""
