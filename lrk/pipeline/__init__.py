"""Stages (train, compress, fine-tune) and the schedules that order them; checkpoint resolution and loading."""
