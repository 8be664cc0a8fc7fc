"""Helpers both sides need (producer `lstm_export` and consumer `runtimes`, and the packages above
them): the one error type, what machine this is, and one way to draw a figure. Imports nothing of ours."""
