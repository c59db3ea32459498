"""Pure model math: torch in, torch out. No sockets, threads, files or global state here,
except the loaders in weights.py and bank.py that read files they are given, and the registry
of backends (backends/__init__.py), filled once at import."""
