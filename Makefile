# The two commands of the quick start: `make demo` and `make test`. Each sets up .venv when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SSHD   ?= /usr/sbin/sshd
# Test processes side by side: one at a time the end-to-end tests mostly wait on agents, sshd hosts and soaks;
# side by side they keep the cores busy.
TEST_WORKERS ?= 4

.PHONY: demo test bench venv sshd chromium clean

demo: $(STAMP)
	$(BIN)/edgeloop demo

test: $(STAMP) sshd chromium
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: $(STAMP) sshd
	$(BIN)/python bench/train_elpv.py
	$(BIN)/python bench/edge.py
	$(BIN)/python bench/provision.py
	$(BIN)/python bench/http_load.py
	$(BIN)/python bench/member_policies.py
	$(BIN)/python bench/finetune_speed.py
	$(BIN)/python bench/loop.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/store_poll.py

venv: $(STAMP)

# Reinstall when the project's requirements change; the constraints file pins what these machines need.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e '.[dev]'
	@touch $@

# The provisioning and sftp tests run real OpenSSH servers on loopback ports.
sshd:
	@if [ -x $(SSHD) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing openssh-server (needed by the SSH tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; \
	else \
		echo "error: $(SSHD) is missing; install openssh-server (e.g. sudo apt-get install openssh-server)" >&2; exit 1; \
	fi

clean:
	rm -rf .demo .pytest_cache build *.egg-info

# The labelling page is tested in a real headless Chromium.
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver (needed by the browser tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "error: chromium and chromedriver are missing; install them (e.g. sudo apt-get install chromium chromium-driver)" >&2; exit 1; \
	fi
