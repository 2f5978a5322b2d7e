"""Evaluators: each takes a jitted eval step, the state and the task's data, and returns metrics."""
