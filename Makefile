# The README's two commands: `make demo` and `make test`. Each installs what it needs:
# torch first and pinned (a CPU wheel on CPU machines; unpinned would pull a CUDA build).
PY ?= python3
TORCH ?= torch==2.13.0

.PHONY: install demo test bench
install: .install.stamp
.install.stamp: pyproject.toml
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(PY) -m pipeline.cli run configs/demo.yaml

test: install
	$(PY) -m pytest tests --durations=15

bench: install
	for b in bench/*.py; do $(PY) $$b || exit 1; done
