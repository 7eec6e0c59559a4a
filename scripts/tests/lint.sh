#!/usr/bin/env bash
# The lints of what is not Rust or TypeScript: shellcheck on every shell script of the
# repository, actionlint on the GitHub workflows (it runs shellcheck on their `run:` blocks
# too), hadolint on every Dockerfile. Every finding fails, whatever its level: a check that
# must not apply is disabled in place, with a comment saying why.
#
# ShellCheck is Debian's; actionlint and hadolint come from the infrastructure checks'
# virtualenv (tools/infra-requirements.txt), whose python scripts/bootstrap writes to
# .mira-test.env as MIRA_INFRA_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "lint: $*" >&2; exit 1; }

[ -n "${MIRA_INFRA_PYTHON:-}" ] || \
  fail "MIRA_INFRA_PYTHON is not set: the python of the infrastructure checks' virtualenv (scripts/bootstrap writes it to .mira-test.env)"
bin=$(dirname "$MIRA_INFRA_PYTHON")
for tool in "$bin/actionlint" "$bin/hadolint"; do
  [ -x "$tool" ] || fail "$tool is missing: MIRA_INFRA_PYTHON ($MIRA_INFRA_PYTHON) is not a virtualenv with tools/infra-requirements.txt installed"
done
command -v shellcheck >/dev/null || fail "shellcheck is missing (Debian's package shellcheck; scripts/bootstrap installs it)"

# The repository's files (tracked, or new and not ignored): *.sh, and any file whose first line
# is a shell's shebang. Dockerfiles: Dockerfile and *.Dockerfile.
scripts=() dockerfiles=()
while IFS= read -r -d '' f; do
  [ -f "$f" ] || continue  # deleted in the work tree, not yet in the index
  case "$f" in
    */node_modules/*|node_modules/*) continue ;;
    *.sh) scripts+=("$f"); continue ;;
    Dockerfile|*/Dockerfile|*.Dockerfile) dockerfiles+=("$f"); continue ;;
  esac
  if head -n 1 "$f" 2>/dev/null | grep -qE '^#!\s*/(usr/)?bin/(env\s+)?(ba|da|k|z)?sh(\s|$)'; then scripts+=("$f"); fi
done < <(git ls-files -z --cached --others --exclude-standard)
[ ${#scripts[@]} -gt 0 ] || fail "found no shell script: is this a git checkout?"

# One run over all the scripts, from the root, so that a script sourcing another by its path
# from the root (`. scripts/lib/apt.sh`) is checked together with it.
shellcheck --color=never "${scripts[@]}"
echo "lint: shellcheck: ${#scripts[@]} scripts clean"

# Without arguments it finds every workflow under .github/workflows.
"$bin/actionlint" -no-color
echo "lint: actionlint: $(find .github/workflows \( -name '*.yml' -o -name '*.yaml' \) | wc -l) workflows clean (their run: blocks through shellcheck)"

if [ ${#dockerfiles[@]} -gt 0 ]; then
  "$bin/hadolint" --no-color --failure-threshold style "${dockerfiles[@]}"
fi
echo "lint: hadolint: ${#dockerfiles[@]} Dockerfiles clean"
echo "lint: ok"
