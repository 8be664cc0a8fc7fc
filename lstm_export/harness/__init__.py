"""Proving runtimes agree and timing them: compare, the CPU and GPU benches, their reports."""
