PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test install clean demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV)

# make demo: the VOSR recipe at demo scale through the public entry points (README, "The demo"),
# into $(WORKDIR): data/, multistep/ and onestep/ (training workdirs), sr/{bicubic,multistep_4,
# multistep_25,onestep}/ (held-out outputs with metrics.json: the multi-step model at 4 and 25
# Euler steps, the one-step student), report/ and report.md. A quick run (2 training steps, the
# multi-step model at 4 Euler steps only):
#   make demo WORKDIR=/tmp/d MS_FLAGS=--config.total_steps=2 OS_FLAGS=--config.total_steps=2 \
#     SAMPLE_STEPS=4
WORKDIR ?= runs/demo
DATA = $(WORKDIR)/data
SR = $(WORKDIR)/sr
MS_FLAGS ?=
OS_FLAGS ?=
SAMPLE_FLAGS ?= --preset=demo --overwrite
SAMPLE_STEPS ?= 4 25
METRICS ?= psnr,ssim,flat_noise,detail_hf,detail_gsim,niqe
TIMED = $(PY) -m vosr_jax.demo time --log=$(WORKDIR)/timings.json
SAMPLE = $(PY) -m vosr_jax.sample --input=$(DATA)/heldout_lr $(SAMPLE_FLAGS)

demo: $(STAMP)
	rm -rf $(WORKDIR)/timings.json $(WORKDIR)/multistep $(WORKDIR)/onestep $(SR)
	$(TIMED) prepare -- $(PY) -m vosr_jax.demo prepare --out=$(DATA)
	$(TIMED) train_multistep -- $(PY) -m vosr_jax.main --config=configs/multistep.py:demo \
	  --workdir=$(WORKDIR)/multistep --config.data.sources=$(DATA)/train $(MS_FLAGS)
	$(TIMED) distill_onestep -- $(PY) -m vosr_jax.main --config=configs/onestep.py:demo \
	  --workdir=$(WORKDIR)/onestep --config.data.sources=$(DATA)/train \
	  --config.model.path=$(WORKDIR)/multistep $(OS_FLAGS)
	for steps in $(SAMPLE_STEPS); do \
	  $(TIMED) sample_multistep_$$steps -- $(SAMPLE) --checkpoint=$(WORKDIR)/multistep \
	    --output=$(SR)/multistep_$$steps --steps=$$steps || exit 1; \
	done
	$(TIMED) sample_onestep -- $(SAMPLE) --checkpoint=$(WORKDIR)/onestep --output=$(SR)/onestep
	$(TIMED) bicubic -- $(PY) -m vosr_jax.demo bicubic --input=$(DATA)/heldout_lr \
	  --output=$(SR)/bicubic
	for method in bicubic $(addprefix multistep_,$(SAMPLE_STEPS)) onestep; do \
	  $(TIMED) evaluate_$$method -- $(PY) -m vosr_jax.evaluate --pred=$(SR)/$$method \
	    --gt=$(DATA)/heldout_hr --metrics=$(METRICS) || exit 1; \
	done
	$(PY) -m vosr_jax.demo report --workdir=$(WORKDIR)
