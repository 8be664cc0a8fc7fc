#!/usr/bin/env bash
# Triton's load tool, perf_analyzer, made runnable here; prints the path of a wrapper that runs it.
# The perf-analyzer wheel needs glibc 2.38, newer than these machines have; the perf_analyzer binary
# in the tritonclient 2.47.0 manylinux1 wheel runs, given libb64 and libcudart, which nvidia-pytriton
# bundles (auditwheel-renamed) in nvidia_pytriton.libs. Both wheels are fetched once with pip (no
# install) and cached under ${XDG_CACHE_HOME:-~/.cache}/lstm-export/perf_analyzer; a second run only
# prints the path. Usage (docs/serving.md):
#   PA=$(./scripts/perf_analyzer.sh) && $PA -m lm.streaming -u localhost:8001 -i grpc --streaming ...
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${XDG_CACHE_HOME:-$HOME/.cache}/lstm-export/perf_analyzer"
wrapper="$dir/perf_analyzer"
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
  echo "$wrapper"
  exit 0
fi
mkdir -p "$dir/lib"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip=(.venv/bin/python -m pip download --disable-pip-version-check -q --no-deps -d "$work")
"${pip[@]}" "tritonclient==2.47.0" "nvidia-pytriton==0.7.0" 2>&1 | { grep -v "is ignored" || true; } >&2
.venv/bin/python - "$work" "$dir" <<'EOF'
import glob, os, sys, zipfile
work, out = sys.argv[1:]
with zipfile.ZipFile(glob.glob(os.path.join(work, "tritonclient-2.47.0-*.whl"))[0]) as z:
    data = z.read("tritonclient-2.47.0.data/data/bin/perf_analyzer")
with open(os.path.join(out, "perf_analyzer.bin"), "wb") as f:
    f.write(data)
os.chmod(os.path.join(out, "perf_analyzer.bin"), 0o755)
with zipfile.ZipFile(glob.glob(os.path.join(work, "nvidia_pytriton-0.7.0-*.whl"))[0]) as z:
    for soname, prefix in (("libb64.so.0d", "libb64-"), ("libcudart.so.12", "libcudart-")):
        name = next(n for n in z.namelist() if n.startswith("nvidia_pytriton.libs/" + prefix))
        with open(os.path.join(out, "lib", soname), "wb") as f:
            f.write(z.read(name))
EOF
cat > "$wrapper" <<EOF
#!/usr/bin/env bash
LD_LIBRARY_PATH="$dir/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$dir/perf_analyzer.bin" "\$@"
EOF
chmod +x "$wrapper"
"$wrapper" --version >/dev/null
echo "$wrapper"
