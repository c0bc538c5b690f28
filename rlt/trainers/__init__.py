"""Trainers: teacher SFT warm-up and teacher GRPO, both on trl."""
