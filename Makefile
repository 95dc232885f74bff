# The README's two commands: `make demo` (the main job) and `make test`.
#
# PYTHON: the interpreter the suite runs on.  Unset, it is python3 with this checkout installed
# into it (scripts/install-deps: pip install -e .[test]), run from here.  Set, as .ci/run does
# (make test PYTHON=VENV/bin/python), it is the uswap[test] installed in that venv: the suite
# runs from an empty directory, so neither it nor a child's `python -m uswap` imports this
# checkout's uswap/ (tests/, examples/ and csrc/ are still read from here).
PYTHON =

.PHONY: deps demo test

deps:
	./scripts/install-deps $(PYTHON)

demo: deps
	python3 -m uswap demo

test: deps
ifeq ($(PYTHON),)
	python3 -m pytest
else
	cwd=$$(mktemp -d) && cd "$$cwd" && status=0 && \
	  $(if $(findstring /,$(PYTHON)),$(abspath $(PYTHON)),$(PYTHON)) -m pytest --rootdir="$(CURDIR)" -c "$(CURDIR)/pyproject.toml" "$(CURDIR)/tests" || status=$$?; \
	  rmdir "$$cwd"; exit $$status
endif
