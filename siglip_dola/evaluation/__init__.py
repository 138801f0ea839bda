"""One embedding pass, calibration, evaluation, metrics and plots."""
