# The two commands on a fresh machine:
#   make demo   install, simulate a small colony dataset, train, predict sequence c, score it, draw pictures
#   make test   install (with the test extras) and run the test suite (.ci/run calls this)
#   make test-fast   the in-process tests only, under a minute
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# demo settings: 5 simulated sequences of 40 frames at 192 x 192; the patch recipe with 128 px patches, on CPU (GPU
# when present)
DEMO_DATA ?= demo_data
DEMO_RUN ?= runs/demo
DEMO_PRED ?= pred/demo
DEMO_EPOCHS ?= 8
REAL_TRPL ?= ../shared/real/trpL
PICTURES ?= $(DEMO_RUN)/pictures

.PHONY: demo test test-fast install install-test extras peers benchmark-real readme-imgs pretrained clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# optional extras: microscope formats (bioio: ND2, CZI, LIF) and the napari viewer; as root also Xvfb and the X
# libraries Qt's xcb plugin needs, so that tests/test_view.py runs on a machine without a display (make test runs it
# where the extras are installed and skips it with the reason elsewhere)
extras: $(VENV)/.installed-extras
$(VENV)/.installed-extras: $(VENV)/.installed-test requirements-movie.txt requirements-view.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements.txt -r requirements-movie.txt \
		-r requirements-view.txt
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 \
			libxcb-image0 libxcb-render-util0 libxkbcommon-x11-0 libgl1 libegl1 >/dev/null; \
	else echo "not root or no apt-get: install xvfb and the X libraries of requirements-view.txt by hand"; fi
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# the in-process tests only (no training runs, subprocesses, real data or SLURM): under a minute
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow and not real and not slurm"

demo: $(VENV)/.installed
	rm -rf $(DEMO_DATA) $(DEMO_RUN) $(DEMO_PRED)
	$(PY) simulate.py --root_dir $(DEMO_DATA) --num_sequences 5 --num_frames 40 --size 192 --seed 0
	$(PY) train.py --root_dir $(DEMO_DATA) --out_dir $(DEMO_RUN) --num_epochs $(DEMO_EPOCHS) --batch_size 8 \
		--set patch_size=128 --set tile_size=192 --set patches_per_epoch=128
	$(PY) inference.py --root_dir $(DEMO_DATA) --split val --model $(DEMO_RUN)/checkpoints/best.ckpt \
		--pred_dir $(DEMO_PRED)
	$(PY) eval.py --pred_dir $(DEMO_PRED) --root_dir $(DEMO_DATA)
	$(PY) pictures.py sample --root_dir $(DEMO_DATA) --seqs c --frames 39 --out_dir $(PICTURES)
	$(PY) pictures.py overlay --root_dir $(DEMO_DATA) --pred_dir $(DEMO_PRED) --seqs c --frames 20,39 \
		--out_dir $(PICTURES)
	$(PY) pictures.py curves --metrics $(DEMO_RUN)/metrics.csv --out $(PICTURES)/curves.png
	$(PY) track.py --labels $(DEMO_PRED)/c --out_dir $(DEMO_RUN)/track/c_RES --out_size 192 192
	$(PY) pictures.py lineage --track_dir $(DEMO_RUN)/track/c_RES --out $(PICTURES)/lineage.png
	@# the bundled model on real frames (zero-shot), where the real sample of ../shared is at hand
	if [ -d $(REAL_TRPL) ] && [ -f models/bacteria_generalist.pt ]; then \
		rm -rf $(DEMO_DATA)_real $(DEMO_PRED)_real && \
		$(PY) import_sequence.py --images $(REAL_TRPL)/trpL_150310-11_img.tif \
			--masks $(REAL_TRPL)/trpL_150310-11_mask.tif --root_dir $(DEMO_DATA)_real --name trpL --frames 17:20 && \
		$(PY) inference.py --root_dir $(DEMO_DATA)_real --seqs trpL --pred_dir $(DEMO_PRED)_real --native && \
		$(PY) eval.py --pred_dir $(DEMO_PRED)_real --root_dir $(DEMO_DATA)_real --native && \
		$(PY) pictures.py overlay --root_dir $(DEMO_DATA)_real --pred_dir $(DEMO_PRED)_real --seqs trpL --frames 2 \
			--native --out_dir $(PICTURES); \
	else echo "real sample or bundled model absent: skipped the bundled model on real frames"; fi
	@# your own movie, end to end (docs/your_movie.md), where the real sample of ../shared is at hand
	if [ -f $(REAL_TRPL)/trpL_150310-11_img.tif ] && [ -f models/bacteria_generalist.pt ]; then \
		$(PY) segment.py $(REAL_TRPL)/trpL_150310-11_img.tif --out $(DEMO_RUN)/movie_trpL --overwrite \
			--gt $(REAL_TRPL)/trpL_150310-11_mask.tif; \
	else echo "real sample or bundled model absent: skipped segment.py on the trpL movie"; fi

# The bundled generalist model for rod-shaped bacteria (models/bacteria_generalist.pt): the patch recipe on 26
# domain-randomised simulated sequences (simulate.py --randomise: phase contrast and brightfield, cells 6-20 px wide,
# chambers, channels, agar pads), each sequence rescaled so that its cells are 16 px wide (the border-core targets
# need cores: at 4 px of border a 9 px cell is nearly all border); no real frame, so scores on real data are
# zero-shot. Its recipe is pinned (intensity augmentation for the randomised looks; cross-entropy alone, float32: the
# same data with today's Dice term and bf16 fit the simulator and lost on real frames). Cost: docs/results.md (The
# bundled model).
GENERALIST_DATA ?= generalist_data
GENERALIST_RUN ?= runs/generalist
GENERALIST_EPOCHS ?= 15
pretrained: $(VENV)/.installed
	rm -rf $(GENERALIST_DATA) $(GENERALIST_RUN)
	$(PY) simulate.py --root_dir $(GENERALIST_DATA) --randomise --num_sequences 26 --without_gt 0 --num_frames 24 \
		--size 256 --seed 7
	$(PY) train.py --root_dir $(GENERALIST_DATA) --train_seqs a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u,v,w,x,y \
		--val_seqs z --out_dir $(GENERALIST_RUN) --model_cell_width 16 --set patch_size=128 --set tile_size=256 \
		--set patches_per_epoch=256 --batch_size 8 --num_epochs $(GENERALIST_EPOCHS) \
		--set photometric=true --set dice_weight=0 --precision 32-true \
		--export_to models/bacteria_generalist.pt

# the peer tool, Cellpose 3, in its own venv: torch==2.13.0 first, then cellpose<4 (no torchvision); never the project's
CELLPOSE_VENV ?= .venv-cellpose
$(CELLPOSE_VENV)/.installed: peer_cellpose.py
	$(PYTHON) peer_cellpose.py install --venv $(CELLPOSE_VENV)
	touch $@
peers: $(CELLPOSE_VENV)/.installed

# the recipes and Cellpose 3 side by side on trpL, Usiigaci and a simulated set (hours on a 2-core CPU;
# docs/peers.md), written into docs/results.md and readme_imgs/peer_race.png
benchmark-real: $(VENV)/.installed $(CELLPOSE_VENV)/.installed
	$(PY) benchmark_real.py --generalist models/bacteria_generalist.pt

# the README's pictures are the demo's: make readme-imgs reruns the demo drawing into readme_imgs/
readme-imgs:
	$(MAKE) demo PICTURES=readme_imgs

clean:
	rm -rf $(VENV) $(CELLPOSE_VENV) runs pred $(DEMO_DATA) $(GENERALIST_DATA)
