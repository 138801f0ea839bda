"""Repo tooling, not shipped with the package: training and reporting on the embedded model."""
