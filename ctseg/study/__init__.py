"""The study: jobs that run or compare many trainings (cross-validation `cv`, YAML `experiments`,
the `compare` table). The top of the package order: it may import every stage below it."""
