#!/usr/bin/env bash
# Offline checks of the Azure deployment template (deploy/): both Bicep
# parsers, the parameters file against the template, property names against
# the Azure SDK models of the template's API versions, the deployment
# contract, and the checker's own tests. What is and is not validated:
# deploy/validate.py's header and README.md, "Deploy to Azure".
#
# Installs its tools into .tools/deploy-venv (gitignored) from
# deploy/requirements.txt, once; later runs reuse it while the pins are
# unchanged, and need no network.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.tools/deploy-venv
stamp="$venv/.requirements.sha256"
want=$(sha256sum deploy/requirements.txt | cut -d' ' -f1)

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  mkdir -p .tools
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian splits venv support out of python3.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3-venv
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check -r deploy/requirements.txt
  echo "$want" >"$stamp"
fi

"$venv/bin/python" deploy/validate.py
cd deploy && "../$venv/bin/python" -m unittest -q test_validate.py
