"""Command-line entry points that are not pipeline stages (the library never imports these)."""
