"""Every touch of a library's private API or global state, one module per library.

Each piece is a function or a context manager that undoes itself, and each has a test in
tests/compat/ that fails when the upstream name or signature it relies on changes: an upgrade of
torch, transformers or peft then breaks a named test, not a training run.
"""
