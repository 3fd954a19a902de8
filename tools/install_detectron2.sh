#!/usr/bin/env bash
# Installs detectron2 into the active Python, trying in order:
#   1. an already importable detectron2 (nothing to do);
#   2. a build from the official source repository (needs network access to GitHub);
#   3. the PyPI wheel `sal-detectron2==0.7.2`, a build of detectron2's main branch published only for
#      cp310: its pure-Python part works on any Python 3 (the compiled `_C` ops are optional on CPU).
# Prints which one it used; exits non-zero with one sentence when none works.
set -u
PY=${PYTHON:-python}

if "$PY" -c "import detectron2" >/dev/null 2>&1; then
  echo "detectron2: already installed ($("$PY" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))'))"
  exit 0
fi

if [ "${D2_SKIP_SOURCE:-0}" != "1" ] && timeout 15 git ls-remote https://github.com/facebookresearch/detectron2.git HEAD >/dev/null 2>&1; then
  echo "detectron2: building from the official source repository (a few minutes)..."
  if "$PY" -m pip install -q --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'; then
    "$PY" -c "import detectron2" && { echo "detectron2: installed from source"; exit 0; }
  fi
  echo "detectron2: source build failed; trying the PyPI fallback"
else
  echo "detectron2: official source repository not reachable; using the PyPI fallback sal-detectron2==0.7.2"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" sal-detectron2==0.7.2; then
  echo "error: could not download sal-detectron2==0.7.2 from PyPI; install detectron2 by hand (see README) and re-run." >&2
  exit 1
fi
whl=$(ls "$tmp"/sal_detectron2-*.whl | head -n1)
mv "$whl" "$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
"$PY" -m pip install -q --no-deps "$tmp/sal_detectron2-0.7.2-py3-none-any.whl" || {
  echo "error: pip could not install the sal-detectron2 wheel; install detectron2 by hand (see README)." >&2; exit 1; }
# detectron2's pure-Python requirements (from its setup.py), minus the ones pinned elsewhere.
"$PY" -m pip install -q 'Pillow>=7.1' matplotlib 'pycocotools>=2.0.2' termcolor yacs tabulate cloudpickle \
  tqdm tensorboard 'fvcore>=0.1.5,<0.1.6' 'iopath>=0.1.7,<0.1.10' omegaconf 'hydra-core>=1.1' packaging \
  opencv-python-headless || { echo "error: could not install detectron2's requirements." >&2; exit 1; }
if "$PY" -c "import detectron2, detectron2.modeling, detectron2.engine" ; then
  echo "detectron2: installed the PyPI fallback sal-detectron2==0.7.2 (pure Python; compiled ops unused on CPU)"
else
  echo "error: detectron2 fallback installed but does not import; see the error above." >&2; exit 1
fi
