# The two commands of the README. Each does all set-up on a fresh machine.
.PHONY: demo test setup

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vdvae demo

# Two pytest-xdist workers, a test file to each at a time, the slowest files first (tests/conftest.py):
# the tests spend much of their time starting processes and waiting on services, so two at once
# finish the suite in about 0.7 of the time of one on a 2-core machine.
TEST_WORKERS ?= 2

test: setup
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 tests
