# The README's commands.
.PHONY: demo test check

demo:
	python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/streamrec demo

test:
	python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/pytest

check: test
	.venv/bin/ruff check . && .venv/bin/mypy models stream_app
