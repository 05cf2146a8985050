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
