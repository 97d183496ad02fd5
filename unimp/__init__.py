"""The ``unimp`` command: the entry point above export/ (torch, offline), runtime/ and benchmarks/."""
