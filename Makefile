# The README's two commands: `make demo` (the main job) and `make test`; `make bench` (root, an idle machine,
# a few minutes; never part of `make test`) regenerates the main comparison of docs/BENCHMARKS.md into bench/results/.
.PHONY: deps demo test bench

BENCH_WORKDIR ?= /var/tmp/uswap-bench

deps:
	./scripts/install-deps

demo: deps
	python3 -m uswap demo

test: deps
	python3 -m pytest

bench:
	python3 -m uswap bench --size 256M --resident 64M --repeat 3 --workloads seq,random,zipf,hog --io sync \
	    --run sync --against native --workdir $(BENCH_WORKDIR) \
	    --json bench/results/bench.json --plot bench/results/bench.png --markdown bench/results/bench.md
