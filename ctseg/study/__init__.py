"""The study: jobs that run many trainings (cross-validation)."""
