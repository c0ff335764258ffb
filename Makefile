# The two commands of the README. Each does all set-up on a fresh machine.
.PHONY: demo test setup

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vdvae demo

test: setup
	.venv/bin/python -m pytest -q --durations=20 tests
