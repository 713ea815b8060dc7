"""Test package (makes `tests.conftest_servers` importable as a pytest plugin)."""
