"""Orchestration only: CLI, config, artifact cache, stage graph, report."""
