"""Plumbing no output depends on: YAML reading, atomic writes, paths, device names, progress bars, timing."""
