# Sourced by the benchmark scripts: `variant NAME PARENT FIELD=VALUE...` writes a copy of the
# shipped recipe PARENT with the named fields changed (integration/recipe_variant.py) into a
# temporary directory and adds `--recipe NAME=PATH` to the array `extra`.
variants=$(mktemp -d)
extra=()
variant() {  # NAME PARENT FIELD=VALUE...
  python integration/recipe_variant.py "recipes/$2.yaml" "$variants/$1.yaml" "${@:3}"
  extra+=(--recipe "$1=$variants/$1.yaml")
}
