"""Evaluation: FID (standard Inception or a local feature network), CLIP score, teacher-vs-student
comparison tables, and the CPU digits benchmark.  See ``fewstep eval --help``."""
