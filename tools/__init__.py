"""Developer tools around the Space that the Space itself does not run (deploying, local test servers)."""
