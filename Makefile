# Set-up and the two everyday commands. `make demo` and `make test` each create the
# virtual environment on first use, so either one works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# A matched torch/torchvision pair (torchvision must be built for the same torch).
# Override for your hardware, e.g. TORCH_PACKAGES="torch torchvision --index-url ..."
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/ntf-ray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PACKAGES)
	$(BIN)/pip install -e '.[test]'
	touch $@

setup: $(BIN)/ntf-ray

demo: setup
	$(BIN)/ntf-ray demo

# The centre-window decode's tests also need libjpeg-turbo 3's TurboJPEG library, which Debian 12
# lacks: the first run puts a released one into the virtual environment (tests/turbojpeg3.py).
test: setup
	$(BIN)/python -m tests.turbojpeg3 fetch
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) ntf-work .pytest_cache
