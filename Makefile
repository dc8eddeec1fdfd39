# Two commands on a fresh machine:
#   make demo   sets everything up and runs the main job on the embedded model and data
#   make test   sets everything up and runs the tests
.PHONY: setup demo test test-slow bench
setup:
	bash scripts/setup_env.sh

demo: setup
	.venv/bin/bilevel-jax run --config configs/demo.py

test:
	bash scripts/test.sh

test-slow:
	bash scripts/test.sh -m slow
