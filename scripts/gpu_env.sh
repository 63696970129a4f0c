# Sourced by the scripts/gpu_*.sh device calls, with the output folder as its argument:
#   . "$(dirname "$0")/gpu_env.sh" "$out"
# puts the carried wheels (.whl/) on the path, writes the GPU's name to $out/gpu.txt, and defines
#   part NAME LIMIT CMD...   (CMD capped at LIMIT seconds, its output in $out/NAME.log, its exit in $out/status.txt)
out=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
part() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "$name exit $?" >> "$out/status.txt"; }
