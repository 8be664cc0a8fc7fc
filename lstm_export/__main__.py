"""`python -m lstm_export COMMAND ...`: the same command line as `lstm-export`."""
import sys

from lstm_export.cli.main import main

sys.exit(main())
