#!/usr/bin/env bash
# Run HERE (a machine with pip and a package index), from the repository root:
#
#     bash benchmarks/gpu_check/fetch_wheels.sh
#
# Downloads, for CPython 3.12 / manylinux x86_64, what the GPU machine lacks (see
# shared/DEVICE.md and the device tool's KINDS.md package list) into .whl/, then packs
# it into call-sized groups under .carry/NN/ (each at most GROUP_MIB, so that a group
# plus the working tree stays under the device tool's 64 MiB per call); a file larger
# than a group is split into parts (NAME.part-aa, -ab, ...), reassembled by run.sh.
# Both folders are git-ignored (/.whl/, /.carry/ in .gitignore); nothing here is
# committed. Prints the wheel list with sizes and the groups.
set -euo pipefail

PY=${PY:-python3}
GROUP_MIB=${GROUP_MIB:-56}
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"

for ignored in .whl/x .carry/x .stash/x; do
    if ! git check-ignore -q "$ignored"; then
        echo "error: ${ignored%/x}/ is not git-ignored; add it to .gitignore or .git/info/exclude first" >&2
        exit 1
    fi
done

# Pinned: the versions of the CPU venv this kit was written against (DALI 2.4.0 and
# the dependencies its metadata names that the GPU image does not hold). Present there
# already, so not carried: numpy, packaging, six, pyyaml, typing-extensions, tqdm is
# carried anyway (small) as the brief asks; setuptools, wheel (pycuda's build).
WHEELS=(
    # DALI and its runtime
    nvidia-dali-cuda130==2.4.0
    astunparse==1.6.3
    gast==0.7.0
    optree==0.20.0
    nvtx==0.2.17
    makefun==1.16.0
    libcst==1.9.0
    nvidia-nvimgcodec-cu13==0.9.0.20
    nvidia-nvjpeg==13.3.2.43
    nvidia-nvjpeg2k-cu13==0.11.0.51
    nvidia-nvtiff-cu13==0.8.0.82
    nvidia-libnvcomp-cu13==5.3.0.16
    # the parquet writer
    polars==2.1.0
    polars-runtime-32==2.1.0
    tqdm==4.70.1
    # pycuda's run-time dependencies (pycuda itself is an sdist, below)
    pytools==2026.1.1
    platformdirs==4.14.8
    siphash24==1.9
    mako==1.4.3
)
SDISTS=(pycuda==2026.1)

PLATFORMS=()
for n in 28 27 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p .whl
for spec in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$spec"
done
# An sdist's metadata is prepared on download; without build isolation pip does not
# try to build pycuda's build requirements (numpy from source) here.
for spec in "${SDISTS[@]}"; do
    "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl "$spec"
done

# Exactly one file per project: two versions of one package stop the install there.
"$PY" - <<'EOF'
import collections, pathlib, re, sys
names = collections.Counter()
for f in pathlib.Path(".whl").iterdir():
    stem = f.name.split("-")[0] if f.suffix == ".whl" else re.sub(r"-[0-9].*$", "", f.name)
    names[re.sub(r"[-_.]+", "_", stem).lower()] += 1
dupes = [n for n, c in names.items() if c > 1]
if dupes:
    sys.exit(f"error: more than one file for {dupes} in .whl/; empty .whl/ and run again")
EOF

echo "Requires-Dist of the downloaded wheels (check that each non-extra need is present on the GPU machine or here):"
for w in .whl/*.whl; do
    reqs=$(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^Requires-Dist: //' | tr '\n' ';' || true)
    printf '  %-70s %s\n' "$(basename "$w")" "${reqs:-(none)}"
done

# Pack into groups of at most GROUP_MIB (first-fit, largest first); split what is larger.
rm -rf .carry
mkdir -p .carry
limit=$((GROUP_MIB * 1024 * 1024))
group=0
declare -A used
new_group() { group=$((group + 1)); dir=$(printf '.carry/%02d' "$group"); mkdir -p "$dir"; used[$dir]=0; }
while read -r size path; do
    name=$(basename "$path")
    if (( size > limit )); then
        tmp=$(mktemp -d)
        split -b "${GROUP_MIB}M" -d -a 2 "$path" "$tmp/$name.part-"
        for part in "$tmp"/*; do
            new_group
            mv "$part" "$dir/"
            used[$dir]=$(stat -c %s "$dir/$(basename "$part")")
        done
        rmdir "$tmp"
        continue
    fi
    placed=""
    for d in $(ls -d .carry/* 2>/dev/null); do
        if (( used[$d] + size <= limit )); then placed=$d; break; fi
    done
    if [[ -z "$placed" ]]; then new_group; placed=$dir; fi
    cp "$path" "$placed/"
    used[$placed]=$(( used[$placed] + size ))
done < <(find .whl -maxdepth 1 -type f -printf '%s %p\n' | sort -rn)

echo
echo "Files in .whl/:"
find .whl -maxdepth 1 -type f -printf '%s %f\n' | sort -rn | awk '{printf "  %8.1f MiB  %s\n", $1/1048576, $2; t+=$1} END {printf "  %8.1f MiB  total (%d files)\n", t/1048576, NR}'
echo
echo "Carry groups (one device call each, in order; see benchmarks/gpu_check/README.md):"
for d in .carry/*; do
    printf '  %s  %6.1f MiB  %s\n' "$d" "$(du -sb "$d" | awk '{print $1/1048576}')" "$(ls "$d" | tr '\n' ' ')"
done
echo "groups: $group"
