#!/usr/bin/env bash
# Builds pyradiomics 3.1.0 from its PyPI source distribution into the active Python.
# Why a script: the 3.1.0 sdist lacks radiomics/src/{cmatrices,cshape}.h (so a plain
# `pip install pyradiomics==3.1.0` fails to compile), and its versioneer reports 3.0.1a1
# when unpacked under pip's temporary name, so pip's version check rejects it.
set -euo pipefail
PY=${1:-python}
here=$(cd "$(dirname "$0")" && pwd)
if "$PY" -c "import radiomics, radiomics._cmatrices, radiomics._cshape" 2>/dev/null; then
  exit 0
fi
URL=https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/pyradiomics-3.1.0.tar.gz
SHA256=24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" - "$URL" "$work/pyradiomics-3.1.0.tar.gz" <<'PYEOF'
import sys, urllib.request
urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
PYEOF
echo "$SHA256  $work/pyradiomics-3.1.0.tar.gz" | sha256sum -c --quiet
tar xzf "$work/pyradiomics-3.1.0.tar.gz" -C "$work"
cp "$here/pyradiomics/cmatrices.h" "$here/pyradiomics/cshape.h" "$work/pyradiomics-3.1.0/radiomics/src/"
"$PY" -m pip install --no-build-isolation "$work/pyradiomics-3.1.0"
"$PY" -c "import radiomics._cmatrices, radiomics._cshape"
