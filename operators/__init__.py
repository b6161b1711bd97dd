"""Operator families. Each module registers its operators with `register`; the runner builds them
from YAML by `op:` name (see operators/base.py for the contract)."""
