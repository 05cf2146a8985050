# Sourced by bench/gpu.sh and bench/gpu_train.sh: shared set-up for a lent GPU machine.

# provide_python DIR: some images name their interpreter python3 only; put a `python` on PATH that runs it.
# A wrapper script in DIR rather than a symlink, which would lose the interpreter's venv.
provide_python() {
  if ! command -v python >/dev/null; then
    mkdir -p "$1"
    printf '#!/bin/sh\nexec python3 "$@"\n' >"$1/python"
    chmod +x "$1/python"
    PATH=$1:$PATH
  fi
}

# build_safron SOURCE BUILD_DIR JOBS [CMAKE_OPTION...]: configure and build safron's C++ core (the Python module,
# plus the C++ tests when asked for with -DSAFRON_BUILD_TESTS=ON) for the `python` on PATH, release, with Ninja.
build_safron() {
  local source=$1 dir=$2 jobs=$3
  shift 3
  cmake -S "$source" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(python -c 'import sys; print(sys.executable)')" \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" "$@" &&
    cmake --build "$dir" -j "$jobs"
}
