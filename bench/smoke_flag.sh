# Sourced by the GPU scripts: their one option, --smoke-test (sets SMOKE=true), and -h/--help (prints the
# script's header comment). Anything else is one line and exit 2.
SMOKE=false
for arg in "$@"; do
    case $arg in
        --smoke-test) SMOKE=true ;;
        -h|--help) sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "$(basename "$0"): unknown argument $arg (the one option is --smoke-test; the rest is environment)" >&2
           exit 2 ;;
    esac
done
