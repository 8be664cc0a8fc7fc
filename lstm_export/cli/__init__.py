"""The `lstm-export` command line and the demo: above the producer, the runtimes, the harness and serving."""
