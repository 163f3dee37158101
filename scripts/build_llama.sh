#!/usr/bin/env bash
# Install llama-cpp-python built for every CPU of this architecture, not only this one.
#
#   bash scripts/build_llama.sh PYTHON            # build once per flag set, then install
#   bash scripts/build_llama.sh PYTHON --print    # only print the flags and the cache key
#
# Why: pip's default build compiles llama.cpp with -march=native. A venv (or an image)
# built on one CPU then crashes in native code on another (a Xeon with AVX-512 and AMX
# segfaulted in decode on its first token). The portable set below is x86-64-v3
# (AVX2, FMA, F16C, BMI2; no AVX-512, no AMX), which every x86-64 CPU since 2013-2015
# runs; on arm64 it is the compiler's armv8-a baseline.
#
# Why not llama.cpp's run-time CPU variants (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS):
# llama-cpp-python 0.3.36 does not load dynamic backends (it never calls
# ggml_backend_load_all), the build compiles ggml-cpu once per variant (several times
# the compile time on 2 cores), and its pick on the machine that crashed would be the
# AMX variant again.
#
# Why our own wheel cache: pip's wheel cache ignores CMAKE_ARGS, so a wheel built once
# with other flags is silently reused. Ours is keyed by version, flags, Python and
# architecture; a venv records the key it was installed from (llama-cpp-build.txt).
#
# Environment:
#   LLAMA_CPP_VERSION   llama-cpp-python version (default below)
#   LLAMA_CMAKE_ARGS    extra CMake flags appended to the portable set, e.g.
#                       "-DGGML_CUDA=on" for an NVIDIA GPU (opt-in)
#   LLAMA_NATIVE=1      build for this CPU only (-march=native): for benchmarks, never to ship
#   SUPERWHISPER_WHEEL_CACHE  where built wheels are kept (default ~/.cache/superwhisper/wheels)
set -euo pipefail

python=${1:?usage: build_llama.sh PYTHON [--print]}
mode=${2:-install}
version=${LLAMA_CPP_VERSION:-0.3.36}

case "$(uname -m)" in
  x86_64|amd64)
    portable="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  *)
    portable="-DGGML_NATIVE=OFF" ;;
esac
[ "${LLAMA_NATIVE:-0}" = 1 ] && portable="-DGGML_NATIVE=ON"
cmake_args="$portable ${LLAMA_CMAKE_ARGS:-}"
cmake_args=${cmake_args% }

py_tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
key=$(printf '%s|%s|%s|%s' "$version" "$(uname -m)" "$py_tag" "$cmake_args" | sha256sum | cut -c1-16)

if [ "$mode" = "--print" ]; then
  printf 'version=%s\nkey=%s\ncmake_args=%s\n' "$version" "$key" "$cmake_args"
  exit 0
fi

log() { printf '\033[1m[build-llama]\033[0m %s\n' "$*"; }
prefix=$("$python" -c 'import sys; print(sys.prefix)')
marker="$prefix/llama-cpp-build.txt"
if [ -f "$marker" ] && grep -qx "key=$key" "$marker" && "$python" -c 'import llama_cpp' 2>/dev/null; then
  exit 0
fi

cache=${SUPERWHISPER_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/superwhisper/wheels}/llama-cpp-python-$version-$key
wheel=$(ls "$cache"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  log "compiling llama-cpp-python $version ($cmake_args); about 5 minutes on 2 cores, once per flag set"
  tmp="$cache.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  CMAKE_ARGS="$cmake_args" "$python" -m pip --disable-pip-version-check -q wheel \
    --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$tmp" "llama-cpp-python==$version"
  rm -rf "$cache"
  mv "$tmp" "$cache"
  wheel=$(ls "$cache"/llama_cpp_python-*.whl | head -n 1)
fi
log "installing $(basename "$wheel") (build key $key)"
"$python" -m pip --disable-pip-version-check -q install --force-reinstall --no-deps "$wheel"
# llama-cpp-python's own dependencies (numpy, jinja2, diskcache, typing-extensions).
"$python" -m pip --disable-pip-version-check -q install "$wheel"
printf 'key=%s\nversion=%s\ncmake_args=%s\n' "$key" "$version" "$cmake_args" >"$marker"
