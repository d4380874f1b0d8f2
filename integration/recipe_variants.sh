# Sourced by the benchmark scripts: `variant NAME PARENT FIELD=VALUE...` queues a copy of the
# shipped recipe PARENT with the named fields changed and adds `--recipe NAME=PATH` to the
# array `extra`; `write_variants` then writes them all in one process
# (integration/recipe_variant.py --batch) into a temporary directory.
variants=$(mktemp -d)
extra=()
variant() {  # NAME PARENT FIELD=VALUE...
  local IFS=$'\t'
  echo "recipes/$2.yaml"$'\t'"$variants/$1.yaml"$'\t'"${*:3}" >> "$variants/batch.tsv"
  extra+=(--recipe "$1=$variants/$1.yaml")
}
write_variants() {
  if [ -f "$variants/batch.tsv" ]; then
    python integration/recipe_variant.py --batch "$variants/batch.tsv"
  fi
}
