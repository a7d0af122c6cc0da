"""fewstep."""
