"""One module per DVC stage, each a pure `run(config)`."""
