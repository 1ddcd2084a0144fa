# Both targets create or reuse .venv and install what they need (idempotent: a stamp file records
# the installed dependency set, so a second run installs nothing).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# Debian packages with real data, installed when missing and we are root: Fashion-MNIST IDX files; the
# pre-training sources and their held-out downstream sets (clip art, colour emoji + Unicode's emoji list, icon themes);
# the fonts `fontdigits` typesets digits in (data/sources/fontdigits.py: FONT_PACKAGES, ~230 usable fonts).
DEB_PACKAGES := dataset-fashion-mnist openclipart-png fonts-noto-color-emoji unicode-data \
                oxygen-icon-theme gnome-icon-theme mate-icon-theme \
                fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-freefont-ttf fonts-urw-base35 \
                fonts-noto-core fonts-crosextra-carlito fonts-crosextra-caladea fonts-ebgaramond \
                fonts-linuxlibertine fonts-cantarell fonts-open-sans fonts-lato fonts-hack fonts-comic-neue \
                fonts-sil-gentium fonts-sil-andika fonts-stix fonts-firacode fonts-inconsolata

.PHONY: demo test lint bench system-data clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import loraplex, peft, timm, mlxtend"
	rm -f $(VENV)/.installed-*
	touch $@

system-data:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages: $$missing (run: sudo apt-get install -y $$missing)"; \
	  fi; \
	fi

demo: $(STAMP) system-data
	$(PY) -m loraplex.demo

test: $(STAMP) system-data
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean-venv:
	rm -rf $(VENV)
