"""AI providers. Adding one is adding a module here and a line in `PROVIDERS`."""
