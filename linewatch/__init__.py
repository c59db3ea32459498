"""linewatch: an inspection daemon that turns camera frames into pass/fail verdicts (SAM-LAD)."""

__version__ = "0.1.0"
