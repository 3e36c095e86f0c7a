"""Distillation: a smaller student trained on a teacher's distributions (`slm distill`, docs/distill.md)."""
