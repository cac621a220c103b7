"""Reference implementations the lab is checked against (test and benchmark dependencies)."""
