"""What a run leaves: test metrics (the metrics.json summary), printed tables, TensorBoard HPARAMS, figures,
the comparison of many runs, and catalogues of predictions for new spectra."""
