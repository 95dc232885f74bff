# The README's two commands: `make demo` (the main job) and `make test`.
.PHONY: deps demo test

deps:
	./scripts/install-deps

demo: deps
	python3 -m uswap demo

test: deps
	python3 -m pytest
