"""What a user drives: config, fingerprints, run layout, the CLI and the run graph."""
