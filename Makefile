# The README's two commands: `make demo` (the main job) and `make test`; `make bench` (root, an idle machine,
# a few minutes; never part of `make test`) regenerates the main comparison of docs/BENCHMARKS.md into bench/results/;
# `make bench-pool` (the same conditions) the compressed pool against zram and zswap at equal total memory (issue 21);
# `make bench-nfs` an nfs:// store on nfs-ganesha (FILE_SYNC and COMMIT), `make bench-set` a store set of two,
# `make bench-stripe` swap-out striped over 1, 2 and 3 NFS servers behind rate-limited links, `make bench-copies`
# --copies 2 against one copy, on local files and on two NFS servers; `make bench-programs` real, unmodified
# programs (python, sqlite, sort, xz, java) under `uswap run` against kernel swap under a memcg of the same limit.
#
# PYTHON: the interpreter the suite runs on.  Unset, it is python3 with this checkout installed
# into it (scripts/install-deps: pip install -e .[test]), run from here.  Set, as .ci/run does
# (make test PYTHON=VENV/bin/python), it is the uswap[test] installed in that venv: the suite
# runs from an empty directory, so neither it nor a child's `python -m uswap` imports this
# checkout's uswap/ (tests/, examples/ and csrc/ are still read from here).
PYTHON =
BENCH_WORKDIR ?= /var/tmp/uswap-bench

.PHONY: deps demo test bench bench-pool bench-nfs bench-set bench-stripe bench-copies bench-programs

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

bench:
	python3 -m uswap bench --size 256M --resident 64M --repeat 3 --workloads seq,random,zipf,hog --io sync \
	    --run sync --against native --workdir $(BENCH_WORKDIR) \
	    --json bench/results/bench.json --plot bench/results/bench.png --markdown bench/results/bench.md

bench-pool:
	python3 -m uswap bench --size 256M --resident 64M --repeat 3 \
	    --workloads seq:zeros,random:zeros,zipf:zeros,seq:half,random:half,zipf:half,hog \
	    --io sync --pool 32M --pool-compressor lz4 --against native,zram,zswap --equal-memory \
	    --workdir $(BENCH_WORKDIR) \
	    --json bench/results/pool.json --plot bench/results/pool.png --markdown bench/results/pool.md

bench-nfs:
	python3 -m uswap bench --size 256M --resident 64M --repeat 3 --workloads seq,random,zipf,hog \
	    --io sync,nfs,nfs-commit --against native --workdir $(BENCH_WORKDIR)-nfs --json bench/results/nfs.json

bench-set:
	python3 -m uswap bench --size 256M --resident 64M --repeat 3 --workloads seq,random,zipf,hog \
	    --io sync,set --against native --workdir $(BENCH_WORKDIR)-set --json bench/results/storeset.json

bench-stripe:
	python3 -m uswap.bench.striping --servers 1,2,3 --rate 64mbit --size 256M --resident 16M --repeat 3 \
	    --workdir $(BENCH_WORKDIR)-stripe --json bench/results/striping.json

bench-copies:
	python3 -m uswap bench --size 256M --resident 64M --repeat 3 --workloads seq,hog \
	    --io set,copies,nfs-set,nfs-copies --against native --workdir $(BENCH_WORKDIR)-copies \
	    --json bench/results/copies.json

bench-programs:
	python3 -m uswap.bench.programs --budget 32M --repeat 3 --timeout-cap 120 --workdir $(BENCH_WORKDIR)-programs \
	    --json bench/results/programs.json --markdown bench/results/programs.md
